"""The run directory of ``kinfonce pretrain`` and ``kinfonce clip``: its name, who owns it, and
the record of what ran in it.

A run owns its directory through an exclusive ``flock`` on ``RUN_DIR/.lock``, held from
before ``config.yaml`` is written until ``metrics.json`` is; the file names the holder
(process id, host, start time). The kernel drops the lock when the holder exits, however it
exits (``kill -9`` included), so a lock is never stale; the file stays behind.

Any directory holding one of :data:`RUN_FILES` is a run: without ``--resume`` a new run
refuses it. A refused run writes nothing.

:func:`run_record` names what a run ran on: the kinfonce, torch and Lightning versions, the
device, and the git commit of the source tree when it is a git checkout (``metrics.json``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning
import torch

from kinfonce.config import TrainConfig
from kinfonce.errors import KinfonceError
from kinfonce.fileio import fsync_directory, remove_temp_files
from kinfonce.scoped import environment

#: Environment variable that hands the run directory to DDP worker processes, which
#: Lightning starts by re-running the same command.
RUN_DIR_ENV = "KINFONCE_RUN_DIR"
#: What ``kinfonce pretrain`` and ``kinfonce clip`` write into a run directory.
RUN_FILES = ("config.yaml", "metrics.json", "curves.png", "checkpoints", "logs")
LOCK_FILE = ".lock"


def resolve_run_dir(config: TrainConfig) -> Path:
    """The run directory: ``output_dir``, else a new time-stamped one.

    New ones are ``runs/<command>/<dataset>-<method>-<loss>-<time>`` (the method of
    ``kinfonce clip`` is ``clip``). A DDP worker (``LOCAL_RANK`` set) takes the
    name its launcher handed on through :data:`RUN_DIR_ENV` (see :func:`shared_with_workers`).
    """
    if config.output_dir:
        return Path(config.output_dir)
    if RUN_DIR_ENV in os.environ and "LOCAL_RANK" in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{config.dataset.split(':')[0]}-{config.method_name}-{config.loss}-{stamp}"
    return Path("runs") / config.command / name


@contextlib.contextmanager
def shared_with_workers(run_dir: Path, world_size: int) -> Iterator[None]:
    """Hand ``run_dir`` to the DDP workers Lightning starts (by re-running the command) through
    :data:`RUN_DIR_ENV`, only while they start and only with more than one process; the
    variable's earlier state is restored afterwards."""
    if world_size == 1 or "LOCAL_RANK" in os.environ:
        yield
        return
    with environment(**{RUN_DIR_ENV: str(run_dir)}):
        yield


def run_files(run_dir: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``run_dir``."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _in_use(run_dir: Path, fd: int) -> KinfonceError:
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    return KinfonceError(
        f"{str(run_dir)!r} is in use by a running kinfonce process ({holder}); wait for it "
        "to finish or choose another --output-dir"
    )


def _check_contents(run_dir: Path, resume: bool) -> None:
    present = run_files(run_dir)
    if present and not resume:
        raise KinfonceError(
            f"{str(run_dir)!r} already holds a run ({', '.join(present)}); pass --resume to "
            "continue it or choose another --output-dir"
        )


def check_run_dir_free(run_dir: Path, *, resume: bool) -> None:
    """Refuse, writing nothing, a directory another process holds, or (without ``resume``)
    one that holds a run. A cheap early check; :func:`claim_run_dir` checks again."""
    lock = run_dir / LOCK_FILE
    if lock.is_file():
        fd = os.open(lock, os.O_RDONLY)
        try:
            if not _try_lock(fd):
                raise _in_use(run_dir, fd)
        finally:
            os.close(fd)  # closing drops a lock taken just to test
    _check_contents(run_dir, resume)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, *, resume: bool) -> Iterator[None]:
    """Own ``run_dir`` for the block: create it, lock it and name this process as holder.

    Leftover temporary files of killed writes are removed once the lock is held.

    Raises:
        KinfonceError: another process holds the directory, or (without ``resume``) it
            already holds a run; nothing is written then (beyond the directory and lock
            file the holder itself created).
    """
    with hold_directory(run_dir):
        _check_contents(run_dir, resume)
        for directory in (run_dir, run_dir / "checkpoints", run_dir / "logs"):
            remove_temp_files(directory)
        yield


@contextlib.contextmanager
def hold_directory(directory: Path) -> Iterator[None]:
    """Own ``directory`` for the block: create it, take the exclusive lock on its
    :data:`LOCK_FILE` and write this process into it as the holder. The lock of
    :func:`claim_run_dir`, without its check of the contents; alone, a search directory's
    (:mod:`kinfonce.tune`).

    A disk that cannot take the lock file (full, read-only) is a KinfonceError, and a
    directory created here is removed again, so that it is not left holding only a lock.

    Raises:
        KinfonceError: another process holds it, or it cannot be created or written.
    """
    created = not directory.exists()
    fd = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            raise _in_use(directory, fd)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%c')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        os.fsync(fd)
        if created:
            fsync_directory(directory.parent)
    except OSError as err:
        if fd is not None:
            os.close(fd)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise KinfonceError(
            f"cannot take {str(directory)!r}: writing its lock file failed ({err.strerror}); "
            "free space or choose a writable directory"
        ) from None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def set_aside_stale_eval(run_dir: Path, trained_epochs: int) -> Path | None:
    """Move ``RUN_DIR/eval`` (``kinfonce eval`` of an earlier checkpoint) aside when a resume
    trains the run further: to ``eval-before-epoch-<trained_epochs>`` (with a number added if
    that exists). Returns where it went, or None when there was none."""
    stale = run_dir / "eval"
    if not stale.is_dir():
        return None
    target = run_dir / f"eval-before-epoch-{trained_epochs}"
    count = 1
    while target.exists():
        count += 1
        target = run_dir / f"eval-before-epoch-{trained_epochs}-{count}"
    stale.rename(target)
    fsync_directory(run_dir)
    return target


def run_record(accelerator: str) -> dict[str, Any]:
    """What a run ran on: kinfonce, torch, torchvision, timm (None if absent) and Lightning
    versions, the device, the git commit.

    Args:
        accelerator: the resolved accelerator of the run ("gpu", "cpu", ...).
    """
    return {
        "kinfonce": importlib.metadata.version("kinfonce"),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "lightning": lightning.__version__,
        "device": device_name(accelerator),
        "git_commit": source_commit(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(accelerator: str) -> str:
    """The name of the device a run of ``accelerator`` trains on, e.g. the GPU's model."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{accelerator} ({platform.processor() or platform.machine()})"


def source_commit() -> str | None:
    """The git commit of kinfonce's source tree when it is a git checkout (an editable
    install), else None."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None
