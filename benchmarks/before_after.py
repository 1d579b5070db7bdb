"""CPU speed of this checkout against an earlier revision, measured alternately in one run.

Two measurements, each in a fresh process per revision and round (rounds alternate the two
revisions, so that a busy machine slows both alike):

* ``views``: views/s of both views of a uint8 batch (``views.pair`` where it exists, else two
  calls), one torch thread, for 32 px RGB (batch 256), 16 px gray (256) and 96 px RGB (64);
* ``eval``: seconds of the end-of-run evaluation with both baselines (``evaluate_baselines``,
  linear probe and kNN for a random ``resnet-mini``, a random encoder and raw pixels) on
  CIFAR-shaped random images (``--train`` / ``--test`` images, ``--epochs`` probe epochs).

The earlier revision's ``src/`` is taken with ``git archive``; it must have
``kinfonce.evaluate.evaluate_baselines(backbone, splits, config, device)``.

    python benchmarks/before_after.py --rev d0e6754 [--rounds 2] [--what views eval]

The last line is ``RESULT key=value ...`` (ratios are this checkout's speed over the revision's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIEW_CASES = ((32, 3, 256), (16, 1, 256), (96, 3, 64))


def measure_views() -> dict[str, float]:
    import torch

    from kinfonce.data.augment import SimCLRViews

    result = {}
    for size, channels, batch in VIEW_CASES:
        views = SimCLRViews(size, (0.5,) * channels, (0.25,) * channels)
        x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
        pair = getattr(views, "pair", lambda b, v=views: (v(b), v(b)))
        pair(x)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            pair(x)
            times.append(time.perf_counter() - start)
        result[f"views_per_s_{size}px_{channels}ch"] = 2 * batch / statistics.median(times)
    return result


def measure_eval(train: int, test: int, epochs: int) -> dict[str, float]:
    import torch

    from kinfonce.config import PretrainConfig
    from kinfonce.data.splits import DatasetSplits, LabeledImages
    from kinfonce.evaluate import evaluate_baselines
    from kinfonce.models import build_backbone

    gen = torch.Generator().manual_seed(0)

    def part(n: int) -> LabeledImages:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        return LabeledImages(images, torch.randint(0, 10, (n,), generator=gen))

    splits = DatasetSplits(
        part(train), part(64), part(test), [str(c) for c in range(10)], 10, 32, 3,
        (0.5,) * 3, (0.25,) * 3, "cifar-shaped",
    )  # fmt: skip
    config = PretrainConfig(
        dataset="cifar10", backbone="resnet-mini", eval_linear_epochs=epochs, progress=False
    )
    try:
        from kinfonce.resolve import resolve
    except ImportError:  # a revision before the one resolution step (issue 19)
        config = config.resolved()
    else:
        config = resolve(config)
    torch.manual_seed(1)
    backbone = build_backbone("resnet-mini", in_channels=3, image_size=32)
    start = time.perf_counter()
    metrics = evaluate_baselines(backbone, splits, config, "cpu")
    return {"eval_s": time.perf_counter() - start, **metrics}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(args.child) / "src"))
    if args.what == "views":
        result = measure_views()
    else:
        result = measure_eval(args.train, args.test, args.epochs)
    print(json.dumps(result))


def run_child(tree: Path, what: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(tree), "--what", what]
    command += ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", help="the earlier git revision (required unless --child)")
    parser.add_argument("--what", nargs="+", default=["views", "eval"], choices=["views", "eval"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.what = args.what[0]
        child(args)
        return
    if not args.rev:
        parser.error("--rev is required")
    with tempfile.TemporaryDirectory() as scratch:
        old = Path(scratch)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.rev, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "x", "-C", str(old)], input=archive, check=True)
        trees = {args.rev: old, "this checkout": REPO}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for what in args.what:
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    runs[name].append(run_child(tree, what, args))
    measured = (k for r in runs["this checkout"] for k in r)
    keys = list(dict.fromkeys(k for k in measured if k.startswith(("views_per_s", "eval_s"))))
    print(f"| measurement | {args.rev} | this checkout | ratio (speed) |\n|---|---:|---:|---:|")
    result = {}
    for key in keys:
        before = statistics.median(r[key] for r in runs[args.rev] if key in r)
        after = statistics.median(r[key] for r in runs["this checkout"] if key in r)
        speed = before / after if key == "eval_s" else after / before
        print(f"| {key} | {before:,.1f} | {after:,.1f} | {speed:.2f}x |")
        result[f"{key}_speedup"] = round(speed, 2)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
