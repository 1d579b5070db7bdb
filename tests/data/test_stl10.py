"""STL-10 through torchvision, with its unlabelled split, on small fake files in its layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.datasets import STL10

from kinfonce.data import load_dataset
from kinfonce.errors import KinfonceError

SIZE = 96


def images(count: int, offset: int) -> np.ndarray:
    """(count, 3, 96, 96) uint8 whose pixels encode (image, channel, row): orientation shows."""
    n, c, y = np.meshgrid(np.arange(count), np.arange(3), np.arange(SIZE), indexing="ij")
    values = (offset + 7 * n + 50 * c + y) % 256
    return np.broadcast_to(values[..., None], (count, 3, SIZE, SIZE)).astype(np.uint8)


def write_binary(path, array: np.ndarray) -> None:
    """STL-10's files store each image column-major: (N, C, W, H) in C order."""
    np.ascontiguousarray(array.transpose(0, 1, 3, 2)).tofile(path)


@pytest.fixture
def stl10_root(tmp_path, monkeypatch):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    write_binary(folder / "train_X.bin", images(20, 0))
    (np.arange(20, dtype=np.uint8) % 10 + 1).tofile(folder / "train_y.bin")  # labels 1..10
    write_binary(folder / "test_X.bin", images(10, 100))
    (np.arange(10, dtype=np.uint8) + 1).tofile(folder / "test_y.bin")
    write_binary(folder / "unlabeled_X.bin", images(6, 200))
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    # Fake files cannot match the archive's MD5 sums; the rest is torchvision's own reader.
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    return tmp_path


def test_unlabeled_split_is_loaded_for_pretraining_only(stl10_root):
    # Catches the unlabelled images being dropped, mislabelled, transposed, or leaking into
    # the labelled splits that the probes use.
    data = load_dataset("stl10", root=stl10_root, cache_dir=stl10_root, val_fraction=0.5,
                        unlabeled=True)  # fmt: skip
    assert (len(data.train), len(data.val), len(data.test)) == (10, 10, 10)
    assert data.unlabeled is not None and data.unlabeled.images.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(data.unlabeled.images, torch.from_numpy(images(6, 200)))
    assert (data.unlabeled.labels == -1).all()
    assert data.train.labels.min() >= 0 and data.class_names[0] == "class0"
    pool = data.pretraining_images()
    assert len(pool) == 16 and (pool.labels == -1).sum() == 6
    assert torch.equal(pool.images[:10], data.train.images)
    plain = load_dataset("stl10", root=stl10_root, cache_dir=stl10_root, val_fraction=0.5)
    assert plain.unlabeled is None and len(plain.pretraining_images()) == 10


def test_unlabeled_needs_a_data_set_that_has_them(tmp_path):
    with pytest.raises(KinfonceError, match="unlabelled split"):
        load_dataset("digits", unlabeled=True)
