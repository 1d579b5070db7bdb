"""A stand-in GPU on a CPU: the "meta" device, with a record of every operation that mixes it
with CPU tensors (each one raises on a real GPU).

:class:`FakeGPU` runs code that was asked to work on ``device="meta"``: meta tensors carry
shapes and dtypes only, so every operation is cheap, and this mode makes the few that need
values harmless (reading a number gives 0, or True for a boolean; copying to the CPU gives
zeros). An operation whose tensors sit on both devices, which a GPU refuses ("Expected all
tensors to be on the same device"), is recorded in ``mixed`` and then run on meta, so that one
test lists every place that forgot to move something.

What a GPU allows is not recorded: 0-dim CPU tensors (scalars) in any operation, CPU index
tensors for indexing, and copies between the devices.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten

_COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}


def _on(device: str):
    def move(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    return move


class FakeGPU(TorchDispatchMode):
    """See the module docstring. ``mixed``: names of the operations that mixed devices."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors)
        if func is aten._local_scalar_dense.default and on_meta:
            return True if tensors[0].dtype == torch.bool else 0
        if func in _COPIES and on_meta:
            return self._copy(func, args, kwargs)
        on_cpu = [t for t in tensors if t.device.type == "cpu" and t.ndim > 0]
        if on_meta and on_cpu:
            if func not in _INDEXING:
                self.mixed.append(str(func.overloadpacket.__name__))
            args, kwargs = tree_map(_on("meta"), (args, kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def _copy(func, args, kwargs):
        """A copy out of meta to the CPU holds zeros; every other copy runs as it is."""
        if func is aten._to_copy.default:
            source, target = args[0], kwargs.get("device", args[0].device)
            if source.device.type == "meta" and torch.device(target).type == "cpu":
                dtype = kwargs.get("dtype") or source.dtype
                return torch.zeros(source.shape, dtype=dtype)
            return func(*args, **kwargs)
        target, source = args[0], args[1]
        if target.device.type == "cpu" and source.device.type == "meta":
            return target.zero_() if func is aten.copy_.default else torch.zeros_like(target)
        return func(*args, **kwargs)
