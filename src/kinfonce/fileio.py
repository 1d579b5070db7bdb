"""Files that a crash, a kill or a full disk cannot leave half-written.

:func:`atomic_write` writes a temporary file in the target's own directory, fsyncs it,
renames it over the target (atomic on POSIX file systems, because source and target are on
one file system) and fsyncs the directory, so that after any fault the target holds either
its previous content or the new one, never a mixture or a truncation.
:func:`check_writable_dir` refuses an output directory that cannot be written, before the
work that would fill it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from kinfonce.errors import KinfonceError

#: errno values of a disk that cannot take a write: full, over quota, read-only, refused.
UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

#: Suffix of the temporary files :func:`atomic_write` leaves behind when it is killed.
TEMP_SUFFIX = ".kinfonce-tmp"


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in directory ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(binary_file)``: all of it or none of it.

    The temporary file is created in ``path``'s directory (with the permissions a new file
    gets under the umask), fsynced, renamed over ``path``, and the directory fsynced. If
    ``write`` or the disk fails, the temporary file is removed and the exception propagates
    (an ``OSError`` with ``path`` as its file name, not the temporary one); ``path`` keeps
    its previous content.

    Returns:
        ``path`` as a Path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(target)) from err
        raise
    fsync_directory(target.parent)
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda file: file.write(text.encode()))


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in
    ``directory`` (not below it); returns them. Only for a directory this process owns."""
    removed = []
    for temp in directory.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    return removed


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise a KinfonceError naming ``what`` unless ``path`` is, or can be created as, a
    writable directory. Writes nothing.

    Args:
        path: the directory (it need not exist yet).
        what: how the user named it, e.g. ``"--out"``.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise KinfonceError(f"{what} {str(target)!r} is a file, not a directory")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KinfonceError(
            f"{what} {str(target)!r} cannot be created: {str(existing)!r} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KinfonceError(
            f"{what} {str(target)!r} cannot be written: no write permission in {str(existing)!r}"
        )
