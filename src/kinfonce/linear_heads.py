"""Linear classifier heads trained by SGD on features, several at once, fast on every device.

The protocol is the linear probe's (:mod:`kinfonce.probes`): mean cross-entropy, SGD with
momentum and weight decay as ``torch.optim.SGD`` computes them, a per-step cosine learning rate
to 0, a seeded batch order per epoch and a seeded ``nn.Linear`` initialisation per head. Heads
on different features (a trained encoder, a random one, raw pixels) share the batch order and
train in the same steps.

What makes it fast: a probe is tens of thousands of tiny steps, so their cost is per-operation
overhead, not arithmetic. The gradient of the cross-entropy of a linear head has a closed form,
``(softmax(x W^T + b) - onehot(y)) / B``, so a step is a few matrix products and one fused
update of all parameters, without autograd; everything a step reads (the batch indices, the
learning rate) is on the device, so on a GPU the step is captured once as a CUDA graph and
replayed. The same step function runs eagerly elsewhere; results on one device are the same for
a given seed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kinfonce.errors import DivergedError
from kinfonce.scoped import torch_seeded

__all__ = ["LinearHeads", "cosine_lrs", "train_on_features", "train_streamed"]


def cosine_lrs(lr: float, steps: int) -> list[float]:
    """Learning rate of each of ``steps`` steps: cosine from ``lr`` to 0 (closed form of
    ``CosineAnnealingLR(T_max=steps, eta_min=0)`` stepped once per step)."""
    return [0.5 * lr * (1.0 + math.cos(math.pi * t / steps)) for t in range(steps)]


def _seeded_head(feature_dim: int, num_classes: int, seed: int, device) -> nn.Linear:
    """``nn.Linear`` initialised on the CPU from its generator seeded with ``seed``, then moved;
    no generator is left changed."""
    with torch_seeded(seed):
        return nn.Linear(feature_dim, num_classes).to(device)


class LinearHeads:
    """The weights, biases and momentum buffers of several linear heads on one device.

    Args:
        feature_dims: input width of each head.
        num_classes: output width C of every head.
        seed: every head starts as ``nn.Linear`` initialised from torch's CPU generator seeded
            with ``seed``.
        momentum, weight_decay: SGD settings.
        device: where the parameters live.
    """

    def __init__(
        self,
        feature_dims: Sequence[int],
        num_classes: int,
        *,
        seed: int,
        momentum: float,
        weight_decay: float,
        device: str | torch.device,
    ) -> None:
        self.params: list[Tensor] = []
        for dim in feature_dims:
            head = _seeded_head(dim, num_classes, seed, device)
            self.params += [head.weight.detach().clone(), head.bias.detach().clone()]
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.num_classes = num_classes
        self.momentum, self.weight_decay = momentum, weight_decay

    def step(self, xs: Sequence[Tensor], y: Tensor, lr: Tensor) -> None:
        """One SGD step of every head on its batch ``xs[h]`` (B, F_h) with labels ``y`` (B,).

        ``lr`` is a 0-dim tensor on the device (so that a captured graph reads its new value).
        """
        grads = []
        for x, weight, bias in zip(xs, self.params[::2], self.params[1::2], strict=True):
            scores = torch.addmm(bias, x, weight.T).softmax(dim=1)
            scores[torch.arange(len(y), device=y.device), y] -= 1.0
            scores.div_(len(y))  # d(mean cross-entropy) / d logits
            grads += [scores.T @ x, scores.sum(dim=0)]
        # torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf
        torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
        torch._foreach_mul_(self.buffers, self.momentum)
        torch._foreach_add_(self.buffers, grads)
        torch._foreach_sub_(self.params, torch._foreach_mul(self.buffers, lr))

    def check_finite(self, lr: float) -> None:
        """Raise a DivergedError naming the head (0-based) whose weights are not finite."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).tolist()
        for head in range(len(finite) // 2):
            if not (finite[2 * head] and finite[2 * head + 1]):
                raise DivergedError(
                    f"linear probe {head} diverged (non-finite weights); lower lr (now {lr})"
                )

    def modules(self) -> list[nn.Linear]:
        """The heads as ``nn.Linear`` modules in eval mode."""
        heads = []
        for weight, bias in zip(self.params[::2], self.params[1::2], strict=True):
            head = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
            heads.append(head.eval())
        return heads


class _CachedLoop:
    """One training step of :class:`LinearHeads` on cached features, all inputs on the device:
    the epoch's batch order ``perm``, the position in it and the step count (which picks the
    learning rate) are tensors the step advances itself."""

    def __init__(self, heads: LinearHeads, xs: Sequence[Tensor], y: Tensor, lrs: list[float]):
        device = y.device
        self.heads, self.xs, self.y = heads, list(xs), y
        self.perm = torch.arange(len(y), device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.lrs = torch.tensor(lrs, dtype=torch.float32, device=device)
        self.offsets = torch.arange(len(y), device=device)

    def step(self, size: int) -> None:
        index = self.perm.index_select(0, self.offsets[:size] + self.position)
        xs = [x.index_select(0, index) for x in self.xs]
        lr = self.lrs.index_select(0, self.count).squeeze(0)
        self.heads.step(xs, self.y.index_select(0, index), lr)
        self.position += size
        self.count += 1

    def state(self) -> list[Tensor]:
        return [*self.heads.params, *self.heads.buffers, self.position, self.count]


class _Graphed:
    """``loop.step(size)`` captured as a CUDA graph (after one warm-up step whose effect is
    undone), replayed by calling it; made and called with the loop's GPU as current device."""

    def __init__(self, loop: _CachedLoop, size: int) -> None:
        saved = [t.clone() for t in loop.state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop.step(size)  # warm-up: cuBLAS handles and workspaces before capture
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(loop.state(), saved, strict=True):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loop.step(size)

    def __call__(self, size: int) -> None:
        self.graph.replay()


def train_on_features(
    heads: LinearHeads,
    xs: Sequence[Tensor],
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    graphs: bool | None = None,
    progress: bool = False,
) -> None:
    """Train ``heads`` on cached features ``xs[h]`` (N, F_h), labels ``y`` (N,), all on one device.

    Args:
        epochs, batch_size, lr: the protocol; the batch order is ``torch.randperm(N)`` of a CPU
            generator seeded with ``seed``, one per epoch; the last batch of an epoch is smaller
            when ``batch_size`` does not divide N.
        graphs: replay the step as a CUDA graph (default: on CUDA devices).
    """
    n = len(y)
    steps_per_epoch = math.ceil(n / batch_size)
    loop = _CachedLoop(heads, xs, y, cosine_lrs(lr, epochs * steps_per_epoch))
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    step: Callable[[int], None] = loop.step
    if graphs is None:
        graphs = y.device.type == "cuda"
    # the capture's streams and the replays belong to the features' GPU, which need not be the
    # current one (``kinfonce eval --device cuda:1``)
    with torch.cuda.device(y.device) if graphs else contextlib.nullcontext():
        if graphs:
            try:
                captured = {size: _Graphed(loop, size) for size in set(sizes)}
                step = lambda size: captured[size](size)  # noqa: E731
            except RuntimeError as err:  # a setup that cannot capture: the same steps, eagerly
                message = f"linear probe: CUDA graph capture failed ({err}); eager steps"
                warnings.warn(message, stacklevel=3)
        generator = torch.Generator().manual_seed(seed)
        for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
            loop.perm.copy_(torch.randperm(n, generator=generator))
            loop.position.zero_()
            for size in sizes:
                step(size)
            heads.check_finite(lr)


def train_streamed(
    heads: LinearHeads,
    batch_features: Callable[[Tensor], Sequence[Tensor]],
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
) -> None:
    """Train ``heads`` on features made per batch: ``batch_features(idx)`` maps (B,) indices (on
    the CPU) to one (B, F_h) tensor per head on the heads' device (e.g. augmented images through
    a frozen encoder). Same protocol and batch order as :func:`train_on_features`."""
    n = len(y)
    device = heads.params[0].device
    lrs = torch.tensor(cosine_lrs(lr, epochs * math.ceil(n / batch_size)), device=device)
    y = y.to(device)
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            heads.step(batch_features(idx), y[idx.to(device)], lrs[count])
            count += 1
        heads.check_finite(lr)
