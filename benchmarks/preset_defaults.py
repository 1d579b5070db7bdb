"""Every loss preset at its defaults: does it train stably, and beat the random encoder?

Runs ``kinfonce pretrain`` once per preset of :data:`kinfonce.LOSS_PRESETS` with nothing set but
the loss (and, for CIFAR-10, the data set, a training subset and a short schedule), and prints
whether the loss stayed finite and the linear and kNN accuracy beside the random-weight encoder
measured in the same run. CIFAR-10 comes from ../shared/data/cifar10-jpg.zip (a JPEG
re-encoding); the benchmark skips it with a message where the file is absent.

Usage:
    python benchmarks/preset_defaults.py [--data digits|cifar10|both] [--loss NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cifar10_zip import CIFAR10_ZIP as ZIP
from cifar10_zip import REPO, cifar10_missing

from kinfonce.config import PretrainConfig
from kinfonce.errors import DivergedError
from kinfonce.losses import LOSS_PRESETS
from kinfonce.train import run_pretrain

#: The CIFAR-10 scale: a seeded 2,000-image subset, 3 epochs of batch 256 (one warm-up epoch).
CIFAR_SETTINGS = dict(train_subset=2000, epochs=3, warmup_epochs=1, eval_linear_epochs=30)


def run_one(loss: str, data: str, out: Path) -> dict:
    settings = {"dataset": "digits"} if data == "digits" else {
        "dataset": f"imagefolder:{ZIP}", **CIFAR_SETTINGS
    }  # fmt: skip
    config = PretrainConfig(
        loss=loss, progress=False, output_dir=str(out / f"{data}-{loss}"), **settings
    )
    started = time.perf_counter()
    try:
        metrics = run_pretrain(config)
    except DivergedError as err:
        return {"loss": loss, "data": data, "finite": False, "note": str(err)}
    return {
        "loss": loss,
        "data": data,
        "finite": True,
        "lr": config.lr,
        "linear": metrics["linear_top1"],
        "random_linear": metrics["random_encoder_linear_top1"],
        "knn": metrics["knn_top1"],
        "random_knn": metrics["random_encoder_knn_top1"],
        "seconds": time.perf_counter() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "cifar10", "both"), default="both")
    parser.add_argument(
        "--loss", nargs="+", choices=tuple(LOSS_PRESETS), default=tuple(LOSS_PRESETS)
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "preset-defaults"))
    args = parser.parse_args()
    sets = ["digits", "cifar10"] if args.data == "both" else [args.data]
    if "cifar10" in sets and cifar10_missing("cifar10"):
        sets.remove("cifar10")
    rows = [run_one(loss, data, Path(args.out)) for data in sets for loss in args.loss]
    print(
        f"{'data':<8}{'loss':<19}{'lr':>6}{'linear':>8}{'random':>8}{'kNN':>7}{'random':>8}{'s':>6}"
    )
    for r in rows:
        if not r["finite"]:
            print(f"{r['data']:<8}{r['loss']:<19} DIVERGED: {r['note']}")
            continue
        print(
            f"{r['data']:<8}{r['loss']:<19}{r['lr']:>6g}{r['linear']:>8.4f}{r['random_linear']:>8.4f}"
            f"{r['knn']:>7.4f}{r['random_knn']:>8.4f}{r['seconds']:>6.0f}"
        )
    stable = sum(r["finite"] for r in rows)
    beats = sum(r["finite"] and r["linear"] > r["random_linear"] for r in rows)
    print(f"RESULT runs={len(rows)} finite={stable} beat_random_linear={beats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
