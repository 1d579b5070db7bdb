"""Training batches from a cache entry's file on disk equal those from memory, gathered ahead
in a background thread that stops with its consumer."""

import dataclasses
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kinfonce.data import load_dataset
from kinfonce.data.batches import AheadLoader, PretrainData
from kinfonce.data.splits import LabeledImages
from kinfonce.data.stored import StoredImages
from tests.helpers import random_pixels, write_image_tree


def _in_memory(images: LabeledImages | None) -> LabeledImages | None:
    return None if images is None else LabeledImages(images.images[:], images.labels)


def _batches(data: PretrainData, epochs: int) -> list[list[torch.Tensor]]:
    data.trainer = SimpleNamespace(
        world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    found = []
    for epoch in range(epochs):
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        found += [list(batch) for batch in loader]
    found += [list(batch) for batch in data.val_dataloader()]
    return found


def test_batches_from_the_file_equal_batches_from_memory(tmp_path):
    # Catches rows read at the wrong offset or in the wrong order, a split that is not the rows
    # it claims, and a background thread that reorders, drops or repeats batches.
    tree = write_image_tree(
        tmp_path / "tree",
        random_pixels(10),
        ["a", "b", "c"],
        {"train": 30, "test": 4},
        unlabelled=5,
    )
    splits = load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache", unlabeled=True)
    assert isinstance(splits.train.images, StoredImages)
    assert isinstance(splits.pretraining_images().images, StoredImages)
    memory = dataclasses.replace(
        splits,
        train=_in_memory(splits.train),
        val=_in_memory(splits.val),
        unlabeled=_in_memory(splits.unlabeled),
    )
    assert isinstance(memory.train.images, torch.Tensor)
    from_file = _batches(PretrainData(splits, batch_size=16, seed=3), epochs=2)
    from_memory = _batches(PretrainData(memory, batch_size=16, seed=3), epochs=2)
    assert len(from_file) == len(from_memory) == 2 * (len(splits.train) + 15) // 16 + 1
    for got, want in zip(from_file, from_memory, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert not torch.equal(from_file[0][0], from_file[len(from_file) // 2][0])  # reshuffled


def test_the_gathering_thread_stops_with_its_consumer_and_passes_errors_on(tmp_path):
    images = torch.arange(40 * 3, dtype=torch.uint8).view(40, 3, 1, 1)
    dataset = torch.utils.data.TensorDataset(images)
    loader = AheadLoader(dataset, batch_size=4)
    first = next(iter(loader))
    assert torch.equal(first[0], images[:4])
    stream = iter(loader)
    next(stream)
    stream.close()  # a consumer that stops early (limit_train_batches)
    assert not [t for t in threading.enumerate() if t.name == "kinfonce-batches"]

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            raise OSError(f"cannot read row {index}")

    with pytest.raises(OSError, match="cannot read row 0"):
        next(iter(AheadLoader(Failing(), batch_size=2)))


def test_stored_images_read_the_rows_asked_for(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (9, 3, 2, 2), dtype=np.uint8)
    np.save(tmp_path / "images.npy", array)
    stored = StoredImages(tmp_path / "images.npy", torch.tensor([5, 6, 7, 1, 0, 8]))
    assert stored.shape == (6, 3, 2, 2) and len(stored) == 6 and stored.size(0) == 6
    assert torch.equal(stored[:], torch.from_numpy(array[[5, 6, 7, 1, 0, 8]]))
    assert torch.equal(stored[[3, 0]], torch.from_numpy(array[[1, 5]]))
    assert torch.equal(stored[-1], torch.from_numpy(array[8]))
    assert torch.equal(stored[1:3, 2, 1], torch.from_numpy(array[[6, 7], 2, 1]))
    assert torch.equal(stored.subset(torch.tensor([2, 2]))[:], torch.from_numpy(array[[7, 7]]))
    with pytest.raises(IndexError, match="out of range"):
        StoredImages(tmp_path / "images.npy", torch.tensor([9]))[:]
