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


def load_cached(root: Path, name: str, key: str) -> CachedImages | None:
    """The cached entry, or None if absent; a corrupt entry is reported, removed, and None."""
    entry = _entry_dir(root, name, key)
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        splits = {}
        for split in (*_SPLITS, "unlabeled"):
            if split == "unlabeled" and not (entry / f"{split}.pt").is_file():
                continue
            blob = torch.load(entry / f"{split}.pt", weights_only=True, mmap=True)
            splits[split] = LabeledImages(blob["images"], blob["labels"])
    except (OSError, RuntimeError, ValueError, KeyError, json.JSONDecodeError) as err:
        warnings.warn(
            f"removing unreadable cache entry {entry} ({err}); decoding again", stacklevel=2
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
