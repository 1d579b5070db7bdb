"""TF32 on a CPU: the rounding an Ampere-or-later GPU applies to float32 matrix products.

With float32 matmul precision "high" (what training sets on CUDA) cuBLAS may run float32
matrix products on tensor cores in TF32: each input element keeps its 8-bit exponent and only
the top 10 of its 23 mantissa bits; products are accumulated in float32. :class:`EmulatedTF32`
applies that rounding (truncation by default, the worse of the two roundings the hardware may
use, or rounding to the nearest) to the
inputs of every matrix product run while cuBLAS's TF32 flag is on, so that a CPU shows what a
GPU would compute. Products at "highest" precision are left exact, as cuBLAS leaves them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Mantissa bits TF32 drops from a float32 (23 - 10).
DROPPED_BITS = 13

#: (op, positions of its matrix operands): the bias of addmm/baddbmm is added in float32.
_MATMULS = {
    aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.baddbmm.default: (1, 2),
}


def tf32_round(x: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """float32 ``x`` with its mantissa cut to TF32's 10 bits (same dtype and shape): truncated,
    or rounded to the nearest (ties away from zero) when ``nearest``."""
    bits = x.contiguous().view(torch.int32)
    if nearest:
        bits = bits + (1 << (DROPPED_BITS - 1))
    return (bits & ~((1 << DROPPED_BITS) - 1)).view(torch.float32).view_as(x)


def tf32_in_effect() -> bool:
    """True when cuBLAS would take TF32 for a float32 product: the flag it reads, which float32
    matmul precision "high" or "medium" sets."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


class EmulatedTF32(TorchDispatchMode):
    """Inside the block, float32 matrix products (forward and backward) round their matrix
    operands as TF32 does whenever :func:`tf32_in_effect` (truncated, or to the nearest when
    ``nearest``); ``self.rounded`` counts them."""

    def __init__(self, nearest: bool = False) -> None:
        super().__init__()
        self.rounded, self.nearest = 0, nearest

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _MATMULS.get(func)
        if operands and tf32_in_effect() and args[operands[0]].dtype == torch.float32:
            args = list(args)
            for index in operands:
                args[index] = tf32_round(args[index], self.nearest)
            self.rounded += 1
        return func(*args, **kwargs)
