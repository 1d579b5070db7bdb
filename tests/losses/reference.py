"""Float64 brute-force references written from the paper's formulas (Algorithm 2, Table 2).

The only liberty taken with the literal formula is a per-row shift of the exponent, which cancels
in each ratio and keeps float64 from underflowing at tau = 1e-3 (exp(-4 / 1e-3) is 0 in float64).
Algorithm 2 prints exp(s / tau); the kernel of Eq. (7) it implements is exp(-s / tau).
"""

from __future__ import annotations

import torch


def unit(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z / z.norm(dim=1, keepdim=True)


def pair_powers(x: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """s_ij = ||x_i - y_j||^gamma from explicit differences, float64, (N, M)."""
    diff = x.double()[:, None, :] - y.double()[None, :, :]
    sq = diff.pow(2).sum(-1)
    positive = sq > 0  # keeps the gradient of the (excluded) self pairs at 0 instead of nan
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt().pow(gamma), 0.0)


def kernel_matrix_logs(x, y, terms, parts=1):
    """Per-term exponents log w - s / tau and the per-row shift; terms: (weight, gamma, tau, part)."""
    xs, ys = x.double().chunk(parts, dim=1), y.double().chunk(parts, dim=1)
    return [
        (weight, -pair_powers(xs[part], ys[part], gamma) / tau)
        for weight, gamma, tau, part in terms
    ]


def ratio_loss(x, y, terms, pos, exclude, parts=1):
    """-log K(x_i, y_pos(i)) / sum_{j not excluded} K(x_i, y_j), per row (float64)."""
    logs = kernel_matrix_logs(x, y, terms, parts)
    mask = torch.ones(x.shape[0], y.shape[0], dtype=torch.bool)
    if exclude is not None:
        mask[torch.arange(x.shape[0]), exclude] = False
    logs = [(w, e.masked_fill(~mask, -torch.inf)) for w, e in logs]
    shift = torch.stack([e for _, e in logs]).amax(dim=(0, 2))
    kernel = sum(w * torch.exp(e - shift[:, None]) for w, e in logs)
    rows = torch.arange(x.shape[0])
    numerator = kernel[rows, pos]
    denominator = kernel.sum(1)
    return -torch.log(numerator / denominator)


def two_view(z0, z1, terms, parts=1, normalize=True):
    """Algorithm 2: 2N anchors, positives N apart, self excluded; mean over anchors."""
    n = z0.shape[0]
    z = torch.cat([z0, z1]).double()
    if normalize:
        z = torch.cat([unit(p) for p in z.chunk(parts, dim=1)], dim=1)
    idx = torch.arange(2 * n)
    return ratio_loss(z, z, terms, (idx + n) % (2 * n), idx, parts).mean()


def with_queue(q, k, queue, terms, parts=1):
    """MoCo form: anchor q_i, its positive k_i, negatives the queue rows."""
    q, k, queue = (torch.cat([unit(p) for p in t.chunk(parts, dim=1)], 1) for t in (q, k, queue))
    rows = [
        ratio_loss(q[i : i + 1], torch.cat([k[i : i + 1], queue]), terms, [0], None, parts)
        for i in range(q.shape[0])
    ]
    return torch.cat(rows).mean()


def bipartite(a, b, terms):
    """CLIP form: a_i against all b_j and b_i against all a_j."""
    a, b = unit(a), unit(b)
    idx = torch.arange(a.shape[0])
    return torch.cat(
        [ratio_loss(a, b, terms, idx, None), ratio_loss(b, a, terms, idx, None)]
    ).mean()


def nt_xent(z0, z1, temperature):
    """SimCLR's NT-Xent written independently: cosine similarities over temperature."""
    z = unit(torch.cat([z0, z1]))
    n = z0.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-torch.inf)
    idx = torch.arange(2 * n)
    return (torch.logsumexp(sim, 1) - sim[idx, (idx + n) % (2 * n)]).mean()
