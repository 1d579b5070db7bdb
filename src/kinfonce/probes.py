"""Tensor-level evaluation protocols on frozen features: linear probe and kNN.

The linear probe follows the linear evaluation protocol of the paper (Appendix B): a linear
classifier trained with SGD (momentum 0.9), a cosine learning rate from 0.3 to 0, batch size
64, weight decay 1e-6 and 100 epochs, here on features extracted once
(:func:`linear_probe`). kNN (:func:`knn_classify`) is the usual temperature-weighted cosine
vote of the SSL literature (k = 200, T = 0.1). Turning encoders and data sets into features
is :mod:`kinfonce.evaluate`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kinfonce.errors import KinfonceError
from kinfonce.linear_heads import LinearHeads, train_on_features, train_streamed
from kinfonce.scoped import one_cpu_thread


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise KinfonceError(f"{name} must be > 0, got {value!r}")


def _check_labeled(name: str, x: Tensor, y: Tensor, num_classes: int) -> None:
    if x.ndim != 2:
        raise KinfonceError(
            f"{name}_x must be a 2-D (N, F) feature tensor, got shape {tuple(x.shape)}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise KinfonceError(
            f"{name}_y must be a 1-D label tensor with {x.shape[0]} entries, "
            f"got shape {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise KinfonceError(f"{name}_x must hold at least one sample")
    if not torch.isfinite(x).all():
        raise KinfonceError(f"{name}_x contains non-finite values (NaN or inf)")
    if y.min() < 0 or y.max() >= num_classes:
        raise KinfonceError(
            f"{name}_y must hold class indices in [0, num_classes={num_classes}), "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def check_features(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int
) -> None:
    if num_classes < 1:
        raise KinfonceError(f"num_classes must be >= 1, got {num_classes}")
    _check_labeled("train", train_x, train_y, num_classes)
    _check_labeled("test", test_x, test_y, num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise KinfonceError(
            f"train_x and test_x must have the same feature dimension, "
            f"got {train_x.shape[1]} and {test_x.shape[1]}"
        )


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy of class scores.

    Args:
        scores: (N, C) class scores (logits or votes), higher is better.
        labels: (N,) true class indices.

    Returns:
        ``{"top1": float, "top5": float}`` as fractions in [0, 1]; with fewer than five
        classes top-5 counts all C classes (and is therefore 1.0).
    """
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item()}


@dataclass(frozen=True)
class LinearProbeSettings:
    """SGD settings of the linear probe (Appendix B defaults); checked on construction.

    Attributes:
        epochs: passes over the training features.
        lr: starting learning rate of the per-step cosine schedule (to 0).
        batch_size: samples per SGD step.
        weight_decay: L2 penalty.
        momentum: SGD momentum.
        seed: seeds the head's initialisation and the batch order.
    """

    epochs: int = 100
    lr: float = 0.3
    batch_size: int = 64
    weight_decay: float = 1e-6
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise KinfonceError(f"{name} must be an integer >= 1, got {value!r}")
        _check_positive("lr", self.lr)
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise KinfonceError(
                f"weight_decay must be >= 0 and momentum in [0, 1), got "
                f"{self.weight_decay}, {self.momentum}"
            )


def _heads(feature_dims: Sequence[int], num_classes: int, settings: LinearProbeSettings, device):
    s = settings
    return LinearHeads(
        feature_dims,
        num_classes,
        seed=s.seed,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
        device=device,
    )


def _schedule(settings: LinearProbeSettings) -> dict:
    s = settings
    return dict(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed)


def fit_linear_head(
    batch_features: Callable[[Tensor], Tensor],
    train_y: Tensor,
    feature_dim: int,
    *,
    num_classes: int,
    settings: LinearProbeSettings,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Linear:
    """Train a linear head with SGD and a per-step cosine schedule from ``settings.lr`` to 0, on
    features made per batch (:func:`kinfonce.linear_heads.train_streamed`).

    Args:
        batch_features: maps (B,) sample indices to the (B, F) head input on ``device``.
        train_y: (N,) training labels.
        feature_dim: F.
        num_classes: C.
        settings: the SGD settings.

    Returns:
        The trained (F -> C) head in eval mode.
    """
    heads = _heads([feature_dim], num_classes, settings, device)
    features = lambda idx: [batch_features(idx)]  # noqa: E731
    train_streamed(heads, features, train_y, **_schedule(settings), progress=progress)
    return heads.modules()[0]


def fit_linear_heads(
    train_xs: Sequence[Tensor],
    train_y: Tensor,
    *,
    num_classes: int,
    settings: LinearProbeSettings,
    progress: bool = False,
) -> list[nn.Linear]:
    """Train one linear head per feature tensor, all in the same SGD steps and batch order.

    Each head gets what it would get alone: the seeded initialisation, the seeded batch order
    and the same updates (:mod:`kinfonce.linear_heads`; CUDA graphs on a GPU).

    Args:
        train_xs: (N, F_h) float32 features per head, all on the device to train on.
        train_y: (N,) labels (moved to that device).
        num_classes: C.
        settings: the SGD settings.

    Returns:
        The trained (F_h -> C) heads in eval mode, on the features' device.
    """
    device = train_xs[0].device
    heads = _heads([x.shape[1] for x in train_xs], num_classes, settings, device)
    y = train_y.to(device)
    train_on_features(heads, train_xs, y, **_schedule(settings), progress=progress)
    return heads.modules()


def standardizer(train_x: Tensor) -> Callable[[Tensor], Tensor]:
    """Per-dimension standardization with training-feature statistics (keeps SGD at lr 0.3 stable)."""
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False).clamp_min(1e-6)
    return lambda x: (x - mean.to(x.device)) / std.to(x.device)


def score_head(head: nn.Linear, test_x: Tensor, test_y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = head(test_x.to(head.weight.device))
    return topk_accuracy(logits, test_y.to(logits.device))


def linear_probes(
    train_xs: Sequence[Tensor],
    train_y: Tensor,
    test_xs: Sequence[Tensor],
    test_y: Tensor,
    *,
    num_classes: int,
    settings: LinearProbeSettings | None = None,
    standardize: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Linear evaluation (paper, Appendix B) of several feature sets of the same images at once.

    Features are standardized per dimension with the training statistics (an affine map
    that a linear head could absorb; it only conditions SGD), then one linear layer per
    feature set is trained with cross-entropy by :func:`fit_linear_heads`; each result is
    the one :func:`linear_probe` gives for that feature set alone.

    Args:
        train_xs: (N, F_h) training features per set. train_y: (N,) labels in [0, num_classes).
        test_xs: (M, F_h) test features per set. test_y: (M,) labels.
        num_classes: number of classes C.
        settings: SGD settings (default: Appendix B's).
        standardize: standardize features with training statistics first.
        device: where to train (default: the training features' device).

    Returns:
        ``{"top1": float, "top5": float}`` test accuracy as fractions, one per feature set.
    """
    if len(train_xs) != len(test_xs) or not train_xs:
        raise KinfonceError(
            f"train_xs and test_xs must be non-empty lists of equal length, got "
            f"{len(train_xs)} and {len(test_xs)}"
        )
    for train_x, test_x in zip(train_xs, test_xs, strict=True):
        check_features(train_x, train_y, test_x, test_y, num_classes)
    device = train_xs[0].device if device is None else torch.device(device)
    norms = [standardizer(x) if standardize else (lambda x: x) for x in train_xs]
    train_in = [norm(x.float()).to(device) for norm, x in zip(norms, train_xs, strict=True)]
    with one_cpu_thread():
        heads = fit_linear_heads(
            train_in,
            train_y,
            num_classes=num_classes,
            settings=settings or LinearProbeSettings(),
            progress=progress,
        )
    return [
        score_head(head, norm(x.float()), test_y)
        for head, norm, x in zip(heads, norms, test_xs, strict=True)
    ]


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, **options: Any
) -> dict[str, float]:
    """Linear evaluation on cached features (paper, Appendix B): :func:`linear_probes` of one
    feature set, with the same keyword arguments (``num_classes``, ``settings``, ...).
    train_x (N, F), train_y (N,), test_x (M, F), test_y (M,); returns
    ``{"top1": float, "top5": float}`` test accuracy as fractions."""
    return linear_probes([train_x], train_y, [test_x], test_y, **options)[0]


def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Weighted kNN on cosine similarity, as in the SSL literature (Wu et al., 2018).

    Each test sample takes its k most cosine-similar training samples; neighbour j votes
    for its class with weight exp(s_j / temperature). Written in torch rather than with
    scikit-learn's KNeighborsClassifier, which has no top-5 and no exponential weights.

    Args:
        train_x: (N, F) training features. train_y: (N,) labels.
        test_x: (M, F) test features. test_y: (M,) labels.
        num_classes: number of classes C.
        k: neighbours, clipped to N.
        temperature: vote temperature T.
        chunk_size: test rows per similarity block ((chunk, N) memory).

    Runs on the training features' device (all blocks queued without waiting for it).

    Returns:
        ``{"top1": float, "top5": float}`` as fractions.
    """
    check_features(train_x, train_y, test_x, test_y, num_classes)
    if int(k) != k or k < 1:
        raise KinfonceError(f"k must be an integer >= 1, got {k!r}")
    _check_positive("temperature", temperature)
    k = min(int(k), train_x.shape[0])
    device = train_x.device
    train_n = nn.functional.normalize(train_x.float(), dim=1)
    test_n = nn.functional.normalize(test_x.float().to(device), dim=1)
    train_y = train_y.to(device)
    votes = []
    for start in range(0, test_n.shape[0], chunk_size):
        sim, idx = (test_n[start : start + chunk_size] @ train_n.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes, device=device)
        votes.append(scores.scatter_add_(1, train_y[idx], weights))
    return topk_accuracy(torch.cat(votes), test_y.to(device))
