"""Data sets by name: ``load_dataset("cifar10")`` gives uint8 train/val/test splits and statistics."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from kinfonce.data.cache import (
    CACHE_ENV,
    CachedImages,
    cache_key,
    cache_root,
    load_cached,
    save_cached,
)
from kinfonce.data.digits import load_digits_splits
from kinfonce.data.imagefolder import load_split_tree
from kinfonce.data.splits import DatasetSplits, LabeledImages, channel_stats, split_off_validation
from kinfonce.data.tinyimagenet import find_tinyimagenet_root, load_tinyimagenet_splits
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


def check_dataset_name(name: object, image_size: int | None = None) -> None:
    """Raise a KinfonceError for an unknown name, or an ``image_size`` for a data set of
    fixed-size arrays (only image trees are decoded at a chosen size)."""
    if not isinstance(name, str) or not (name in DATASETS or name.startswith(IMAGEFOLDER_PREFIX)):
        raise _unknown(name)
    if image_size is not None and not name.startswith(TREE_DATASETS):
        raise KinfonceError(
            f"image_size applies to image trees (imagefolder:PATH, tinyimagenet) only; "
            f"{name!r} has images of a fixed size, so leave image_size unset"
        )


def _decoded_with_cache(
    name: str,
    identity: list,
    cache_dir: Path,
    decode: Callable[[], CachedImages],
) -> CachedImages:
    """The cached entry for ``identity``, else ``decode()`` (a ``CachedImages``) saved to it."""
    key = cache_key(name, identity)
    cached = load_cached(cache_dir, name, key)
    if cached is None:
        decoded = decode()  # decoding warned about skipped files
        try:
            save_cached(cache_dir, name, key, decoded)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            warnings.warn(
                f"{name}: cannot write its cache entry under {cache_dir} ({err}); using the "
                f"decoded images without caching them (free space there, or set {CACHE_ENV} "
                "to a writable directory, so that later runs need not decode again)",
                stacklevel=3,
            )
            return decoded
        cached = load_cached(cache_dir, name, key)
        if cached is None:
            raise RuntimeError(f"cache entry for {name} under {cache_dir} unreadable after writing")
    elif cached.meta.get("skipped", 0):
        warnings.warn(
            f"{name}: {cached.meta['skipped']} undecodable image file(s) were skipped when it was "
            f"decoded (listed in meta.json of its entry under {cache_dir})",
            stacklevel=3,
        )
    return cached


def _imagefolder(
    path: Path, cache_dir: Path, image_size: int | None, unlabeled: bool = False
) -> CachedImages:
    tree = ImageTree(path)

    def decode() -> CachedImages:
        splits, classes, skipped = load_split_tree(tree, image_size=image_size, unlabeled=unlabeled)
        meta = {"source": str(path), "skipped": len(skipped), "skipped_files": skipped}
        return CachedImages(splits["train"], splits["test"], classes, meta, splits.get("unlabeled"))

    identity = [tree.identity(), image_size] + (["unlabeled"] if unlabeled else [])
    return _decoded_with_cache(f"imagefolder-{path.stem}", identity, cache_dir, decode)


def _tinyimagenet(
    root: Path, cache_dir: Path, download: bool, image_size: int | None
) -> CachedImages:
    tree_root = find_tinyimagenet_root(root, download)
    tree = ImageTree(tree_root)

    def decode() -> CachedImages:
        splits, classes, skipped = load_tinyimagenet_splits(tree_root, image_size)
        meta = {"source": str(tree_root), "skipped": len(skipped), "skipped_files": skipped}
        return CachedImages(splits["train"], splits["test"], classes, meta)

    return _decoded_with_cache("tinyimagenet", [tree.identity(), image_size], cache_dir, decode)


def _load_source(
    name: str,
    root: Path | None,
    cache_dir: Path,
    download: bool,
    image_size: int | None,
    unlabeled: bool = False,
) -> tuple[LabeledImages, LabeledImages, list[str], int, LabeledImages | None]:
    """(train, test, class names, skipped file count, an image tree's unlabelled images when
    ``unlabeled``) of the named source."""
    if name == "digits":
        if root is not None:
            raise KinfonceError("root must be None for 'digits' (it is embedded in scikit-learn)")
        train, test, classes = load_digits_splits()
        return train, test, classes, 0, None
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
        data = _imagefolder(path, cache_dir, image_size, unlabeled)
        skipped = int(data.meta.get("skipped", 0))
        return data.train, data.test, data.class_names, skipped, data.unlabeled
    default_root = cache_dir / "datasets" / name
    if name in TORCHVISION_LAYOUTS:
        train, test, classes = load_torchvision_splits(name, root or default_root, download)
        return train, test, classes, 0, None
    if name == "tinyimagenet":
        data = _tinyimagenet(root or default_root, cache_dir, download, image_size)
        return data.train, data.test, data.class_names, int(data.meta.get("skipped", 0)), None
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

    Returns:
        ``DatasetSplits``; ``mean``/``std`` are per channel over the whole training set.

    Raises:
        ValueError: unknown name (the message lists the known ones), bad ``val_fraction`` or
            ``image_size``, train and test class sets that differ, fewer than 2 classes.
        FileNotFoundError: the data are absent; the message says how to obtain them.
    """
    check_dataset_name(name, image_size)
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
    train_full, test, classes, skipped, extra = _load_source(
        name, root_path, cache_root(cache_dir), download, image_size, unlabeled
    )
    side = int(train_full.images.shape[-1])
    if side < TINY_IMAGE_SIZE:
        warnings.warn(
            f"the images of {name} are tiny ({side}x{side} px): random crops keep few pixels "
            "and the backbone's downsampling fewer; set image_size (--image-size) to enlarge them",
            stacklevel=2,
        )
    train, val = split_off_validation(train_full, val_fraction, seed)
    mean, std = channel_stats(train_full.images)
    if unlabeled and name == "stl10":
        extra = load_stl10_unlabeled(
            root_path or cache_root(cache_dir) / "datasets" / name, download
        )
    return DatasetSplits(
        train=train,
        val=val,
        test=test,
        class_names=classes,
        num_classes=len(classes),
        image_size=int(train.images.shape[-1]),
        channels=int(train.images.shape[1]),
        mean=mean,
        std=std,
        name=name,
        skipped_files=skipped,
        unlabeled=extra,
    )
