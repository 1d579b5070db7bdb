"""Images in a ``.npy`` file on disk, read by rows through the page cache.

A :class:`StoredImages` stands for uint8 images (N, C, H, W): the rows ``rows`` of an
(M, C, H, W) array in a ``.npy`` file (a cache entry's ``images.npy``). Indexing it reads only
the rows asked for, with ``os.preadv`` straight into the result, so a process holds the rows of
its current batch and never the set: the page cache keeps what was read, shared by every
process of the machine, and the kernel gives it up under memory pressure. (Indexing a memory
map instead would count every page ever touched as the process's own resident memory.)
A subset is a new list of rows, not a copy of images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["StoredImages", "npy_layout"]


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, Fortran order, byte offset of the data) of a ``.npy`` file's array."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }[version]
        shape, fortran, dtype = read_header(file)
        return shape, dtype, fortran, file.tell()


class StoredImages:
    """Read-only uint8 images (N, C, H, W): rows of the array in a ``.npy`` file.

    Indexing (an int, a slice, a list, an int64 tensor or array, then optionally indices of
    the other dimensions) returns a uint8 tensor read from the file; ``shape``, ``dtype``, ``ndim``, ``size()`` and ``len()`` are a tensor's.

    Args:
        path: a ``.npy`` file of a C-ordered uint8 (M, C, H, W) array.
        rows: int64 (N,) row numbers in the file; None: all M rows in order.
    """

    dtype = torch.uint8
    ndim = 4
    _fd: int | None = None

    def __init__(self, path: str | os.PathLike, rows: torch.Tensor | None = None) -> None:
        self.path = Path(path)
        shape, dtype, fortran, self._offset = npy_layout(self.path)
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{self.path} holds {dtype} {shape}, not C-ordered uint8 (M, C, H, W)")
        self._file_rows, self._row_shape = shape[0], tuple(shape[1:])
        self._row_bytes = int(np.prod(self._row_shape))
        if self.path.stat().st_size < self._offset + self._file_rows * self._row_bytes:
            raise ValueError(f"{self.path} is shorter than its {shape} array")
        self.rows = torch.arange(self._file_rows) if rows is None else rows.to(torch.int64)
        self._fd: int | None = None
        self._pid = -1

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self._row_shape))

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"StoredImages({self.path}, {tuple(self.shape)} uint8)"

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):  # rows, then the other dimensions of what they read
            rows, rest = key[0], key[1:]
            return self[rows][rest] if isinstance(rows, int) else self[rows][(slice(None), *rest)]
        if isinstance(key, int):
            return self.read(self.rows[key : key + 1 or None])[0]
        return self.read(self.rows[torch.as_tensor(key) if isinstance(key, list) else key])

    def subset(self, index: torch.Tensor) -> StoredImages:
        """The images at ``index`` (int64 (K,)), as rows of the same file: nothing is read."""
        return StoredImages(self.path, self.rows[index])

    def concat(self, other: StoredImages) -> StoredImages:
        """These images, then ``other``'s, which must be rows of the same file."""
        if other.path != self.path:
            raise ValueError(f"cannot join rows of {self.path} and {other.path}")
        return StoredImages(self.path, torch.cat([self.rows, other.rows]))

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64 (B,)) of the file as a uint8 tensor (B, C, H, W); each run of
        consecutive rows is one read."""
        rows = torch.as_tensor(rows).reshape(-1).numpy()
        out = np.empty((len(rows), *self._row_shape), dtype=np.uint8)
        if len(rows) == 0:
            return torch.from_numpy(out)
        if rows.min() < 0 or rows.max() >= self._file_rows:
            raise IndexError(f"row out of range [0, {self._file_rows}) of {self.path}")
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(rows)]])
        flat = out.reshape(len(rows), -1)
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            self._read_into(memoryview(flat[start:end]).cast("B"), int(rows[start]))
        return torch.from_numpy(out)

    def _read_into(self, buffer: memoryview, row: int) -> None:
        fd = self._file()
        offset, done = self._offset + row * self._row_bytes, 0
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.path} ends before row {row + done // self._row_bytes}")
            done += got

    def _file(self) -> int:
        """This process's descriptor of the file (a forked process opens its own)."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
