"""Exponential kernels and their mixtures, evaluated as log-kernels from squared distances.

The paper's kernel (Eq. 7) is ``k(x, y) = exp(-||x - y||^gamma / tau)`` with ``0 < gamma <= 2``:
gamma = 2 is the Gaussian kernel of SimCLR, gamma = 1 the Laplacian kernel, gamma = 0.5 the third
row of Table 1. Section 5.2 mixes two of them in two ways, both provided here:

* Simple Sum Kernel: ``lam * k1(x, y) + (1 - lam) * k2(x, y)`` on the whole feature vector;
* Concatenation Sum Kernel: ``lam * k1(x_L, y_L) + (1 - lam) * k2(x_R, y_R)``, where ``x_L`` is the
  first half of the features and ``x_R`` the second half.

(Section 5.2 writes both with unit weights; a common factor cancels in the InfoNCE ratio, so
``lam = 0.5`` is the paper's kernel exactly.)

Everything works in the log domain: a kernel maps squared distances ``d^2`` to ``log k``, and a sum
of kernels is a ``logsumexp`` of weighted log-kernels. Forming ``exp(-d^gamma / tau)`` directly
underflows at small ``tau``; the log form never does.

Gradient convention at zero distance: for ``gamma < 2`` the derivative of ``d^gamma`` with respect to
``d^2`` is infinite at ``d = 0``. We take it to be 0 there, the value that keeps the gradient finite
and is symmetric in the two points (for ``gamma >= 1`` it is the limit or a subgradient of the
convex function ``d^gamma``). Pairs at distance exactly 0 therefore exert no force on each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kinfonce.errors import KinfonceError


def check_temperature(name: str, value: float) -> float:
    """Returns ``value`` as a float, or raises if it is not a finite positive number."""
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise KinfonceError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_weight(name: str, value: float) -> float:
    """Returns ``value`` as a float, or raises if it is not in [0, 1]."""
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise KinfonceError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def safe_pow(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for ``x >= 0`` whose gradient is 0 (not inf or nan) where ``x == 0``.

    A NaN stays NaN (it is not 0), so that a non-finite input gives a non-finite loss.
    """
    nonzero = x != 0
    return torch.where(nonzero, torch.where(nonzero, x, 1.0).pow(exponent), 0.0)


@dataclass(frozen=True)
class ExpKernel:
    """The exponential kernel ``exp(-||x - y||^gamma / temperature)`` of Eq. (7).

    Args:
        gamma: Power of the distance, in (0, 2].
        temperature: Scale ``tau > 0``.
    """

    gamma: float = 2.0
    temperature: float = 0.5

    def __post_init__(self) -> None:
        gamma = self.gamma
        if not isinstance(gamma, int | float) or not 0.0 < gamma <= 2.0:
            raise KinfonceError(f"gamma must be a number in (0, 2], got {gamma!r}")
        object.__setattr__(self, "gamma", float(gamma))
        object.__setattr__(self, "temperature", check_temperature("temperature", self.temperature))

    def log_kernel(self, sq_dist: Tensor) -> Tensor:
        """Log-kernel ``-d^gamma / tau`` of squared distances, any shape; differentiable."""
        sq_dist = sq_dist.clamp_min(0)
        if self.gamma == 2.0:
            return sq_dist / -self.temperature
        return safe_pow(sq_dist, self.gamma / 2) / -self.temperature


@dataclass(frozen=True)
class KernelTerm:
    """One weighted exponential kernel acting on one part of the features."""

    kernel: ExpKernel
    weight: float
    part: int


class MixtureKernel:
    """A weighted sum of exponential kernels, each on one of ``parts`` equal slices of the features.

    ``log K(x, y) = logsumexp_c(log w_c + log k_c(||x_{p(c)} - y_{p(c)}||^2))``. A single
    :class:`ExpKernel` is the mixture with one term of weight 1 on one part.

    Args:
        terms: The kernel terms; weights in [0, 1]; terms of weight 0 are dropped.
        parts: Number of equal consecutive slices the feature dimension is cut into.
    """

    def __init__(self, terms: Sequence[KernelTerm], parts: int = 1) -> None:
        if parts < 1:
            raise KinfonceError(f"parts must be >= 1, got {parts}")
        for term in terms:
            check_weight("weight", term.weight)
            if not 0 <= term.part < parts:
                raise KinfonceError(f"part must be in [0, {parts}), got {term.part}")
        kept = tuple(t for t in terms if t.weight > 0)
        if not kept:
            raise KinfonceError("a mixture kernel needs at least one term with weight > 0")
        self.terms = kept
        self.parts = parts
        self.log_weights = tuple(math.log(t.weight) for t in kept)

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{t.weight:g}*exp(gamma={t.kernel.gamma:g}, tau={t.kernel.temperature:g})"
            + (f" on part {t.part}" if self.parts > 1 else "")
            for t in self.terms
        )
        return f"MixtureKernel({inner})"

    @property
    def single(self) -> ExpKernel | None:
        """The kernel itself when this mixture is one unweighted exponential kernel."""
        if len(self.terms) == 1 and self.parts == 1 and self.terms[0].weight == 1.0:
            return self.terms[0].kernel
        return None

    def check_dim(self, dim: int) -> None:
        """Raises unless a feature dimension ``dim`` splits into ``parts`` equal slices."""
        if dim % self.parts:
            raise KinfonceError(
                f"the feature dimension must be divisible by {self.parts} for this kernel "
                f"(the concatenation kernel splits it in halves), got {dim}"
            )

    def split(self, z: Tensor) -> list[Tensor]:
        """(N, D) -> ``parts`` tensors of shape (N, D / parts)."""
        self.check_dim(z.shape[-1])
        return list(z.chunk(self.parts, dim=-1)) if self.parts > 1 else [z]

    def normalize(self, z: Tensor) -> Tensor:
        """Projects every part of every row of ``z`` (N, D) to the unit sphere."""
        if self.parts == 1:
            return F.normalize(z, dim=-1)
        return torch.cat([F.normalize(p, dim=-1) for p in self.split(z)], dim=-1)

    def log_kernel(self, sq_parts: Sequence[Tensor]) -> Tensor:
        """Log-kernel from the squared distances of every part (each of the same shape)."""
        logs = [
            lw + t.kernel.log_kernel(sq_parts[t.part])
            for lw, t in zip(self.log_weights, self.terms, strict=True)
        ]
        return logs[0] if len(logs) == 1 else torch.logsumexp(torch.stack(logs), dim=0)

    def pair_sq_dists(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Row-wise squared distances per part: x, y (N, D) -> ``parts`` tensors (N,)."""
        return [(a - b).pow(2).sum(-1) for a, b in zip(self.split(x), self.split(y), strict=True)]

    def log_pairs(self, x: Tensor, y: Tensor) -> Tensor:
        """Row-wise log-kernel ``log K(x_i, y_i)``: (N, D), (N, D) -> (N,)."""
        return self.log_kernel(self.pair_sq_dists(x, y))

    def log_gram(self, x: Tensor, y: Tensor) -> Tensor:
        """Log-kernel matrix ``log K(x_i, y_j)``: (N, D), (M, D) -> (N, M), from exact differences."""
        sq = [torch.cdist(a, b).pow(2) for a, b in zip(self.split(x), self.split(y), strict=True)]
        return self.log_kernel(sq)


def as_mixture(kernel: ExpKernel | MixtureKernel) -> MixtureKernel:
    """Wraps a single exponential kernel as a one-term mixture; mixtures pass through."""
    if isinstance(kernel, MixtureKernel):
        return kernel
    if isinstance(kernel, ExpKernel):
        return MixtureKernel([KernelTerm(kernel, 1.0, 0)])
    raise KinfonceError(
        f"kernel must be an ExpKernel or a MixtureKernel, got {type(kernel).__name__}"
    )


def simple_sum_kernel(
    temperature1: float = 0.5, temperature2: float = 0.5, lam: float = 0.5, gamma1: float = 1.0
) -> MixtureKernel:
    """Simple Sum Kernel of Section 5.2: ``lam * Laplacian(tau1) + (1 - lam) * Gaussian(tau2)``;
    ``gamma1`` replaces the first kernel's exponent 1 (the authors' search draws 0.5 or 1)."""
    lam = check_weight("lam", lam)
    return MixtureKernel(
        [
            KernelTerm(ExpKernel(gamma1, temperature1), lam, 0),
            KernelTerm(ExpKernel(2.0, temperature2), 1.0 - lam, 0),
        ]
    )


def concat_sum_kernel(
    temperature1: float = 0.5, temperature2: float = 0.5, lam: float = 0.5, gamma1: float = 1.0
) -> MixtureKernel:
    """Concatenation Sum Kernel of Section 5.2.

    ``lam * Laplacian(tau1)`` on the first half of the features plus ``(1 - lam) * Gaussian(tau2)``
    on the second half; ``gamma1`` replaces the first kernel's exponent 1. (Section 5.2 prints
    the Gaussian on the first half; Table 2 puts the Laplacian there. The two differ only in
    which half is which; we follow Table 2.)
    """
    lam = check_weight("lam", lam)
    return MixtureKernel(
        [
            KernelTerm(ExpKernel(gamma1, temperature1), lam, 0),
            KernelTerm(ExpKernel(2.0, temperature2), 1.0 - lam, 1),
        ],
        parts=2,
    )


def log_gram(x: Tensor, y: Tensor, kernel: ExpKernel | MixtureKernel) -> Tensor:
    """Log-kernel matrix ``log K(x_i, y_j)``: (N, D), (M, D) -> (N, M)."""
    return as_mixture(kernel).log_gram(x, y)
