"""Decode image files into rows of a uint8 array, skipping (and reporting) undecodable ones.

The output size is given, or chosen from every file's header (its size, read without decoding
the pixels; :func:`most_common_size`); each image is then decoded and fitted to that size by a
resize policy (:data:`RESIZE_POLICIES`). A file fails per file, whatever the error
(unreadable, a bad CRC in a zip, a truncated or corrupt image, a decompression bomb): it is
skipped, named and counted, and the other files load. Which process decodes which rows is
:mod:`kinfonce.data.build`'s concern.

JPEGs are decoded by ``simplejpeg`` (libjpeg-turbo; measured ~40 us per 32x32 image against
~100 us for torchvision.io, whose image decoding is deprecated, and several hundred for PIL,
whose per-file header parsing is Python), other formats by PIL. simplejpeg is imported where the
first JPEG is met, so that everything else (other formats, every part of kinfonce that decodes
nothing) runs on a machine without it.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError

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


#: How an image of another shape becomes S x S pixels (``--resize``): name -> what it does.
RESIZE_POLICIES = {
    "shorter-side-then-centre-crop": "the shorter side scaled to S (antialiased), then the "
    "central S x S kept: the aspect ratio stays, the ends of the longer side are lost",
    "stretch": "each side scaled to S (antialiased): the whole image stays, its aspect ratio not",
}
#: The resize policy of image trees unless one is chosen.
DEFAULT_RESIZE = "shorter-side-then-centre-crop"


def decode_one(data: bytes) -> np.ndarray:
    """Decode image bytes to RGB uint8 (3, H, W). A truncated or corrupt JPEG raises instead
    of decoding partly.

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
    return image.transpose(2, 0, 1)


def fit_to_size(image: np.ndarray, size: int, resize: str) -> np.ndarray:
    """A uint8 image (3, H, W) as (3, size, size), resized by the policy ``resize``
    (:data:`RESIZE_POLICIES`) unless it has that shape already."""
    if image.shape[1:] == (size, size):
        return image
    pixels = torch.from_numpy(np.ascontiguousarray(image))
    if resize == "stretch":
        return TF.resize(pixels, [size, size], antialias=True).numpy()
    return TF.center_crop(TF.resize(pixels, size, antialias=True), [size, size]).numpy()


#: An object's repr with its memory address (as in PIL's "cannot identify image file <...>"),
#: which would make a cache entry's list of skipped files differ from one process to another.
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


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
        return f"{type(err).__name__}: {_ADDRESS.sub('the file', str(err))}"


def read_shapes(tree: ImageTree, names: Sequence[str]) -> list[Shape]:
    """The (height, width) of each file from its header, or why it cannot be read."""
    return [_per_file(tree, name, image_shape) for name in names]  # type: ignore[misc]


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
class DecodedRows:
    """What decoding a run of files into rows gave: the skipped rows (index in the run, why),
    how many images were resized, and per-channel histograms (C, 256) int64 of the byte values
    of the decoded (not skipped) images (zeros where they were not counted)."""

    skipped: list[tuple[int, str]]
    resized: int
    counts: np.ndarray


def decode_into(
    tree: ImageTree,
    names: Sequence[str],
    out: np.ndarray,
    size: int,
    resize: str,
    count_bytes: bool = True,
) -> DecodedRows:
    """Decode ``names`` into ``out`` (len(names), 3, size, size) uint8, row i from file i; the
    row of an undecodable file is left as it is and reported in ``skipped``. The byte
    histograms are counted only with ``count_bytes``: counting takes about as long as
    decoding a JPEG."""
    skipped: list[tuple[int, str]] = []
    resized = 0
    counts = np.zeros((3, 256), dtype=np.int64)
    for index, name in enumerate(names):
        image = _per_file(tree, name, decode_one)
        if isinstance(image, str):
            skipped.append((index, f"{name} ({image})"))
            continue
        resized += image.shape[1:] != (size, size)
        out[index] = fit_to_size(image, size, resize)
        if count_bytes:
            for channel in range(3):
                counts[channel] += np.bincount(out[index, channel].reshape(-1), minlength=256)
    return DecodedRows(skipped, resized, counts)


def warn_skipped(skipped: Sequence[str], source: object) -> None:
    """One warning that counts the skipped files and names the first five, if any."""
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"skipped {len(skipped)} undecodable image file(s) in {source}: {shown}",
            stacklevel=3,
        )


@dataclass(frozen=True)
class DecodedImages:
    """Decoded images (M, 3, S, S) uint8 in memory, the index in ``names`` of each, the skipped
    lines, and how many of the M were resized (their own shape was not S x S)."""

    images: np.ndarray
    kept: np.ndarray
    skipped: list[str]
    resized: int


def decode_images(
    tree: ImageTree,
    names: Sequence[str],
    *,
    size: int | None = None,
    resize: str = DEFAULT_RESIZE,
) -> DecodedImages:
    """Decode ``names`` into one uint8 array in memory, skipping undecodable files: for small
    sets (a caption file's images); image trees go to the cache on disk
    (:mod:`kinfonce.data.build`).

    Args:
        tree: where the files are.
        names: members to decode, in order.
        size: side of the square output; None: :func:`most_common_size` of the files.
        resize: the policy that fits other shapes (:data:`RESIZE_POLICIES`).

    Returns:
        ``DecodedImages``; one warning reports the skipped files, if any.

    Raises:
        KinfonceError: no file decodes at all.
    """
    names = list(names)
    size = most_common_size(read_shapes(tree, names)) if size is None else size
    out = np.zeros((len(names), 3, size, size), dtype=np.uint8)
    decoded = decode_into(tree, names, out, size, resize, count_bytes=False)
    bad = [index for index, _ in decoded.skipped]
    kept = np.delete(np.arange(len(names), dtype=np.int64), bad)
    if len(kept) == 0:
        raise KinfonceError(f"no decodable image among {len(names)} files in {tree.path}")
    skipped = [line for _, line in decoded.skipped]
    warn_skipped(skipped, tree.path)
    return DecodedImages(out[kept] if bad else out, kept, skipped, decoded.resized)
