"""Fused, blocked log-sum-exp of a log-kernel matrix: the inner loop of every Kernel-InfoNCE loss.

For anchors ``A`` (Na, D) and candidates ``C`` (Nc, D) it returns, per anchor row ``i``,

* ``lse_i = log sum_{j != self(i)} K(A_i, C_j)`` (the denominator of Eq. 8, in log form), and
* ``lpos_i = log K(A_i, C_{pos(i)})`` (the numerator),

without ever holding the (Na, Nc) matrix: rows are processed in blocks of ``chunk_size``, and the
backward pass recomputes each block. The gradient has a closed form: with ``P`` the row softmax,
``G_ij = (g_lse_i P_ij + g_pos_i [j = pos(i)]) * dlog K / d(d^2)_ij``, and since
``d(d^2_ij)/dA_i = 2 (A_i - C_j)``, the gradients are two matrix products per block:
``dA = 2 (rowsum(G) * A - G C)`` and ``dC = 2 (colsum(G) * C - G^T A)``.

Autograd over the same expression keeps every elementwise intermediate of the whole matrix and is
both slower and O(Na * Nc) in memory (measured at 2N = 2048, D = 128 on 2 CPU cores: 90-118 ms per
forward and backward, against 50-85 ms for the literal formula of Algorithm 2, which
``benchmarks/loss_speed.py`` times beside this one); that is the reason this is a hand-written
``torch.autograd.Function``.

Squared distances come from ``|a|^2 + |c|^2 - 2 a.c`` (one matrix product), clamped at 0; the
positive pair's entry is recomputed from the exact difference ``|a - c|^2``, so identical views give
exactly 0 (the expansion's rounding would give ~1e-7, which ``d^gamma`` with small gamma amplifies).

Both passes run in float32 with autocast off and float32 matrix products at full precision
("highest"), whatever the caller set (:func:`exact_float32`): a backward pass called inside
autocast would otherwise run its products in half precision, and on a GPU with TF32 (the
"high" precision training sets on CUDA) ``|a|^2 + |c|^2 - 2 a.c`` loses the small distances
that ``d^gamma`` and its ``1 / d`` amplify (docs/architecture.md, "TF32 and the loss").

Two paths compute the same values (:func:`kernel_nll` chooses, see :func:`resolve_path`):

* ``"blocked"``: the row blocks above, O(Na * chunk) memory, each block recomputed in the backward
  pass when there are several;
* ``"fused"``: for one exponential kernel and a positive per row, the whole matrix at once with
  ``log_softmax`` (one fused pass, as NT-Xent's ``cross_entropy`` uses) and a closed-form backward
  of two matrix products. It keeps two (Na, Nc) float32 matrices, fewer than NT-Xent's
  ``cross_entropy`` on the masked logit matrix, and makes fewer passes over them than the blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kinfonce.errors import KinfonceError
from kinfonce.kernels import ExpKernel, MixtureKernel
from kinfonce.scoped import matmul_precision

_TINY = torch.finfo(torch.float32).tiny
#: Largest block, in anchor-candidate pairs, when no chunk size is given (512 MiB per float32 matrix).
AUTO_BLOCK_PAIRS = 2**27
#: The ways of computing the loss rows; "auto" picks one per call (:func:`resolve_path`).
PATHS = ("auto", "fused", "blocked")
#: (Na, Nc) float32 matrices the fused path holds at its peak (NT-Xent's cross_entropy holds three).
FUSED_MATRICES = 2
#: (Na, Nc) float32 matrices one block kept for the backward pass holds: squared distances,
#: log-kernel and shifted exponentials (the queue form's "fused" path, see ``KernelInfoNCE``).
KEPT_BLOCK_MATRICES = 3
#: On a GPU, "auto" fuses while those matrices take at most this share of the memory still
#: available to this process (free on the device plus what torch's allocator holds unused).
FUSED_MEMORY_SHARE = 0.25
#: Rows of the fused backward's elementwise work per pass for gamma != 2 (bounds its temporary).
_FACTOR_BLOCK_PAIRS = 2**26


def exact_float32(function: Callable) -> Callable:
    """Runs an autograd Function's ``forward(ctx, tensor, ...)`` or ``backward(ctx, grad, ...)``
    with autocast off on the device of its first tensor and float32 matrix products at
    "highest" precision (set through ``torch.set_float32_matmul_precision``, the API training
    sets "high" with: torch refuses a mix of it and the per-backend one).

    ``torch.amp.custom_fwd`` / ``custom_bwd`` would do the autocast part for one device type
    fixed when decorating; these Functions run on any device.
    """

    @functools.wraps(function)
    def wrapped(ctx, first: Tensor, *rest):
        with torch.autocast(first.device.type, enabled=False), matmul_precision("highest"):
            return function(ctx, first, *rest)

    return wrapped


def _powered(sq: Tensor, gamma: float) -> Tensor:
    """``d^gamma`` from ``d^2`` (a new tensor, except for gamma = 2); sqrt is far cheaper than pow."""
    if gamma == 2.0:
        return sq
    if gamma == 1.0:
        return sq.sqrt()
    if gamma == 0.5:
        return sq.sqrt().sqrt_()
    return sq.pow(gamma / 2)


def _block_logits(kernel: MixtureKernel, sq_parts: list[Tensor]) -> Tensor:
    """(B, Nc) log-kernel of a block (a new tensor, safe to modify)."""
    single = kernel.single
    if single is None:
        return kernel.log_kernel(sq_parts)
    powered = _powered(sq_parts[0], single.gamma)
    if powered is sq_parts[0]:
        return powered.mul(-1.0 / single.temperature)
    return powered.mul_(-1.0 / single.temperature)


class _Block:
    """One block of rows: squared distances, logits, and the shifted exponentials of its rows.

    ``exps = exp(logit - shift)`` with the row maximum as shift, so that ``sums = exps.sum(1)``
    and ``lse = shift + log(sums)``; the excluded (self) entries hold the lowest finite logit and
    an exponential of exactly 0.
    """

    def __init__(self, kernel, sq, rows, self_idx, pos):
        self.sq, self.rows, self.pos, self.self_idx = sq, rows, pos, self_idx
        self.logit = _block_logits(kernel, sq)
        self.lpos = self.logit[rows, pos] if pos is not None else None
        if self_idx is not None:  # the lowest finite value, so that 0 * logit stays 0
            self.logit[rows, self_idx] = torch.finfo(self.logit.dtype).min
        shift = self.logit.amax(dim=1, keepdim=True)
        self.exps = (self.logit - shift).exp_()
        self.sums = self.exps.sum(dim=1)
        self.lse = shift.squeeze(1) + self.sums.log()

    def grad_weights(self, kernel, grad_lse, grad_lpos) -> list[tuple[Tensor, float]]:
        """Per part, ``(G, scale)`` with dL/d(d^2) = scale * G, (B, Nc); consumes the block."""
        weights = self.exps.mul_((grad_lse / self.sums).unsqueeze(1))  # row softmax * grad
        if self.pos is not None:
            weights[self.rows, self.pos] += grad_lpos
        single = kernel.single
        if single is not None:
            if single.gamma == 2.0:
                return [(weights, -1.0 / single.temperature)]
            # d log k / d(d^2) = (gamma / 2) log k / d^2; log k = 0 where d = 0: no force there
            weights.mul_(self.logit).div_(self.sq[0].clamp_min_(_TINY))
            return [(weights, 0.5 * single.gamma)]
        grads: list[Tensor | float] = [0.0] * kernel.parts
        for lw, term in zip(kernel.log_weights, kernel.terms, strict=True):
            sq = self.sq[term.part]
            log_k = term.kernel.log_kernel(sq)
            share = (log_k + lw - self.logit).exp_()  # this term's share of the mixture
            if self.self_idx is not None:  # inf there (logit = lowest float), and weight 0
                share[self.rows, self.self_idx] = 0.0
            if term.kernel.gamma == 2.0:
                dlog = share.mul_(-1.0 / term.kernel.temperature)
            else:  # (gamma / 2) log k / d^2, 0 where d = 0
                dlog = share.mul_(log_k.div_(sq.clamp_min(_TINY))).mul_(term.kernel.gamma / 2)
            grads[term.part] = grads[term.part] + dlog
        return [(weights * g, 1.0) for g in grads]


class _KernelLogSumExp(torch.autograd.Function):
    """See the module docstring. With one block (no chunking) the forward pass keeps the block
    for the backward pass, which then skips the recomputation (O(N^2) memory, as the block itself
    needs); with several blocks each block is recomputed in the backward pass."""

    @staticmethod
    @exact_float32
    def forward(ctx, anchors, cands, self_idx, pos_idx, kernel, chunk):
        blocks = _Blocks(anchors, cands, self_idx, pos_idx, kernel, chunk)
        n = anchors.shape[0]
        lse = anchors.new_empty(n)
        lpos = anchors.new_empty(n if pos_idx is not None else 0)
        ctx.kept = None
        for start, stop, block in blocks:
            lse[start:stop] = block.lse
            if block.lpos is not None:
                lpos[start:stop] = block.lpos
            if stop - start == n:
                ctx.kept = block
        ctx.save_for_backward(anchors, cands, self_idx, pos_idx)
        ctx.kernel, ctx.chunk = kernel, chunk
        return lse, lpos

    @staticmethod
    @once_differentiable
    @exact_float32
    def backward(ctx, grad_lse, grad_lpos):
        anchors, cands, self_idx, pos_idx = ctx.saved_tensors
        kernel = ctx.kernel
        blocks = _Blocks(anchors, cands, self_idx, pos_idx, kernel, ctx.chunk, kept=ctx.kept)
        ctx.kept = None
        grad_a = [torch.zeros_like(a) for a in blocks.a_parts]
        grad_c = [torch.zeros_like(c) for c in blocks.c_parts]
        for start, stop, block in blocks:
            g_pos = grad_lpos[start:stop] if pos_idx is not None else None
            for p, (g, scale) in enumerate(block.grad_weights(kernel, grad_lse[start:stop], g_pos)):
                a, c = blocks.a_parts[p][start:stop], blocks.c_parts[p]
                # dL/dA_i = sum_j G_ij 2 (A_i - C_j),  dL/dC_j = sum_i G_ij 2 (C_j - A_i)
                grad_a[p][start:stop] += 2.0 * scale * (g.sum(1, keepdim=True) * a - g @ c)
                grad_c[p] += 2.0 * scale * (g.sum(0).unsqueeze(1) * c - g.T @ a)
        if kernel.parts == 1:
            return grad_a[0], grad_c[0], None, None, None, None
        return torch.cat(grad_a, dim=-1), torch.cat(grad_c, dim=-1), None, None, None, None


class _Blocks:
    """Iterates over the row blocks: yields ``(start, stop, _Block)``."""

    def __init__(self, anchors, cands, self_idx, pos_idx, kernel, chunk, kept=None):
        self.kernel, self.kept = kernel, kept
        self.a_parts, self.c_parts = kernel.split(anchors), kernel.split(cands)
        self.self_idx, self.pos_idx, self.chunk, self.n = self_idx, pos_idx, chunk, anchors.shape[0]

    def __iter__(self):
        if self.kept is not None:
            yield 0, self.n, self.kept
            return
        c_norms = [c.pow(2).sum(-1) for c in self.c_parts]
        pos_sq = None
        if self.pos_idx is not None:  # exact |a - c|^2 of the positive pairs
            pos_sq = [
                (a - c[self.pos_idx]).pow(2).sum(-1)
                for a, c in zip(self.a_parts, self.c_parts, strict=True)
            ]
        for start in range(0, self.n, self.chunk):
            stop = min(start + self.chunk, self.n)
            rows = torch.arange(stop - start, device=c_norms[0].device)
            pos = None if self.pos_idx is None else self.pos_idx[start:stop]
            sq = []
            for p, (a, c, cn) in enumerate(zip(self.a_parts, self.c_parts, c_norms, strict=True)):
                a = a[start:stop]
                block = torch.addmm(cn.unsqueeze(0), a, c.T, alpha=-2.0)
                block.add_(a.pow(2).sum(-1, keepdim=True)).clamp_min_(0.0)
                if pos is not None:
                    block[rows, pos] = pos_sq[p][start:stop]
                sq.append(block)
            self_idx = None if self.self_idx is None else self.self_idx[start:stop]
            yield start, stop, _Block(self.kernel, sq, rows, self_idx, pos)


def kernel_logsumexp(
    anchors: Tensor,
    cands: Tensor,
    kernel: MixtureKernel,
    *,
    self_idx: Tensor | None = None,
    pos_idx: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Row-wise log-sum-exp of the log-kernel between anchors and candidates.

    Args:
        anchors: (Na, D) float tensor.
        cands: (Nc, D) float tensor of the same dtype and device.
        kernel: The (mixture) kernel.
        self_idx: Optional (Na,) long tensor: the candidate excluded from row i's sum.
        pos_idx: Optional (Na,) long tensor: the candidate whose log-kernel is returned.
        chunk_size: Rows per block. Values and gradients do not depend on it; peak memory is
            O(chunk_size * Nc). None: all rows in one block up to ``AUTO_BLOCK_PAIRS`` pairs, and
            blocks of that many pairs beyond.

    Returns:
        ``(lse, lpos)``: (Na,) log-sum-exp over the candidates, and (Na,) log-kernel of the
        positive (empty when ``pos_idx`` is None). Both are differentiable w.r.t. ``anchors`` and
        ``cands``. Half-precision inputs are computed in float32.
    """
    if chunk_size is None:
        chunk_size = max(1, AUTO_BLOCK_PAIRS // max(1, cands.shape[0]))
    anchors, cands = _as_float32(anchors, cands)
    return _KernelLogSumExp.apply(anchors, cands, self_idx, pos_idx, kernel, chunk_size)


def _as_float32(anchors: Tensor, cands: Tensor) -> tuple[Tensor, Tensor]:
    if anchors.dtype in (torch.float16, torch.bfloat16):
        return anchors.float(), cands.float()
    return anchors, cands


def check_path(path: str, chunk_size: int | None = None) -> None:
    """Raises unless ``path`` is one of :data:`PATHS` and goes with ``chunk_size``."""
    if path not in PATHS:
        raise KinfonceError(f"path must be one of {PATHS}, got {path!r}")
    if path == "fused" and chunk_size is not None:
        raise KinfonceError(
            f"chunk_size={chunk_size} needs path='blocked' (or 'auto'); the fused path has no blocks"
        )


def resolve_path(
    path: str,
    n_anchors: int,
    n_cands: int,
    device: torch.device,
    chunk_size: int | None = None,
    single: bool = True,
    matrices: int = FUSED_MATRICES,
) -> str:
    """The path ``"auto"`` stands for, or ``path`` itself after checking it.

    ``"auto"`` is ``"fused"`` on a GPU for one exponential kernel (``single``) while the path's
    ``matrices`` float32 (Na, Nc) matrices (:data:`FUSED_MATRICES` for the fused path) take at
    most :data:`FUSED_MEMORY_SHARE` of the memory available on the device now
    (:func:`available_memory`: other processes, such as tune trials sharing the GPU, and this
    one's own tensors are left out) and no ``chunk_size`` is given, and ``"blocked"``
    otherwise; on a CPU always: there the fused path was no faster
    (``benchmarks/loss_speed.py``; slower for gamma = 0.5, whose backward pass needs a power),
    while the blocked one keeps one block for the backward pass up to :data:`AUTO_BLOCK_PAIRS`.
    """
    check_path(path, chunk_size)
    if path != "auto":
        return path
    if chunk_size is not None:
        return "blocked"
    if device.type != "cuda" or not single:
        return "blocked"
    fits = matrices * 4 * n_anchors * n_cands <= FUSED_MEMORY_SHARE * available_memory(device)
    return "fused" if fits else "blocked"


def available_memory(device: torch.device) -> int:
    """Bytes a new tensor on the CUDA ``device`` can take now: free on the device (which other
    processes' use lowers) plus what torch's caching allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def kernel_nll(
    anchors: Tensor,
    cands: Tensor,
    kernel: MixtureKernel,
    *,
    pos_idx: Tensor,
    self_idx: Tensor | None = None,
    path: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Per anchor, ``lse_i - lpos_i = -log(K(A_i, C_pos(i)) / sum_{j != self(i)} K(A_i, C_j))``.

    The rows of Eq. 8 that the two-view and bipartite losses average.

    Args:
        anchors: (Na, D) float tensor.
        cands: (Nc, D) float tensor of the same dtype and device.
        kernel: The (mixture) kernel.
        pos_idx: (Na,) long tensor: each anchor's positive candidate.
        self_idx: Optional (Na,) long tensor: the candidate excluded from row i's sum.
        path: "fused", "blocked" or "auto" (:func:`resolve_path`). A mixture of several kernels
            takes the blocked path's code with one block when fused.
        chunk_size: Rows per block of the blocked path (see :func:`kernel_logsumexp`).

    Returns:
        (Na,) float32, differentiable w.r.t. ``anchors`` and ``cands``; the same values on both
        paths up to float32 rounding.
    """
    single = kernel.single
    path = resolve_path(
        path, anchors.shape[0], cands.shape[0], anchors.device, chunk_size, single is not None
    )
    if path == "blocked" or single is None:
        chunk = chunk_size if path == "blocked" else max(1, anchors.shape[0])
        lse, lpos = kernel_logsumexp(
            anchors, cands, kernel, self_idx=self_idx, pos_idx=pos_idx, chunk_size=chunk
        )
        return lse - lpos
    anchors, cands = _as_float32(anchors, cands)
    return _FusedNLL.apply(anchors, cands, self_idx, pos_idx, single)


def _fused_logits(anchors, cands, self_idx, pos_idx, kernel: ExpKernel, rows) -> Tensor:
    """(Na, Nc) log-kernel with exact positives and the lowest float at the excluded entries.

    For gamma = 2 it is shifted by the row constant ``|a_i|^2 / tau`` (one matrix product and no
    other pass; ``log_softmax`` does not see a row constant). ``rows``: ``arange(Na)``.
    """
    a_sq = anchors.pow(2).sum(-1)
    c_sq = a_sq if cands is anchors else cands.pow(2).sum(-1)
    pos_sq = (anchors - cands[pos_idx]).pow(2).sum(-1)  # exact |a - c|^2 of the positives
    tau = kernel.temperature
    if kernel.gamma == 2.0:
        # (2 a.c - |c|^2) / tau = -d^2 / tau + |a|^2 / tau
        logit = torch.addmm(c_sq.unsqueeze(0), anchors, cands.T, beta=-1.0 / tau, alpha=2.0 / tau)
        logit[rows, pos_idx] = (a_sq - pos_sq) / tau
    else:
        logit = torch.addmm(c_sq.unsqueeze(0), anchors, cands.T, alpha=-2.0)
        logit.add_(a_sq.unsqueeze(1)).clamp_min_(0.0)
        logit[rows, pos_idx] = pos_sq
        if kernel.gamma == 1.0:
            logit.sqrt_()
        elif kernel.gamma == 0.5:
            logit.sqrt_().sqrt_()
        else:
            logit.pow_(kernel.gamma / 2)
        logit.mul_(-1.0 / tau)
    if self_idx is not None:  # the lowest finite value, so that 0 * logit stays 0
        logit[rows, self_idx] = torch.finfo(logit.dtype).min
    return logit


def _fused_log_softmax(anchors, cands, self_idx, pos_idx, kernel: ExpKernel, rows):
    """(log_softmax of the logits, the logits when the backward needs them (gamma != 2))."""
    logit = _fused_logits(anchors, cands, self_idx, pos_idx, kernel, rows)
    return torch.log_softmax(logit, dim=1), None if kernel.gamma == 2.0 else logit


class _FusedNLL(torch.autograd.Function):
    """``-log_softmax(logit)[i, pos(i)]`` of one exponential kernel, with a closed-form backward.

    With ``W = softmax - onehot(pos)`` and row weights ``g`` (the incoming gradient), the gradient
    w.r.t. the squared distances is ``g_i W_ij dlog k / d(d^2)_ij``; for gamma = 2 that factor
    is the constant ``-1 / tau``, otherwise ``(gamma / 2) log k / d^2`` (0 where d = 0), computed
    in row blocks from the kept log-kernel. The sums over rows and columns come out of the two
    matrix products (an extra column of ones or of ``g``).
    """

    @staticmethod
    @exact_float32
    def forward(ctx, anchors, cands, self_idx, pos_idx, kernel: ExpKernel):
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        log_p, logit = _fused_log_softmax(anchors, cands, self_idx, pos_idx, kernel, rows)
        nll = log_p[rows, pos_idx].neg_()
        ctx.kernel = kernel
        ctx.save_for_backward(anchors, cands, self_idx, pos_idx)
        # kept outside save_for_backward: the backward pass consumes them in place; a second
        # backward pass (retain_graph) recomputes them
        ctx.kept = (log_p, logit)
        return nll

    @staticmethod
    @once_differentiable
    @exact_float32
    def backward(ctx, grad):
        anchors, cands, self_idx, pos_idx = ctx.saved_tensors
        kernel = ctx.kernel
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        kept = ctx.kept or _fused_log_softmax(anchors, cands, self_idx, pos_idx, kernel, rows)
        log_p, logit = kept
        ctx.kept = None
        weights = log_p.exp_()  # the row softmax, in place of its log
        weights[rows, pos_idx] -= 1.0  # softmax - onehot(pos)
        g = grad.unsqueeze(1)
        if kernel.gamma == 2.0:
            # d logit_ij / d a_i = 2 c_j / tau, d logit_ij / d c_j = 2 (a_i - c_j) / tau
            scale = 2.0 / kernel.temperature
            col = weights.T @ torch.cat([anchors * g, g], dim=1)  # [W^T (g A), W^T g]
            grad_a = (weights @ cands).mul_(g * scale)
            return grad_a, (col[:, :-1] - col[:, -1:] * cands).mul_(scale), None, None, None
        # V = W log k / d^2 (times factor); d(d^2_ij) / d a_i = 2 (a_i - c_j), and the 2 and the
        # gamma / 2 of d log k / d(d^2) make gamma
        scale = kernel.gamma * _distance_factor_(weights, logit, kernel)
        ones = torch.ones_like(cands[:, :1])
        row = weights @ torch.cat([cands, ones], dim=1)  # (Na, D + 1): [V C, rowsum V]
        col = weights.T @ torch.cat([anchors * g, g], dim=1)  # (Nc, D + 1): [V^T (g A), V^T g]
        grad_a = (row[:, -1:] * anchors - row[:, :-1]).mul_(g * scale)
        grad_c = (col[:, -1:] * cands - col[:, :-1]).mul_(scale)
        return grad_a, grad_c, None, None, None


def _distance_factor_(weights: Tensor, logit: Tensor, kernel: ExpKernel) -> float:
    """``weights *= log k / d^2`` in place, 0 where d = 0, up to the returned constant factor.

    With ``t = d^gamma = -tau log k``: ``log k / d^2 = -(1 / tau) t^(1 - 2 / gamma)``
    (for gamma = 1, ``1 / (tau^2 log k)``). Where d = 0 that is infinite (or 0 * inf), and the
    convention is a zero gradient: non-finite entries are set to 0 (the excluded entries hold
    the lowest float and a weight of 0, which gives 0). The temporary of a general gamma is made
    in row blocks.
    """
    tau = kernel.temperature
    if kernel.gamma == 1.0:
        weights.div_(logit)
        factor = 1.0 / tau**2
    else:
        rows = max(1, _FACTOR_BLOCK_PAIRS // max(1, logit.shape[1]))
        exponent = 1.0 - 2.0 / kernel.gamma
        for start in range(0, logit.shape[0], rows):
            block = logit[start : start + rows].mul(-tau).pow_(exponent)
            weights[start : start + rows].mul_(block)
        factor = -1.0 / tau
    weights.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return factor
