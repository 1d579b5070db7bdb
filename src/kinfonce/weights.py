"""Initial backbone weights from a file (``--init-weights``), read safely.

A safetensors file, a torch ``state_dict`` (``torch.load(weights_only=True)``: tensors and
plain containers only, no pickled code), or the directory of a ``kinfonce export``
(its ``backbone.safetensors`` or ``backbone.pth``). A mapping with a ``state_dict`` entry
(a Lightning checkpoint) gives that entry, and keys under ``backbone.`` (a kinfonce
checkpoint's) lose the prefix. Every key must fit the backbone: missing, unexpected and
mis-shaped keys are refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kinfonce.errors import KinfonceError, MissingFileError

#: Files of an export directory that hold backbone weights, in order of preference.
EXPORT_WEIGHT_FILES = ("backbone.safetensors", "backbone.pth")
#: Key names shown per kind of mismatch before the rest are counted.
SHOWN_KEYS = 8


def weights_file(path: Path) -> Path:
    """The file of ``path`` that holds the weights: ``path`` itself, or the weights of an
    export directory.

    Raises:
        MissingFileError: no such file.
        KinfonceError: an export directory without weights.
    """
    if not path.exists():
        raise MissingFileError(f"init_weights {str(path)!r} does not exist")
    if not path.is_dir():
        return path
    for name in EXPORT_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise KinfonceError(
        f"init_weights {str(path)!r} is a directory without {' or '.join(EXPORT_WEIGHT_FILES)} "
        "(export with --format safetensors or torchvision)"
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or export directory, by key (see the module docstring).

    Raises:
        MissingFileError: no such file.
        KinfonceError: neither safetensors nor a safely loadable mapping of tensors.
    """
    file = weights_file(Path(path))
    try:
        return load_file(file)
    except (SafetensorError, OSError):
        pass  # not safetensors: a torch file
    state = load_torch_file(file, "init_weights (neither safetensors nor torch)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KinfonceError(f"init_weights {str(file)!r} holds no mapping of names to tensors")
    prefix = "backbone."
    if any(key.startswith(prefix) for key in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only.

    Raises:
        KinfonceError: naming ``what``: the file is corrupt or truncated, or holds pickled
            objects other than tensors and plain containers.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # arbitrary bytes can fail anywhere in the (safe) unpickler
        raise KinfonceError(
            f"{what} {str(path)!r} cannot be read safely: it is corrupt or truncated, or "
            f"holds pickled objects other than tensors and plain containers "
            f"({type(err).__name__})"
        ) from None


def _named(kind: str, keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{kind} {', '.join(keys[:SHOWN_KEYS])}{more}"


class KeyDifferences(NamedTuple):
    """Sorted keys in which a state_dict differs from a module's (see :func:`key_differences`)."""

    missing: list[str]
    unexpected: list[str]
    reshaped: list[str]


def key_differences(module: nn.Module, state: dict[str, Any]) -> KeyDifferences:
    """Keys of ``module``'s weights missing from ``state``, keys of ``state`` the module
    lacks, and keys whose ``state`` entry is not a tensor of the module's shape."""
    own = module.state_dict()
    return KeyDifferences(
        missing=sorted(own.keys() - state.keys()),
        unexpected=sorted(state.keys() - own.keys()),
        reshaped=sorted(
            key
            for key in own.keys() & state.keys()
            if not isinstance(state[key], torch.Tensor) or state[key].shape != own[key].shape
        ),
    )


def load_initial_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load the weights of ``path`` into ``backbone``, every key and shape matched.

    Raises:
        KinfonceError: keys missing from the file, keys the backbone lacks, or tensors of
            another shape, each named.
    """
    state = read_weights(path)
    differences = key_differences(backbone, state)
    expected = backbone.state_dict()
    shapes = [
        f"{key} (file {tuple(state[key].shape)}, backbone {tuple(expected[key].shape)})"
        for key in differences.reshaped
    ]
    problems = [
        _named(kind, keys)
        for kind, keys in (
            ("missing from the file:", differences.missing),
            ("not in the backbone:", differences.unexpected),
            ("of another shape:", shapes),
        )
        if keys
    ]
    if problems:
        raise KinfonceError(
            f"init_weights {str(path)!r} does not fit the backbone; keys {'; '.join(problems)}"
        )
    backbone.load_state_dict(state)
