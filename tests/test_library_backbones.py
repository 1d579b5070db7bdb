"""Backbones from timm and torchvision: built without weights, their classifier removed, their
small stem at 32 px, rebuilt from their recipe; real tiny runs with eval and export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from kinfonce.cli import main
from kinfonce.errors import KinfonceError
from kinfonce.export import TOLERANCE, relative_difference
from kinfonce.models import build_backbone
from kinfonce.rebuild import build_model
from tests.helpers import tiny_flags

timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'kinfonce[timm]'")


def _rebuilt_outputs(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backbone's output, the output of its recipe's model given its weights)."""
    model = build_model(backbone.recipe)
    model.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        return backbone.eval()(x), model.eval()(x)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_a_library_resnet_gets_the_small_stem_at_32_px(name):
    # Catches a 224-px stem on CIFAR-sized images (a 7x7 stride-2 conv1 and a max-pool leave
    # 8x8 maps after the stem) and a classifier left in place.
    backbone = build_backbone(name, in_channels=3, image_size=32)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    features, rebuilt = _rebuilt_outputs(backbone, x)
    assert features.shape == (2, backbone.feature_dim) == (2, 512)
    assert relative_difference(features, rebuilt) == 0.0
    large = build_backbone(name, in_channels=3, image_size=224)
    assert large.conv1.kernel_size == (7, 7)
    assert not isinstance(large.maxpool, nn.Identity)


def test_a_timm_vit_gets_4_px_patches_and_the_data_size():
    backbone = build_backbone("timm:vit_tiny_patch16_224", in_channels=1, image_size=32)
    assert backbone.patch_embed.grid_size == (8, 8)
    x = torch.randn(2, 1, 32, 32)
    features, rebuilt = _rebuilt_outputs(backbone, x)
    assert features.shape == (2, backbone.feature_dim) == (2, 192)
    assert relative_difference(features, rebuilt) == 0.0
    own = build_backbone("timm:vit_tiny_patch16_224", image_size=32, stem="imagenet")
    assert own.patch_embed.grid_size == (2, 2)


def test_torchvision_models_take_the_data_channels_and_lose_their_classifier():
    backbone = build_backbone("torchvision:mobilenet_v3_small", in_channels=1, image_size=96)
    x = torch.randn(2, 1, 96, 96)
    features, rebuilt = _rebuilt_outputs(backbone, x)
    assert features.shape == (2, backbone.feature_dim) == (2, 1024)
    assert relative_difference(features, rebuilt) == 0.0


def test_a_model_without_a_small_stem_warns_under_auto_and_is_refused_by_name():
    with pytest.warns(UserWarning, match="has no small stem"):
        build_backbone("timm:efficientnet_b0", image_size=32)
    with pytest.raises(KinfonceError, match=r"stem 'cifar'.*pass --stem imagenet"):
        build_backbone("timm:efficientnet_b0", image_size=32, stem="cifar")


@pytest.mark.parametrize(
    ("name", "close"),
    [("timm:resnet19", "resnet18"), ("torchvision:resnt50", "resnet50")],
)
def test_an_unknown_library_name_is_refused_with_close_names(name, close, capsys):
    with pytest.raises(KinfonceError, match=f"close names: .*{close}"):
        build_backbone(name)
    assert main(["pretrain", "--backbone", name, "--print-config"]) == 2
    assert close in capsys.readouterr().err


@pytest.mark.parametrize(
    ("backbone", "width"),
    [("timm:resnet18", 512), ("timm:vit_tiny_patch16_224", 192)],
)
def test_a_timm_backbone_pretrains_evaluates_and_exports(backbone, width, tmp_path, capsys):
    # Catches a timm backbone that breaks anywhere between the command line and the export:
    # one tiny epoch on digits, `kinfonce eval` of its checkpoint, and a checked export that
    # timm alone rebuilds.
    run = tmp_path / "run"
    flags = tiny_flags(backbone=backbone, train_subset=64, eval_linear_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no stem warning: both have a small stem
        assert main(["pretrain", *flags, "--output-dir", str(run)]) == 0
    checkpoint = run / "checkpoints" / "last.ckpt"
    argv = ["eval", str(checkpoint), "--protocol", "knn", "--map-points", "0", "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["feature_dim"] == width
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    assert "largest relative difference" in capsys.readouterr().out
    config = json.loads((run / "export-safetensors" / "config.json").read_text())
    assert config["model"]["library"] == "timm"
    assert config["check"]["max_relative_difference"]["backbone"] < TOLERANCE


def test_a_torchvision_backbone_exports_to_torchvision(tmp_path: Path):
    run = tmp_path / "run"
    flags = tiny_flags(backbone="torchvision:resnet18", train_subset=64, eval_linear_epochs=1)
    assert main(["pretrain", *flags, "--output-dir", str(run)]) == 0
    assert main(["export", str(run), "--format", "torchvision"]) == 0
    config = json.loads((run / "export-torchvision" / "config.json").read_text())
    assert config["model"]["name"] == "resnet18"
    assert sorted(config["model"]["replaced_modules"]) == ["conv1", "fc", "maxpool"]


def test_clip_trains_a_timm_backbone(tmp_path: Path):
    run = tmp_path / "clip"
    flags = tiny_flags(backbone="timm:resnet18", train_subset=64, eval_linear_epochs=1)
    assert main(["clip", *flags, "--output-dir", str(run)]) == 0
    assert (run / "metrics.json").is_file()
