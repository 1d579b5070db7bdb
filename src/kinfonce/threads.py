"""Scoped torch CPU thread counts, for loops of tiny operations.

Small steps (a linear head on a batch of 64, 100 points of the synthetic experiment) cost
more in thread synchronisation than they gain; on a loaded 2-core machine, 5 epochs of a
(1000, 32) -> 10 probe took 4.8 s on two threads and 0.16 s on one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
