"""Backbones from timm (``timm:NAME``, the optional extra ``kinfonce[timm]``) and torchvision
(``torchvision:NAME``), built without pretrained weights.

What is done to a library model, recorded as a recipe (:mod:`kinfonce.rebuild`) that a
checkpoint's config and an export's ``config.json`` rebuild it from:

* its classifier is removed: timm's ``num_classes=0``; torchvision's last ``nn.Linear``
  becomes an ``Identity``. The feature width is read from the model (timm's
  ``head_hidden_size`` or ``num_features``, the removed layer's ``in_features``).
* its input channels: timm's ``in_chans``; torchvision's first convolution is made again
  with the data's channels.
* models of a fixed input size (timm's vision transformers) are made for the data's
  ``img_size``; torchvision's ``vit_*`` for its ``image_size``.
* the small stem (``stem="cifar"``, and ``"auto"`` for images of at most 64 px): a model with
  a ``conv1`` convolution and a ``maxpool`` (the ResNet family of both libraries) gets
  kinfonce's CIFAR stem, a 3x3 stride-1 ``conv1`` and no max-pool; a timm transformer that
  takes ``patch_size`` gets patches of :data:`SMALL_PATCH` px (an 8x8 grid at 32 px instead
  of 2x2 at its own 16). Under ``"auto"`` a model with neither keeps its own stem, with a
  warning; asked for by name, that is an error. ``"imagenet-no-maxpool"`` removes the
  max-pool of a model that has one.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torchvision
from torch import nn

from kinfonce.errors import KinfonceError
from kinfonce.rebuild import create, replace_modules

#: Prefixes of the library backbone names: ``timm:resnet18``, ``torchvision:resnet50``.
LIBRARIES = ("timm", "torchvision")
#: Patch side of a timm transformer under the small stem.
SMALL_PATCH = 4

#: What a library's builder returns: (recipe without its replaced modules, the model as the
#: library made it, the modules to replace, the feature width).
Made = tuple[dict[str, Any], nn.Module, dict[str, Any], int]


def library_of(name: str) -> str | None:
    """``"timm"`` or ``"torchvision"`` for a library backbone name, else None."""
    library, sep, _ = name.partition(":")
    return library if sep and library in LIBRARIES else None


def _timm():
    try:
        import timm
    except ImportError:
        raise KinfonceError("timm backbones need timm: pip install 'kinfonce[timm]'") from None
    return timm


def _model_names(library: str) -> list[str]:
    if library == "timm":
        return _timm().list_models()
    return torchvision.models.list_models()


def check_library_name(name: str) -> None:
    """Raise a KinfonceError unless ``name`` is ``timm:NAME`` or ``torchvision:NAME`` of a
    model the installed library has, suggesting close names."""
    library, _, model = name.partition(":")
    names = _model_names(library)
    if model not in names:
        close = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise KinfonceError(f"backbone {name!r}: {library} has no model {model!r}{hint}")


def _conv_args(conv: nn.Conv2d, **changes: Any) -> dict[str, Any]:
    """The constructor arguments of a convolution, with ``changes``."""
    args = {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "bias": conv.bias is not None,
    }
    return {**args, **changes}


def _has_conv_stem(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")


def _stem_changes(model: nn.Module, name: str, stem: str, asked: bool) -> dict[str, Any]:
    """The replaced modules that give a ResNet-like model the stem ``stem``."""
    if stem == "imagenet" or (stem == "cifar" and not _has_conv_stem(model)):
        if stem == "cifar":
            _no_small_stem(name, asked)
        return {}
    if not hasattr(model, "maxpool"):
        raise KinfonceError(f"stem 'imagenet-no-maxpool': backbone {name!r} has no max-pool")
    changes: dict[str, Any] = {"maxpool": {"type": "Identity"}}
    if stem == "cifar":
        small = {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1]}
        changes["conv1"] = {"type": "Conv2d", "args": _conv_args(model.conv1, **small)}
    return changes


def _no_small_stem(name: str, asked: bool) -> None:
    message = (
        f"backbone {name!r} has no small stem kinfonce knows (a conv1 and a maxpool, or a "
        "transformer's patch_size)"
    )
    if asked:
        raise KinfonceError(f"stem 'cifar': {message}; pass --stem imagenet")
    warnings.warn(f"{message}: it keeps its own stem on small images", stacklevel=3)


def _timm_recipe(name: str, in_channels: int, image_size: int, stem: str, asked: bool) -> Made:
    timm = _timm()
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
    if timm.models.get_pretrained_cfg(name).fixed_input_size:
        kwargs["img_size"] = image_size
        if stem == "cifar":
            kwargs["patch_size"] = SMALL_PATCH
    try:
        model = create("timm", name, kwargs)
    except TypeError as err:
        raise KinfonceError(f"timm cannot make {name!r} with {kwargs}: {err}") from None
    small_by_patch = "patch_size" in kwargs
    changes = {} if small_by_patch else _stem_changes(model, f"timm:{name}", stem, asked)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return {"library": "timm", "name": name, "kwargs": kwargs}, model, changes, width


def _torchvision_recipe(
    name: str, in_channels: int, image_size: int, stem: str, asked: bool
) -> Made:
    kwargs: dict[str, Any] = {}
    if torchvision.models.get_model_builder(name).__module__.endswith("vision_transformer"):
        kwargs["image_size"] = image_size
    model = create("torchvision", name, kwargs)
    changes = _stem_changes(model, f"torchvision:{name}", stem, asked)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not convs or not linears:
        raise KinfonceError(f"torchvision:{name} is not an image classifier with a linear head")
    first, conv = convs[0]
    if in_channels != conv.in_channels:
        args = changes.get(first, {}).get("args") or _conv_args(conv)
        changes[first] = {"type": "Conv2d", "args": {**args, "in_channels": in_channels}}
    last, classifier = linears[-1]
    changes[last] = {"type": "Identity"}
    recipe = {"library": "torchvision", "name": name, "kwargs": kwargs}
    return recipe, model, changes, classifier.in_features


def build_library_backbone(
    name: str, *, in_channels: int, image_size: int, stem: str, asked: bool
) -> nn.Module:
    """A timm or torchvision model as a backbone (see the module docstring).

    Args:
        name: ``timm:NAME`` or ``torchvision:NAME``.
        in_channels, image_size: of the data.
        stem: ``"cifar"``, ``"imagenet"`` or ``"imagenet-no-maxpool"``.
        asked: the stem was asked for by name (not chosen by ``"auto"``): a model without
            it is an error, not a warning.

    Returns:
        The model mapping (B, C, H, W) to (B, ``feature_dim``), with attributes
        ``feature_dim`` and ``recipe`` (:mod:`kinfonce.rebuild`; JSON-safe).
    """
    check_library_name(name)
    library, _, model_name = name.partition(":")
    make = _timm_recipe if library == "timm" else _torchvision_recipe
    recipe, model, changes, width = make(model_name, in_channels, image_size, stem, asked)
    replace_modules(model, changes)
    model.feature_dim = int(width)
    model.recipe = {**recipe, "replaced_modules": changes}
    return model
