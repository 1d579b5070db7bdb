"""Containers for labelled uint8 image sets and their train/val/test splits."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kinfonce.errors import KinfonceError

__all__ = ["DatasetSplits", "LabeledImages", "channel_stats", "split_off_validation"]


@dataclass(frozen=True)
class LabeledImages:
    """Images with class labels.

    Attributes:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,), class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise KinfonceError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise KinfonceError(
                f"labels must be int64 (N,) with N={self.images.shape[0]}, "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"LabeledImages(images={tuple(self.images.shape)} uint8, labels=({len(self)},) int64)"
        )

    def subset(self, index: torch.Tensor) -> LabeledImages:
        """The images and labels at ``index`` (int64 (M,)), copied into memory."""
        return LabeledImages(self.images[index].contiguous(), self.labels[index].contiguous())


@dataclass(frozen=True)
class DatasetSplits:
    """A data set ready for pretraining and evaluation.

    Attributes:
        train: training images, without the validation ones.
        val: a fixed, seeded fraction of the original training set (online probe, tuning).
        test: the held-out test set.
        class_names: name of each class index.
        num_classes: ``len(class_names)``.
        image_size: side of the square images.
        channels: 1 (gray) or 3 (RGB).
        mean: per-channel mean of the [0, 1] scaled training images (train and val together).
        std: per-channel standard deviation of the same.
        name: the data set's name as given to ``load_dataset``.
        skipped_files: image files that could not be decoded and were left out.
        unlabeled: extra images for pretraining only, every label -1 (STL-10's unlabelled
            split), or None.
    """

    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    class_names: list[str]
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    skipped_files: int = field(default=0)
    unlabeled: LabeledImages | None = None

    @property
    def pretraining_size(self) -> int:
        """How many images pretraining draws from (training and unlabelled)."""
        return len(self.train) + (0 if self.unlabeled is None else len(self.unlabeled))

    def pretraining_images(self) -> LabeledImages:
        """The images pretraining draws from: the training split, then the unlabelled ones."""
        if self.unlabeled is None:
            return self.train
        return LabeledImages(
            torch.cat([self.train.images, self.unlabeled.images]),
            torch.cat([self.train.labels, self.unlabeled.labels]),
        )

    def with_train_subset(self, size: int | None, seed: int) -> DatasetSplits:
        """These splits with a seeded random subset of ``size`` training images (all when None)."""
        if size is None or size >= len(self.train):
            return self
        return dataclasses.replace(
            self, train=self.train.subset(subset_index(len(self.train), size, seed))
        )


def subset_index(count: int, size: int, seed: int) -> torch.Tensor:
    """(size,) int64 sorted indices of a seeded random subset of ``count`` items."""
    if size < 1:
        raise KinfonceError(f"train_subset must be >= 1, got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:size].sort().values


def split_index(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) sorted int64 indices of ``labels`` ((N,) int64): ``fraction`` of them
    held out, drawn with ``seed``, stratified by label whenever every class can give items
    to both sides."""
    if not 0.0 <= fraction < 1.0:
        raise KinfonceError(f"val_fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(labels)
    classes = int((counts > 0).sum())
    n_held = math.ceil(fraction * len(labels))
    can_stratify = counts[counts > 0].min() >= 2 and classes <= n_held <= len(labels) - classes
    kept, held = train_test_split(
        np.arange(len(labels)),
        test_size=n_held,
        random_state=seed,
        stratify=labels.numpy() if can_stratify else None,
    )
    return torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(held))


def split_off_validation(
    data: LabeledImages, val_fraction: float, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """Split ``data`` into (train, val): val is ``val_fraction`` of it, drawn with ``seed``
    (:func:`split_index`)."""
    train_idx, val_idx = split_index(data.labels, val_fraction, seed)
    return data.subset(train_idx), data.subset(val_idx)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1].

    Computed exactly from per-channel histograms of the 256 byte values (several times faster
    than summing floats over the images).

    Returns:
        (mean, std), each a tuple of C floats.
    """
    channels = images.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk]
        for c in range(channels):
            counts[c] += torch.bincount(block[:, c].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(dim=1).to(torch.float64)
    if images.shape[0] == 0:
        raise KinfonceError("cannot compute normalisation statistics of an empty training set")
    mean = (counts * values).sum(dim=1) / total
    std = ((counts * (values - mean[:, None]).square()).sum(dim=1) / total).sqrt()
    if (std == 0).any():
        raise KinfonceError("cannot compute normalisation statistics: a channel is constant")
    return tuple(mean.tolist()), tuple(std.tolist())
