"""Decode many image files into one uint8 array, skipping (and reporting) undecodable ones.

JPEGs are decoded by ``simplejpeg`` (libjpeg-turbo; measured ~40 us per 32x32 image against
~100 us for torchvision.io, whose image decoding is deprecated, and several hundred for PIL,
whose per-file header parsing is Python), other formats by PIL. One process: on the 2 shared
cores this was measured, a pool of two decoded CIFAR-10's test set four times slower (pool start
and transfers) than the plain loop (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError

__all__ = ["DecodedImages", "decode_images", "decode_one"]


def decode_one(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode image bytes to RGB uint8 (3, H, W), or (3, size, size) when ``size`` is given.

    An image of another shape is resized (shorter side to ``size``, antialiased) and
    centre-cropped. A truncated or corrupt JPEG raises instead of decoding partly.

    Raises:
        OSError, ValueError: the bytes are not a decodable image.
    """
    if simplejpeg.is_jpeg(data):
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    else:
        with Image.open(io.BytesIO(data)) as pil:
            image = np.asarray(pil.convert("RGB"))
    image = image.transpose(2, 0, 1)
    if size is not None and image.shape[1:] != (size, size):
        resized = TF.resize(torch.from_numpy(image.copy()), size, antialias=True)
        image = TF.center_crop(resized, [size, size]).numpy()
    return image


def _decode_or_error(tree: ImageTree, name: str, size: int | None) -> np.ndarray | str:
    try:
        return decode_one(tree.read(name), size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class DecodedImages:
    """Decoded images (M, 3, S, S) uint8, the index in ``names`` of each, and the skipped lines."""

    images: np.ndarray
    kept: np.ndarray
    skipped: list[str]


def decode_images(
    tree: ImageTree,
    names: Sequence[str],
    *,
    size: int | None = None,
    desc: str = "decoding",
) -> DecodedImages:
    """Decode ``names`` from ``tree`` into one uint8 array, skipping undecodable files.

    Args:
        tree: where the files are.
        names: members to decode, in order.
        size: side of the square output; None takes the shorter side of the first decodable image.
        desc: progress-bar label.

    Returns:
        ``DecodedImages``; one warning reports the skipped files, if any.

    Raises:
        ValueError: no file decodes at all.
    """
    names = list(names)
    skipped: list[str] = []
    out: np.ndarray | None = None
    kept: list[int] = []
    for index, name in enumerate(tqdm(names, desc=desc, unit="img", leave=False)):
        image = _decode_or_error(tree, name, size)
        if isinstance(image, str):
            skipped.append(f"{name} ({image})")
            continue
        if out is None:  # the first decodable image fixes the size
            size = min(image.shape[1:]) if size is None else size
            if image.shape[1:] != (size, size):
                image = decode_one(tree.read(name), size)
            out = np.empty((len(names) - index, 3, size, size), dtype=np.uint8)
        out[len(kept)] = image
        kept.append(index)
    if out is None:
        raise KinfonceError(f"no decodable image among {len(names)} files in {tree.path}")
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"skipped {len(skipped)} undecodable image file(s) in {tree.path}: {shown}",
            stacklevel=2,
        )
    return DecodedImages(out[: len(kept)], np.asarray(kept, dtype=np.int64), skipped)
