"""Checkpoints of a run: written atomically and durably, and chosen for resuming by progress.

Lightning writes every checkpoint through the run's :class:`AtomicCheckpointIO` (a
``Trainer`` plugin): a temporary file in the checkpoint's own directory, fsynced, then
renamed, so a kill or a full disk leaves the previous checkpoint whole; a full disk is
reported as one line that says so.

:func:`resume_checkpoint` reads the (epoch, global step) stored in each of
``last.ckpt``, ``interrupted.ckpt`` and ``best.ckpt``, skips unreadable ones with a
warning, and continues from the furthest; file times play no part.

Checkpoints are read safely (:func:`load_checkpoint`, ``torch.load(weights_only=True)``);
:func:`load_encoder` rebuilds the backbone of one (:func:`load_encoder_parts` also its head) from its stored, resolved configuration.
"""

from __future__ import annotations

import contextlib
import errno
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from kinfonce.config import CONFIG_CLASSES, TrainConfig, config_differences, config_from_mapping
from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.fileio import atomic_write
from kinfonce.library_backbones import check_library_name, library_of
from kinfonce.methods.base import CHECKPOINT_KEY, DATA_FIELDS
from kinfonce.models import ProjectionHead, build_backbone, place_backbone
from kinfonce.resolve import resolve
from kinfonce.weights import key_differences, load_torch_file

#: Checkpoints of a run directory that a resume may continue from, in order of preference
#: between equal progress.
RESUME_CANDIDATES = ("last.ckpt", "interrupted.ckpt", "best.ckpt")


#: errno values of a full disk or an exhausted quota.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, writing through :func:`atomic_write`.

    The checkpoint is serialised in memory first (as Lightning's own IO does), so that a
    failing disk shows as the disk's own error; a full disk or quota becomes a
    KinfonceError that says the checkpoints already written are whole.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write(path, lambda file: file.write(buffer.getbuffer()))
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise KinfonceError(
                f"no space left to write checkpoint {str(path)!r} ({err.strerror}); the "
                "checkpoints already written are whole: free space, then continue with --resume"
            ) from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a kinfonce checkpoint safely (``torch.load(weights_only=True)``).

    Raises:
        MissingFileError: no such file.
        KinfonceError: the file is corrupt, holds pickled code, or is no kinfonce checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()]
        hint = f", such as {str(found[0])!r}" if found else ""
        raise KinfonceError(f"checkpoint {str(path)!r} is a directory: pass a .ckpt file{hint}")
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise KinfonceError(
            f"{str(path)!r} is not a kinfonce pretraining checkpoint (no {CHECKPOINT_KEY!r} entry)"
        )
    problem = _malformed(checkpoint)
    if problem:
        raise KinfonceError(f"checkpoint {str(path)!r} is malformed: {problem}")
    return checkpoint


def _malformed(checkpoint: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a loaded checkpoint, or None."""
    stored = checkpoint[CHECKPOINT_KEY]
    if not isinstance(stored, dict):
        return f"its {CHECKPOINT_KEY!r} entry is a {type(stored).__name__}, not a mapping"
    for key in ("config", "data"):
        if not isinstance(stored.get(key), dict):
            return f"its {CHECKPOINT_KEY!r} entry has no {key!r} mapping"
    missing = [key for key in DATA_FIELDS if key not in stored["data"]]
    if missing:
        return f"its data description lacks {missing}"
    if not isinstance(checkpoint.get("state_dict"), dict):
        return "it has no 'state_dict' mapping of tensors"
    return None


def stored_config(checkpoint: dict[str, Any], path: str | Path) -> TrainConfig:
    """The resolved configuration a checkpoint was written with.

    A checkpoint of an earlier kinfonce may hold an input configuration (loss parameters and
    memory format left at None): it is resolved here as its run resolved it.

    Raises:
        KinfonceError: its kind is unknown, or its configuration is not valid.
    """
    stored = checkpoint[CHECKPOINT_KEY]
    kind = stored.get("kind", "pretrain")
    if kind not in CONFIG_CLASSES:
        raise KinfonceError(f"{str(path)!r} holds a checkpoint of an unknown kind {kind!r}")
    with warnings.catch_warnings():  # the run warned about its settings when it started
        warnings.simplefilter("ignore")
        return resolve(config_from_mapping(stored["config"], cls=CONFIG_CLASSES[kind]))


def load_encoder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained backbone of a checkpoint written by ``kinfonce pretrain`` or ``clip``.

    Args:
        path: a ``.ckpt`` file from ``RUN_DIR/checkpoints``.

    Returns:
        (backbone in eval mode mapping (B, C, H, W) float to (B, F), on the CPU in the memory
        format its run used (:func:`kinfonce.models.place_backbone`); the resolved config as
        a dict, which also holds ``"data"``, the data description the model was built for).
    """
    backbone, _, config = load_encoder_parts(path, head=False)
    return backbone, config


def load_encoder_parts(
    path: str | Path, *, head: bool
) -> tuple[nn.Module, ProjectionHead | None, dict[str, Any]]:
    """:func:`load_encoder`, and with ``head`` the projection head too ((B, F) -> (B, D),
    eval mode, on the CPU)."""
    checkpoint = load_checkpoint(path)
    stored = checkpoint[CHECKPOINT_KEY]
    data = stored["data"]
    name = stored["config"].get("backbone")
    if isinstance(name, str) and library_of(name):  # timm missing here is no malformed file
        check_library_name(name)
    with _malformed_as_error(path):
        config = stored_config(checkpoint, path)
        backbone = build_backbone(
            config.backbone,
            in_channels=data["channels"],
            image_size=data["image_size"],
            stem=config.stem,
        )
    _check_recipe(stored.get("backbone_recipe"), backbone, path)
    projection = None
    with _malformed_as_error(path):
        state = _module_state(checkpoint, "backbone.")
    mismatch = weights_mismatch(backbone, state)
    if mismatch:  # torch's own error lists every key: dozens of lines
        raise KinfonceError(
            f"checkpoint {str(path)!r} is malformed: its weights are not those of its "
            f"backbone {config.backbone!r} ({mismatch})"
        )
    with _malformed_as_error(path):
        backbone.load_state_dict(state)
        if head:
            projection = ProjectionHead(
                backbone.feature_dim,
                config.proj_hidden_dim,
                config.proj_out_dim,
                batch_norm=config.proj_batch_norm,
            )
            projection.load_state_dict(_module_state(checkpoint, "head."))
            projection.eval()
    backbone = place_backbone(backbone, "cpu", channels_last=config.channels_last)
    return backbone.eval(), projection, {**config.to_dict(), "data": data}


@contextlib.contextmanager
def _malformed_as_error(path: str | Path) -> Iterator[None]:
    """Report what a checkpoint's contents failed to build as one malformed-checkpoint error."""
    try:
        yield
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise KinfonceError(
            f"checkpoint {str(path)!r} is malformed: its config, data description and weights "
            f"do not make an encoder ({type(err).__name__}: {err})"
        ) from None


def _check_recipe(stored: dict[str, Any] | None, backbone: nn.Module, path: str | Path) -> None:
    """Refuse a backbone that this machine builds otherwise than the checkpoint's run did (a
    timm or torchvision release that changed the model); older checkpoints store no recipe."""
    if stored is not None and stored != backbone.recipe:
        raise KinfonceError(
            f"checkpoint {str(path)!r}: its backbone was built as {stored}, but this "
            f"machine's libraries build {backbone.recipe}; install the versions its run used "
            "(RUN_DIR/metrics.json names them)"
        )


def _module_state(checkpoint: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a checkpoint's state_dict under ``prefix``, without it."""
    state = checkpoint["state_dict"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def weights_mismatch(module: nn.Module, state: dict[str, Any]) -> str | None:
    """How ``state`` differs from the weights ``module`` holds, counted in one line with an
    example of each kind (torch's own error lists every key), or None when they match."""
    differences = key_differences(module, state)
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]!r})"
        for keys, what in (
            (differences.missing, "missing"),
            (differences.unexpected, "unexpected"),
            (differences.reshaped, "of another shape"),
        )
        if keys
    ]
    return ", ".join(parts) or None


def checkpoint_progress(path: Path) -> tuple[int, int]:
    """(epoch, global step) recorded in a kinfonce checkpoint.

    Raises:
        KinfonceError: unreadable, not a kinfonce checkpoint, or without those two entries.
    """
    return _recorded_progress(load_checkpoint(path), path)


def _recorded_progress(checkpoint: dict[str, Any], path: Path) -> tuple[int, int]:
    progress = (checkpoint.get("epoch"), checkpoint.get("global_step"))
    if not all(isinstance(value, int) for value in progress):
        raise KinfonceError(f"checkpoint {str(path)!r} records no integer epoch and global_step")
    return progress  # type: ignore[return-value]


def trained_epochs(path: Path) -> int:
    """How many epochs a kinfonce checkpoint's run had trained when it was saved (an
    interrupted epoch not counted)."""
    checkpoint = load_checkpoint(path)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    processed = progress.get("total", {}).get("processed")
    return processed if isinstance(processed, int) else _recorded_progress(checkpoint, path)[0]


def describe_resume(path: Path, done: int, epochs: int) -> str:
    """The line that says what a resume continues: the checkpoint ``path``, the ``done``
    epochs it had trained (:func:`trained_epochs`) and those left of ``epochs``."""
    left = max(epochs - done, 0)
    tail = f"{left} to go" if left else "none to go: only the final evaluation runs"
    return f"resuming from {path}: {done} of {epochs} epochs trained, {tail}"


def furthest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The readable one of :data:`RESUME_CANDIDATES` with the highest (epoch, global step).

    Returns:
        Its path, or None when none of them exists.

    Raises:
        KinfonceError: some exist but none is readable (each reason named).
    """
    found, reasons = [], []
    for preference, name in enumerate(RESUME_CANDIDATES):
        path = checkpoint_dir / name
        if not path.exists():
            continue
        try:
            found.append(((*checkpoint_progress(path), -preference), path))
        except KinfonceError as err:
            reasons.append(str(err))
            warnings.warn(f"skipping checkpoint {str(path)!r} for the resume: {err}", stacklevel=2)
    if found:
        return max(found)[1]
    if reasons:
        raise KinfonceError(f"no readable checkpoint to resume from: {'; '.join(reasons)}")
    return None


def resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from.

    Args:
        run_dir: the run directory.
        resume: None (a new run), a checkpoint path, or ``"last"``: the furthest readable
            checkpoint of ``run_dir`` (:func:`furthest_checkpoint`).

    Returns:
        The checkpoint, or None: a new run, or a run that stopped before its first
        checkpoint (it then starts again from epoch 0, with a warning).

    Raises:
        MissingFileError: nothing to resume in ``run_dir``.
        KinfonceError: its checkpoints are all unreadable.
    """
    if resume is None:
        return None
    if resume != "last":
        return Path(resume)
    checkpoint = furthest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        if not (run_dir / "config.yaml").is_file():
            raise MissingFileError(
                f"nothing to resume in {str(run_dir)!r}: no config.yaml and no checkpoint; pass "
                "the --output-dir of an earlier run"
            )
        warnings.warn(
            f"{str(run_dir)!r} holds no checkpoint yet: the run starts again from epoch 0",
            stacklevel=2,
        )
    return checkpoint


def check_resumable(checkpoint_path: Path, config: TrainConfig) -> None:
    """Refuse a checkpoint written with another configuration, naming the differences.

    Both configurations are compared resolved; :data:`kinfonce.config.RUNTIME_FIELDS` may differ.

    More ``epochs`` than the checkpoint's run had is allowed: training longer. The cosine
    schedule is then stretched, not continued: it is recomputed over the new number of
    steps, so the learning rate rises from where the old schedule ended (0 for a finished
    run) to the new curve's value at that step and decays to 0 at the new end.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    try:
        saved = stored_config(checkpoint, checkpoint_path)
        if type(saved) is not type(config):
            raise KinfonceError(f"it holds a {saved.command} configuration")
        saved = saved.to_dict()
    except KinfonceError as err:
        raise KinfonceError(
            f"cannot resume from {str(checkpoint_path)!r}: it was written by another kind of "
            f"run ({err})"
        ) from None
    if config.epochs > saved["epochs"]:  # training longer
        saved["epochs"] = config.epochs
    differences = config_differences(saved, config.to_dict())
    if differences:
        raise KinfonceError(
            f"cannot resume from {str(checkpoint_path)!r}: it was written with another "
            f"configuration ({'; '.join(differences)}). Pass the same settings, e.g. "
            "--config RUN_DIR/config.yaml"
        )
