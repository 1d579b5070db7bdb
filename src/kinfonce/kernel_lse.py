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
    return _powered(sq_parts[0], single.gamma).mul(-1.0 / single.temperature)


def _single_grad_weights(kernel, sq, lse, grad_lse, grad_lpos, rows, self_idx, pos):
    """Single kernel: (B, Nc) weights G / scale and the scalar scale with dL/d(d^2) = scale * G."""
    single = kernel.single
    powered = _powered(sq, single.gamma)
    # softmax of the row: exp(-d^gamma / tau - lse)
    weights = torch.add(-lse.unsqueeze(1), powered, alpha=-1.0 / single.temperature).exp_()
    weights.mul_(grad_lse.unsqueeze(1))
    if self_idx is not None:
        weights[rows, self_idx] = 0.0
    if pos is not None:
        weights[rows, pos] += grad_lpos
    if single.gamma == 2.0:
        return weights, -1.0 / single.temperature
    # d log k / d(d^2) = -(gamma / 2) / tau * d^gamma / d^2, and 0 where d = 0 (d^gamma = 0 there)
    weights.mul_(powered).div_(sq.clamp_min_(_TINY))
    return weights, -0.5 * single.gamma / single.temperature


def _mixture_grad_weights(kernel, sq_parts, lse, grad_lse, grad_lpos, rows, self_idx, pos):
    """Mixture kernel: per part, (B, Nc) dL/d(d^2) of the block."""
    logit = kernel.log_kernel(sq_parts)
    weights = (logit - lse.unsqueeze(1)).exp_().mul_(grad_lse.unsqueeze(1))
    if self_idx is not None:
        weights[rows, self_idx] = 0.0
    if pos is not None:
        weights[rows, pos] += grad_lpos
    grads: list[Tensor | float] = [0.0] * kernel.parts
    for lw, term in zip(kernel.log_weights, kernel.terms, strict=True):
        sq = sq_parts[term.part]
        log_k = term.kernel.log_kernel(sq)
        share = (log_k + lw - logit).exp_()  # this term's share of the mixture at each pair
        if term.kernel.gamma == 2.0:
            dlog = share.mul_(-1.0 / term.kernel.temperature)
        else:  # d log k / d(d^2) = (gamma / 2) log k / d^2, 0 where d = 0
            dlog = share.mul_(log_k.div_(sq.clamp_min(_TINY))).mul_(term.kernel.gamma / 2)
        grads[term.part] = grads[term.part] + dlog
    return [weights * g for g in grads]


class _KernelLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, cands, self_idx, pos_idx, kernel, chunk):
        blocks = _Blocks(anchors, cands, pos_idx, kernel, chunk)
        n = anchors.shape[0]
        lse = anchors.new_empty(n)
        lpos = anchors.new_empty(n if pos_idx is not None else 0)
        for start, stop, rows, pos, sq in blocks:
            logit = _block_logits(kernel, sq)
            if pos is not None:
                lpos[start:stop] = logit[rows, pos]
            if self_idx is not None:
                logit[rows, self_idx[start:stop]] = float("-inf")
            lse[start:stop] = torch.logsumexp(logit, dim=1)
        ctx.save_for_backward(anchors, cands, self_idx, pos_idx, lse)
        ctx.kernel, ctx.chunk = kernel, chunk
        return lse, lpos

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse, grad_lpos):
        anchors, cands, self_idx, pos_idx, lse = ctx.saved_tensors
        kernel = ctx.kernel
        blocks = _Blocks(anchors, cands, pos_idx, kernel, ctx.chunk)
        grad_a = [torch.zeros_like(a) for a in blocks.a_parts]
        grad_c = [torch.zeros_like(c) for c in blocks.c_parts]
        for start, stop, rows, pos, sq in blocks:
            args = (
                lse[start:stop],
                grad_lse[start:stop],
                grad_lpos[start:stop] if pos is not None else None,
                rows,
                None if self_idx is None else self_idx[start:stop],
                pos,
            )
            if kernel.single is not None:
                weights, scale = _single_grad_weights(kernel, sq[0], *args)
                per_part = [(weights, 2.0 * scale)]
            else:
                per_part = [(g, 2.0) for g in _mixture_grad_weights(kernel, sq, *args)]
            for p, (g, scale) in enumerate(per_part):
                a, c = blocks.a_parts[p][start:stop], blocks.c_parts[p]
                # dL/dA_i = sum_j G_ij 2 (A_i - C_j),  dL/dC_j = sum_i G_ij 2 (C_j - A_i)
                grad_a[p][start:stop] += scale * (g.sum(1, keepdim=True) * a - g @ c)
                grad_c[p] += scale * (g.sum(0).unsqueeze(1) * c - g.T @ a)
        if kernel.parts == 1:
            return grad_a[0], grad_c[0], None, None, None, None
        return torch.cat(grad_a, dim=-1), torch.cat(grad_c, dim=-1), None, None, None, None


class _Blocks:
    """Iterates over row blocks: yields (start, stop, rows, pos, squared distances per part)."""

    def __init__(self, anchors, cands, pos_idx, kernel, chunk):
        self.a_parts, self.c_parts = kernel.split(anchors), kernel.split(cands)
        self.c_norms = [c.pow(2).sum(-1) for c in self.c_parts]
        self.pos_idx, self.chunk, self.n = pos_idx, chunk, anchors.shape[0]
        self.pos_sq = None
        if pos_idx is not None:
            self.pos_sq = [
                (a - c[pos_idx]).pow(2).sum(-1)
                for a, c in zip(self.a_parts, self.c_parts, strict=True)
            ]

    def __iter__(self):
        for start in range(0, self.n, self.chunk):
            stop = min(start + self.chunk, self.n)
            rows = torch.arange(stop - start, device=self.c_norms[0].device)
            pos = None if self.pos_idx is None else self.pos_idx[start:stop]
            sq = []
            for p, (a, c, cn) in enumerate(
                zip(self.a_parts, self.c_parts, self.c_norms, strict=True)
            ):
                a = a[start:stop]
                block = torch.addmm(cn.unsqueeze(0), a, c.T, alpha=-2.0)
                block.add_(a.pow(2).sum(-1, keepdim=True)).clamp_min_(0.0)
                if pos is not None:
                    block[rows, pos] = self.pos_sq[p][start:stop]
                sq.append(block)
            yield start, stop, rows, pos, sq


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
        chunk_size: Rows per block (None: all rows at once). Values and gradients do not depend on
            it; peak memory is O(chunk_size * Nc).

    Returns:
        ``(lse, lpos)``: (Na,) log-sum-exp over the candidates, and (Na,) log-kernel of the
        positive (empty when ``pos_idx`` is None). Both are differentiable w.r.t. ``anchors`` and
        ``cands``. Half-precision inputs are computed in float32.
    """
    chunk = anchors.shape[0] if chunk_size is None else chunk_size
    dtype = anchors.dtype
    if dtype in (torch.float16, torch.bfloat16):
        anchors, cands = anchors.float(), cands.float()
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        lse, lpos = _KernelLogSumExp.apply(anchors, cands, self_idx, pos_idx, kernel, max(chunk, 1))
    return lse, lpos
