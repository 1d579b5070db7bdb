"""Tests for kinfonce.probes: the linear probe and kNN on cached features."""

from __future__ import annotations

import pytest
import torch

from kinfonce.probes import LinearProbeSettings, knn_classify, linear_probe, topk_accuracy


def separable_features(n_per_class: int, num_classes: int = 10, dim: int = 32, seed: int = 0):
    """Gaussian clusters around well-separated class means: (N, dim) features, (N,) labels."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * 3.0
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = means[labels] + 0.3 * torch.randn(labels.shape[0], dim, generator=gen)
    return x, labels


def test_linear_probe_separable_classes_above_99_percent():
    train_x, train_y = separable_features(100, seed=0)
    test_x, test_y = separable_features(50, seed=0)
    test_x = test_x + 0.3 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    result = linear_probe(
        train_x, train_y, test_x, test_y, num_classes=10, settings=LinearProbeSettings(epochs=5)
    )
    assert result["top1"] > 0.99
    assert result["top5"] >= result["top1"]


def test_knn_separable_classes_above_99_percent():
    train_x, train_y = separable_features(100, seed=0)
    test_x, test_y = separable_features(50, seed=0)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=10)
    assert result["top1"] > 0.99


def test_random_labels_stay_near_chance():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 32, generator=gen), torch.randn(2000, 32, generator=gen)
    train_y = torch.randint(0, 10, (2000,), generator=gen)
    test_y = torch.randint(0, 10, (2000,), generator=gen)
    lin = linear_probe(
        train_x, train_y, test_x, test_y, num_classes=10, settings=LinearProbeSettings(epochs=3)
    )
    knn = knn_classify(train_x, train_y, test_x, test_y, num_classes=10)
    for result in (lin, knn):
        assert abs(result["top1"] - 0.1) < 0.04
        assert abs(result["top5"] - 0.5) < 0.06


def test_linear_probe_is_reproducible_with_seed():
    x, y = separable_features(20, dim=8)
    noisy = x + 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    runs = [
        linear_probe(noisy, y, x, y, num_classes=10, settings=LinearProbeSettings(epochs=2, seed=3))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_knn_clips_k_and_weights_votes_by_similarity():
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    train_y = torch.tensor([0, 1, 1])
    # Closest to class 0 alone; with T small its single vote outweighs the two class-1 votes.
    test_x, test_y = torch.tensor([[1.0, 0.2]]), torch.tensor([0])
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=2, k=200, temperature=0.05)
    assert result == {"top1": 1.0, "top5": 1.0}
    hot = knn_classify(train_x, train_y, test_x, test_y, num_classes=2, temperature=100.0)
    assert hot["top1"] == 0.0  # nearly uniform votes: the majority class wins


def test_topk_accuracy_counts_top5():
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([6, 6])
    assert topk_accuracy(scores, labels) == {"top1": 0.5, "top5": 0.5}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"num_classes": 3}, "train_y"),
    ],
)
def test_linear_probe_rejects_bad_arguments(kwargs, match):
    x, y = separable_features(5)
    num_classes = kwargs.pop("num_classes", 10)
    with pytest.raises(ValueError, match=match):
        linear_probe(x, y, x, y, num_classes=num_classes, settings=LinearProbeSettings(**kwargs))


def test_probes_reject_bad_features():
    x, y = separable_features(5)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        linear_probe(bad, y, x, y, num_classes=10, settings=LinearProbeSettings(epochs=1))
    with pytest.raises(ValueError, match="feature dimension"):
        knn_classify(x, y, x[:, :3], y, num_classes=10)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, y, num_classes=10, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, num_classes=10, temperature=0.0)


def test_linear_probe_reports_divergence():
    x, y = separable_features(10)
    with pytest.raises(RuntimeError, match="diverged"):
        settings = LinearProbeSettings(epochs=1, lr=1e30)
        linear_probe(x * 1e30, y, x, y, num_classes=10, settings=settings, standardize=False)
