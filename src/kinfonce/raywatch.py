"""The watchdog of a Ray started by ``kinfonce tune``: it ends that Ray when the search dies.

Ray ties its head processes (GCS server, raylet) to the process that started them (Linux's
parent-death signal), but their agents and idle workers outlived a ``kill -9`` of the search
by a minute or more. This script runs as a separate process, in its own session, with a pipe
on its standard input whose write end only the search holds. It polls the processes that
descend from Ray's (their ids and start times); when the pipe reports end-of-file (the
search exited, however: ``kill -9`` included, or it closed the pipe after ``ray.shutdown``)
it kills every one of them still running.

Run as a file (``python raywatch.py PID...``), not as a module of the package: it imports
nothing of kinfonce (and so no torch), only psutil.
"""

from __future__ import annotations

import os
import select
import sys

#: Seconds between two polls of the process tree.
POLL_S = 0.5


def watch(roots: list[int], pipe: int, poll_s: float = POLL_S) -> list[int]:
    """Track the descendants of ``roots`` until ``pipe`` reports end-of-file, then kill
    every tracked process still running (the same process: same id and start time).

    Returns:
        The ids of the processes killed.
    """
    import psutil

    tracked: dict[int, float] = {}

    def track() -> None:
        for pid in roots:
            try:
                root = psutil.Process(pid)
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in family:
                try:
                    tracked.setdefault(process.pid, process.create_time())
                except psutil.Error:
                    continue

    while True:
        track()
        ready, _, _ = select.select([pipe], [], [], poll_s)
        if ready and not os.read(pipe, 4096):
            break
    killed = []
    for pid, started in tracked.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.kill()
                killed.append(pid)
        except psutil.Error:
            continue
    return killed


if __name__ == "__main__":
    watch([int(pid) for pid in sys.argv[1:]], sys.stdin.fileno())
