"""Class-per-folder image trees (``<split>/<class>/<image>``), in a directory or a zip.

Why not ``torchvision.datasets.ImageFolder``: it decodes lazily, one image per ``__getitem__``,
from a directory only; here every image is decoded once (from a directory or a zip's members)
into one uint8 array that the cache then keeps on disk.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from kinfonce.data import decode
from kinfonce.data.splits import LabeledImages
from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError, MissingFileError

__all__ = ["decode_labelled_splits", "load_split_tree"]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _find_split_root(names: Sequence[str], splits: Sequence[str]) -> str:
    """The prefix under which ``splits`` are folders: "" or a single top-level folder."""
    tops = {PurePosixPath(n).parts[0] for n in names if len(PurePosixPath(n).parts) > 1}
    if all(s in tops for s in splits):
        return ""
    if len(tops) == 1:
        top = next(iter(tops))
        inner = {PurePosixPath(n).parts[1] for n in names if len(PurePosixPath(n).parts) > 2}
        if all(s in inner for s in splits):
            return top + "/"
    return ""


#: Folders of a tree's unlabelled images (any depth below them), read with ``unlabeled``.
UNLABELED_FOLDERS = ("unlabelled", "unlabeled")


def load_split_tree(
    tree: ImageTree,
    splits: Sequence[str] = ("train", "test"),
    image_size: int | None = None,
    unlabeled: bool = False,
) -> tuple[dict[str, LabeledImages], list[str], list[str]]:
    """Decode ``<split>/<class>/<image>`` for each split of a tree.

    Args:
        tree: the directory or zip.
        splits: the split folders.
        image_size: see :func:`decode_labelled_splits`.
        unlabeled: also decode every image under ``unlabelled/`` (or ``unlabeled/``), at any
            depth, into the split ``"unlabeled"`` with label -1.

    Returns:
        (images per split, class names sorted, skipped-file lines).

    Raises:
        FileNotFoundError: a split folder is missing or holds no image.
        ValueError: the splits' class sets differ (the message names the differences),
            there are fewer than 2 classes, or a class has no decodable image in a split.
    """
    names = [n for n in tree.names() if _is_image(n)]
    prefix = _find_split_root(names, splits)
    members: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = PurePosixPath(name[len(prefix) :]).parts
        if len(parts) >= 3 and parts[0] in members:
            members[parts[0]].append((parts[1], name))
    for split, found in members.items():
        if not found:
            raise MissingFileError(
                f"no images under {split}/<class>/ in {tree.path}: expected layout "
                f"{'/'.join(splits)} folders, each with one sub-folder of images per class"
            )
    classes = {split: sorted({cls for cls, _ in found}) for split, found in members.items()}
    reference = classes[splits[0]]
    for split in splits[1:]:
        if classes[split] != reference:
            only_ref = sorted(set(reference) - set(classes[split]))
            only_other = sorted(set(classes[split]) - set(reference))
            raise KinfonceError(
                f"class folders differ between {splits[0]}/ and {split}/ in {tree.path}: "
                f"only in {splits[0]}: {only_ref}; only in {split}: {only_other}"
            )
    if len(reference) < 2:
        raise KinfonceError(
            f"{tree.path} holds {len(reference)} class folder(s) ({reference}) under "
            f"{splits[0]}/: a classification probe needs at least 2 classes"
        )
    index = {cls: i for i, cls in enumerate(reference)}
    labelled = {
        split: [(name, index[cls]) for cls, name in found] for split, found in members.items()
    }
    if unlabeled:
        folders = tuple(prefix + folder + "/" for folder in UNLABELED_FOLDERS)
        labelled["unlabeled"] = [(name, -1) for name in names if name.startswith(folders)]
        if not labelled["unlabeled"]:
            raise MissingFileError(
                f"no images under unlabelled/ in {tree.path}: with unlabeled=True "
                "(--unlabeled), put the images without labels in an unlabelled/ folder beside "
                f"{'/'.join(splits)}"
            )
    result, skipped = decode_labelled_splits(tree, labelled, image_size)
    check_every_class_decoded(result, reference, str(tree.path))
    return result, reference, skipped


def check_every_class_decoded(
    images: dict[str, LabeledImages], class_names: Sequence[str], source: str
) -> None:
    """Refuse labelled splits in which a class kept no decodable image: a class whose every
    file is undecodable would otherwise vanish, and a probe of the classes left would look
    perfect (a 2-class tree scoring 100% on one). The unlabelled split has no classes.

    Raises:
        KinfonceError: naming the split and the classes without a decoded image.
    """
    for split, found in images.items():
        if split == "unlabeled":
            continue
        present = set(found.labels.unique().tolist())
        missing = [name for label, name in enumerate(class_names) if label not in present]
        if missing:
            shown = missing[:10] + (["..."] if len(missing) > 10 else [])
            raise KinfonceError(
                f"{source}: class(es) {shown} have no decodable image under {split}/ (every "
                "file of theirs was skipped); each class needs at least one decodable image "
                "in each split: repair or remove those files"
            )


def available_memory() -> int:
    """Bytes of memory available to a new allocation now: psutil's estimate, else (where
    psutil is missing, as on a bare GPU machine) the free physical pages."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def check_fits_in_memory(count: int, image_size: int, source: str) -> None:
    """Refuse, before decoding, a data set whose uint8 tensor (count x 3 x S x S bytes, the
    RGB bound) would not fit in the memory available now: kinfonce holds data in memory."""
    needed = count * 3 * image_size * image_size
    available = available_memory()
    if needed > available:
        raise KinfonceError(
            f"{source}: {count} images at {image_size}x{image_size} px need "
            f"{needed / 2**30:.1f} GiB as uint8 tensors, but only {available / 2**30:.1f} GiB "
            "of memory is available; kinfonce decodes a data set into memory. Choose a smaller "
            "--image-size, or fewer images"
        )


def decode_labelled_splits(
    tree: ImageTree, members: dict[str, list[tuple[str, int]]], image_size: int | None = None
) -> tuple[dict[str, LabeledImages], list[str]]:
    """Decode each split's (member, label) pairs, all at one square size.

    Args:
        tree: where the files are.
        members: split -> (member name, label) pairs.
        image_size: the side in pixels; None: the most common size over all splits
            (:func:`kinfonce.data.decode.most_common_size`). A warning counts the images
            resized to it.

    Returns:
        (images per split, skipped-file lines of all splits).
    """
    shapes = {
        split: decode.read_shapes(tree, [n for n, _ in pairs], desc=f"reading {split} sizes")
        for split, pairs in members.items()
    }
    chosen = "given"
    if image_size is None:
        image_size = decode.most_common_size([s for found in shapes.values() for s in found])
        chosen = "the most common size"
    count = sum(len(pairs) for pairs in members.values())
    check_fits_in_memory(count, image_size, str(tree.path))
    result: dict[str, LabeledImages] = {}
    skipped: list[str] = []
    resized = 0
    for split, pairs in members.items():
        labels = np.asarray([label for _, label in pairs], dtype=np.int64)
        decoded = decode.decode_images(
            tree,
            [n for n, _ in pairs],
            size=image_size,
            shapes=shapes[split],
            desc=f"decoding {split}",
        )
        skipped += decoded.skipped
        resized += decoded.resized
        result[split] = LabeledImages(
            torch.from_numpy(decoded.images), torch.from_numpy(labels[decoded.kept])
        )
    total = sum(len(images) for images in result.values())
    if resized:
        warnings.warn(
            f"resized {resized} of {total} images in {tree.path} to {image_size}x{image_size} "
            f"px ({chosen}; shorter side scaled, then centre-cropped); set image_size "
            "(--image-size) to choose another size",
            stacklevel=3,
        )
    return result, skipped
