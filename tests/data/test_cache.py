"""The decoded-image cache: reuse, invalidation by the source's identity, corrupt entries, and
its building by worker processes (byte-identical whatever their number, resumable after a
kill, one builder at a time)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kinfonce.data.build as build
import kinfonce.data.datasets as datasets
from kinfonce.data import load_dataset
from kinfonce.data.cache import CACHE_ENV, cache_root
from kinfonce.data.splits import channel_counts, stats_from_counts
from kinfonce.data.stored import StoredImages
from tests.helpers import image_bytes, write_image_tree

ENTRY_FILES = ("images.npy", "labels.npy", "meta.json")


def _tree(root: Path) -> Path:
    """Two classes of 3 training and 3 test 6x6 PNGs, each image its own colour."""
    value = {"a": 40, "b": 220}

    def image(name: str, i: int, rng: np.random.Generator) -> np.ndarray:
        return np.full((6, 6, 3), (value[name], value[name], i), np.uint8)

    return write_image_tree(root, image, value, {"train": 3, "test": 3})


def _mixed_tree(root: Path, per_class: int = 10) -> Path:
    """Two classes of ``per_class`` training and 3 test JPEGs of random sizes (12 to 40 px a
    side) and random pixels, one PNG, and one undecodable file."""

    def image(name: str, i: int, rng: np.random.Generator) -> np.ndarray:
        height, width = rng.integers(12, 41, size=2)
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)

    tree = write_image_tree(root, image, ["a", "b"], {"train": per_class, "test": 3}, fmt="JPEG")
    (tree / "train" / "a" / "png.png").write_bytes(image_bytes((10, 20, 30), (20, 30)))
    (tree / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return tree


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _count_builds(monkeypatch) -> list[int]:
    calls = []
    original = datasets.build_entry

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "build_entry", counting)
    return calls


def _files(entry: Path) -> dict[str, bytes]:
    return {name: (entry / name).read_bytes() for name in ENTRY_FILES}


def test_second_load_reads_the_cache_rows_from_disk(tmp_path, monkeypatch, capsys):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    calls = _count_builds(monkeypatch)
    first = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(calls) == 1
    (entry,) = _entries(cache)
    assert {p.name for p in entry.iterdir()} == set(ENTRY_FILES)
    assert "reusing" not in capsys.readouterr().err
    second = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(calls) == 1  # nothing decoded again
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "reusing" in x]
    assert line == f"reusing the decoded cache {entry} (12 images at 6x6 px)"
    for split in (second.train, second.val, second.test):  # rows of the file, not copies
        assert isinstance(split.images, StoredImages) and split.images.path == entry / "images.npy"
    assert torch.equal(first.test.images[:], second.test.images[:])
    assert torch.equal(first.train.labels, second.train.labels)
    assert np.load(entry / "images.npy", mmap_mode="r").shape == (12, 3, 6, 6)


def test_changed_source_gets_a_new_entry(tmp_path, monkeypatch):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    image = tree / "train" / "a" / "0.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = _count_builds(monkeypatch)
    load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert len(calls) == 1 and len(_entries(cache)) == 2
    load_dataset(f"imagefolder:{tree}", cache_dir=cache, resize="stretch")  # part of the key
    assert len(calls) == 2 and len(_entries(cache)) == 3


def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path):
    tree, cache = _tree(tmp_path / "tree"), tmp_path / "cache"
    expected = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    (entry,) = _entries(cache)
    with open(entry / "images.npy", "r+b") as file:
        file.truncate(200)
    with pytest.warns(UserWarning, match="unreadable cache entry .* shorter than"):
        again = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert torch.equal(again.train.images[:], expected.train.images[:])


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
        hostile = np.array([_RunsCode(marker)] * 12, dtype=object)
        np.save(entry / "labels.npy", hostile, allow_pickle=True)
    else:
        meta = json.loads((entry / "meta.json").read_text())
        del meta["class_names"]
        (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="removing unreadable cache entry"):
        again = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert torch.equal(again.train.images[:], expected.train.images[:]) and not marker.exists()
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert not [w for w in later if "unreadable" in str(w.message)]  # rebuilt for good


def test_an_unwritable_cache_warns_and_serves_the_decoded_images(tmp_path):
    """Issue 21, point 12: an OSError of a cache that cannot be written (here a directory
    that cannot be made) ended the run with a traceback, where running without the cache
    serves."""
    tree, blocker = _tree(tmp_path / "tree"), tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="cannot write its cache entry .* without caching"):
        data = load_dataset(f"imagefolder:{tree}", cache_dir=blocker / "cache")
    assert len(data.test) == 6 and data.class_names == ["a", "b"]
    assert data.test.images[:].shape == (6, 3, 6, 6)


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "kinfonce"


def test_one_and_two_workers_give_byte_identical_entries(tmp_path, monkeypatch, capsys):
    # Catches rows written at another worker's offset, a chunk lost or decoded twice, and
    # metadata (skipped rows, resized count, histograms) that depends on the finishing order.
    tree = _mixed_tree(tmp_path / "tree")
    monkeypatch.setattr(build, "CHUNK_ROWS", 4)  # 8 chunks
    entries = []
    for workers in (1, 2):
        cache = tmp_path / f"cache{workers}"
        with pytest.warns(UserWarning, match="skipped 1 undecodable"):
            data = load_dataset(f"imagefolder:{tree}", cache_dir=cache, workers=workers)
        assert f"by {workers} process(es)" in capsys.readouterr().err
        (entry,) = _entries(cache)
        entries.append(entry)
    assert entries[0].name == entries[1].name
    assert _files(entries[0]) == _files(entries[1])
    assert data.skipped_files == 1 and len(data.train) + len(data.val) == 21
    assert data.image_size == 40 or 12 <= data.image_size <= 40  # the most common size


def test_normalisation_statistics_count_the_training_rows_only(tmp_path, monkeypatch):
    # Catches training chunks whose bytes go uncounted (the decoding counts only theirs),
    # and test rows' bytes in the statistics.
    tree = _mixed_tree(tmp_path / "tree")
    monkeypatch.setattr(build, "CHUNK_ROWS", 4)  # 8 chunks, 2 of them the test split's
    for _ in range(2):  # built, then read back from the cache entry
        with pytest.warns(UserWarning, match="1 undecodable"):
            data = load_dataset(
                f"imagefolder:{tree}", cache_dir=tmp_path / "cache", workers=1, image_size=16
            )
        counts = channel_counts(data.train.images) + channel_counts(data.val.images)
        assert (data.mean, data.std) == stats_from_counts(counts)


GATED_BUILD = """
import os, sys, time
import kinfonce.data.build as build
from kinfonce.data import load_dataset
build.CHUNK_ROWS, build.SYNC_SECONDS = 4, 0.0
decode_into, chunks = build.decode_into, []
def gated(*args, **kwargs):
    if len(chunks) >= {hold_after}:  # wait here until the test releases this builder
        while not os.path.exists("{release}"):
            time.sleep(0.01)
    chunks.append(1)
    return decode_into(*args, **kwargs)
build.decode_into = gated
open(f"{go}.ready-{{os.getpid()}}", "w").close()
while not os.path.exists("{go}"):  # imports done: start together
    time.sleep(0.01)
data = load_dataset("imagefolder:{tree}", cache_dir="{cache}", workers=1, image_size=16)
print("loaded", len(data.train) + len(data.val), int(data.test.images[:].sum()))
"""


def _gated_builder(
    tree: Path, cache: Path, go: Path, hold_after: int, release: Path, log: Path
) -> subprocess.Popen:
    """A process that decodes ``tree`` into ``cache`` with 4 files a chunk once the file ``go``
    exists, and holds before its chunk number ``hold_after`` until the file ``release`` exists;
    its messages go to ``log``. Files, not delays, order the steps, so load cannot reorder them."""
    code = textwrap.dedent(GATED_BUILD).format(
        tree=tree, cache=cache, go=go, hold_after=hold_after, release=release
    )
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", code],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def _wait_until(condition, what: str) -> None:
    """Poll ``condition`` for up to 120 s (a bound for a broken build, not a timing)."""
    deadline = time.monotonic() + 120
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after 120 s waiting for {what}")
        time.sleep(0.05)


def test_a_killed_builder_leaves_no_entry_and_a_rerun_completes_it(tmp_path, monkeypatch, capsys):
    # Catches a half-written entry that looks complete, a resumed build that decodes everything
    # again, and one whose rows or metadata differ from an uninterrupted build's.
    tree = _mixed_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    go, log = tmp_path / "go", tmp_path / "builder.err"
    go.touch()
    # Held before its third chunk, never released: two of 8 chunks are done when it is killed.
    builder = _gated_builder(tree, cache, go, 2, tmp_path / "never", log)

    def progress_lines() -> int:
        found = list(cache.glob(".*.partial/progress.jsonl")) if cache.is_dir() else []
        assert builder.poll() is None, "the builder ended early: " + log.read_text()
        return len(found[0].read_text().splitlines()) if found else 0

    _wait_until(lambda: progress_lines() >= 2, "two chunks in the progress file")
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    (progress,) = cache.glob(".*.partial/progress.jsonl")
    assert _entries(cache) == []  # nothing that looks complete
    done_before = len(progress.read_text().splitlines())
    assert done_before == 2
    monkeypatch.setattr(build, "CHUNK_ROWS", 4)
    decoded = []
    original = build.decode_into
    monkeypatch.setattr(
        build, "decode_into", lambda *a, **k: decoded.append(1) or original(*a, **k)
    )
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        load_dataset(f"imagefolder:{tree}", cache_dir=cache, workers=1, image_size=16)
    assert len(decoded) == 8 - done_before  # only the chunks without a line
    assert f"{done_before} of 8 chunks were decoded before" in capsys.readouterr().err
    whole = tmp_path / "whole"
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        load_dataset(f"imagefolder:{tree}", cache_dir=whole, workers=1, image_size=16)
    (resumed,), (uninterrupted,) = _entries(cache), _entries(whole)
    assert _files(resumed) == _files(uninterrupted)
    assert not list(cache.glob(".*.partial"))


def test_two_builders_at_once_make_one_entry(tmp_path):
    # Catches two processes (two ranks, two runs) that both decode the tree, or that clash
    # writing one entry; the second must wait and read the first's.
    tree = _mixed_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    go, release = tmp_path / "go", tmp_path / "release"
    logs = [tmp_path / f"builder{i}.err" for i in range(2)]
    # Each holds before its first chunk: the one that took the lock keeps it until released.
    builders = [_gated_builder(tree, cache, go, 0, release, log) for log in logs]
    _wait_until(lambda: len(list(tmp_path.glob("go.ready-*"))) == 2, "both builders to start")
    go.touch()
    try:
        _wait_until(
            lambda: any("waiting for another process" in log.read_text() for log in logs),
            "one builder to wait for the other",
        )
    finally:
        release.touch()  # a builder that never waits fails below rather than hanging here
        outputs = [builder.communicate(timeout=120)[0] for builder in builders]
    errors = [log.read_text() for log in logs]
    assert [b.returncode for b in builders] == [0, 0], errors
    lines = [line for err in errors for line in err.splitlines()]
    assert sum(line.startswith("decoded 28 image files") for line in lines) == 1
    assert sum(line.startswith("waiting for another process") for line in lines) == 1
    assert sum(line.startswith("reusing the decoded cache") for line in lines) == 1
    assert outputs[0] == outputs[1] and outputs[0].startswith("loaded 21 ")
    assert len(_entries(cache)) == 1 and not list(cache.glob(".*.partial"))
