"""A CPU-scale ``kinfonce tune`` search on CIFAR-10: how long, and what ASHA did.

Runs :func:`kinfonce.tune.run_search` (Ray started in this process) over Table 3's
default space for the Simple Sum loss on a seeded subset of the CIFAR-10 training images
(../shared/data/cifar10-jpg.zip, a JPEG re-encoding: accuracies are close to, not exactly
comparable with, published CIFAR-10 numbers), with a small backbone and a short ``max_t``.
Prints the equivalent ``kinfonce tune`` command, the best trials, and a ``RESULT`` line.

Usage:
    python benchmarks/tune_cifar10.py [--num-samples 8] [--max-t 5] [--train-subset 2500] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time

from cifar10_zip import CIFAR10_ZIP as ZIP
from cifar10_zip import cifar10_missing, stamped_run_dir

from kinfonce.config import PretrainConfig, SearchSettings
from kinfonce.space import default_space
from kinfonce.tables import search_summary
from kinfonce.tune import run_search


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-t", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=2500)
    parser.add_argument("--backbone", default="resnet-mini")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument(
        "--out",
        default=stamped_run_dir("tune-cifar10"),
    )
    args = parser.parse_args()
    if cifar10_missing():
        return 0
    base = PretrainConfig(
        dataset=f"imagefolder:{ZIP}",
        train_subset=args.train_subset,
        val_fraction=0.02,  # 1,000 held-out images for the online probe, every epoch
        backbone=args.backbone,
        loss="simple-sum",
        crop_scale_min=0.2,  # milder crops than SimCLR's 0.08 suit a few epochs
        batch_size=128,
        warmup_epochs=1,
    )
    settings = SearchSettings(
        max_t=args.max_t, num_samples=args.num_samples, cpus_per_trial=args.cpus_per_trial
    )
    print(
        f"kinfonce tune --dataset imagefolder:{ZIP} --train-subset {args.train_subset} "
        f"--val-fraction 0.02 --backbone {args.backbone} --loss simple-sum --crop-scale-min 0.2 "
        f"--batch-size 128 --warmup-epochs 1 --num-samples {args.num_samples} "
        f"--max-t {args.max_t} --cpus-per-trial {args.cpus_per_trial} --output-dir {args.out}"
    )
    space = default_space(base.loss)
    started = time.perf_counter()
    result = run_search(base, space, settings, args.out)
    wall = time.perf_counter() - started
    print(search_summary(result.trials, result.keys))
    counts = {
        s: sum(t.status == s for t in result.trials) for s in ("completed", "stopped", "failed")
    }
    epochs = sum(len(t.epochs) for t in result.trials)
    best = result.best.last_probe if result.best else float("nan")
    print(
        f"RESULT trials={len(result.trials)} completed={counts['completed']} "
        f"stopped={counts['stopped']} failed={counts['failed']} epochs_trained={epochs} "
        f"epochs_without_asha={len(result.trials) * args.max_t} best_probe_top1={best:.4f} "
        f"wall_time_s={wall:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
