"""Cached-feature linear probe vs training the head with the encoder in the loop.

Both paths train the same linear head for the same number of epochs on the same CIFAR-10
subset with a small ResNet: the fast path (:func:`kinfonce.probes.linear_probe`)
extracts features once and trains on them; the slow path
(:func:`kinfonce.evaluate.linear_probe_augmented`) crops, flips and encodes every
training batch again. Each timing includes that path's feature extraction (the slow path
extracts too: standardization statistics and test features); a second figure subtracts
the fast path's extraction time from both, leaving head training alone. The encoder
has random weights: speed does not depend on them, and the accuracies printed only show
that both paths train.

    .venv/bin/python benchmarks/linear_probe_speed.py [--train-size 2000 --epochs 20 --threads 1]

Reads CIFAR-10 from ../shared/data/cifar10-jpg.zip (relative to the repository root) and
exits with a message when it is absent. Ends with one line ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from kinfonce.data import load_dataset
from kinfonce.data.augment import EvalTransform
from kinfonce.evaluate import extract_features, linear_probe_augmented
from kinfonce.models import build_backbone
from kinfonce.probes import LinearProbeSettings, linear_probe

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.zip"


def seeded_subset(images, labels, size: int, seed: int):
    """A seeded random subset of ``size`` images and their labels."""
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:size]
    return images[index], labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 JPEG zip")
    parser.add_argument("--backbone", default="resnet18-w0.25", help="kinfonce.models backbone")
    parser.add_argument("--train-size", type=int, default=2000, help="training images used")
    parser.add_argument("--test-size", type=int, default=500, help="test images used")
    parser.add_argument("--epochs", type=int, default=20, help="linear-probe epochs (both paths)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_file():
        sys.exit(f"CIFAR-10 zip not found at {args.data}: skipping this benchmark")

    splits = load_dataset(f"imagefolder:{args.data}", val_fraction=0.0)
    train_images, train_y = seeded_subset(
        splits.train.images, splits.train.labels, args.train_size, args.seed
    )
    test_images, test_y = seeded_subset(
        splits.test.images, splits.test.labels, args.test_size, args.seed
    )
    torch.manual_seed(args.seed)
    encoder = build_backbone(args.backbone, in_channels=3, image_size=splits.image_size)
    transform = EvalTransform(splits.mean, splits.std)
    probe = dict(
        num_classes=splits.num_classes,
        settings=LinearProbeSettings(epochs=args.epochs, seed=args.seed),
    )

    start = time.perf_counter()
    train_x = extract_features(encoder, train_images, transform)
    test_x = extract_features(encoder, test_images, transform)
    extracted = time.perf_counter()
    cached = linear_probe(train_x, train_y, test_x, test_y, **probe)
    cached_s = time.perf_counter() - start
    extract_s = extracted - start

    start = time.perf_counter()
    in_loop = linear_probe_augmented(
        encoder, train_images, train_y, test_images, test_y, transform, **probe
    )
    in_loop_s = time.perf_counter() - start

    speedup = in_loop_s / cached_s
    # Both paths extract the same images once; without that, what remains is head training.
    head_speedup = (in_loop_s - extract_s) / (cached_s - extract_s)
    print(
        f"CIFAR-10 (JPEG copy) subset: {args.train_size} train / {args.test_size} test images, "
        f"backbone {args.backbone} ({train_x.shape[1]} features), {args.epochs} epochs, "
        f"batch 64, {torch.get_num_threads()} torch threads"
    )
    print(f"{'path':<40}{'time (s)':>10}{'top-1':>8}")
    print(f"{'cached features (extract once + head)':<40}{cached_s:>10.2f}{cached['top1']:>8.3f}")
    print(f"{'  of which feature extraction':<40}{extract_s:>10.2f}{'':>8}")
    print(f"{'encoder in the loop (crop + flip)':<40}{in_loop_s:>10.2f}{in_loop['top1']:>8.3f}")
    print(f"speed-up of the cached path: {speedup:.1f}x end to end")
    print(f"speed-up of head training alone (extraction time subtracted): {head_speedup:.0f}x")
    print(
        f"RESULT cached_s={cached_s:.2f} in_loop_s={in_loop_s:.2f} speedup={speedup:.1f} "
        f"head_only_speedup={head_speedup:.0f} "
        f"epochs={args.epochs} train_size={args.train_size} backbone={args.backbone} "
        f"cached_top1={cached['top1']:.4f} in_loop_top1={in_loop['top1']:.4f}"
    )


if __name__ == "__main__":
    main()
