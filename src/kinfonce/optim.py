"""Optimisers and the learning-rate schedule of the paper's Appendix B.

Appendix B trains with LARS (momentum 0.9, weight decay 1e-6, batch size 256) and a
LambdaLR schedule; here the schedule is a linear warm-up followed by cosine decay,
stepped once per optimiser step. Batch-norm parameters and biases are excluded from
weight decay and from the LARS trust ratio, as in SimCLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from kinfonce.errors import KinfonceError

#: Names accepted by :func:`build_optimizer`.
OPTIMIZERS = ("lars", "sgd", "adam")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017).

    For a parameter ``w`` with gradient ``g`` in a group with ``lars_adapt=True`` the
    update direction is ``trust * ||w|| / (||g|| + wd * ||w||) * (g + wd * w)``; groups
    with ``lars_adapt=False`` (batch-norm weights and biases) take a plain SGD step
    ``g + wd * w``. Momentum follows ``torch.optim.SGD`` (no dampening).

    Written here because torch has no LARS, and the copies in other libraries either
    come with a whole framework as a dependency (lightly, only a dev dependency of this
    project) or tie the adaptation to ``weight_decay != 0``, so that a run with weight
    decay 0 silently becomes plain SGD. The tests check that this class takes the same
    steps as ``lightly.utils.lars.LARS`` where both apply.

    Args:
        params: parameters or parameter groups; a group may set ``lars_adapt``.
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty added to the gradient.
        trust_coefficient: the trust coefficient eta of the ratio.
        eps: added to the ratio's denominator.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        for arg, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("trust_coefficient", trust_coefficient),
            ("eps", eps),
        ):
            if not value >= 0.0:
                raise KinfonceError(f"{arg} must be >= 0, got {value}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_adapt=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one optimisation step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                step = param.grad.add(param, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    param_norm = torch.linalg.vector_norm(param)
                    grad_norm = torch.linalg.vector_norm(param.grad)
                    ratio = group["trust_coefficient"] * param_norm
                    ratio = ratio / (grad_norm + group["weight_decay"] * param_norm + group["eps"])
                    usable = (param_norm > 0) & (grad_norm > 0)
                    step = step * torch.where(usable, ratio, torch.ones_like(ratio))
                if group["momentum"] != 0:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = step.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(step)
                    step = state["momentum_buffer"]
                param.add_(step, alpha=-group["lr"])
        return loss


def parameter_groups(
    module: nn.Module, weight_decay: float, *, exclude_bn_bias: bool = True
) -> list[dict]:
    """Split trainable parameters into decayed/adapted weights and the rest.

    With ``exclude_bn_bias``, parameters with at most one dimension (batch-norm weights and
    biases, linear and convolution biases) get no weight decay and ``lars_adapt=False``;
    without it, every parameter gets both (the authors' code's default).

    Returns:
        up to two parameter groups (empty groups are dropped).
    """
    weights, others = [], []
    for param in module.parameters():
        if param.requires_grad:
            (weights if param.ndim > 1 or not exclude_bn_bias else others).append(param)
    groups = [
        {"params": weights, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": others, "weight_decay": 0.0, "lars_adapt": False},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    name: str,
    groups: list[dict],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """Build an optimiser by name over parameter groups.

    Args:
        name: one of :data:`OPTIMIZERS`.
        groups: parameter groups, e.g. from :func:`parameter_groups`; their own
            ``weight_decay``/``lr`` entries override the defaults given here.
        lr: base learning rate.
        momentum: momentum for ``lars`` and ``sgd`` (Adam's beta1 is left at 0.9).
        weight_decay: default L2 penalty for groups that do not set one.
        trust_coefficient: LARS trust coefficient.

    Raises:
        ValueError: unknown name or a negative learning rate.
    """
    if name not in OPTIMIZERS:
        raise KinfonceError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    if not lr >= 0.0:
        raise KinfonceError(f"lr must be >= 0, got {lr}")
    if name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
        )
    # The LARS flag means nothing to torch's optimisers; drop it.
    plain = [{k: v for k, v in group.items() if k != "lars_adapt"} for group in groups]
    if name == "sgd":
        return torch.optim.SGD(plain, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(plain, lr=lr, weight_decay=weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor for ``torch.optim.lr_scheduler.LambdaLR``, one call per step.

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps,
    then cosine decay from 1 to 0 at ``total_steps``.

    Raises:
        ValueError: ``total_steps < 1`` or ``warmup_steps`` outside ``[0, total_steps)``.
    """
    if total_steps < 1:
        raise KinfonceError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise KinfonceError(f"warmup_steps must be in [0, {total_steps}), got {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
