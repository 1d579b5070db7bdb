"""Data sets by name: ``load_dataset("cifar10")`` gives uint8 train/val/test splits and statistics."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kinfonce.data.build import TreeRows, build_entry, default_workers
from kinfonce.data.cache import CACHE_ENV, CachedImages, cache_key, cache_root, load_or_build
from kinfonce.data.decode import DEFAULT_RESIZE, RESIZE_POLICIES
from kinfonce.data.digits import load_digits_splits
from kinfonce.data.imagefolder import check_every_class_decoded, tree_members
from kinfonce.data.splits import (
    DatasetSplits,
    LabeledImages,
    channel_counts,
    split_off_validation,
    stats_from_counts,
)
from kinfonce.data.tinyimagenet import find_tinyimagenet_root, tinyimagenet_members
from kinfonce.data.torchvision_sets import (
    TORCHVISION_LAYOUTS,
    load_stl10_unlabeled,
    load_torchvision_splits,
)
from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError, MissingFileError

__all__ = ["DATASETS", "load_dataset"]

IMAGEFOLDER_PREFIX = "imagefolder:"

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 8x8 digits as 16x16 gray images, embedded (no download)",
    "cifar10": "CIFAR-10 through torchvision (32x32 RGB, 10 classes)",
    "cifar100": "CIFAR-100 through torchvision (32x32 RGB, 100 classes)",
    "stl10": "STL-10 through torchvision (96x96 RGB, 10 classes; its 100,000 unlabelled "
    "images with unlabeled=True)",
    "tinyimagenet": "Tiny ImageNet from its standard layout (64x64 RGB, 200 classes)",
    f"{IMAGEFOLDER_PREFIX}PATH": "a directory or .zip with train/<class>/* and test/<class>/*",
}
"""Known names and what each gives."""


#: Data sets decoded from image files, whose image size can be chosen (``image_size``).
TREE_DATASETS = ("tinyimagenet", IMAGEFOLDER_PREFIX)
#: Below this side (pixels) a warning says the images are tiny: random crops keep few
#: pixels, and a ResNet's downsampling leaves little of them.
TINY_IMAGE_SIZE = 16


def _unknown(name: object) -> KinfonceError:
    return KinfonceError(f"unknown data set name {name!r}; known names: {', '.join(DATASETS)}")


def check_dataset_name(
    name: object, image_size: int | None = None, resize: str = DEFAULT_RESIZE
) -> None:
    """Raise a KinfonceError for an unknown name, or an ``image_size`` or ``resize`` for a
    data set of fixed-size arrays (only image trees are decoded at a chosen size)."""
    if not isinstance(name, str) or not (name in DATASETS or name.startswith(IMAGEFOLDER_PREFIX)):
        raise _unknown(name)
    if resize not in RESIZE_POLICIES:
        raise KinfonceError(f"resize must be one of {sorted(RESIZE_POLICIES)}, got {resize!r}")
    for field, value, default in (
        ("image_size", image_size, None),
        ("resize", resize, DEFAULT_RESIZE),
    ):
        if value != default and not name.startswith(TREE_DATASETS):
            raise KinfonceError(
                f"{field} applies to image trees (imagefolder:PATH, tinyimagenet) only; "
                f"{name!r} has images of a fixed size, so leave {field} unset"
            )


@dataclass(frozen=True)
class TreeDecoding:
    """How an image tree is decoded into the cache: the side S of the stored images (None: the
    most common size), the policy that fits other shapes to S x S, and the processes that
    decode (None: the cores available; it does not change the result)."""

    image_size: int | None = None
    resize: str = DEFAULT_RESIZE
    workers: int | None = None


@dataclass(frozen=True)
class _Source:
    """A loaded source: its splits, class names, skipped files and, where the cache has them,
    the byte histograms (C, 256) of its training images."""

    train: LabeledImages
    test: LabeledImages
    classes: list[str]
    skipped: int = 0
    unlabeled: LabeledImages | None = None
    counts: torch.Tensor | None = None

    @classmethod
    def cached(cls, data: CachedImages) -> _Source:
        counts = torch.tensor(data.meta["train_channel_counts"], dtype=torch.int64)
        skipped = int(data.meta.get("skipped", 0))
        return cls(data.train, data.test, data.class_names, skipped, data.unlabeled, counts)


def _decoded_with_cache(
    name: str,
    identity: list,
    cache_dir: Path,
    members: Callable[[], tuple[ImageTree, dict[str, list[tuple[str, int]]], list[str]]],
    decoding: TreeDecoding,
) -> _Source:
    """The cached entry of ``identity`` and the decoding settings, else the tree's files
    (``members()``: tree, split -> (name, label) pairs, class names) decoded into it."""

    def build(partial: Path) -> None:
        tree, pairs, classes = members()
        build_entry(
            partial,
            TreeRows.from_members(tree, pairs),
            image_size=decoding.image_size,
            resize=decoding.resize,
            workers=decoding.workers or default_workers(),
            meta={"source": str(tree.path), "class_names": classes},
        )

    key = cache_key(name, identity, decoding.image_size, decoding.resize)
    try:
        cached, built = load_or_build(cache_dir, name, key, build)
    except OSError as err:  # a cache directory that cannot be written
        elsewhere = Path(tempfile.mkdtemp(prefix="kinfonce-uncached-"))
        atexit.register(shutil.rmtree, elsewhere, ignore_errors=True)
        warnings.warn(
            f"{name}: cannot write its cache entry under {cache_dir} ({err}); decoding into "
            f"{elsewhere} without caching, removed when this process ends (set {CACHE_ENV} to "
            "a writable directory, so that later runs need not decode again)",
            stacklevel=3,
        )
        cached, built = load_or_build(elsewhere, name, key, build)
    labels = {"train": cached.train.labels, "test": cached.test.labels}
    check_every_class_decoded(labels, cached.class_names, cached.meta.get("source", name))
    if not built and cached.meta.get("skipped", 0):
        warnings.warn(
            f"{name}: {cached.meta['skipped']} undecodable image file(s) were skipped when it was "
            f"decoded (listed in meta.json of its entry under {cache_dir})",
            stacklevel=3,
        )
    return _Source.cached(cached)


def _imagefolder(
    path: Path, cache_dir: Path, decoding: TreeDecoding, unlabeled: bool = False
) -> _Source:
    tree = ImageTree(path)
    identity = [tree.identity()] + (["unlabeled"] if unlabeled else [])
    return _decoded_with_cache(
        f"imagefolder-{path.stem}",
        identity,
        cache_dir,
        lambda: (tree, *tree_members(tree, unlabeled=unlabeled)),
        decoding,
    )


def _tinyimagenet(root: Path, cache_dir: Path, download: bool, decoding: TreeDecoding) -> _Source:
    tree = ImageTree(find_tinyimagenet_root(root, download))
    return _decoded_with_cache(
        "tinyimagenet",
        [tree.identity()],
        cache_dir,
        lambda: (tree, *tinyimagenet_members(tree)),
        decoding,
    )


def _load_source(
    name: str,
    root: Path | None,
    cache_dir: Path,
    download: bool,
    decoding: TreeDecoding,
    unlabeled: bool = False,
) -> _Source:
    """The named source (with an image tree's unlabelled images when ``unlabeled``)."""
    if name == "digits":
        if root is not None:
            raise KinfonceError("root must be None for 'digits' (it is embedded in scikit-learn)")
        return _Source(*load_digits_splits())
    if name.startswith(IMAGEFOLDER_PREFIX):
        if download:
            raise KinfonceError("download=True is not possible for imagefolder:PATH (a local tree)")
        path = Path(name[len(IMAGEFOLDER_PREFIX) :]).expanduser()
        if not str(path) or str(path) == ".":
            raise KinfonceError(
                "imagefolder needs a path: 'imagefolder:PATH' (a directory or .zip)"
            )
        path = root / path if root is not None and not path.is_absolute() else path
        if not path.exists():
            raise MissingFileError(
                f"imagefolder path {path} does not exist: give a directory or .zip holding "
                "train/<class>/* and test/<class>/*"
            )
        return _imagefolder(path, cache_dir, decoding, unlabeled)
    default_root = cache_dir / "datasets" / name
    if name in TORCHVISION_LAYOUTS:
        return _Source(*load_torchvision_splits(name, root or default_root, download))
    if name == "tinyimagenet":
        return _tinyimagenet(root or default_root, cache_dir, download, decoding)
    raise _unknown(name)


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    unlabeled: bool = False,
    image_size: int | None = None,
    resize: str = DEFAULT_RESIZE,
    workers: int | None = None,
) -> DatasetSplits:
    """Load a data set by name as uint8 tensors with train/val/test splits.

    Args:
        name: one of ``DATASETS``: "digits", "cifar10", "cifar100", "stl10", "tinyimagenet", or
            "imagefolder:PATH" (PATH a directory or .zip with train/ and test/ inside; relative
            to ``root`` when both are given).
        root: where the files are (default ``<cache>/datasets/<name>``); unused by digits.
        cache_dir: cache directory (default ``$KINFONCE_CACHE`` or ``~/.cache/kinfonce``);
            decoded image trees are kept there.
        download: fetch torchvision data sets and Tiny ImageNet into ``root`` if absent.
        val_fraction: fraction of the training set held out (stratified) as the validation split.
        seed: seed of the validation split.
        unlabeled: also load the data set's unlabelled images into ``unlabeled``, for
            pretraining only: STL-10's 100,000, or every image under an image tree's
            ``unlabelled/`` folder (beside ``train/`` and ``test/``).
        image_size: for image trees (``imagefolder:``, ``tinyimagenet``), the side every image
            is resized to; None: the most common size (a warning counts the resized images).
        resize: for image trees, how an image of another shape is fitted to that size (a
            name of ``decode.RESIZE_POLICIES``).
        workers: for image trees, the processes that decode a tree into the cache (None: the
            cores available); the cache is the same whatever their number.

    Returns:
        ``DatasetSplits``; ``mean``/``std`` are per channel over the whole training set. An
        image tree's splits are rows of its cache entry on disk, read as they are used.

    Raises:
        ValueError: unknown name (the message lists the known ones), bad ``val_fraction`` or
            ``image_size``, train and test class sets that differ, fewer than 2 classes.
        FileNotFoundError: the data are absent; the message says how to obtain them.
    """
    check_dataset_name(name, image_size, resize)
    if not 0.0 <= val_fraction < 1.0:
        raise KinfonceError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if unlabeled and name != "stl10" and not name.startswith(IMAGEFOLDER_PREFIX):
        raise KinfonceError(
            f"unlabeled=True needs a data set with an unlabelled split (stl10, or an "
            f"imagefolder:PATH tree with an unlabelled/ folder), got {name!r}"
        )
    if image_size is not None and image_size < 1:
        raise KinfonceError(f"image_size must be >= 1 (pixels), got {image_size!r}")
    root_path = Path(root).expanduser() if root is not None else None
    if workers is not None and workers < 1:
        raise KinfonceError(f"workers must be >= 1 (processes), got {workers!r}")
    source = _load_source(
        name,
        root_path,
        cache_root(cache_dir),
        download,
        TreeDecoding(image_size, resize, workers),
        unlabeled,
    )
    train_full, extra = source.train, source.unlabeled
    side = int(train_full.images.shape[-1])
    if side < TINY_IMAGE_SIZE:
        warnings.warn(
            f"the images of {name} are tiny ({side}x{side} px): random crops keep few pixels "
            "and the backbone's downsampling fewer; set image_size (--image-size) to enlarge them",
            stacklevel=2,
        )
    train, val = split_off_validation(train_full, val_fraction, seed)
    counts = channel_counts(train_full.images) if source.counts is None else source.counts
    mean, std = stats_from_counts(counts)
    if unlabeled and name == "stl10":
        extra = load_stl10_unlabeled(
            root_path or cache_root(cache_dir) / "datasets" / name, download
        )
    return DatasetSplits(
        train=train,
        val=val,
        test=source.test,
        class_names=source.classes,
        num_classes=len(source.classes),
        image_size=int(train.images.shape[-1]),
        channels=int(train.images.shape[1]),
        mean=mean,
        std=std,
        name=name,
        skipped_files=source.skipped,
        unlabeled=extra,
    )
