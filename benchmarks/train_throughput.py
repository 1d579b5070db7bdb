"""Images per second of one SimCLR training step on the CPU, and the share spent on views.

A step is what ``SimCLR.training_step`` does plus the optimiser: two random views of a
uint8 batch (made on the training device in one pass), backbone and projection head on both,
the Simple Sum Kernel-InfoNCE loss, backward, and a LARS step. Views are timed
separately within the same steps, so the fraction is measured, not estimated.
Random uint8 images stand in for data (the cost does not depend on pixel values).

Usage:
    python benchmarks/train_throughput.py [--batch-size 128] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from kinfonce.config import PretrainConfig
from kinfonce.methods import SimCLR
from kinfonce.optim import build_optimizer, parameter_groups
from kinfonce.resolve import resolve

CASES = [
    ("resnet-mini", 1, 16),  # the embedded digits default
    ("resnet-mini", 3, 32),
    ("resnet18-w0.25", 3, 32),
    ("resnet18", 3, 32),
]


def measure(backbone: str, channels: int, size: int, batch: int, steps: int) -> dict:
    config = resolve(PretrainConfig(backbone=backbone, proj_hidden_dim=2048))
    data = {"image_size": size, "channels": channels, "num_classes": 10,
            "mean": (0.5,) * channels, "std": (0.25,) * channels}  # fmt: skip
    torch.manual_seed(0)
    module = SimCLR(config, data).train()
    optimizer = build_optimizer("lars", parameter_groups(module, 1e-6), lr=0.3)
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    view_times, step_times = [], []
    for step in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        with torch.no_grad():
            view0, view1 = module.views.pair(images)
        views_done = time.perf_counter()
        loss, _ = module.contrastive_step(view0, view1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = time.perf_counter()
        if step:
            view_times.append(views_done - start)
            step_times.append(done - start)
    step_time = sorted(step_times)[len(step_times) // 2]
    view_time = sorted(view_times)[len(view_times) // 2]
    return {
        "backbone": backbone,
        "input": f"{channels}x{size}x{size}",
        "params_m": sum(p.numel() for p in module.backbone.parameters()) / 1e6,
        "step_s": step_time,
        "images_per_s": batch / step_time,
        "view_fraction": view_time / step_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, median of {args.steps} steps")  # fmt: skip
    rows = [measure(*case, args.batch_size, args.steps) for case in CASES]
    print(f"{'backbone':<16}{'input':>10}{'params (M)':>12}{'step (s)':>10}"
          f"{'images/s':>10}{'views share':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['backbone']:<16}{r['input']:>10}{r['params_m']:>12.2f}{r['step_s']:>10.3f}"
              f"{r['images_per_s']:>10.1f}{r['view_fraction']:>13.1%}")  # fmt: skip
    by_name = {(r["backbone"], r["input"]): r for r in rows}
    small, large = by_name[("resnet-mini", "3x32x32")], by_name[("resnet18", "3x32x32")]
    digits = by_name[("resnet-mini", "1x16x16")]
    print(
        "RESULT "
        f"digits_mini_images_per_s={digits['images_per_s']:.1f} "
        f"digits_mini_view_fraction={digits['view_fraction']:.3f} "
        f"cifar_mini_images_per_s={small['images_per_s']:.1f} "
        f"cifar_mini_view_fraction={small['view_fraction']:.3f} "
        f"cifar_resnet18_images_per_s={large['images_per_s']:.1f} "
        f"cifar_resnet18_view_fraction={large['view_fraction']:.3f} "
        f"resnet18_over_mini_step_time={large['step_s'] / small['step_s']:.1f}"
    )


if __name__ == "__main__":
    main()
