"""Kernel-InfoNCE losses (Section 5.2, Eq. 8), their Table 2 mixtures, and spectral contrastive loss.

Two readings of "Simple Sum" and "Concatenation Sum" exist in the paper, and both are here:

* a mixture KERNEL inside one InfoNCE ratio (Section 5.2):
  ``KernelInfoNCE(kernel=simple_sum_kernel(...))``, ``-log K(q, p1) / sum_i K(q, p_i)`` with ``K`` a sum
  of kernels (presets ``simple-sum-kernel`` and ``concat-sum-kernel``);
* a mixture of LOSSES, as the experiments use it (Appendix B, Table 2):
  ``lam * C(gamma=1, tau1) + (1 - lam) * C(gamma=2, tau2)``, a weighted sum of two Kernel-InfoNCE
  losses, :class:`LossMixture` (presets ``simple-sum`` and ``concat-sum``).

Every sum preset takes ``gamma1``, the exponent of its first term (1, the Laplacian, by
default): the authors' search draws it from {0.5, 1}.

The paper's Tables 1 and 4 were measured with the second reading.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kinfonce.errors import KinfonceError
from kinfonce.kernel_lse import (
    KEPT_BLOCK_MATRICES,
    check_path,
    kernel_logsumexp,
    kernel_nll,
    resolve_path,
)
from kinfonce.kernels import (
    ExpKernel,
    KernelTerm,
    MixtureKernel,
    as_mixture,
    check_weight,
    concat_sum_kernel,
    simple_sum_kernel,
)


def check_embeddings(*, check_finite: bool = True, **named: Tensor) -> None:
    """Raises a ValueError naming the argument unless all tensors are finite, non-empty float (N, D)
    matrices of one dtype and device with the same D.

    ``check_finite=False`` leaves out the finiteness test, the one check that waits for a GPU
    (a host synchronisation); non-finite inputs then give a non-finite loss."""
    ref_name, ref = next(iter(named.items()))
    for name, z in named.items():
        if not isinstance(z, Tensor):
            raise KinfonceError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 2:
            raise KinfonceError(
                f"{name} must have shape (N, D) with 2 dims, got shape {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise KinfonceError(f"{name} must be a floating point tensor, got dtype {z.dtype}")
        if z.dtype != ref.dtype or z.device != ref.device:
            raise KinfonceError(
                f"{name} must have the dtype and device of {ref_name} ({ref.dtype}, {ref.device}), "
                f"got {z.dtype}, {z.device}"
            )
        if z.shape[1] != ref.shape[1]:
            raise KinfonceError(
                f"{name} must have the feature dimension of {ref_name} ({ref.shape[1]}), "
                f"got shape {tuple(z.shape)}"
            )
        if z.shape[0] == 0:
            raise KinfonceError(
                f"{name} is empty (shape {tuple(z.shape)}); it needs at least 1 row"
            )
        if check_finite and not torch.isfinite(z).all():
            raise KinfonceError(f"{name} contains non-finite values (nan or inf)")


def _check_same_shape(z0: Tensor, z1: Tensor) -> None:
    if z0.shape != z1.shape:
        raise KinfonceError(
            f"z0 and z1 must have the same shape (N, D), got {tuple(z0.shape)} and {tuple(z1.shape)}"
        )


def gather_with_grad(z: Tensor) -> tuple[Tensor, int]:
    """All-gathers ``z`` (n, D) from every rank with gradient: returns ((world * n, D), rank).

    Needs the same ``n`` on every rank. The backward pass sums the gradients of all ranks
    (``torch.distributed.nn.all_gather``), so each rank's gradient is ``world_size`` times the
    gradient of the mean loss over all ranks; data-parallel training, which averages gradients over
    ranks, gets exactly the full-batch gradient. Without an initialised process group the world is
    this one process, as in lightly's and solo-learn's losses: ``(z, 0)``, so that one training
    script runs on one device and on many.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0), dist.get_rank()


class KernelInfoNCE(nn.Module):
    """Kernel-InfoNCE loss (Eq. 8) with an exponential kernel (Eq. 7) or a mixture kernel.

    Three forms, all returning the mean over anchors of ``log sum_j K(q, p_j) - log K(q, p_pos)``:

    * two views (Algorithm 2, SimCLR): ``loss(z0, z1)`` with z0, z1 (N, D); 2N anchors, each with
      its other view as positive and the other 2N - 2 embeddings as negatives;
    * queue (MoCo): ``loss(z0, z1, queue=Q)`` with Q (M, D): N anchors z0, positives z1 (the keys),
      negatives the M rows of Q;
    * bipartite (CLIP, Section 4, Theorem 4.2): ``bipartite=True``, ``loss(a, b)`` with N pairs
      (a_i, b_i): anchors a_i against all b_j and anchors b_i against all a_j, 2N anchors.

    Args:
        gamma: Distance power of the exponential kernel, in (0, 2]. Ignored if ``kernel`` is given.
        temperature: Kernel temperature tau > 0. Ignored if ``kernel`` is given.
        kernel: An :class:`ExpKernel` or :class:`MixtureKernel` (e.g. ``simple_sum_kernel()``).
        normalize: Project embeddings (each part, for a concatenation kernel) to the unit sphere.
        bipartite: Use the CLIP form.
        chunk_size: Anchor rows per block of the blocked path; same values and gradients,
            O(N * chunk_size) memory. None: one block up to 2^27 anchor-candidate pairs
            (2N = 11,585), blocks beyond.
        gather_distributed: Gather the in-batch candidates of all ranks (with gradient) under
            torch.distributed; without a process group, the batch itself (a world of one). The
            queue form gathers nothing: its negatives are the queue.
        positive_in_denominator: Count the positive in the denominator (Eq. 8). False, for the
            queue form only, sums over the queue's negatives alone, as the paper's MoCo code
            does: ``-log K(q, k) / sum_m K(q, Q_m)``.
        path: "auto" (default), "fused" or "blocked": how the rows are computed
            (:func:`kinfonce.kernel_lse.resolve_path`); values agree to float32 rounding.
        check_finite: Raise on non-finite inputs. The check waits for the GPU (a host
            synchronisation); a training loop that checks its loss can turn it off.

    Raises (when called):
        ValueError: an empty input, or fewer than 2 pairs in the two-view and bipartite forms
            (one pair has no negatives, and its loss would be 0 whatever the embeddings).

    Note:
        The Gaussian kernel at temperature tau on unit vectors equals NT-Xent (SimCLR's loss) at
        temperature tau / 2, since ``||a - b||^2 = 2 - 2 a.b``.
    """

    out_dim_multiple = 1

    def __init__(
        self,
        gamma: float = 2.0,
        temperature: float = 0.5,
        *,
        kernel: ExpKernel | MixtureKernel | None = None,
        normalize: bool = True,
        bipartite: bool = False,
        chunk_size: int | None = None,
        gather_distributed: bool = False,
        positive_in_denominator: bool = True,
        path: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.kernel = as_mixture(ExpKernel(gamma, temperature) if kernel is None else kernel)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise KinfonceError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
        check_path(path, chunk_size)
        self.out_dim_multiple = self.kernel.parts
        self.normalize = normalize
        self.bipartite = bipartite
        self.chunk_size = chunk_size
        self.gather_distributed = gather_distributed
        self.positive_in_denominator = positive_in_denominator
        self.path = path
        self.check_finite = check_finite
        self._index_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel}, normalize={self.normalize}, bipartite={self.bipartite}, "
            f"chunk_size={self.chunk_size}, gather_distributed={self.gather_distributed}, "
            f"positive_in_denominator={self.positive_in_denominator}, path={self.path!r}"
        )

    def forward(self, z0: Tensor, z1: Tensor, queue: Tensor | None = None) -> Tensor:
        """Loss of a batch.

        Args:
            z0: (N, D) embeddings of the first view (anchors / queries / modality a).
            z1: (N, D) embeddings of the second view (positives / keys / modality b).
            queue: Optional (M, D) negatives (MoCo memory bank); not with ``bipartite``.

        Returns:
            Scalar mean loss over the anchors.
        """
        if queue is None:
            check_embeddings(z0=z0, z1=z1, check_finite=self.check_finite)
            if not self.positive_in_denominator:
                raise KinfonceError(
                    "positive_in_denominator=False needs the queue (MoCo) form: pass queue=, "
                    "or keep the positive in the denominator"
                )
        else:
            check_embeddings(z0=z0, z1=z1, queue=queue, check_finite=self.check_finite)
            if self.bipartite:
                raise KinfonceError("queue must be None for the bipartite (CLIP) form")
        _check_same_shape(z0, z1)
        self.kernel.check_dim(z0.shape[1])
        if z0.dtype in (torch.float16, torch.bfloat16):  # normalise and compare in float32
            z0, z1 = z0.float(), z1.float()
            queue = None if queue is None else queue.float()
        if queue is None and not self.bipartite:
            return self._two_view_loss(z0, z1)  # normalises the concatenated views at once
        z0, z1 = self._normalized(z0), self._normalized(z1)
        if queue is not None:
            return self._queue_loss(z0, z1, self._normalized(queue))
        return self._bipartite_loss(z0, z1)

    def _normalized(self, z: Tensor) -> Tensor:
        return self.kernel.normalize(z) if self.normalize else z

    def _gather(self, z: Tensor) -> tuple[Tensor, int]:
        return gather_with_grad(z) if self.gather_distributed else (z, 0)

    def _rows(self, anchors: Tensor, cands: Tensor, self_idx, pos_idx) -> Tensor:
        return kernel_nll(
            anchors,
            cands,
            self.kernel,
            self_idx=self_idx,
            pos_idx=pos_idx,
            path=self.path,
            chunk_size=self.chunk_size,
        )

    def _two_view_indices(self, n: int, total: int, rank: int, device) -> tuple[Tensor, Tensor]:
        """(self_idx, pos_idx), each (2n,), made once per batch shape (no per-step kernels)."""
        key = (n, total, rank, str(device))
        if key not in self._index_cache:
            local = torch.arange(n, device=device) + rank * n
            self._index_cache[key] = (
                torch.cat([local, local + total]),
                torch.cat([local + total, local]),
            )
        return self._index_cache[key]

    @staticmethod
    def _check_negatives(total: int) -> None:
        if total < 2:
            raise KinfonceError(
                f"the batch must hold at least 2 pairs (N >= 2, over all processes), got {total}: "
                "with one pair an anchor has no negatives and the loss is 0 whatever the embeddings"
            )

    def _two_view_loss(self, z0: Tensor, z1: Tensor) -> Tensor:
        all0, rank = self._gather(z0)
        all1, _ = self._gather(z1)
        self._check_negatives(all0.shape[0])
        self_idx, pos_idx = self._two_view_indices(z0.shape[0], all0.shape[0], rank, z0.device)
        anchors = self._normalized(torch.cat([z0, z1]))
        # one process: the same rows (normalising rows commutes with gathering them)
        cands = anchors if all0 is z0 else self._normalized(torch.cat([all0, all1]))
        return self._rows(anchors, cands, self_idx, pos_idx).mean()

    def _bipartite_loss(self, a: Tensor, b: Tensor) -> Tensor:
        all_a, rank = self._gather(a)
        all_b, _ = self._gather(b)
        self._check_negatives(all_a.shape[0])
        pos = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
        a_to_b = self._rows(a, all_b, None, pos)
        b_to_a = self._rows(b, all_a, None, pos)
        return torch.cat([a_to_b, b_to_a]).mean()

    def _queue_loss(self, q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
        chunk = self.chunk_size
        single = self.kernel.single is not None
        path = resolve_path(
            self.path, q.shape[0], queue.shape[0], q.device, chunk, single, KEPT_BLOCK_MATRICES
        )
        if path == "fused":
            chunk = q.shape[0]  # one block, kept for the backward pass
        lse_neg, _ = kernel_logsumexp(q, queue, self.kernel, chunk_size=chunk)
        lpos = self.kernel.log_pairs(q, k)
        lse = torch.logaddexp(lse_neg, lpos) if self.positive_in_denominator else lse_neg
        return (lse - lpos).mean()


class LossMixture(nn.Module):
    """Weighted sum of losses, Table 2: ``sum_c w_c * loss_c(z0, z1)``.

    With ``split_features=True`` the features are cut into equal consecutive parts and loss ``c``
    sees part ``c`` only (Table 2's Concatenation Sum: ``z_L`` to the first loss, ``z_R`` to the
    second); otherwise every loss sees the whole embedding (Table 2's Sum).

    Args:
        losses: The component losses, each called as ``loss(z0, z1, queue=None)``.
        weights: Their weights, each in [0, 1].
        split_features: Give each loss its own slice of the features.
        normalize_whole: Put each whole row on the unit sphere before it is split (the paper's
            code for Concatenation Sum); the component losses should then not normalise again.
        check_finite: With ``normalize_whole``, raise on non-finite inputs (a host
            synchronisation on a GPU); the components check their own inputs as they are set.
    """

    def __init__(
        self,
        losses: Sequence[nn.Module],
        weights: Sequence[float],
        *,
        split_features: bool = False,
        normalize_whole: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if len(losses) != len(weights) or not losses:
            raise KinfonceError(
                f"losses and weights must be non-empty and of equal length, got {len(losses)} "
                f"losses and {len(weights)} weights"
            )
        self.weights = [check_weight("weight", w) for w in weights]
        self.losses = nn.ModuleList(losses)
        self.split_features = split_features
        self.normalize_whole = normalize_whole
        self.check_finite = check_finite
        self.out_dim_multiple = len(losses) if split_features else 1

    @property
    def kernel(self) -> MixtureKernel:
        """The mixture kernel ``sum_c w_c K_c`` of the weighted component kernels.

        Each component's kernel acts on its own slice of the features when they are split.
        It ranks candidates the way the mixture trains them to be ranked (used by
        zero-shot classification); the loss itself stays a weighted sum of losses.

        Raises:
            KinfonceError: a component has no kernel (e.g. the spectral contrastive loss).
        """
        terms = []
        for index, (weight, loss) in enumerate(zip(self.weights, self.losses, strict=True)):
            if not isinstance(getattr(loss, "kernel", None), MixtureKernel):
                raise KinfonceError(
                    f"component {index} of the mixture ({type(loss).__name__}) has no kernel"
                )
            for term in loss.kernel.terms:
                part = index if self.split_features else term.part
                terms.append(KernelTerm(term.kernel, weight * term.weight, part))
        return MixtureKernel(terms, parts=self.out_dim_multiple)

    def _parts(self, z: Tensor | None) -> list[Tensor | None]:
        if z is None or not self.split_features:
            return [z] * len(self.losses)
        if z.ndim != 2 or z.shape[1] % len(self.losses):
            raise KinfonceError(
                f"the feature dimension must be divisible by {len(self.losses)} to split it "
                f"between the losses, got shape {tuple(z.shape)}"
            )
        return list(z.chunk(len(self.losses), dim=1))

    def forward(self, z0: Tensor, z1: Tensor, queue: Tensor | None = None) -> Tensor:
        """(N, D), (N, D), optional (M, D) -> scalar weighted sum of the component losses."""
        if self.normalize_whole:
            named = {"z0": z0, "z1": z1} if queue is None else {"z0": z0, "z1": z1, "queue": queue}
            check_embeddings(**named, check_finite=self.check_finite)
            z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
            queue = None if queue is None else F.normalize(queue, dim=1)
        parts = zip(self._parts(z0), self._parts(z1), self._parts(queue), strict=True)
        terms = [
            w * loss(a, b, queue=q)
            for w, loss, (a, b, q) in zip(self.weights, self.losses, parts, strict=True)
            if w > 0
        ]
        return torch.stack(terms).sum()


#: The spectral loss's default cap ``mu`` (docs/benchmarks.md: its measured choice).
SPECTRAL_MU = 3.0


class SpectralContrastiveLoss(nn.Module):
    """Spectral contrastive loss (HaoChen et al., 2021), a baseline with the same call signature.

    ``L = -2/N sum_i z0_i . z1_i + 1/(N (N - 1)) sum_{i != j} (z0_i . z1_j)^2``.

    Args:
        mu: An embedding whose norm exceeds ``sqrt(mu)`` is scaled onto the sphere of that radius
            before the sums, as in HaoChen et al.'s reference code (which uses ``mu = 1``);
            shorter ones are left as they are. The default, :data:`SPECTRAL_MU`, trained better here (digits and
            a CIFAR-10 subset; 30 and above collapsed; docs/benchmarks.md). ``None`` leaves
            every norm free, which lets the squared term grow without bound and diverge.
        gather_distributed: Gather both views from all ranks (with gradient) before the sums.
        check_finite: Raise on non-finite inputs (a host synchronisation on a GPU).
    """

    out_dim_multiple = 1

    def __init__(
        self,
        *,
        mu: float | None = SPECTRAL_MU,
        gather_distributed: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if mu is not None and not (math.isfinite(mu) and mu > 0):
            raise KinfonceError(f"mu must be a finite number > 0 or None, got {mu!r}")
        self.mu = mu
        self.gather_distributed = gather_distributed
        self.check_finite = check_finite

    def forward(self, z0: Tensor, z1: Tensor, queue: Tensor | None = None) -> Tensor:
        """(N, D), (N, D) -> scalar. ``queue`` is not supported (a clear error if given)."""
        if queue is not None:
            raise KinfonceError(
                "queue must be None: the spectral contrastive loss has no queue form"
            )
        check_embeddings(z0=z0, z1=z1, check_finite=self.check_finite)
        _check_same_shape(z0, z1)
        if self.mu is not None:
            z0, z1 = self._capped(z0), self._capped(z1)
        if self.gather_distributed:
            z0, _ = gather_with_grad(z0)
            z1, _ = gather_with_grad(z1)
        n = z0.shape[0]
        attraction = -2.0 * (z0 * z1).sum(1).mean()
        if n < 2:
            return attraction
        sim = z0 @ z1.T
        off_diag = sim.pow(2).sum() - sim.diagonal().pow(2).sum()
        return attraction + off_diag / (n * (n - 1))

    def _capped(self, z: Tensor) -> Tensor:
        """(N, D) -> (N, D): rows longer than ``sqrt(mu)`` scaled down to that length."""
        radius = math.sqrt(self.mu)
        return z * (radius / z.norm(dim=1, keepdim=True).clamp_min(radius))


def _exponential(temperature: float = 0.5, gamma: float = 2.0, **common) -> KernelInfoNCE:
    return KernelInfoNCE(kernel=ExpKernel(gamma, temperature), **common)


def _gaussian(temperature: float = 0.5, **common) -> KernelInfoNCE:
    return _exponential(temperature, 2.0, **common)


def _laplacian(temperature: float = 0.5, **common) -> KernelInfoNCE:
    return _exponential(temperature, 1.0, **common)


def _exp_half(temperature: float = 0.5, **common) -> KernelInfoNCE:
    return _exponential(temperature, 0.5, **common)


def _table2_mixture(
    temperature1: float,
    temperature2: float,
    lam: float,
    gamma1: float,
    common: dict,
    split: bool,
    normalize_whole: bool = False,
) -> LossMixture:
    lam = check_weight("lam", lam)
    if normalize_whole:
        common = {**common, "normalize": False}
    return LossMixture(
        [_exponential(temperature1, gamma1, **common), _gaussian(temperature2, **common)],
        [lam, 1.0 - lam],
        split_features=split,
        normalize_whole=normalize_whole,
        check_finite=common.get("check_finite", True),
    )


def _simple_sum(
    temperature1: float = 0.5,
    temperature2: float = 0.5,
    lam: float = 0.5,
    gamma1: float = 1.0,
    **common,
):
    return _table2_mixture(temperature1, temperature2, lam, gamma1, common, split=False)


#: Where Concatenation Sum puts its embedding on the unit sphere: each half (kinfonce's
#: default, so that each kernel sees unit vectors as in Section 2), or the whole 256-d
#: embedding before it is split (the paper's code, whose projection head normalises).
CONCAT_NORMALIZATIONS = ("halves", "whole")


def _concat_sum(
    temperature1: float = 0.5,
    temperature2: float = 0.5,
    lam: float = 0.5,
    gamma1: float = 1.0,
    concat_normalization: str = "halves",
    **common,
):
    if concat_normalization not in CONCAT_NORMALIZATIONS:
        raise KinfonceError(
            f"concat_normalization must be one of {list(CONCAT_NORMALIZATIONS)}, "
            f"got {concat_normalization!r}"
        )
    whole = concat_normalization == "whole" and common.get("normalize", True)
    return _table2_mixture(
        temperature1, temperature2, lam, gamma1, common, True, normalize_whole=whole
    )


def _simple_sum_kernel(
    temperature1: float = 0.5,
    temperature2: float = 0.5,
    lam: float = 0.5,
    gamma1: float = 1.0,
    **common,
) -> KernelInfoNCE:
    kernel = simple_sum_kernel(temperature1, temperature2, lam, gamma1)
    return KernelInfoNCE(kernel=kernel, **common)


def _concat_sum_kernel(
    temperature1: float = 0.5,
    temperature2: float = 0.5,
    lam: float = 0.5,
    gamma1: float = 1.0,
    **common,
) -> KernelInfoNCE:
    kernel = concat_sum_kernel(temperature1, temperature2, lam, gamma1)
    return KernelInfoNCE(kernel=kernel, **common)


def _spectral(
    mu: float | None = SPECTRAL_MU, gather_distributed: bool = False, check_finite: bool = True
) -> SpectralContrastiveLoss:
    return SpectralContrastiveLoss(
        mu=mu, gather_distributed=gather_distributed, check_finite=check_finite
    )


#: Loss presets by name: Table 1 rows (Table 2's definitions), Section 5.2's mixture kernels, and
#: the spectral contrastive baseline.
LOSS_PRESETS: dict[str, Callable[..., nn.Module]] = {
    "gaussian": _gaussian,
    "laplacian": _laplacian,
    "exp-0.5": _exp_half,
    "exponential": _exponential,
    "simple-sum": _simple_sum,
    "concat-sum": _concat_sum,
    "simple-sum-kernel": _simple_sum_kernel,
    "concat-sum-kernel": _concat_sum_kernel,
    "spectral": _spectral,
}

_COMMON = (
    "normalize",
    "bipartite",
    "chunk_size",
    "gather_distributed",
    "positive_in_denominator",
    "path",
    "check_finite",
)

#: Every kernel or loss parameter some preset takes (``mu``: spectral's), in display order.
LOSS_PARAMETERS = ("gamma", "temperature", "gamma1", "temperature1", "temperature2", "lam", "mu")


def preset_defaults(name: str, names: Sequence[str] = LOSS_PARAMETERS) -> dict[str, Any]:
    """The defaults of a preset's own parameters among ``names`` (default: its kernel
    parameters), e.g. ``{"temperature": 0.5}``."""
    preset_params(name)  # checks the name
    params = inspect.signature(LOSS_PRESETS[name]).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name in names and p.default is not inspect.Parameter.empty
    }


def preset_params(name: str) -> tuple[str, ...]:
    """Keyword arguments a preset accepts, its own first, then the common ones it takes."""
    if name not in LOSS_PRESETS:
        known = ", ".join(sorted(LOSS_PRESETS))
        raise KinfonceError(f"unknown loss preset {name!r}; known presets: {known}")
    params = inspect.signature(LOSS_PRESETS[name]).parameters.values()
    own = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return own + _COMMON
    return own


def make_loss(name: str, **params) -> nn.Module:
    """Builds a loss module by preset name (see :data:`LOSS_PRESETS`).

    A parameter the preset does not take raises a ValueError rather than being silently ignored.

    Args:
        name: One of ``LOSS_PRESETS``.
        **params: The preset's parameters (``preset_params(name)``), e.g. ``temperature``, or
            ``temperature1``, ``temperature2``, ``lam``; and ``normalize``, ``chunk_size``,
            ``gather_distributed``, ``path``, ``check_finite``.
    """
    allowed = preset_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise KinfonceError(
            f"loss preset {name!r} takes no parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    return LOSS_PRESETS[name](**params)
