"""Building a cache entry from an image tree: decoded in chunks by worker processes straight
into one preallocated uint8 file on disk, resumably.

The set is never held in memory. The entry is written under ``<root>/.<entry>.partial/``:

- ``plan.json``: what is built (rows, side, resize policy); a partial directory of another
  plan is started afresh.
- ``images.npy``: the uint8 (N, 3, S, S) array, allocated at its full size first; each
  worker decodes a chunk of ``CHUNK_ROWS`` files and writes its rows (``os.pwrite``).
- ``progress.jsonl``: one line per finished chunk (its skipped rows, resized images and
  byte histograms), appended only after ``images.npy`` was synced to disk. A crash loses the
  chunks of the last seconds at most; a rerun decodes only the chunks without a line.

When every chunk is done, ``labels.npy`` and ``meta.json`` are written and the directory is
renamed into place (:func:`kinfonce.data.cache.load_or_build` holds the entry's lock
meanwhile). Rows depend only on their files, so any number of workers gives the same bytes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kinfonce.data.decode import (
    DecodedRows,
    Shape,
    decode_into,
    most_common_size,
    read_shapes,
    warn_skipped,
)
from kinfonce.data.stored import npy_layout
from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError
from kinfonce.fileio import write_text_atomic
from kinfonce.scoped import progress_shown

__all__ = ["CHUNK_ROWS", "TreeRows", "build_entry", "default_workers"]

#: Files one worker decodes per task: the unit of progress and of resuming.
CHUNK_ROWS = 256
#: Seconds between syncs of the images file (each followed by the finished chunks' lines).
SYNC_SECONDS = 2.0


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class TreeRows:
    """The rows of an entry: every file of every split, split after split, with its label.

    Attributes:
        tree: where the files are.
        names: member name of each row.
        labels: int64 (N,) class of each row (-1: unlabelled).
        splits: split -> (first row, end row).
    """

    tree: ImageTree
    names: list[str]
    labels: np.ndarray
    splits: dict[str, tuple[int, int]]

    @classmethod
    def from_members(cls, tree: ImageTree, members: dict[str, list[tuple[str, int]]]) -> TreeRows:
        """From split -> (member name, label) pairs."""
        names, labels, splits = [], [], {}
        for split, pairs in members.items():
            splits[split] = (len(names), len(names) + len(pairs))
            names += [name for name, _ in pairs]
            labels += [label for _, label in pairs]
        return cls(tree, names, np.asarray(labels, dtype=np.int64), splits)

    def chunks(self) -> list[tuple[int, int]]:
        """(first row, end row) of each chunk; no chunk spans two splits."""
        return [
            (start, min(start + CHUNK_ROWS, end))
            for first, end in self.splits.values()
            for start in range(first, end, CHUNK_ROWS)
        ]


def build_entry(
    partial: Path,
    rows: TreeRows,
    *,
    image_size: int | None,
    resize: str,
    workers: int,
    meta: dict[str, Any],
) -> None:
    """Decode ``rows`` into the entry directory ``partial`` (resuming what it holds).

    Args:
        partial: the entry's temporary directory.
        rows: the files and labels.
        image_size: side S of the stored images; None: the most common size of the files.
        resize: the policy that fits other shapes to S x S (``decode.RESIZE_POLICIES``).
        workers: processes that decode (1: this process).
        meta: extra fields of ``meta.json`` (such as the class names).

    Raises:
        KinfonceError: no room on the disk for the images (the sizes named), or no file
            decodes at all.
    """
    chunks = rows.chunks()
    workers = max(1, min(workers, math.ceil(len(rows.names) / CHUNK_ROWS)))  # no idle ones
    source = str(rows.tree.path)
    if workers == 1:  # the chunks run in this process: its reader, index already read
        _TREES[source] = rows.tree
    try:
        with _pool(workers) as run:
            if image_size is None:
                shapes = _read_shapes(run, rows, chunks)
                image_size = most_common_size(shapes)
                chosen = "the most common size"
            else:
                chosen = "given"
            plan = {"rows": len(rows.names), "image_size": image_size, "resize": resize}
            images = _prepare(partial, plan, source)
            done = _finished_chunks(partial / "progress.jsonl")
            todo = [chunk for chunk in chunks if chunk[0] not in done]
            if done:
                print(
                    f"resuming the decoding of {source}: {len(chunks) - len(todo)} of "
                    f"{len(chunks)} chunks were decoded before",
                    file=sys.stderr,
                )
            began = time.perf_counter()
            train_end = rows.splits["train"][1]  # only the training rows' bytes are counted
            tasks = (
                (
                    _decode_chunk,
                    (source, rows.names[a:b], str(images), a, image_size, resize, a < train_end),
                )
                for a, b in todo
            )
            count, ends = sum(b - a for a, b in todo), dict(chunks)
            with tqdm(
                total=count, desc="decoding", unit="img", leave=False, disable=not progress_shown()
            ) as bar:
                for start, decoded in _synced(run(tasks), images, partial / "progress.jsonl"):
                    done[start] = decoded
                    bar.update(ends[start] - start)
            seconds = time.perf_counter() - began
    finally:
        _TREES.pop(source, None)
    print(
        f"decoded {count} image files of {source} at {image_size}x{image_size} px by {workers} "
        f"process(es) in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s)",
        file=sys.stderr,
    )
    _finish(partial, rows, done, meta={**meta, **plan, "splits": rows.splits}, chosen=chosen)


def check_disk_space(folder: Path, needed: int, have: int, what: str) -> None:
    """Refuse, before decoding, an entry of ``needed`` bytes (``have`` of them already on disk)
    on a file system without room for the rest."""
    free = shutil.disk_usage(folder).free
    if needed - have > free:
        raise KinfonceError(
            f"{what} needs {_bytes(needed)} on disk for its decoded cache in {folder}, "
            f"but only {_bytes(free)} are free there"
            + (f" ({_bytes(have)} of it written already)" if have else "")
            + "; free space, put the cache on a larger disk ($KINFONCE_CACHE), or choose a "
            "smaller --image-size"
        )


def _bytes(count: int) -> str:
    """``count`` bytes in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _prepare(partial: Path, plan: dict[str, Any], source: str) -> Path:
    """``partial/images.npy``, allocated at full size unless a build of this plan is there."""
    plan_file, images = partial / "plan.json", partial / "images.npy"
    if not (plan_file.is_file() and json.loads(plan_file.read_text()) == plan):
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    side = plan["image_size"]
    have = images.stat().st_blocks * 512 if images.is_file() else 0
    check_disk_space(
        partial.parent,
        plan["rows"] * 3 * side * side,
        have,
        f"{source} ({plan['rows']} images at {side}x{side} px)",
    )
    if not images.is_file():
        shape = (plan["rows"], 3, side, side)
        allocating = partial / "images.npy.new"
        allocated = np.lib.format.open_memmap(allocating, mode="w+", dtype=np.uint8, shape=shape)
        del allocated  # a sparse file of the full size: the workers fill its rows
        os.replace(allocating, images)
        (partial / "progress.jsonl").unlink(missing_ok=True)
        write_text_atomic(plan_file, json.dumps(plan))
    return images


def _finished_chunks(progress: Path) -> dict[int, DecodedRows]:
    """The chunks a progress file records (a line cut short by a crash is ignored)."""
    done: dict[int, DecodedRows] = {}
    if not progress.is_file():
        return done
    for line in progress.read_text().splitlines():
        try:
            record = json.loads(line)
            done[record["start"]] = DecodedRows(
                [tuple(s) for s in record["skipped"]],
                record["resized"],
                np.asarray(record["counts"], dtype=np.int64),
            )
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def _synced(
    results: Iterable[tuple[int, DecodedRows]], images: Path, progress: Path
) -> Iterator[tuple[int, DecodedRows]]:
    """Pass ``results`` on, recording each in ``progress`` after ``images`` reached the disk."""
    pending: list[tuple[int, DecodedRows]] = []
    last_sync = time.monotonic()

    def record() -> None:
        fd = os.open(images, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(progress, "a") as file:
            for start, decoded in pending:
                line = {
                    "start": start,
                    "skipped": decoded.skipped,
                    "resized": decoded.resized,
                    "counts": decoded.counts.tolist(),
                }
                file.write(json.dumps(line) + "\n")
            file.flush()
            os.fsync(file.fileno())
        pending.clear()

    for result in results:
        pending.append(result)
        yield result
        if time.monotonic() - last_sync > SYNC_SECONDS:
            record()
            last_sync = time.monotonic()
    record()


def _finish(
    partial: Path, rows: TreeRows, done: dict[int, DecodedRows], meta: dict[str, Any], chosen: str
) -> None:
    """Write labels.npy and meta.json once every chunk is in; warn of skipped and resized files."""
    skipped = sorted(
        (start + index, line) for start, d in done.items() for index, line in d.skipped
    )
    first, end = rows.splits["train"]
    counts = sum(
        (d.counts for start, d in done.items() if first <= start < end),
        np.zeros((3, 256), dtype=np.int64),
    )
    if len(skipped) == len(rows.names):
        raise KinfonceError(f"no decodable image among {len(rows.names)} files in {rows.tree.path}")
    resized = sum(d.resized for d in done.values())
    np.save(partial / "labels.npy", rows.labels)
    meta = {
        **meta,
        "skipped": len(skipped),
        "skipped_rows": [row for row, _ in skipped],
        "skipped_files": [line for _, line in skipped],
        "resized": resized,
        "train_channel_counts": counts.tolist(),
    }
    (partial / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    (partial / "plan.json").unlink()
    (partial / "progress.jsonl").unlink(missing_ok=True)
    warn_skipped([line for _, line in skipped], rows.tree.path)
    if resized:
        side = meta["image_size"]
        warnings.warn(
            f"resized {resized} of {len(rows.names) - len(skipped)} images in {rows.tree.path} "
            f"to {side}x{side} px ({chosen}; {meta['resize']}); set image_size (--image-size) "
            "to choose another size",
            stacklevel=2,
        )


def _read_shapes(
    run: Callable[[Iterable[tuple[Callable, tuple]]], Iterator[Any]],
    rows: TreeRows,
    chunks: list[tuple[int, int]],
) -> list[Shape]:
    """Every file's (height, width), read from the headers by the workers."""
    tasks = ((_shapes_chunk, (str(rows.tree.path), rows.names[a:b], a)) for a, b in chunks)
    found: dict[int, list[Shape]] = {}
    with tqdm(
        total=len(rows.names),
        desc="reading sizes",
        unit="img",
        leave=False,
        disable=not progress_shown(),
    ) as bar:
        for start, shapes in run(tasks):
            found[start] = shapes
            bar.update(len(shapes))
    return [shape for start in sorted(found) for shape in found[start]]


class _pool:
    """``run(tasks)``: each (function, arguments) called in this process (one worker) or in
    a pool of worker processes, yielding results as they finish."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> Callable[[Iterable[tuple[Callable, tuple]]], Iterator[Any]]:
        if self.workers > 1:
            self.executor = ProcessPoolExecutor(
                self.workers, mp_context=_worker_context(), initializer=_one_thread
            )
        return self.run

    def run(self, tasks: Iterable[tuple[Callable, tuple]]) -> Iterator[Any]:
        if self.executor is None:
            for function, arguments in tasks:
                yield function(*arguments)
            return
        futures = [self.executor.submit(function, *arguments) for function, arguments in tasks]
        for future in as_completed(futures):
            yield future.result()

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Forked workers on Linux, as torch's data loader's: they start at once and do not import
    the main script again (a script without ``if __name__ == "__main__"`` would decode from
    each worker); elsewhere the platform's default."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _one_thread() -> None:
    """A worker's torch (resizing) uses one thread: the workers are the parallelism."""
    torch.set_num_threads(1)


_TREES: dict[str, ImageTree] = {}


def _tree(path: str) -> ImageTree:
    """This process's reader of the tree at ``path`` (a zip's index is read once)."""
    if path not in _TREES:
        _TREES[path] = ImageTree(path)
    return _TREES[path]


def _shapes_chunk(tree: str, names: list[str], start: int) -> tuple[int, list[Shape]]:
    return start, read_shapes(_tree(tree), names)


def _decode_chunk(
    tree: str, names: list[str], images: str, start: int, size: int, resize: str, counted: bool
) -> tuple[int, DecodedRows]:
    """Decode ``names`` into rows ``start, start + 1, ...`` of the ``.npy`` file ``images``,
    their byte histograms ``counted`` or left zero."""
    out = np.zeros((len(names), 3, size, size), dtype=np.uint8)
    decoded = decode_into(_tree(tree), names, out, size, resize, count_bytes=counted)
    offset = npy_layout(Path(images))[3]
    fd = os.open(images, os.O_WRONLY)
    try:
        data, written = memoryview(out).cast("B"), 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + start * out[0].nbytes + written)
    finally:
        os.close(fd)
    return start, decoded
