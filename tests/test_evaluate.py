"""Tests for kinfonce.evaluate: linear probe, kNN, feature extraction, evaluate_encoder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kinfonce.evaluate import evaluate_encoder, extract_features, linear_probe_augmented
from kinfonce.probes import LinearProbeSettings


def scale_transform(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 255.0


class TinyConvEncoder(nn.Module):
    """Conv -> BN -> ReLU -> dropout -> pool: eval mode changes its output, so mode matters."""

    def __init__(self, channels: int = 3, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def colour_images(n_per_class: int, size: int = 8, seed: int = 0):
    """uint8 (N, 3, size, size) images whose class is the brightest channel."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    images = torch.randint(0, 100, (labels.shape[0], 3, size, size), generator=gen)
    images[torch.arange(labels.shape[0]), labels] += 120
    return images.to(torch.uint8), labels


def test_extract_features_is_deterministic_without_grad_and_restores_mode():
    torch.manual_seed(0)
    encoder = TinyConvEncoder().train()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    first = extract_features(encoder, images, scale_transform, batch_size=4)
    second = extract_features(encoder, images, scale_transform, batch_size=7)
    assert first.shape == (10, 8)
    assert torch.allclose(first, second, atol=1e-6)
    assert not first.requires_grad and first.grad_fn is None
    assert encoder.training
    assert all(p.grad is None for p in encoder.parameters())
    # BatchNorm running statistics are untouched (eval mode during extraction).
    assert torch.equal(encoder.net[1].running_mean, torch.zeros(8))


def test_extract_features_saves_nothing_for_backward():
    """No activation is kept for a backward pass, so repeated extraction does not grow memory."""
    saved = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    encoder = TinyConvEncoder()
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for _ in range(3):
            extract_features(encoder, images, scale_transform, batch_size=2)
        assert saved == []
        encoder(scale_transform(images))  # the same forward with autograd does save tensors
    assert saved


def test_extract_features_mode_restored_on_error():
    # Catches an encoder left in eval mode after a failed forward pass. The raw torch error
    # passes through: check_encoder_fits turns a shape mismatch into a user error first.
    encoder = TinyConvEncoder(channels=3).train()
    with pytest.raises(RuntimeError, match="3 channels"):
        extract_features(encoder, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), scale_transform)
    assert encoder.training


@pytest.mark.parametrize(
    "images",
    [torch.zeros(2, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8)],
    ids=["float", "3d"],
)
def test_extract_features_rejects_bad_images(images):
    with pytest.raises(ValueError, match="images_uint8"):
        extract_features(TinyConvEncoder(), images, scale_transform)


def test_extract_features_rejects_non_finite_output():
    class NanEncoder(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        extract_features(NanEncoder(), torch.zeros(2, 3, 4, 4, dtype=torch.uint8), scale_transform)


def test_augmented_probe_learns_colour_classes():
    torch.manual_seed(0)
    encoder = TinyConvEncoder(width=16)
    train_images, train_y = colour_images(40, seed=0)
    test_images, test_y = colour_images(20, seed=1)
    result = linear_probe_augmented(
        encoder, train_images, train_y, test_images, test_y, scale_transform,
        num_classes=3, settings=LinearProbeSettings(epochs=3, batch_size=16),
    )  # fmt: skip
    assert result["top1"] > 0.9
    assert encoder.training


def fake_splits(n_train: int = 40, n_test: int = 20):
    train_images, train_y = colour_images(n_train, seed=0)
    test_images, test_y = colour_images(n_test, seed=1)
    return SimpleNamespace(
        train=SimpleNamespace(images=train_images, labels=train_y),
        test=SimpleNamespace(images=test_images, labels=test_y),
        num_classes=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


@pytest.mark.parametrize(
    ("protocol", "keys"),
    [
        ("linear", {"linear_top1", "linear_top5"}),
        ("knn", {"knn_top1", "knn_top5"}),
        ("both", {"linear_top1", "linear_top5", "knn_top1", "knn_top5"}),
    ],
)
def test_evaluate_encoder_keys_follow_protocol(protocol, keys):
    torch.manual_seed(0)
    metrics = evaluate_encoder(
        TinyConvEncoder(width=16), fake_splits(), protocol=protocol, linear_epochs=3,
        transform=scale_transform,
    )  # fmt: skip
    assert set(metrics) - {"feature_dim"} == keys
    assert metrics["feature_dim"] == 16
    # Three classes: top-5 counts every class, so it is exactly 1 (catches a top-k that
    # indexes past C or counts a wrong axis), and each protocol's top-1 separates the colours.
    for key in keys:
        assert metrics[key] == 1.0 if key.endswith("top5") else metrics[key] > 0.9


def test_evaluate_encoder_augmented_path():
    torch.manual_seed(0)
    metrics = evaluate_encoder(
        TinyConvEncoder(width=16), fake_splits(), protocol="linear", linear_epochs=2,
        augment=True, transform=scale_transform,
    )  # fmt: skip
    assert metrics["linear_top1"] > 0.9


def test_evaluate_encoder_is_reproducible():
    torch.manual_seed(0)
    encoder = TinyConvEncoder(width=16)
    runs = [
        evaluate_encoder(encoder, fake_splits(), linear_epochs=2, transform=scale_transform)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_evaluate_encoder_names_data_set_that_does_not_fit():
    splits = fake_splits()
    splits.test.images = splits.test.images[:, :1]
    with pytest.raises(ValueError, match=r"mnist-like does not fit .* 3 channels"):
        evaluate_encoder(
            TinyConvEncoder(), splits, transform=scale_transform, dataset_name="mnist-like"
        )


def test_evaluate_encoder_rejects_unknown_protocol():
    with pytest.raises(ValueError, match="protocol"):
        evaluate_encoder(TinyConvEncoder(), fake_splits(), protocol="svm")
