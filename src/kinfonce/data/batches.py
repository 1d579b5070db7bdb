"""Training batches: a seeded, sharded sampler over the uint8 set (and per-image extras),
gathered in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    SequentialSampler,
    TensorDataset,
)

from kinfonce.data.splits import DatasetSplits
from kinfonce.errors import KinfonceError


class EpochBatchSampler(BatchSampler):
    """A ``BatchSampler`` that passes ``set_epoch`` on to its sampler (Lightning calls it on
    the data loader's sampler each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class AheadLoader(DataLoader):
    """A ``DataLoader`` whose batches are gathered by a background thread, ``ahead`` batches
    in advance, so that reading a batch's rows (from the cache file, through the page cache;
    ``os.preadv`` runs without the GIL) overlaps the training step. Same batches, same order."""

    ahead = 2

    def __iter__(self) -> Iterator[Any]:
        return _in_background(super().__iter__(), self.ahead)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def _in_background(batches: Iterator[Any], ahead: int) -> Iterator[Any]:
    """``batches`` drawn by a thread into a queue of ``ahead``; the thread stops when the
    consumer does (a generator closed early)."""
    found: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                found.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as err:  # raised again in the consumer's thread
            put(_Failed(err))

    thread = threading.Thread(target=fill, name="kinfonce-batches", daemon=True)
    thread.start()
    try:
        while (item := found.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class PretrainData(L.LightningDataModule):
    """Training batches (shuffled per epoch with the run's seed) and the validation split.

    Each process gets ``batch_size / world_size`` images per step from a
    ``DistributedSampler`` (also on one process, for its seeded per-epoch order);
    incomplete last batches are dropped, because contrastive batches and batch norm
    need full batches. Training draws from ``splits.pretraining_images()`` (the
    unlabelled images too, when loaded). Training batches are ``(images, labels, *extra)``:
    ``extra`` holds further per-image tensors (N, ...) of those images, such as the captions
    of each image. A batch is one indexing of these tensors (not one per image and a
    stack), in pinned memory when training on a GPU so that its copy does not wait, gathered
    ahead of the step in a background thread (:class:`AheadLoader`): the images may be rows of
    a cache file on disk, read as the batches need them.
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
        dataset = TensorDataset(train.images, train.labels, *self.extra)  # type: ignore[arg-type]
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
        return AheadLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        val = self.splits.val
        dataset = TensorDataset(val.images, val.labels)  # type: ignore[arg-type]
        batches = BatchSampler(SequentialSampler(dataset), 512, drop_last=False)
        return AheadLoader(dataset, sampler=batches, batch_size=None)


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
