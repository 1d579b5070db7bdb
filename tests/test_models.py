"""Backbones and projection head."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from kinfonce.errors import KinfonceError
from kinfonce.models import BACKBONES, ProjectionHead, build_backbone


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_width_matches_torchvision_without_classifier():
    ours = build_backbone("resnet18", image_size=224)
    reference = torchvision.models.resnet18()
    assert n_params(ours) == n_params(reference) - n_params(reference.fc)
    ref_names = {k for k in reference.state_dict() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == ref_names


def test_stem_follows_image_size():
    small = build_backbone("resnet18-w0.25", image_size=32)
    large = build_backbone("resnet-mini", image_size=96)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, torch.nn.MaxPool2d)
    # The CIFAR stem keeps 32x32 resolution into the first stage: 4x4 maps before pooling.
    feats = torch.nn.Sequential(*list(small.children())[:-1])(torch.randn(2, 3, 32, 32))
    assert feats.shape[-2:] == (4, 4)


@pytest.mark.parametrize(
    ("name", "channels", "size", "dim"),
    [("resnet-mini", 1, 16, 128), ("resnet18-w0.5", 3, 32, 256), ("resnet50-w0.25", 3, 16, 512)],
)
def test_forward_shapes(name, channels, size, dim):
    backbone = build_backbone(name, in_channels=channels, image_size=size)
    assert backbone.feature_dim == dim
    out = backbone(torch.randn(3, channels, size, size))
    assert out.shape == (3, dim) and torch.isfinite(out).all()


def test_width_multiplier_shrinks_parameters():
    sizes = [n_params(build_backbone(n)) for n in ("resnet34", "resnet34-w0.5", "resnet34-w0.25")]
    assert sizes[0] > 3.5 * sizes[1] > 3.5 * 3.5 * sizes[2]


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match=r"backbone must be one of .*resnet18-w0\.25"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", in_channels=0)
    assert {"resnet18", "resnet34", "resnet50", "resnet-mini"} <= set(BACKBONES)


def test_projection_head_layout():
    head = ProjectionHead(64, 2048, 128)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head(torch.randn(4, 64)).shape == (4, 128)
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(64, 16, 0)


@pytest.mark.parametrize(
    ("stem", "size", "kernel", "pool", "feature_map"),
    [
        ("cifar", 64, 3, False, 8),  # TinyImageNet with kinfonce's CIFAR stem
        ("imagenet", 64, 7, True, 2),  # TinyImageNet as the paper's code builds it
        ("imagenet-no-maxpool", 96, 7, False, 6),  # STL-10 as the paper's code builds it
        ("auto", 64, 3, False, 8),
        ("auto", 96, 7, True, 3),
    ],
)
def test_stem_by_name(stem, size, kernel, pool, feature_map):
    # Catches a stem option that is ignored, or the max-pool kept or dropped by mistake.
    backbone = build_backbone("resnet-mini", image_size=size, stem=stem)
    assert backbone.conv1.kernel_size == (kernel, kernel)
    assert isinstance(backbone.maxpool, torch.nn.MaxPool2d) == pool
    feats = torch.nn.Sequential(*list(backbone.children())[:-1])(torch.randn(1, 3, size, size))
    assert feats.shape[-1] == feature_map
    with pytest.raises(ValueError, match="stem must be one of"):
        build_backbone("resnet-mini", stem="imagenet-7x7")


def test_projection_head_without_batch_norm():
    # The MoCo code's head: Linear (with bias) -> ReLU -> Linear.
    head = ProjectionHead(512, 512, 128, batch_norm=False)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert head[0].bias is not None and head(torch.randn(2, 512)).shape == (2, 128)


def test_a_timm_backbone_without_timm_names_the_extra(monkeypatch):
    # Catches an ImportError traceback (or a silent fallback) where timm is not installed.
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails
    with pytest.raises(KinfonceError, match=r"pip install 'kinfonce\[timm\]'"):
        build_backbone("timm:resnet18")
