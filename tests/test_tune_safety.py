"""A search that runs its own Ray keeps it on this machine and ends it; search directories
are locked, trusted before they are unpickled, and never left in a state nothing accepts
(issue 21, points 1-4, 12 and 15).

One real search runs as a separate ``kinfonce tune`` process: while its trial trains, the
test reads the listening sockets of all its processes, tries a ``--resume`` of the same
directory, then kills the search with SIGKILL and watches its Ray processes end.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
import ray.exceptions
import yaml

from kinfonce.cli import main
from kinfonce.config import SearchSettings
from kinfonce.raysession import is_loopback
from kinfonce.space import default_space, space_to_yaml
from tests.helpers import tiny_config, tiny_flags

#: The search: one trial of 40 tiny epochs, long enough to be looked at while it trains
#: (the tiny run's flags but those the search sets itself).
SEARCH_FLAGS = [
    *[f for f in tiny_flags(train_subset=64) if f not in ("--epochs", "1", "--no-progress")],
    "--max-t", "40", "--num-samples", "1", "--max-concurrent", "1",
]  # fmt: skip
#: The CPUs of a Ray started here.
LOCAL_FLAGS = ["--num-cpus", "1"]


def family(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``processes``."""
    found = []
    for process in processes:
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((process.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def running_search(tmp_path):
    """A ``kinfonce tune`` process whose first trial has written a checkpoint."""
    search_dir = tmp_path / "search"
    argv = [sys.executable, "-m", "kinfonce.cli", "tune", *SEARCH_FLAGS, *LOCAL_FLAGS]
    log = (tmp_path / "tune.log").open("w")
    driver = subprocess.Popen(
        [*argv, "--output-dir", str(search_dir)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(
            lambda: (
                any(search_dir.glob("*/run/checkpoints/last.ckpt")) or driver.poll() is not None
            ),
            240,
            "the first trial checkpoint",
        )
        assert driver.poll() is None, (tmp_path / "tune.log").read_text()[-3000:]
        yield driver, search_dir
    finally:
        for process in reversed(family(driver.pid) if driver.poll() is None else []):
            process.kill()
        driver.wait()
        log.close()


def test_a_local_search_listens_on_loopback_is_locked_and_its_ray_dies_with_it(
    running_search, capsys
):
    driver, search_dir = running_search
    processes = family(driver.pid)
    # Point 1: a search that starts its own Ray listened on every interface (Ray runs any
    # job sent to a reachable cluster).
    sockets = listening(processes)
    assert any(name == "gcs_server" for name, _, _ in sockets)  # Ray's servers are seen
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # Point 3: a --resume of a search still running was accepted; the first driver then
    # exited "interrupted" and the resume called a finished trial failed.
    assert main(["tune", "--resume", str(search_dir)]) == 2
    assert "is in use by a running kinfonce process" in capsys.readouterr().err
    assert not ray.is_initialized()
    # Point 15: kill -9 of the driver left 4 Ray processes, two still alive 13 s later.
    ray_processes = [
        p for p in processes if p.pid != driver.pid and "raywatch" not in " ".join(p.cmdline())
    ]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    _, alive = psutil.wait_procs(ray_processes, timeout=10)
    assert alive == [], f"still running 10 s after the driver died: {[p.name() for p in alive]}"


def crafted_search(root: Path, marker: Path) -> Path:
    """A search directory whose Tune state (``tuner.pkl``) runs a command when unpickled."""
    search_dir = root / "crafted"
    search_dir.mkdir()
    base = tiny_config(root)
    record = {
        "config": base.to_dict(),
        "space": space_to_yaml(default_space(base.loss)),
        "settings": SearchSettings(max_t=1).to_dict(),
    }
    (search_dir / "search.yaml").write_text(yaml.safe_dump(record))

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (search_dir / "tuner.pkl").write_bytes(pickle.dumps(RunsCode()))
    return search_dir


def test_resume_refuses_a_search_directory_others_can_write(tmp_path, capsys):
    """Point 2: a crafted tuner.pkl ran code on --resume; the directory is now refused when
    anything in it is writable by others or owned by another user."""
    marker = tmp_path / "code-ran"
    search_dir = crafted_search(tmp_path, marker)
    (search_dir / "tuner.pkl").chmod(0o666)
    assert main(["tune", "--resume", str(search_dir)]) == 2
    err = capsys.readouterr().err
    assert "tuner.pkl' can be written by others (mode 666)" in err and "chmod -R go-w" in err
    assert not marker.exists() and not ray.is_initialized()
    if os.getuid() == 0:  # only root can give a file away
        (search_dir / "tuner.pkl").chmod(0o644)
        os.chown(search_dir / "tuner.pkl", 65534, 65534)
        assert main(["tune", "--resume", str(search_dir)]) == 2
        assert "is owned by user id 65534, not by you (0)" in capsys.readouterr().err
        assert not marker.exists()


def test_a_cluster_that_refuses_the_token_is_one_line_and_leaves_the_dir_free(
    tmp_path, capsys, monkeypatch
):
    """Point 4: an InvalidAuthToken from a Ray 2.60 cluster was a traceback, and left a
    search.yaml that a rerun refused ("already holds a search") and --resume too ("no Tune
    experiment state")."""

    def refused(*args, **kwargs):
        raise ray.exceptions.AuthenticationError(
            "Authentication failed: InvalidAuthToken: no token was presented"
        )

    monkeypatch.setattr(ray, "init", refused)
    search_dir = tmp_path / "search"
    argv = ["tune", *SEARCH_FLAGS, "--address", "127.0.0.1:6379", "--output-dir", str(search_dir)]
    for _ in range(2):  # the rerun meets the same refusal, not the directory
        assert main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "cannot join the Ray cluster" in line and "InvalidAuthToken" in line
        assert "--address auto" in line
        assert "RAY_AUTH_MODE=token" in line
        assert not (search_dir / "search.yaml").exists()


def test_a_search_into_a_read_only_place_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """Point 12: `tune --output-dir` on a read-only file system gave a traceback."""
    import kinfonce.fileio

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.access
    monkeypatch.setattr(
        kinfonce.fileio.os,
        "access",
        lambda path, mode: False if Path(path) == read_only else real(path, mode),
    )
    argv = ["tune", *SEARCH_FLAGS, *LOCAL_FLAGS, "--output-dir", str(read_only / "search")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "cannot be written: no write permission" in err
    assert not ray.is_initialized() and not (read_only / "search").exists()
