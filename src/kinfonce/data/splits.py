"""Containers for labelled uint8 image sets and their train/val/test splits."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kinfonce.data.stored import StoredImages
from kinfonce.errors import KinfonceError

__all__ = [
    "DatasetSplits",
    "LabeledImages",
    "channel_counts",
    "channel_stats",
    "split_off_validation",
    "stats_from_counts",
]


@dataclass(frozen=True)
class LabeledImages:
    """Images with class labels.

    Attributes:
        images: uint8 tensor (N, C, H, W) in memory, or rows of a cache entry's file on disk
            (:class:`StoredImages`, indexed like a tensor: each index reads its rows).
        labels: int64 tensor (N,), class indices.
    """

    images: torch.Tensor | StoredImages
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
        """The images and labels at ``index`` (int64 (M,)): copied when in memory, a list of
        rows when on disk (nothing read)."""
        if isinstance(self.images, StoredImages):
            return LabeledImages(self.images.subset(index), self.labels[index].contiguous())
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
        train, unlabeled = self.train.images, self.unlabeled.images
        both = (
            train.concat(unlabeled)
            if isinstance(train, StoredImages) and isinstance(unlabeled, StoredImages)
            else torch.cat([train[:], unlabeled[:]])
        )
        return LabeledImages(both, torch.cat([self.train.labels, self.unlabeled.labels]))

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


def channel_counts(images: torch.Tensor | StoredImages, chunk: int = 8192) -> torch.Tensor:
    """How often each byte value occurs per channel: int64 (C, 256), of uint8 images
    (N, C, H, W), read ``chunk`` images at a time."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk]
        for c in range(counts.shape[0]):
            counts[c] += torch.bincount(block[:, c].reshape(-1), minlength=256)
    return counts


def channel_stats(images: torch.Tensor | StoredImages) -> tuple[tuple[float, ...], ...]:
    """Per-channel (mean, std) of uint8 images (N, C, H, W) scaled to [0, 1]:
    :func:`stats_from_counts` of :func:`channel_counts`."""
    return stats_from_counts(channel_counts(images))


def stats_from_counts(counts: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of images scaled to [0, 1], exactly, from their byte
    histograms (C, 256) (:func:`channel_counts`; several times faster than summing floats).

    Returns:
        (mean, std), each a tuple of C floats.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(dim=1).to(torch.float64)
    if (total == 0).any():
        raise KinfonceError("cannot compute normalisation statistics of an empty training set")
    mean = (counts * values).sum(dim=1) / total
    std = ((counts * (values - mean[:, None]).square()).sum(dim=1) / total).sqrt()
    if (std == 0).any():
        raise KinfonceError("cannot compute normalisation statistics: a channel is constant")
    return tuple(mean.tolist()), tuple(std.tolist())
