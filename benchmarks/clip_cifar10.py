"""Kernel CLIP on CIFAR-10 at CPU scale: zero-shot accuracy by kernel, with and without rewrites.

Trains ``kinfonce clip`` (resnet-mini image encoder, small text encoder from scratch, class-name
prompts) on a seeded subset of the CIFAR-10 training images from ../shared/data/cifar10-jpg.zip
(a JPEG re-encoding: accuracies are close to, not exactly comparable with, published CIFAR-10
numbers), for the Gaussian kernel (CLIP's own loss) and the Simple Sum kernel (the best average
of the paper's Table 1), each with one caption per class and with ``--rewrites K``, over three
seeds. Reports zero-shot top-1 (plain prompt, and all captions of each class) and the linear
probe of the same image encoder on the full 10,000-image test set.

Each run is an ordinary ``kinfonce clip`` run directory under ``--out``; runs whose
``metrics.json`` exists are read, not repeated, so an interrupted benchmark continues where
it stopped.

Usage:
    python benchmarks/clip_cifar10.py [--train-subset 4000] [--epochs 4] [--rewrites 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cifar10_zip import CIFAR10_ZIP as ZIP
from cifar10_zip import cifar10_missing, stamped_run_dir

from kinfonce.clip import run_clip
from kinfonce.config import ClipConfig

LOSSES = ("gaussian", "simple-sum")
SEEDS = (0, 1, 2)


def shared_settings(args: argparse.Namespace, loss: str, seed: int, name: str) -> dict:
    """The settings of a CPU-scale clip run that the clip benchmarks share; ``name`` is its
    directory under ``args.out``."""
    return dict(
        backbone="resnet-mini",
        loss=loss,
        crop_scale_min=0.2,
        batch_size=args.batch_size,
        epochs=args.epochs,
        warmup_epochs=1,
        seed=seed,
        eval_linear_epochs=args.eval_linear_epochs,
        baselines=False,
        progress=False,
        output_dir=str(Path(args.out) / name),
    )


def run_config(args: argparse.Namespace, loss: str, rewrites: int, seed: int) -> ClipConfig:
    return ClipConfig(
        dataset=f"imagefolder:{ZIP}",
        train_subset=args.train_subset,
        rewrites=rewrites,
        **shared_settings(args, loss, seed, f"{loss}-r{rewrites}-s{seed}"),
    )


def run_or_read(config: ClipConfig) -> dict:
    path = Path(config.output_dir) / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    return run_clip(config)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rewrites", type=int, default=5)
    parser.add_argument("--eval-linear-epochs", type=int, default=20)
    parser.add_argument(
        "--out",
        default=stamped_run_dir("clip-cifar10"),
    )
    args = parser.parse_args()
    if cifar10_missing():
        return 0
    started = time.perf_counter()
    results: dict[tuple[str, int], list[dict]] = {}
    for loss in LOSSES:
        for rewrites in (1, args.rewrites):
            for seed in SEEDS:
                metrics = run_or_read(run_config(args, loss, rewrites, seed))
                results.setdefault((loss, rewrites), []).append(metrics)
                print(
                    f"{loss} rewrites={rewrites} seed={seed}: zero-shot "
                    f"{metrics['zero_shot_top1']:.4f}, linear {metrics['linear_top1']:.4f}, "
                    f"{metrics['wall_time_s']:.0f} s",
                    flush=True,
                )
    print(
        f"\nCIFAR-10, {args.train_subset} training images, {args.epochs} epochs, batch "
        f"{args.batch_size}, resnet-mini; test: 10,000 images; mean ± std over seeds {SEEDS}\n"
    )
    print("| loss | captions per class | zero-shot top-1 | zero-shot top-1, all captions "
          "| linear top-1 | train time per run (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    summary = {}
    for (loss, rewrites), runs in results.items():
        zero_shot = [m["zero_shot_top1"] for m in runs]
        summary[(loss, rewrites)] = statistics.mean(zero_shot)
        print(
            f"| {loss} | {rewrites} | {mean_std(zero_shot)} | "
            f"{mean_std([m['zero_shot_ensemble_top1'] for m in runs])} | "
            f"{mean_std([m['linear_top1'] for m in runs])} | "
            f"{statistics.mean(m['pretrain_time_s'] for m in runs):.0f} |"
        )
    k = args.rewrites
    print(
        "\nRESULT "
        + " ".join(
            f"{loss}_r{rewrites}_zero_shot={value:.4f}"
            for (loss, rewrites), value in summary.items()
        )
        + " "
        + " ".join(
            f"{loss}_rewrite_gain={summary[(loss, k)] - summary[(loss, 1)]:+.4f}" for loss in LOSSES
        )
        + f" wall_time_s={time.perf_counter() - started:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
