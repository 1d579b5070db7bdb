"""Write a class-per-folder tree of JPEGs of mixed sizes, as ImageNet's are, for the load benchmark.

Usage:
    python benchmarks/mixed_jpeg_tree.py DIR [--images 100000] [--classes 100]

Each image has its own width and height, drawn uniformly from 60 to 400 px, and smooth random
content (an upsampled grid of random colours plus mild noise), so that its JPEG is of a
photograph's size in bytes rather than noise's. ``DIR/train/<class>/`` gets ``--images``
images, ``DIR/test/<class>/`` a twentieth as many; a file ``DIR/.complete`` marks a finished
tree, which a second call leaves as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import simplejpeg
from tqdm import tqdm

SIDES = (60, 400)


def draw(rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 image of random size in ``SIDES``."""
    height, width = rng.integers(SIDES[0], SIDES[1] + 1, size=2)
    cell = int(rng.integers(8, 33))
    grid = rng.integers(0, 256, size=(height // cell + 1, width // cell + 1, 3), dtype=np.uint8)
    image = grid.repeat(cell, axis=0).repeat(cell, axis=1)[:height, :width]
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def write_tree(root: Path, images: int, classes: int, seed: int = 0) -> Path:
    """Write the tree (train: ``images``, test: ``images // 20``) unless it is complete."""
    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    counts = {"train": images, "test": images // 20}
    for split, count in counts.items():
        for index in tqdm(range(count), desc=f"writing {split}", unit="img"):
            folder = root / split / f"class{index % classes:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = draw(rng)
            (folder / f"{index:07d}.jpg").write_bytes(simplejpeg.encode_jpeg(pixels, quality=90))
    (root / ".complete").write_text(f"{counts}\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory to write (under /tmp, not the repo)")
    parser.add_argument("--images", type=int, default=100_000, help="training images")
    parser.add_argument("--classes", type=int, default=100, help="class folders")
    args = parser.parse_args()
    write_tree(args.root, args.images, args.classes)


if __name__ == "__main__":
    main()
