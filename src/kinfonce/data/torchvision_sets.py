"""CIFAR-10, CIFAR-100 and STL-10 through torchvision, as uint8 tensors.

torchvision's readers of these binary releases are fast (arrays in a few files), so they are not
cached again; ``download=True`` fetches and checks the archives (needs network).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from kinfonce.data.splits import LabeledImages
from kinfonce.errors import KinfonceError, MissingFileError

__all__ = ["TORCHVISION_LAYOUTS", "load_stl10_unlabeled", "load_torchvision_splits"]

TORCHVISION_LAYOUTS = {
    "cifar10": "ROOT/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta: the "
    "'CIFAR-10 python version')",
    "cifar100": "ROOT/cifar-100-python/ (train, test, meta: the 'CIFAR-100 python version')",
    "stl10": "ROOT/stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin, "
    "class_names.txt; unlabeled_X.bin for --unlabeled)",
}
"""Where each data set's files must be under its root when offline."""


def _cifar(cls: type) -> Callable[[Path, bool], tuple[LabeledImages, LabeledImages, list[str]]]:
    def load(root: Path, download: bool) -> tuple[LabeledImages, LabeledImages, list[str]]:
        parts = []
        for train in (True, False):
            data = cls(str(root), train=train, download=download)
            images = torch.from_numpy(np.ascontiguousarray(data.data.transpose(0, 3, 1, 2)))
            labels = torch.as_tensor(data.targets, dtype=torch.int64)
            parts.append(LabeledImages(images, labels))
        return parts[0], parts[1], list(data.classes)

    return load


def _stl10_split(root: Path, split: str, download: bool) -> tuple[LabeledImages, list[str]]:
    data = datasets.STL10(str(root), split=split, download=download)
    images = torch.from_numpy(np.ascontiguousarray(data.data))
    return LabeledImages(images, torch.from_numpy(data.labels.astype(np.int64))), data.classes


def _stl10(root: Path, download: bool) -> tuple[LabeledImages, LabeledImages, list[str]]:
    (train, classes), (test, _) = (_stl10_split(root, s, download) for s in ("train", "test"))
    return train, test, list(classes)


_LOADERS = {
    "cifar10": _cifar(datasets.CIFAR10),
    "cifar100": _cifar(datasets.CIFAR100),
    "stl10": _stl10,
}


def _explained(name: str, root: Path, download: bool, load: Callable):
    """``load()``, with download and missing-file errors turned into clear ones."""
    try:
        return load()
    except OSError as err:  # network failures while downloading (URLError, timeouts)
        raise KinfonceError(f"downloading {name} into {root} failed: {err}") from err
    except RuntimeError as err:
        if download:
            raise
        raise MissingFileError(
            f"{name} not found under {root} ({err}). "
            + _image_tree_hint(name, root)
            + "Pass download=True (`--download` on the command line) to fetch it there, or "
            "place it as " + TORCHVISION_LAYOUTS[name].replace("ROOT", str(root))
        ) from err


def _image_tree_hint(name: str, root: Path) -> str:
    """What to do when the root of a named data set is an image tree (a ``.zip``, or a
    directory with ``train/``): load it as one, which keeps a recipe's other settings."""
    if root.suffix.lower() != ".zip" and not (root / "train").is_dir():
        return ""
    return (
        f"{root} looks like an image tree (train/<class>/*, test/<class>/*): load it with "
        f"--dataset imagefolder:{root} instead of --dataset {name} --data-root (after "
        "--recipe NAME it replaces the recipe's data set and keeps its other settings). "
    )


def load_stl10_unlabeled(root: Path, download: bool) -> LabeledImages:
    """STL-10's ``unlabeled`` split: 100,000 images (3, 96, 96), every label -1.

    torchvision reads it from ``ROOT/stl10_binary/unlabeled_X.bin`` after checking the
    MD5 sums of all the archive's files.
    """
    return _explained("stl10", root, download, lambda: _stl10_split(root, "unlabeled", download)[0])


def load_torchvision_splits(
    name: str, root: Path, download: bool
) -> tuple[LabeledImages, LabeledImages, list[str]]:
    """(train, test, class names) of a torchvision data set ("cifar10", "cifar100" or "stl10").

    STL-10's train split is its 5,000 labelled images; :func:`load_stl10_unlabeled` reads the
    unlabelled 100,000.

    Raises:
        FileNotFoundError: the files are absent and ``download`` is off; the message gives the
            download flag and the expected layout.
        RuntimeError: downloading failed.
    """
    return _explained(name, root, download, lambda: _LOADERS[name](root, download))
