"""Shared test helpers: the tiny-run settings, the one writer of synthetic image trees, and a
run killed in a forked process (to test resuming).

Imported by the tests (``from tests.helpers import ...``); no test imports another test file.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

from kinfonce.config import PretrainConfig, TrainConfig

#: The CIFAR-10 JPEG zip (docs/data.md): ``$KINFONCE_CIFAR10_ZIP``, else
#: ``../shared/data/cifar10-jpg.zip`` beside the checkout. Tests that need it skip without it.
CIFAR10_ZIP = Path(
    os.environ.get(
        "KINFONCE_CIFAR10_ZIP",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip",
    )
)

#: The smallest real training run: 128 digits, a quarter-width one-block ResNet, one epoch of
#: 4 steps, a 2-epoch final probe, no baselines, no progress bars (a few seconds on 2 cores).
TINY: dict[str, Any] = {
    "dataset": "digits",
    "train_subset": 128,
    "backbone": "resnet-mini",
    "proj_hidden_dim": 32,
    "batch_size": 32,
    "epochs": 1,
    "warmup_epochs": 0,
    "eval_linear_epochs": 2,
    "eval_knn_k": 10,
    "baselines": False,
    "progress": False,
}


def tiny_config(tmp_path: Path, cls: type[TrainConfig] = PretrainConfig, **overrides) -> Any:
    """A :data:`TINY` configuration of ``cls`` writing to ``tmp_path/run``, with ``overrides``
    (a pretraining one with a 128-key MoCo queue)."""
    settings = {**TINY, "output_dir": str(tmp_path / "run")}
    if cls is PretrainConfig:
        settings["queue_size"] = 128
    return cls(**{**settings, **overrides})


def tiny_flags(**overrides) -> list[str]:
    """The command-line flags of :data:`TINY` with ``overrides`` (field -> value)."""
    flags = []
    for name, value in {**TINY, **overrides}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


#: :func:`tiny_flags` without overrides.
TINY_FLAGS = tiny_flags()

#: Draws one (H, W, 3) uint8 image of a class: (class name, index in its folder, generator).
ImageMaker = Callable[[str, int, np.random.Generator], np.ndarray]


def write_image_tree(
    root: Path,
    image: ImageMaker,
    classes: Sequence[str],
    counts: Mapping[str, int],
    *,
    fmt: str = "PNG",
    unlabelled: int = 0,
    seed: int = 0,
) -> Path:
    """An image tree as ``kinfonce`` reads it: ``<split>/<class>/<i>.<fmt>`` for each split
    of ``counts`` (images per class), and ``unlabelled/<i>.<fmt>`` with ``unlabelled``
    images of each class. ``root`` ending in ``.zip`` is written as a zip of that tree.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    suffix = "jpg" if fmt.upper() == "JPEG" else fmt.lower()
    for split, count in counts.items():
        for name in classes:
            for i in range(count):
                files[f"{split}/{name}/{i}.{suffix}"] = _encode(image(name, i, rng), fmt)
    for name in classes:
        for i in range(unlabelled):
            files[f"unlabelled/{name}-{i}.{suffix}"] = _encode(image(name, i, rng), fmt)
    if root.suffix == ".zip":
        root.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root, "w") as archive:
            for path, data in files.items():
                archive.writestr(path, data)
        return root
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def flat_colour(colours: Mapping[str, tuple[int, int, int]], size: int = 8) -> ImageMaker:
    """Images of one flat colour per class, ``size`` pixels square."""
    return lambda name, i, rng: np.full((size, size, 3), colours[name], dtype=np.uint8)


def noisy_colour(
    colours: Mapping[str, tuple[int, int, int]], size: int = 16, noise: int = 30
) -> ImageMaker:
    """Images of one colour per class with uniform noise of +-``noise`` grey levels."""

    def draw(name: str, i: int, rng: np.random.Generator) -> np.ndarray:
        pixels = np.array(colours[name]) + rng.integers(-noise, noise, size=(size, size, 3))
        return np.clip(pixels, 0, 255).astype(np.uint8)

    return draw


def random_pixels(size: int = 8) -> ImageMaker:
    """Uniform random RGB images, ``size`` pixels square, whatever the class."""
    return lambda name, i, rng: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8), fmt="PNG") -> bytes:
    """One flat-coloured image of ``size`` (width, height), encoded in ``fmt``."""
    return _encode(np.full((size[1], size[0], 3), colour, dtype=np.uint8), fmt)


def pattern(name: str, index: int, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 RGB uint8 image of the class ``name`` with random phase and noise."""
    y, x = np.mgrid[:16, :16]
    shift = int(rng.integers(4))
    base = {
        "vertical": (x + shift) // 2 % 2,
        "horizontal": (y + shift) // 2 % 2,
        "checker": ((x + shift) // 4 + (y + shift) // 4) % 2,
        "blob": ((x - 7.5) ** 2 + (y - 7.5) ** 2 < 20).astype(int),
    }[name]
    gray = np.clip(60 + 140 * base + rng.normal(0, 12, base.shape), 0, 255)
    return np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)


class KillAtEpochStart(L.Callback):
    """SIGKILL this process when ``epoch`` starts (the checkpoint of the one before is on disk)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def run_in_child(run: Callable[..., Any], config: TrainConfig, **kwargs) -> int | None:
    """``run(config, **kwargs)`` (``run_pretrain``, ``run_clip``) in a forked process; its exit
    code (-9 when killed)."""
    child = multiprocessing.get_context("fork").Process(target=run, args=(config,), kwargs=kwargs)
    child.start()
    child.join(timeout=300)
    return child.exitcode
