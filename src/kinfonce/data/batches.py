"""Training batches: a seeded, sharded sampler over the in-memory uint8 set (and per-image extras)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from kinfonce.data.splits import DatasetSplits
from kinfonce.errors import KinfonceError


class EpochBatchSampler(BatchSampler):
    """A ``BatchSampler`` that passes ``set_epoch`` on to its sampler (Lightning calls it on
    the data loader's sampler each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class PretrainData(L.LightningDataModule):
    """Training batches (shuffled per epoch with the run's seed) and the validation split.

    Each process gets ``batch_size / world_size`` images per step from a
    ``DistributedSampler`` (also on one process, for its seeded per-epoch order);
    incomplete last batches are dropped, because contrastive batches and batch norm
    need full batches. Training draws from ``splits.pretraining_images()`` (the
    unlabelled images too, when loaded). Training batches are ``(images, labels, *extra)``:
    ``extra`` holds further per-image tensors (N, ...) of those images, such as the captions
    of each image. A batch is one indexing of these tensors (not one per image and a
    stack), in pinned memory when training on a GPU so that its copy does not wait.
    """

    def __init__(
        self, splits: DatasetSplits, batch_size: int, seed: int, extra: Sequence[Tensor] = ()
    ):
        super().__init__()
        self.splits, self.batch_size, self.seed = splits, batch_size, seed
        self.extra = tuple(extra)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        train = self.splits.pretraining_images()
        dataset = TensorDataset(train.images, train.labels, *self.extra)
        sampler = DistributedSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        batches = EpochBatchSampler(sampler, self.batch_size // world, drop_last=True)
        pin = self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        val = self.splits.val
        return DataLoader(TensorDataset(val.images, val.labels), batch_size=512)


def check_batch_size(batch_size: int, train_size: int, world_size: int) -> None:
    """Explain a batch size the data or the devices cannot provide."""
    if batch_size > train_size:
        raise KinfonceError(
            f"batch_size {batch_size} is larger than the training set ({train_size} images "
            f"after the validation split); pass a --batch-size of at most {train_size}"
        )
    if batch_size % world_size:
        raise KinfonceError(
            f"batch_size {batch_size} does not divide across {world_size} processes; use a "
            f"multiple of {world_size}"
        )
    if batch_size // world_size < 2:
        raise KinfonceError(
            f"batch_size {batch_size} gives {batch_size // world_size} image(s) per process; "
            "contrastive batches and batch norm need at least 2"
        )
