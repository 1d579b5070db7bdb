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
both slower and O(Na * Nc) in memory (see DESIGN.md and ``benchmarks/loss_speed.py``); that is the
reason this is a hand-written ``torch.autograd.Function``.

Squared distances come from ``|a|^2 + |c|^2 - 2 a.c`` (one matrix product), clamped at 0; the
positive pair's entry is recomputed from the exact difference ``|a - c|^2``, so identical views give
exactly 0 (the expansion's rounding would give ~1e-7, which ``d^gamma`` with small gamma amplifies).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kinfonce.kernels import MixtureKernel

_TINY = torch.finfo(torch.float32).tiny
#: Largest block, in anchor-candidate pairs, when no chunk size is given (512 MiB per float32 matrix).
AUTO_BLOCK_PAIRS = 2**27


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
    dtype = anchors.dtype
    if dtype in (torch.float16, torch.bfloat16):
        anchors, cands = anchors.float(), cands.float()
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        lse, lpos = _KernelLogSumExp.apply(anchors, cands, self_idx, pos_idx, kernel, chunk_size)
    return lse, lpos
