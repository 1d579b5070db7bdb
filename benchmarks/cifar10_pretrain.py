"""CIFAR-10 pretraining at CPU scale: does Kernel-InfoNCE beat a random encoder?

Pretrains a small ResNet with SimCLR and the Simple Sum kernel on a seeded subset of
the CIFAR-10 training images (from ../shared/data/cifar10-jpg.zip, a JPEG re-encoding:
accuracies are close to, not exactly comparable with, published CIFAR-10 numbers),
then evaluates on the full 10,000-image test set with the same linear probe and kNN as
``kinfonce eval``, beside a random-weight encoder and raw pixels measured in the same
run. It is ``kinfonce pretrain`` with the settings below (printed as flags).

Usage:
    python benchmarks/cifar10_pretrain.py [--train-subset 4000] [--epochs 6] [--batch-size 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from cifar10_zip import CIFAR10_ZIP as ZIP
from cifar10_zip import cifar10_missing, stamped_run_dir

from kinfonce.config import PretrainConfig
from kinfonce.tables import format_summary
from kinfonce.train import run_pretrain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backbone", default="resnet-mini")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-linear-epochs", type=int, default=50)
    parser.add_argument("--out", default=stamped_run_dir("cifar10"))
    args = parser.parse_args()
    if cifar10_missing():
        return 0
    config = PretrainConfig(
        dataset=f"imagefolder:{ZIP}",
        train_subset=args.train_subset,
        backbone=args.backbone,
        loss="simple-sum",
        crop_scale_min=0.2,  # milder crops than SimCLR's 0.08 suit a few epochs
        batch_size=args.batch_size,
        lr=1.0,
        warmup_epochs=1,
        epochs=args.epochs,
        eval_linear_epochs=args.eval_linear_epochs,
        output_dir=args.out,
        progress=False,
    )
    defaults = PretrainConfig()
    flags = []
    for key, value in config.to_dict().items():
        if value != getattr(defaults, key):
            flag = key.replace("_", "-")
            flags.append(
                f"--{'' if value else 'no-'}{flag}"
                if isinstance(value, bool)
                else f"--{flag} {value}"
            )
    print("kinfonce pretrain " + " ".join(flags))
    metrics = run_pretrain(config)
    print(format_summary(metrics))
    print(
        "RESULT "
        f"train_images={metrics['train_images']} epochs={metrics['epochs']} "
        f"linear_top1={metrics['linear_top1']:.4f} knn_top1={metrics['knn_top1']:.4f} "
        f"random_encoder_linear_top1={metrics['random_encoder_linear_top1']:.4f} "
        f"raw_pixels_linear_top1={metrics['raw_pixels_linear_top1']:.4f} "
        f"pretrain_time_s={metrics['pretrain_time_s']:.0f} wall_time_s={metrics['wall_time_s']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
