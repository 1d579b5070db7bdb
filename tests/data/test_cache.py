"""The decoded-image cache: reuse, invalidation by the source's identity, corrupt entries."""

import errno
import json
import os
import shutil
import warnings
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


class _RunsCode:
    """Unpickling this runs a shell command (the pickle a hostile cache entry could hold)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["pickle with code", "meta without class_names"])
def test_entries_that_cannot_be_read_are_rebuilt_without_running_code(tmp_path, damage):
    """Issue 21, point 11: an UnpicklingError or a KeyError escaped as a traceback, and the
    entry was kept, so that every later run failed the same way."""
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    expected = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    (entry,) = _entries(cache)
    marker = tmp_path / "code-ran"
    if damage == "pickle with code":
        torch.save(_RunsCode(marker), entry / "train.pt")  # a torch zip whose pickle runs code
    else:
        meta = json.loads((entry / "meta.json").read_text())
        del meta["class_names"]
        (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="removing unreadable cache entry"):
        again = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert torch.equal(again.train.images, expected.train.images) and not marker.exists()
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert not [w for w in later if "unreadable" in str(w.message)]  # rebuilt for good


@pytest.mark.parametrize("fault", ["full disk", "read-only file system"])
def test_an_unwritable_cache_warns_and_serves_the_decoded_images(tmp_path, monkeypatch, fault):
    """Issue 21, point 12: torch.save's RuntimeError on a full disk, or an OSError on a
    read-only file system, ended the run with a traceback, where running without the cache
    serves."""
    import kinfonce.data.cache as cache_module

    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    if fault == "full disk":

        def save(*args, **kwargs):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                "writing file data/0: file write failed"
            )

        monkeypatch.setattr(cache_module.torch, "save", save)
    else:

        def mkdtemp(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(cache))

        monkeypatch.setattr(cache_module.tempfile, "mkdtemp", mkdtemp)
    with pytest.warns(UserWarning, match="cannot write its cache entry .* without caching"):
        data = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(data.test) == 6 and data.class_names == ["a", "b"]
    assert not cache.exists() or not list(cache.iterdir())  # no entry, no temporary left
