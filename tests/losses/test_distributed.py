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


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z0, z1 = _batch()
        rows = slice(rank * N, (rank + 1) * N)
        for name, build in LOSSES.items():
            a = z0[rows].clone().requires_grad_(True)
            b = z1[rows].clone().requires_grad_(True)
            value = build(True)(a, b)
            value.backward()
            out[(name, rank)] = (value.detach(), a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_equals_full_batch(tmp_path):
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    z0, z1 = _batch()
    for name, build in LOSSES.items():
        a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
        full = build(False)(a, b)
        full.backward()
        values = [out[(name, r)][0] for r in range(WORLD)]
        # each rank averages over its own anchors; their mean is the full-batch loss
        torch.testing.assert_close(torch.stack(values).mean(), full.detach(), rtol=1e-5, atol=1e-6)
        for r in range(WORLD):
            rows = slice(r * N, (r + 1) * N)
            _, grad_a, grad_b = out[(name, r)]
            # the gather's backward sums over ranks: each rank holds WORLD x the full gradient,
            # which DDP's gradient averaging turns back into exactly the full-batch gradient
            torch.testing.assert_close(grad_a / WORLD, a.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grad_b / WORLD, b.grad[rows], rtol=1e-4, atol=1e-6)
