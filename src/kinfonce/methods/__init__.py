"""Pretraining methods by name, and loading a pretrained encoder from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.methods.base import CHECKPOINT_KEY, DATA_FIELDS, PretrainMethod
from kinfonce.methods.moco import MoCo
from kinfonce.methods.simclr import SimCLR

#: Method name -> LightningModule class.
METHODS: dict[str, type[PretrainMethod]] = {"simclr": SimCLR, "moco": MoCo}

__all__ = ["METHODS", "MoCo", "PretrainMethod", "SimCLR", "load_checkpoint", "load_encoder"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a kinfonce checkpoint safely (``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt, holds pickled code, or is no kinfonce checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # arbitrary bytes can fail anywhere in the (safe) unpickler
        raise KinfonceError(
            f"checkpoint {str(path)!r} cannot be read safely: it is corrupt or truncated, or "
            f"holds pickled objects other than tensors and plain containers "
            f"({type(err).__name__})"
        ) from None
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


def load_encoder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained backbone of a checkpoint written by ``kinfonce pretrain`` or ``clip``.

    Args:
        path: a ``.ckpt`` file from ``RUN_DIR/checkpoints``.

    Returns:
        (backbone in eval mode mapping (B, C, H, W) float to (B, F), config dict); the
        config dict also holds ``"data"``, the data description the model was built for.
    """
    from kinfonce.config import CONFIG_CLASSES, config_from_mapping
    from kinfonce.models import build_backbone

    checkpoint = load_checkpoint(path)
    stored = checkpoint[CHECKPOINT_KEY]
    kind = stored.get("kind", "pretrain")
    if kind not in CONFIG_CLASSES:
        raise KinfonceError(f"{str(path)!r} holds a checkpoint of an unknown kind {kind!r}")
    data = stored["data"]
    try:
        config = config_from_mapping(stored["config"], cls=CONFIG_CLASSES[kind])
        backbone = build_backbone(
            config.backbone,
            in_channels=data["channels"],
            image_size=data["image_size"],
            stem=config.stem,
        )
        prefix = "backbone."
        state = {
            k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
        }
        backbone.load_state_dict(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise KinfonceError(
            f"checkpoint {str(path)!r} is malformed: its config, data description and weights "
            f"do not make an encoder ({type(err).__name__}: {err})"
        ) from None
    return backbone.eval(), {**config.to_dict(), "data": data}
