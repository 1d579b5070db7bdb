"""Read-only access to the files of a directory or a zip archive, by POSIX relative path.

Why not plain ``zipfile.ZipFile.read``: for the many small members of an image archive its
per-member cost (opening the member, re-reading its header, checking the CRC; ~100-250 us in
Python) exceeds decoding the image. Members stored without compression (``zip -0``, as data-set
archives usually are) are therefore sliced straight out of a memory map of the archive, at the
offset ``zipfile`` reports plus the local header's length (PKWARE APPNOTE 4.3.7: 30 bytes, then
the name and extra field, whose lengths sit at bytes 26-29). Compressed or encrypted members go
through ``zipfile``, which checks their CRC-32; a stored member's CRC-32 is checked here, the
first time it is read, so that corrupt bytes are skipped and named as a deflated member's are
(decoding a tree reads each member twice: its header, then its pixels).
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from pathlib import Path

from kinfonce.errors import KinfonceError, MissingFileError

__all__ = ["ImageTree"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_MAGIC = b"PK\x03\x04"


class ImageTree:
    """The files under a directory, or inside a zip, by POSIX path relative to its root.

    Args:
        path: a directory or a .zip file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a file but not a zip archive, or a truncated one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise MissingFileError(f"image tree {self.path} does not exist")
        self.is_zip = self.path.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as file:
                starts_as_zip = file.read(len(_LOCAL_MAGIC)) == _LOCAL_MAGIC
            if starts_as_zip:
                raise KinfonceError(
                    f"{self.path} is a truncated or damaged zip archive: it starts as one but its "
                    "central directory (the list of members at its end) is missing; copy or "
                    "download it again"
                )
            raise KinfonceError(
                f"{self.path} is a file but not a zip archive (a directory or .zip expected)"
            )
        self._zip: zipfile.ZipFile | None = None
        self._map: mmap.mmap | None = None
        self._members: dict[str, zipfile.ZipInfo] | None = None
        self._crc_checked: set[str] = set()

    def identity(self) -> list:
        """What a cache key hashes: the zip's path, size and mtime, or those of every file."""
        if self.is_zip:
            stat = self.path.stat()
            return [str(self.path.resolve()), stat.st_size, stat.st_mtime_ns]
        entries = []
        for name in self.names():
            stat = (self.path / name).stat()
            entries.append((name, stat.st_size, stat.st_mtime_ns))
        return [str(self.path.resolve()), entries]

    def names(self) -> list[str]:
        """Sorted relative POSIX paths of all regular files."""
        if self.is_zip:
            return sorted(self._zip_members())
        return sorted(
            p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()
        )

    def read(self, name: str) -> bytes:
        """The bytes of one file.

        Raises:
            zipfile.BadZipFile: a zip member whose bytes fail its CRC-32.
            OSError: an unreadable file or member.
        """
        if not self.is_zip:
            return (self.path / name).read_bytes()
        info = self._zip_members()[name]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            assert self._zip is not None
            return self._zip.read(info)
        if self._map is None:
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        magic, name_len, extra_len = _LOCAL_HEADER.unpack_from(self._map, info.header_offset)
        if magic != _LOCAL_MAGIC:
            raise OSError(f"bad local header for member {name} in {self.path}")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        data = self._map[start : start + info.compress_size]
        if name not in self._crc_checked:
            if zlib.crc32(data) != info.CRC:
                raise zipfile.BadZipFile(f"Bad CRC-32 for stored member {name!r}")
            self._crc_checked.add(name)
        return data

    def _zip_members(self) -> dict[str, zipfile.ZipInfo]:
        if self._members is None:
            self._zip = zipfile.ZipFile(self.path)
            self._members = {i.filename: i for i in self._zip.infolist() if not i.is_dir()}
        return self._members
