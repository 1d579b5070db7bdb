"""The decoded-image cache: reuse, invalidation by the source's identity, corrupt entries."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kinfonce.data.decode as decode
from kinfonce.data import load_dataset
from kinfonce.data.cache import CACHE_ENV, cache_root, load_cached, save_cached
from tests.helpers import write_image_tree


def _tree(root: Path) -> Path:
    """Two classes of 3 training and 3 test 6x6 PNGs, each image its own colour."""
    value = {"a": 40, "b": 220}

    def image(name: str, i: int, rng: np.random.Generator) -> np.ndarray:
        return np.full((6, 6, 3), (value[name], value[name], i), np.uint8)

    return write_image_tree(root, image, value, {"train": 3, "test": 3})


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _count_decodes(monkeypatch) -> list[int]:
    calls = []
    original = decode.decode_images

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_images", counting)
    return calls


def test_second_load_reads_the_cache_memory_mapped(tmp_path, monkeypatch):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    calls = _count_decodes(monkeypatch)
    first = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(calls) == 2  # train and test decoded once
    (entry,) = _entries(cache)
    assert {p.name for p in entry.iterdir()} == {"train.pt", "test.pt", "meta.json"}
    second = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(calls) == 2  # nothing decoded again
    assert torch.equal(first.test.images, second.test.images)
    assert torch.equal(first.train.labels, second.train.labels)
    blob = torch.load(entry / "test.pt", weights_only=True, mmap=True)
    assert blob["images"].dtype == torch.uint8 and blob["images"].shape == (6, 3, 6, 6)


def test_changed_source_gets_a_new_entry(tmp_path, monkeypatch):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    image = tree / "train" / "a" / "0.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = _count_decodes(monkeypatch)
    load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(calls) == 2 and len(_entries(cache)) == 2


def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    expected = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    (entry,) = _entries(cache)
    (entry / "train.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        again = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert torch.equal(again.train.images, expected.train.images)


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "kinfonce"


def test_a_racing_writer_keeps_the_existing_entry(tmp_path, monkeypatch):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    first = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    (entry,) = _entries(cache)
    name, key = entry.name.rsplit("-", 1)
    data = load_cached(cache, name, key)
    (entry / "marker").write_text("written by the first process")
    real_rmtree = shutil.rmtree

    def rmtree_but_not_the_entry(path, ignore_errors=False):
        # the entry appears between this writer's removal and its rename, as when two ranks race
        if Path(path) != entry:
            real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", rmtree_but_not_the_entry)
    save_cached(cache, name, key, data)
    monkeypatch.undo()
    assert (entry / "marker").is_file() and _entries(cache) == [entry]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left
    again = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert torch.equal(again.train.images, first.train.images)
