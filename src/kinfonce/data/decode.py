"""Decode many image files into one uint8 array, skipping (and reporting) undecodable ones.

Two passes: the first reads every file's header (its size, without decoding the pixels),
so that the output size can be chosen (:func:`most_common_size`) and one array allocated;
the second decodes each image straight to that size. A file fails per file, whatever the
error (unreadable, a bad CRC in a zip, a truncated or corrupt image, a decompression
bomb): it is skipped, named and counted, and the other files load.

JPEGs are decoded by ``simplejpeg`` (libjpeg-turbo; measured ~40 us per 32x32 image against
~100 us for torchvision.io, whose image decoding is deprecated, and several hundred for PIL,
whose per-file header parsing is Python), other formats by PIL. simplejpeg is imported where the
first JPEG is met, so that everything else (other formats, every part of kinfonce that decodes
nothing) runs on a machine without it. One process: on the 2 shared
cores this was measured, a pool of two decoded CIFAR-10's test set four times slower (pool start
and transfers) than the plain loop (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm.auto import tqdm

from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError
from kinfonce.scoped import progress_shown

#: (height, width) of an image, or why it cannot be read.
Shape = tuple[int, int] | str


def _check_pixels(height: int, width: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > 2 * limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} pixels, more than twice PIL's MAX_IMAGE_PIXELS ({limit}): a "
            "possible decompression bomb"
        )


#: The start-of-image marker every JPEG file begins with.
_JPEG_START = b"\xff\xd8"


def _jpeg_codec(data: bytes) -> ModuleType | None:
    """simplejpeg when ``data`` is a JPEG (``simplejpeg.is_jpeg``), else None.

    Raises:
        KinfonceError: a JPEG, and simplejpeg is not installed.
    """
    if not data.startswith(_JPEG_START):
        return None
    try:
        import simplejpeg
    except ImportError:
        raise KinfonceError(
            "decoding JPEG files needs simplejpeg, a dependency of kinfonce that is not "
            "installed here: pip install simplejpeg"
        ) from None
    return simplejpeg if simplejpeg.is_jpeg(data) else None


def image_shape(data: bytes) -> tuple[int, int]:
    """(height, width) from an image's header, without decoding its pixels.

    Raises:
        PIL.Image.DecompressionBombError: more than twice PIL's ``MAX_IMAGE_PIXELS``.
        Exception: any error of an unreadable header.
    """
    jpeg = _jpeg_codec(data)
    if jpeg is not None:
        height, width, _, _ = jpeg.decode_jpeg_header(data)
        _check_pixels(height, width)
        return height, width
    with Image.open(io.BytesIO(data)) as pil:  # PIL checks the pixel count itself
        width, height = pil.size
    return height, width


def decode_one(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode image bytes to RGB uint8 (3, H, W), or (3, size, size) when ``size`` is given.

    An image of another shape is resized (shorter side to ``size``, antialiased) and
    centre-cropped. A truncated or corrupt JPEG raises instead of decoding partly.

    Raises:
        PIL.Image.DecompressionBombError: too many pixels (checked before decoding).
        OSError, ValueError: the bytes are not a decodable image.
    """
    jpeg = _jpeg_codec(data)
    if jpeg is not None:
        image_shape(data)  # refuses a decompression bomb before allocating its pixels
        image = jpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    else:
        with Image.open(io.BytesIO(data)) as pil:
            image = np.asarray(pil.convert("RGB"))
    image = image.transpose(2, 0, 1)
    if size is not None and image.shape[1:] != (size, size):
        resized = TF.resize(torch.from_numpy(image.copy()), size, antialias=True)
        image = TF.center_crop(resized, [size, size]).numpy()
    return image


def _per_file(tree: ImageTree, name: str, decode: Callable[[bytes], object]) -> object | str:
    """``decode(bytes of name)``, or the error as a line. Any exception counts: reading and
    decoding untrusted files fails in many ways (BadZipFile, zlib.error, OSError, ValueError,
    SyntaxError, DecompressionBombError, ...), and each must skip one file, not the load. A
    KinfonceError (a missing decoder) is about the machine, not the file, and stops the load."""
    try:
        return decode(tree.read(name))
    except KinfonceError:
        raise
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def read_shapes(tree: ImageTree, names: Sequence[str], desc: str = "reading sizes") -> list[Shape]:
    """The (height, width) of each file from its header, or why it cannot be read."""
    return [
        _per_file(tree, name, image_shape)  # type: ignore[misc]
        for name in tqdm(names, desc=desc, unit="img", leave=False, disable=not progress_shown())
    ]


def most_common_size(shapes: Sequence[Shape]) -> int:
    """Side of the square output for images of these shapes: the shorter side of the most
    common (height, width), the first seen among equally common ones.

    Raises:
        KinfonceError: no readable shape.
    """
    counts = Counter(shape for shape in shapes if not isinstance(shape, str))
    if not counts:
        raise KinfonceError(f"no readable image among {len(shapes)} files")
    height, width = counts.most_common(1)[0][0]
    return min(height, width)


@dataclass(frozen=True)
class DecodedImages:
    """Decoded images (M, 3, S, S) uint8, the index in ``names`` of each, the skipped lines,
    and how many of the M were resized (their own shape was not S x S)."""

    images: np.ndarray
    kept: np.ndarray
    skipped: list[str]
    resized: int


def decode_images(
    tree: ImageTree,
    names: Sequence[str],
    *,
    size: int | None = None,
    shapes: Sequence[Shape] | None = None,
    desc: str = "decoding",
) -> DecodedImages:
    """Decode ``names`` from ``tree`` into one uint8 array, skipping undecodable files.

    Args:
        tree: where the files are.
        names: members to decode, in order.
        size: side of the square output; None: :func:`most_common_size` of the files.
        shapes: :func:`read_shapes` of ``names``, if already read.
        desc: progress-bar label.

    Returns:
        ``DecodedImages``; one warning reports the skipped files, if any.

    Raises:
        ValueError: no file decodes at all.
    """
    names = list(names)
    shapes = read_shapes(tree, names) if shapes is None else shapes
    size = most_common_size(shapes) if size is None else size
    decode_at_size = functools.partial(decode_one, size=size)
    skipped: list[str] = []
    out = np.empty((len(names), 3, size, size), dtype=np.uint8)
    kept: list[int] = []
    resized = 0
    for index, (name, shape) in enumerate(
        zip(
            tqdm(names, desc=desc, unit="img", leave=False, disable=not progress_shown()),
            shapes,
            strict=True,
        )
    ):
        image = shape if isinstance(shape, str) else _per_file(tree, name, decode_at_size)
        if isinstance(image, str):
            skipped.append(f"{name} ({image})")
            continue
        out[len(kept)] = image
        kept.append(index)
        resized += shape != (size, size)
    if not kept:
        raise KinfonceError(f"no decodable image among {len(names)} files in {tree.path}")
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"skipped {len(skipped)} undecodable image file(s) in {tree.path}: {shown}",
            stacklevel=2,
        )
    return DecodedImages(out[: len(kept)], np.asarray(kept, dtype=np.int64), skipped, resized)
