"""Decoded data sets kept on disk as uint8 tensors, memory-mapped on later runs.

An entry is a directory ``<cache root>/<name>-<key>/`` holding ``train.pt`` and ``test.pt``
(``torch.save`` of a dict of plain tensors ``images`` uint8 (N, C, H, W) and ``labels`` int64
(N,)) and ``meta.json``. The key hashes the source's identity (path, sizes, modification times)
and the format version, so a changed source gets a new entry. Entries are read with
``torch.load(..., weights_only=True, mmap=True)``: safe, and only the pages used are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kinfonce.data.splits import LabeledImages

__all__ = ["CACHE_ENV", "CachedImages", "cache_key", "cache_root", "load_cached", "save_cached"]

CACHE_ENV = "KINFONCE_CACHE"
_FORMAT_VERSION = 2  # 2: image size chosen by the most common size, not the first image
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class CachedImages:
    """A decoded data set: train and test images, class names, and extra metadata."""

    train: LabeledImages
    test: LabeledImages
    class_names: list[str]
    meta: dict
    unlabeled: LabeledImages | None = None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$KINFONCE_CACHE``, else ``~/.cache/kinfonce``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kinfonce"


def cache_key(*parts: object) -> str:
    """Short hex digest of ``parts`` (any JSON-serialisable identity of a source)."""
    text = json.dumps([_FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _entry_dir(root: Path, name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return root / f"{safe}-{key}"


def _read_split(path: Path) -> LabeledImages:
    """One split file of an entry, checked: a mapping of uint8 ``images`` (N, C, H, W) and
    int64 ``labels`` (N,).

    Raises:
        ValueError: the file holds something else.
    """
    blob = torch.load(path, weights_only=True, mmap=True)
    images = blob.get("images") if isinstance(blob, dict) else None
    labels = blob.get("labels") if isinstance(blob, dict) else None
    if not (
        isinstance(images, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and images.dtype == torch.uint8
        and images.ndim == 4
        and labels.dtype == torch.int64
        and labels.shape == images.shape[:1]
    ):
        raise ValueError(f"{path.name} holds no uint8 images (N, C, H, W) with int64 labels (N,)")
    return LabeledImages(images, labels)


def _read_meta(path: Path) -> dict:
    """An entry's ``meta.json``, checked: a mapping with a list of ``class_names``.

    Raises:
        ValueError: bad JSON, or no such list.
    """
    meta = json.loads(path.read_text())
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise ValueError(f"{path.name} has no list of class_names")
    return meta


def load_cached(root: Path, name: str, key: str) -> CachedImages | None:
    """The cached entry, or None if absent; an entry that cannot be read (truncated, bad
    JSON, a missing field, pickled objects that are not plain tensors) is reported, removed,
    and None, so that it is decoded again. Nothing in an entry is executed: splits are read
    with ``torch.load(weights_only=True)``."""
    entry = _entry_dir(root, name, key)
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = _read_meta(entry / "meta.json")
        splits = {}
        for split in (*_SPLITS, "unlabeled"):
            if split == "unlabeled" and not (entry / f"{split}.pt").is_file():
                continue
            splits[split] = _read_split(entry / f"{split}.pt")
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        warnings.warn(
            f"removing unreadable cache entry {entry} ({type(err).__name__}: {err}); decoding "
            "again",
            stacklevel=2,
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None
    classes = list(meta["class_names"])
    return CachedImages(splits["train"], splits["test"], classes, meta, splits.get("unlabeled"))


def save_cached(root: Path, name: str, key: str, data: CachedImages) -> Path:
    """Write ``data`` as a cache entry (atomically: a temporary directory renamed into place).

    Processes decoding the same source at once each write their own temporary directory; the
    first rename wins and the others keep its entry.
    """
    entry = _entry_dir(root, name, key)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
    try:
        for split in (*_SPLITS, "unlabeled"):
            images: LabeledImages | None = getattr(data, split)
            if images is None:
                continue
            torch.save(
                {"images": images.images.contiguous(), "labels": images.labels.contiguous()},
                tmp / f"{split}.pt",
            )
        meta = {**data.meta, "class_names": list(data.class_names), "format": _FORMAT_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            # another process (e.g. a second rank) wrote the same entry meanwhile: keep theirs
            if not (entry / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
