"""Two CPU processes (gloo): the gathered loss and gradients equal the full-batch ones."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kinfonce import KernelInfoNCE, make_loss

WORLD, N, D = 2, 6, 8


def _batch():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(N * WORLD, D, generator=g)
    return z0, z0 + 0.4 * torch.randn(N * WORLD, D, generator=g)


LOSSES = {
    "two-view": lambda gather: KernelInfoNCE(gamma=1.0, temperature=0.2, gather_distributed=gather),
    "bipartite": lambda gather: KernelInfoNCE(
        gamma=0.5, temperature=0.3, bipartite=True, gather_distributed=gather, chunk_size=4
    ),
    "simple-sum": lambda gather: make_loss("simple-sum", lam=0.8, gather_distributed=gather),
    "spectral": lambda gather: make_loss("spectral", gather_distributed=gather),
}


#: Relative difference allowed between the gathered and the full-batch results, as
#: ||got - want|| / ||want||. Summation order is all that separates them (float32 rounding,
#: about 1e-7 here); a rank that keeps only its own negatives (the negative control below)
#: is off by far more than 10 times this.
TOLERANCE = 1e-4


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z0, z1 = _batch()
        rows = slice(rank * N, (rank + 1) * N)
        for name, build in LOSSES.items():
            for gather in (True, False):  # False: the negative control, no cross-rank negatives
                a = z0[rows].clone().requires_grad_(True)
                b = z1[rows].clone().requires_grad_(True)
                value = build(gather)(a, b)
                # the gather's backward sums over ranks: each rank holds WORLD x the full
                # gradient, which DDP's gradient averaging turns back into the full one
                scale = WORLD if gather else 1
                value.backward()
                out[(name, gather, rank)] = (value.detach(), a.grad / scale, b.grad / scale)
    finally:
        dist.destroy_process_group()


def worst_difference(out: dict, name: str, gather: bool, full, grad_a, grad_b) -> float:
    """The largest relative difference of a run's loss and gradients from the full batch's."""
    values = torch.stack([out[(name, gather, r)][0] for r in range(WORLD)])
    got_a = torch.cat([out[(name, gather, r)][1] for r in range(WORLD)])
    got_b = torch.cat([out[(name, gather, r)][2] for r in range(WORLD)])
    # each rank averages over its own anchors; their mean is the full-batch loss
    return max(
        relative_error(values.mean(), full),
        relative_error(got_a, grad_a),
        relative_error(got_b, grad_b),
    )


def test_gathered_loss_equals_full_batch(tmp_path):
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    z0, z1 = _batch()
    for name, build in LOSSES.items():
        a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
        full = build(False)(a, b)
        full.backward()
        reference = (full.detach(), a.grad, b.grad)
        assert worst_difference(out, name, True, *reference) < TOLERANCE, name
        # The same check must reject ranks that do not share their negatives.
        assert worst_difference(out, name, False, *reference) > 10 * TOLERANCE, name
