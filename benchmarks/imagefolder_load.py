"""Seconds to load an image tree by name: decoding into a fresh cache, then from the cache.

Usage:
    python benchmarks/imagefolder_load.py [PATH]   (default: ../shared/data/cifar10-jpg.zip)

Prints a table and ends with ``RESULT first_s=... cached_s=...``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kinfonce.data import load_dataset

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT), help="directory or .zip")
    args = parser.parse_args()
    if not Path(args.path).exists():
        raise SystemExit(f"{args.path} not found (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        data = load_dataset(f"imagefolder:{args.path}", cache_dir=cache)
        first = time.perf_counter() - began
        began = time.perf_counter()
        load_dataset(f"imagefolder:{args.path}", cache_dir=cache)
        cached = time.perf_counter() - began
    images = len(data.train) + len(data.val) + len(data.test)
    print(f"| load of {images:,} images ({data.image_size} px) | seconds |\n| --- | ---: |")
    print(f"| first: read sizes, decode, write the cache, statistics, val split | {first:.1f} |")
    print(f"| second: from the cache (memory-mapped), statistics, val split | {cached:.1f} |")
    print(f"RESULT first_s={first:.1f} cached_s={cached:.1f} images={images}")


if __name__ == "__main__":
    main()
