"""Process-wide settings changed for a block only, and restored afterwards, however it exits.

Library code changes no global state for longer than a call: torch's CPU thread count, the
random generators, environment variables, the float32 matmul precision, whether progress
bars are shown and the SIGTERM handler are each set by one context manager here, which
puts back what was there before.

Small steps (a linear head on a batch of 64, 100 points of the synthetic experiment) cost
more in thread synchronisation than they gain; on a loaded 2-core machine, 5 epochs of a
(1000, 32) -> 10 probe took 4.8 s on two threads and 0.16 s on one
(:func:`one_cpu_thread`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch

from kinfonce.errors import Terminated


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run torch's CPU ops on ``count`` threads inside the block, then restore the previous
    count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_cpu_thread() -> contextlib.AbstractContextManager[None]:
    """:func:`cpu_threads` with one thread: for loops of tiny torch operations."""
    return cpu_threads(1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's global generator and torch's CPU and CUDA generators
    with ``seed`` for the block, then restore all of their previous states.

    What ``lightning.seed_everything`` seeds, without its lasting effects (the generators
    stay seeded after the run, and ``PL_GLOBAL_SEED`` stays in the environment).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_devices()):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also every CUDA generator
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def torch_seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch's CPU generator and, for a CUDA ``device``, that device's generator with
    ``seed`` for the block, then restore both; no other generator is touched.

    For code that draws from the CPU and one device (a layer's initialisation, a step's views):
    ``torch.manual_seed`` would also reseed the generator of every other GPU, and leave it so.
    """
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _cuda_devices() -> list[int]:
    """Indices of the CUDA devices whose generators :func:`seeded` saves (none without CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the block; each comes back to its earlier value (or is
    removed again) afterwards."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def matmul_precision(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for the block (None: unchanged), then
    the previous setting."""
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


_PROGRESS_SHOWN = contextvars.ContextVar("kinfonce_progress_shown", default=True)


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Show (or hide) the progress bars of code that takes no ``progress`` argument of its
    own, such as data loading, inside the block (:func:`progress_shown`)."""
    token = _PROGRESS_SHOWN.set(shown)
    try:
        yield
    finally:
        _PROGRESS_SHOWN.reset(token)


def progress_shown() -> bool:
    """Whether progress bars are shown here: the innermost :func:`progress_bars`, else True."""
    return _PROGRESS_SHOWN.get()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`~kinfonce.errors.Terminated` in the main thread for the block,
    as SIGINT raises ``KeyboardInterrupt``; the previous handler is restored afterwards.

    During ``Trainer.fit`` Lightning's own SIGTERM handler runs first and then this one, so
    the exception goes through Lightning's exception path (``interrupted.ckpt``).
    """

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
