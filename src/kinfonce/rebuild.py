"""Rebuild an exported encoder from its ``config.json`` with torchvision or timm alone.

This module imports nothing of kinfonce: it is the code that docs/guide.md ("Using your
encoder elsewhere") gives for programs without kinfonce, and ``kinfonce export`` checks every
safetensors and torchvision export by rebuilding it here. A recipe (``config.json``'s
``"model"``) names a library model and what kinfonce changed in it:

* ``library``, ``name``, ``kwargs``: ``timm.create_model`` or ``torchvision.models.get_model``
  without pretrained weights;
* ``stages`` (kinfonce's ResNets of another width or depth than torchvision's): the four
  stages made again by torchvision's own ``ResNet._make_layer`` with these widths and depths;
* ``replaced_modules``: dotted module name -> ``{"type": a torch.nn class, "args": ...}``
  (the small stem, the input channels, the classifier made an ``Identity``).

A head (``config.json``'s ``"head"``) is a list of such layers, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn


def make_layer(spec: dict[str, Any]) -> nn.Module:
    """A ``torch.nn`` layer from ``{"type": name, "args": keyword arguments}``."""
    return getattr(nn, spec["type"])(**spec.get("args", {}))


def create(library: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A timm or torchvision model by name, with random weights."""
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def build_model(recipe: dict[str, Any]) -> nn.Module:
    """The model of a recipe (random weights; load the exported ones into it)."""
    model = create(recipe["library"], recipe["name"], recipe["kwargs"])
    stages = recipe.get("stages")
    if stages:  # a torchvision ResNet: its stages again, at kinfonce's widths and depths
        block = type(model.layer1[0])
        model.inplanes = stages["widths"][0]
        for i, (width, depth) in enumerate(zip(stages["widths"], stages["depths"], strict=True)):
            stride = 1 if i == 0 else 2
            setattr(model, f"layer{i + 1}", model._make_layer(block, width, depth, stride))
    replace_modules(model, recipe["replaced_modules"])
    return model


def replace_modules(model: nn.Module, replaced: dict[str, dict[str, Any]]) -> None:
    """Put a new layer (:func:`make_layer`) at each dotted module name of ``replaced``."""
    for name, spec in replaced.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, make_layer(spec))


def load_export(directory: str | Path) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    """(backbone, head or None, config.json) of a safetensors export, in eval mode.

    The backbone maps normalised images (B, C, H, W) to features (B, F); the head features
    to embeddings (B, D).
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    backbone = build_model(config["model"])
    backbone.load_state_dict(load_file(directory / "backbone.safetensors"))
    head = None
    if config.get("head"):
        head = nn.Sequential(*(make_layer(layer) for layer in config["head"]))
        head.load_state_dict(load_file(directory / "head.safetensors"))
    return backbone.eval(), head if head is None else head.eval(), config


def normalise(images: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> the float32 input the encoder was trained on."""
    mean = torch.tensor(config["input"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["input"]["std"]).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std
