"""Decoding an image tree into the cache and training from it: 1 against 2 worker processes,
peak memory, and training steps from the cache file against from memory.

Every part runs in a fresh Python process (its own peak resident memory, ``ru_maxrss`` of the
process and of its worker processes, is reported):

1. decode the tree into an empty cache with ``--workers 1``, then into another with 2; the
   two entries must be byte-identical;
2. load the entry again (reuse: listing, checks, statistics, validation split);
3. gather training batches only (``PretrainData``'s loader, no model), from the cache file
   (rows read per batch) and from memory (the same splits copied into tensors first);
4. train SimCLR (the Lightning loop, ``max_steps``) from the file and from memory.

Parts 3 and 4 alternate between the sources, ``--rounds`` times. The page cache is warm in them (the entry was just written or read): the file's pages
come from memory, as on a machine whose memory holds the entry.

Usage:
    OMP_WAIT_POLICY=PASSIVE python benchmarks/imagefolder_load.py [PATH] [--image-size S]
        [--steps N] [--batch-size B] [--rounds R]
    (PATH default: ../shared/data/cifar10-jpg.zip; a tree: benchmarks/mixed_jpeg_tree.py)

Prints a table and ends with ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"


def _peak_mib() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_mib": own, "worker_peak_mib": workers}


def _load(args: argparse.Namespace, workers: int | None = None):
    from kinfonce.data import load_dataset

    return load_dataset(
        f"imagefolder:{args.path}",
        cache_dir=args.cache,
        image_size=args.image_size,
        workers=workers,
    )


def part_decode(args: argparse.Namespace) -> dict:
    import kinfonce.data  # noqa: F401  (imports are not timed)

    began = time.perf_counter()
    data = _load(args, args.workers)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "images": len(data.train) + len(data.val) + len(data.test)}


def part_reuse(args: argparse.Namespace) -> dict:
    import kinfonce.data  # noqa: F401

    began = time.perf_counter()
    _load(args)
    return {"seconds": time.perf_counter() - began}


def _splits(args: argparse.Namespace):
    import dataclasses

    from kinfonce.data.splits import LabeledImages

    splits = _load(args)
    if args.source == "memory":
        splits = dataclasses.replace(
            splits,
            train=LabeledImages(splits.train.images[:], splits.train.labels),
            val=LabeledImages(splits.val.images[:], splits.val.labels),
        )
    return splits


def part_gather(args: argparse.Namespace) -> dict:
    from types import SimpleNamespace

    import torch

    from kinfonce.data.batches import PretrainData

    data = PretrainData(_splits(args), args.batch_size, seed=0)
    device = SimpleNamespace(root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=device)
    loader = data.train_dataloader()
    batches = iter(loader)
    next(batches)  # the thread started
    began, count = time.perf_counter(), 0
    for count, _ in enumerate(batches, start=1):
        if count == args.gather_batches:
            break
    seconds = time.perf_counter() - began
    return {"images_per_s": count * args.batch_size / seconds}


def part_train(args: argparse.Namespace) -> dict:
    import lightning as L

    from kinfonce.config import PretrainConfig
    from kinfonce.resolve import resolve
    from kinfonce.train import PRETRAIN_JOB

    splits = _splits(args)
    config = resolve(
        PretrainConfig(
            dataset=f"imagefolder:{args.path}",
            image_size=args.image_size,
            batch_size=args.batch_size,
            backbone="resnet-mini",
            progress=False,
        )
    )
    module, data = PRETRAIN_JOB.build(config, splits)
    stamps: list[float] = []

    class Stamps(L.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            stamps.append(time.perf_counter())

    trainer = L.Trainer(
        max_steps=args.steps + 1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Stamps()],
    )
    trainer.fit(module, datamodule=data)
    seconds = stamps[-1] - stamps[0]  # the steps after the first
    return {"images_per_s": args.steps * args.batch_size / seconds}


PARTS = {"decode": part_decode, "reuse": part_reuse, "gather": part_gather, "train": part_train}


def run_part(args: argparse.Namespace, part: str, cache: Path, **extra: object) -> dict:
    """Run one part in a fresh process; its JSON result with its peak memory."""
    command = [sys.executable, __file__, str(args.path), "--part", part, "--cache", str(cache)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    command += ["--gather-batches", str(args.gather_batches)]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    for name, value in extra.items():
        command += [f"--{name}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"part {part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def digest(entry: Path) -> str:
    sha = hashlib.sha256()
    for name in ("images.npy", "labels.npy", "meta.json"):
        with open(entry / name, "rb") as file:
            while block := file.read(1 << 24):
                sha.update(block)
    return sha.hexdigest()


def _ratio(results: dict[str, list[dict]]) -> float:
    """Mean images/s from the file over mean images/s from memory."""
    mean = {s: sum(r["images_per_s"] for r in rs) / len(rs) for s, rs in results.items()}
    return mean["file"] / mean["memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT), help="directory or .zip")
    parser.add_argument("--image-size", type=int, default=None, help="side S (none: most common)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--gather-batches", type=int, default=100, help="timed batches (3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of parts 3 and 4")
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: temp)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", choices=["file", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps({**PARTS[args.part](args), **_peak_mib()}))
        return
    if not Path(args.path).exists():
        raise SystemExit(f"{args.path} not found (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        caches = {w: Path(work) / f"workers{w}" for w in (1, 2)}
        decode = {w: run_part(args, "decode", caches[w], workers=w) for w in (1, 2)}
        entries = {w: next(p for p in caches[w].iterdir() if p.is_dir() and p.name[0] != ".")
                   for w in (1, 2)}  # fmt: skip
        identical = digest(entries[1]) == digest(entries[2])
        entry_gib = sum(f.stat().st_size for f in entries[2].iterdir()) / 2**30
        shutil.rmtree(caches[1])  # keep one entry on the disk
        reuse = run_part(args, "reuse", caches[2])
        gather, train = {}, {}
        for _ in range(args.rounds):  # interleaved, so that a change of the machine's load
            for source in ("file", "memory"):  # falls on both sources alike
                for name, results in (("gather", gather), ("train", train)):
                    found = run_part(args, name, caches[2], source=source)
                    results.setdefault(source, []).append(found)
    images = decode[1]["images"]
    rate = {w: images / decode[w]["seconds"] for w in (1, 2)}
    print(f"{images:,} images of {args.path}, entry {entry_gib:.2f} GiB, byte-identical "
          f"entries from 1 and 2 workers: {identical}\n")  # fmt: skip
    print("| part | seconds | images/s | peak RSS, MiB (process / a worker) |")
    print("| --- | ---: | ---: | ---: |")
    for w in (1, 2):
        d = decode[w]
        print(f"| decode, {w} worker(s) | {d['seconds']:.1f} | {rate[w]:.0f} | "
              f"{d['peak_mib']:.0f} / {d['worker_peak_mib']:.0f} |")  # fmt: skip
    print(f"| load again from the cache | {reuse['seconds']:.1f} | | {reuse['peak_mib']:.0f} |")
    for name, results in (("gather batches", gather), ("train SimCLR", train)):
        for source in ("file", "memory"):
            rates = " / ".join(f"{r['images_per_s']:.0f}" for r in results[source])
            peak = max(r["peak_mib"] for r in results[source])
            print(f"| {name}, from {source} (each round) | | {rates} | {peak:.0f} |")
    print(
        f"RESULT images={images} decode1_img_s={rate[1]:.0f} decode2_img_s={rate[2]:.0f} "
        f"speedup2={rate[2] / rate[1]:.2f} identical={identical} "
        f"decode_peak_mib={max(d['peak_mib'] for d in decode.values()):.0f} "
        f"gather_file_over_memory={_ratio(gather):.2f} train_file_over_memory={_ratio(train):.2f}"
    )


if __name__ == "__main__":
    main()
