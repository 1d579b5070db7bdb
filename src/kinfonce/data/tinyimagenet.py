"""Tiny ImageNet (200 classes, 64x64) from its standard layout; torchvision has no reader for it.

Layout under the root (or under ``ROOT/tiny-imagenet-200/``)::

    train/<wnid>/images/*.JPEG        500 images per class
    val/images/*.JPEG                 10,000 images, labels in val/val_annotations.txt
    val/val_annotations.txt           "<file>\\t<wnid>\\t..." per line
    wnids.txt (optional)              class order; words.txt (optional) wnid -> readable name

The official test split has no labels, so the labelled val split serves as the test split.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from torchvision.datasets.utils import download_and_extract_archive

from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError, MissingFileError

__all__ = ["TINYIMAGENET_LAYOUT", "find_tinyimagenet_root", "tinyimagenet_members"]

_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_LAYOUT = (
    "ROOT/train/<wnid>/images/*.JPEG, ROOT/val/images/*.JPEG and ROOT/val/val_annotations.txt "
    f"(ROOT may also contain them inside {_FOLDER}/)"
)


def find_tinyimagenet_root(root: Path, download: bool) -> Path:
    """The directory holding train/ and val/; downloads into ``root`` first if asked."""
    for candidate in (root, root / _FOLDER):
        if (candidate / "train").is_dir() and (candidate / "val" / "val_annotations.txt").is_file():
            return candidate
    if download:
        try:
            download_and_extract_archive(_URL, download_root=str(root), md5=_MD5)
        except OSError as err:
            raise KinfonceError(f"downloading {_URL} into {root} failed: {err}") from err
        return root / _FOLDER
    raise MissingFileError(
        f"tinyimagenet not found under {root}. Pass download=True (`--download` on the command "
        f"line) to fetch {_URL} there, or place it as "
        + TINYIMAGENET_LAYOUT.replace("ROOT", str(root))
    )


def _class_names(tree_root: Path, wnids: list[str]) -> list[str]:
    words_file = tree_root / "words.txt"
    if not words_file.is_file():
        return wnids
    words = dict(
        line.split("\t", 1) for line in words_file.read_text().splitlines() if "\t" in line
    )
    return [words.get(w, w).split(",")[0].strip() or w for w in wnids]


def tinyimagenet_members(
    tree: ImageTree,
) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """The files of Tiny ImageNet's tree (see :func:`find_tinyimagenet_root`) and their classes.

    Returns:
        ({"train": ..., "test": ...} of (member name, class index) pairs, class names).

    Raises:
        ValueError: the val annotations name classes absent from train/ (both listed).
    """
    root = tree.path
    names = tree.names()
    train_files = [
        n for n in names if n.startswith("train/") and PurePosixPath(n).suffix.lower() == ".jpeg"
    ]
    train_wnids = sorted({PurePosixPath(n).parts[1] for n in train_files})
    wnids_file = root / "wnids.txt"
    wnids = wnids_file.read_text().split() if wnids_file.is_file() else train_wnids
    annotations = {}
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            annotations[f"val/images/{fields[0]}"] = fields[1]
    val_wnids = sorted(set(annotations.values()))
    if set(train_wnids) != set(wnids) or not set(val_wnids) <= set(wnids):
        raise KinfonceError(
            f"class sets differ in {root}: train/ has {len(train_wnids)} classes, wnids.txt "
            f"{len(wnids)}; only in train: {sorted(set(train_wnids) - set(wnids))}; "
            f"only in wnids.txt: {sorted(set(wnids) - set(train_wnids))}; "
            f"only in val: {sorted(set(val_wnids) - set(wnids))}"
        )
    index = {w: i for i, w in enumerate(wnids)}
    val_files = sorted(n for n in annotations if (root / n).is_file())
    members = {
        "train": [(n, index[PurePosixPath(n).parts[1]]) for n in train_files],
        "test": [(n, index[annotations[n]]) for n in val_files],
    }
    return members, _class_names(root, wnids)
