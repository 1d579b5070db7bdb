"""Encoders: torchvision ResNet backbones and the projection head (paper Appendix B).

Backbones are chosen by name from :data:`BACKBONES`. Each is a torchvision ResNet
(``BasicBlock``/``Bottleneck`` from ``torchvision.models.resnet``) with

* a stem chosen by name (:data:`STEMS`): by default the CIFAR stem (3x3 convolution,
  stride 1, no max-pool) for images of 64 px or less and the standard ImageNet stem
  (7x7, stride 2, max-pool) otherwise; the paper's code uses the ImageNet stem for
  64 px TinyImageNet and the 7x7 convolution without max-pool for 96 px STL-10;
* a configurable number of input channels (1 for grey-scale digits);
* an optional width multiplier (``resnet18-w0.25`` has stages of 16, 32, 64, 128
  channels) for CPU-scale runs. torchvision's constructor fixes the stage widths at
  64..512, so the stages are assembled here from its public block classes; at width
  1 the module tree and parameter count equal ``torchvision.models.resnet18`` without
  its classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from kinfonce.errors import KinfonceError
from kinfonce.library_backbones import build_library_backbone, check_library_name, library_of

#: Images at most this many pixels wide get the CIFAR stem under ``stem="auto"``.
CIFAR_STEM_MAX_SIZE = 64

#: Stem names: first convolution and whether a 3x3 stride-2 max-pool follows it.
STEMS: dict[str, str] = {
    "auto": f"cifar for images of at most {CIFAR_STEM_MAX_SIZE} px, imagenet above",
    "cifar": "3x3 convolution, stride 1, no max-pool",
    "imagenet": "7x7 convolution, stride 2, then a 3x3 stride-2 max-pool",
    "imagenet-no-maxpool": "7x7 convolution, stride 2, no max-pool",
}


@dataclass(frozen=True)
class BackboneSpec:
    """Shape of a ResNet: block type, blocks per stage and width multiplier."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    width: float = 1.0


def _specs() -> dict[str, BackboneSpec]:
    depths = {
        "resnet18": (BasicBlock, (2, 2, 2, 2)),
        "resnet34": (BasicBlock, (3, 4, 6, 3)),
        "resnet50": (Bottleneck, (3, 4, 6, 3)),
    }
    specs = {}
    for name, (block, layers) in depths.items():
        for width in (1.0, 0.5, 0.25):
            suffix = "" if width == 1.0 else f"-w{width:g}"
            specs[name + suffix] = BackboneSpec(block, layers, width)
    specs["resnet-mini"] = BackboneSpec(BasicBlock, (1, 1, 1, 1), 0.25)
    return specs


#: Backbone name -> shape. ``resnet-mini`` is one BasicBlock per stage at width 0.25.
BACKBONES: dict[str, BackboneSpec] = _specs()
#: torchvision's ResNet of each block type and stage depths (the base of a recipe).
TORCHVISION_RESNETS = {
    (BasicBlock, (2, 2, 2, 2)): "resnet18",
    (BasicBlock, (3, 4, 6, 3)): "resnet34",
    (Bottleneck, (3, 4, 6, 3)): "resnet50",
}


class ResNetBackbone(nn.Module):
    """ResNet feature extractor without the classifier.

    Args:
        spec: block type, stage depths and width multiplier.
        in_channels: channels of the input images.
        stem: "cifar", "imagenet" or "imagenet-no-maxpool" (see :data:`STEMS`).

    Shape:
        input (B, in_channels, H, W) float -> output (B, ``feature_dim``).
    """

    def __init__(self, spec: BackboneSpec, in_channels: int = 3, stem: str = "cifar"):
        super().__init__()
        widths = [max(1, round(w * spec.width)) for w in (64, 128, 256, 512)]
        self.recipe = _resnet_recipe(spec, widths, in_channels, stem)
        self.inplanes = widths[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        elif stem in ("imagenet", "imagenet-no-maxpool"):
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        else:
            raise KinfonceError(
                f"stem must be one of {sorted(set(STEMS) - {'auto'})}, got {stem!r}"
            )
        pool = stem == "imagenet"
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(spec.block, widths[0], spec.layers[0], stride=1)
        self.layer2 = self._stage(spec.block, widths[1], spec.layers[1], stride=2)
        self.layer3 = self._stage(spec.block, widths[2], spec.layers[2], stride=2)
        self.layer4 = self._stage(spec.block, widths[3], spec.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3] * spec.block.expansion
        self._init_weights()

    def _stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        # Bottleneck's inner width is planes * base_width / 64; keep base_width = 64.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # The same initialisation as torchvision's ResNet constructor.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _resnet_recipe(
    spec: BackboneSpec, widths: list[int], in_channels: int, stem: str
) -> dict[str, Any]:
    """How torchvision alone makes this ResNet (:mod:`kinfonce.rebuild`): its resnet18, 34 or
    50 (by block type), with stages of other widths or depths made again, the stem's
    convolution and max-pool replaced and the classifier an ``Identity``."""
    stock = TORCHVISION_RESNETS.get((spec.block, spec.layers))
    base = "resnet50" if spec.block is Bottleneck else "resnet18"
    kernel, stride = (3, 1) if stem == "cifar" else (7, 2)
    conv = {"in_channels": in_channels, "out_channels": widths[0], "kernel_size": kernel}
    conv.update(stride=stride, padding=kernel // 2, bias=False)
    replaced: dict[str, Any] = {
        "conv1": {"type": "Conv2d", "args": conv},
        "bn1": {"type": "BatchNorm2d", "args": {"num_features": widths[0]}},
        "fc": {"type": "Identity"},
    }
    if stem != "imagenet":
        replaced["maxpool"] = {"type": "Identity"}
    recipe = {"library": "torchvision", "name": stock or base, "kwargs": {}}
    if stock is None or widths != [64, 128, 256, 512]:
        recipe["stages"] = {"widths": widths, "depths": list(spec.layers)}
    return {**recipe, "replaced_modules": replaced}


def check_backbone_name(name: str) -> None:
    """Raise a KinfonceError unless ``name`` is a key of :data:`BACKBONES` or a model of an
    installed library (``timm:NAME``, ``torchvision:NAME``)."""
    if library_of(name):
        check_library_name(name)
    elif name not in BACKBONES:
        raise KinfonceError(
            f"backbone must be one of {sorted(BACKBONES)}, timm:NAME or torchvision:NAME, "
            f"got {name!r}"
        )


def build_backbone(
    name: str, *, in_channels: int = 3, image_size: int = 32, stem: str = "auto"
) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: a key of :data:`BACKBONES`, or ``timm:NAME`` / ``torchvision:NAME``
            (:mod:`kinfonce.library_backbones`).
        in_channels: channels of the input images.
        image_size: side of the (square) training images in pixels; under
            ``stem="auto"``, <= 64 selects the CIFAR stem.
        stem: a key of :data:`STEMS`.

    Returns:
        A module mapping (B, in_channels, H, W) to (B, ``feature_dim``), with attributes
        ``feature_dim`` and ``recipe`` (how torchvision or timm alone rebuild it,
        :mod:`kinfonce.rebuild`).

    Raises:
        KinfonceError: unknown name or stem, or non-positive channels / size.
    """
    check_backbone_name(name)
    if in_channels < 1:
        raise KinfonceError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 1:
        raise KinfonceError(f"image_size must be >= 1, got {image_size}")
    if stem not in STEMS:
        raise KinfonceError(f"stem must be one of {sorted(STEMS)}, got {stem!r}")
    stem_of_size = resolved_stem(stem, image_size)
    if library_of(name):
        return build_library_backbone(
            name,
            in_channels=in_channels,
            image_size=image_size,
            stem=stem_of_size,
            asked=stem != "auto",
        )
    return ResNetBackbone(BACKBONES[name], in_channels, stem=stem_of_size)


def resolved_stem(stem: str, image_size: int) -> str:
    """The stem ``stem`` names for images of ``image_size`` px (``"auto"`` decided)."""
    if stem == "auto":
        return "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"
    return stem


def place_backbone(
    backbone: nn.Module, device: str | torch.device, *, channels_last: bool
) -> nn.Module:
    """The backbone on ``device``, in the memory format its run trained it in.

    A convolution's float32 result depends on the memory format (another kernel sums in
    another order), so a backbone evaluated in another format than its run's gives features
    off by rounding, and probe accuracies off in the fourth digit. The end-of-run evaluation
    and ``kinfonce eval`` both place the backbone through this function.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return backbone.to(device=device, memory_format=memory_format)


class ProjectionHead(nn.Sequential):
    """Appendix B projection head: Linear -> BatchNorm1d -> ReLU -> Linear.

    Shape: (B, in_dim) -> (B, out_dim). The paper uses hidden 2048 and output 128
    (256 for the concatenation kernel, whose loss splits the embedding in halves).
    With ``batch_norm=False`` it is Linear -> ReLU -> Linear, the MoCo head of the
    paper's MoCo code (512 -> 512 -> 128).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, *, batch_norm: bool = True
    ):
        for arg, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value < 1:
                raise KinfonceError(f"{arg} must be >= 1, got {value}")
        middle = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=not batch_norm),
            *middle,
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
