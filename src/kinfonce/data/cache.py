"""Decoded image trees kept on disk, one entry per source and decoding settings.

An entry is a directory ``<cache root>/<name>-<key>/`` holding ``images.npy`` (uint8
(N, 3, S, S): the rows of every split, one split after another), ``labels.npy`` (int64 (N,))
and ``meta.json`` (each split's rows, the rows of skipped files, the class names, the decoding
settings, the byte histograms of the training split). The key hashes the source's identity
(path, sizes, modification times), the decoding settings and the format version, so a changed
source gets a new entry. A split is read by rows (:class:`kinfonce.data.stored.StoredImages`):
only the rows used are read, and no process holds the whole set.

An entry appears complete or not at all: it is built under ``.<entry>.partial/``
(:mod:`kinfonce.data.build`, resumable after a crash) and renamed into place. One process
builds it, holding the lock file ``.<entry>.lock``; another that needs it meanwhile (a second
rank, a second run) waits, then reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import filelock
import numpy as np
import torch

from kinfonce.data.splits import LabeledImages
from kinfonce.data.stored import StoredImages

__all__ = [
    "CACHE_ENV",
    "CachedImages",
    "cache_key",
    "cache_root",
    "entry_dir",
    "load_cached",
    "load_or_build",
]

CACHE_ENV = "KINFONCE_CACHE"
_FORMAT_VERSION = 3  # 3: one images.npy of all splits, decoded in chunks by worker processes


@dataclass(frozen=True)
class CachedImages:
    """A decoded data set: train and test images, class names, and the entry's metadata."""

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


def entry_dir(root: Path, name: str, key: str) -> Path:
    """The directory of the entry ``name`` with ``key`` under ``root``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return root / f"{safe}-{key}"


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
    JSON, a missing field, an array of pickled objects) is reported, removed, and None, so that
    it is decoded again. Nothing in an entry is executed: ``np.load`` refuses pickles."""
    entry = entry_dir(root, name, key)
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = _read_meta(entry / "meta.json")
        images = StoredImages(entry / "images.npy")
        labels = torch.from_numpy(np.load(entry / "labels.npy", allow_pickle=False))
        if labels.dtype != torch.int64 or labels.shape != (len(images),):
            raise ValueError(f"labels.npy holds no int64 label per image ({len(images)})")
        skipped = torch.as_tensor(meta["skipped_rows"], dtype=torch.int64)
        splits = {}
        for split, (first, end) in meta["splits"].items():
            rows = torch.arange(first, end)
            rows = rows[~torch.isin(rows, skipped)]
            splits[split] = LabeledImages(images.subset(rows), labels[rows])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        warnings.warn(
            f"removing unreadable cache entry {entry} ({type(err).__name__}: {err}); decoding "
            "again",
            stacklevel=2,
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None
    classes = list(meta["class_names"])
    return CachedImages(splits["train"], splits["test"], classes, meta, splits.get("unlabeled"))


def load_or_build(
    root: Path, name: str, key: str, build: Callable[[Path], None]
) -> tuple[CachedImages, bool]:
    """The entry, built first by ``build(partial directory)`` when absent.

    ``build`` writes the entry's files into the directory it is given (which may hold an
    interrupted build's files); the directory is then renamed into place. A process that finds
    another building the entry waits for it and reads its entry. A reused entry is said so
    in one line (on stderr).

    Returns:
        (the entry, whether this call built it).
    """
    entry = entry_dir(root, name, key)
    cached = load_cached(root, name, key)
    if cached is None:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{entry.name}.lock", entry):
            cached = load_cached(root, name, key)  # built by another process meanwhile?
            if cached is None:
                partial = root / f".{entry.name}.partial"
                build(partial)
                os.replace(partial, entry)
                cached = load_cached(root, name, key)
                if cached is None:
                    raise RuntimeError(f"cache entry {entry} unreadable after writing")
                return cached, True
    images = cached.train.images
    print(
        f"reusing the decoded cache {entry} ({len(images) + len(cached.test)} images at "
        f"{images.shape[-1]}x{images.shape[-1]} px)",
        file=sys.stderr,
    )
    return cached, False


@contextlib.contextmanager
def _locked(path: Path, entry: Path) -> Iterator[None]:
    """Hold the lock file ``path``; say so once when another process holds it first."""
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another process that builds {entry} ({path})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
