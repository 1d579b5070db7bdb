"""Class-per-folder image trees (``<split>/<class>/<image>``), in a directory or a zip: which
files each split holds, and their classes.

Why not ``torchvision.datasets.ImageFolder``: it decodes lazily, one image per ``__getitem__``,
from a directory only; here every image is decoded once (from a directory or a zip's members,
:mod:`kinfonce.data.build`) into one uint8 file that the cache keeps on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError, MissingFileError

__all__ = ["UNLABELED_FOLDERS", "check_every_class_decoded", "is_image", "tree_members"]


def is_image(name: str) -> bool:
    """Whether a member name has an image extension torchvision reads."""
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


def tree_members(
    tree: ImageTree, splits: Sequence[str] = ("train", "test"), unlabeled: bool = False
) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """The image files of ``<split>/<class>/<image>`` for each split of a tree.

    Args:
        tree: the directory or zip.
        splits: the split folders.
        unlabeled: also every image under ``unlabelled/`` (or ``unlabeled/``), at any depth,
            as the split ``"unlabeled"`` with label -1.

    Returns:
        (split -> (member name, class index) pairs in name order, class names sorted).

    Raises:
        FileNotFoundError: a split folder is missing or holds no image.
        ValueError: the splits' class sets differ (the message names the differences), or
            there are fewer than 2 classes.
    """
    names = [n for n in tree.names() if is_image(n)]
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
    return labelled, reference


def check_every_class_decoded(
    labels: dict[str, torch.Tensor], class_names: Sequence[str], source: str
) -> None:
    """Refuse labelled splits (split -> int64 labels (N,) of the decoded images) in which a
    class kept no decodable image: a class whose every file is undecodable would otherwise
    vanish, and a probe of the classes left would look perfect (a 2-class tree scoring 100% on
    one). The unlabelled split has no classes.

    Raises:
        KinfonceError: naming the split and the classes without a decoded image.
    """
    for split, found in labels.items():
        if split == "unlabeled":
            continue
        present = set(found.unique().tolist())
        missing = [name for label, name in enumerate(class_names) if label not in present]
        if missing:
            shown = missing[:10] + (["..."] if len(missing) > 10 else [])
            raise KinfonceError(
                f"{source}: class(es) {shown} have no decodable image under {split}/ (every "
                "file of theirs was skipped); each class needs at least one decodable image "
                "in each split: repair or remove those files"
            )
