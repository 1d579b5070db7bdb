"""CIFAR-10 read from ../shared/data/cifar10-jpg.zip (skipped when the archive is absent)."""

import pytest
import torch

from kinfonce.data import load_dataset
from tests.helpers import CIFAR10_ZIP

ZIP = CIFAR10_ZIP
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = pytest.mark.skipif(
    not ZIP.is_file(), reason=f"CIFAR-10 JPEG archive not found at {ZIP} (see docs/data.md)"
)


@pytest.fixture(scope="session")
def cifar():
    """Decoded once per test session into the session's cache (shared with the other tests
    of the zip)."""
    return load_dataset(f"imagefolder:{ZIP}")


def test_cifar10_zip_sizes_classes_and_balance(cifar):
    assert cifar.class_names == CLASSES and cifar.num_classes == 10
    assert (cifar.image_size, cifar.channels, cifar.skipped_files) == (32, 3, 0)
    assert len(cifar.train) + len(cifar.val) == 50_000 and len(cifar.test) == 10_000
    assert len(cifar.val) == 5_000
    for split in (cifar.train, cifar.val, cifar.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
    train_labels = torch.cat([cifar.train.labels, cifar.val.labels])
    assert torch.bincount(train_labels).tolist() == [5_000] * 10
    assert torch.bincount(cifar.test.labels).tolist() == [1_000] * 10
    assert torch.bincount(cifar.val.labels).tolist() == [500] * 10


def test_cifar10_zip_statistics_are_those_of_cifar10(cifar):
    # the usual CIFAR-10 training statistics, up to the JPEG re-encoding of this copy
    for got, usual in zip(cifar.mean, (0.4914, 0.4822, 0.4465), strict=True):
        assert abs(got - usual) < 0.01
    for got, usual in zip(cifar.std, (0.2470, 0.2435, 0.2616), strict=True):
        assert abs(got - usual) < 0.01
    assert cifar.test.images[:].float().std() > 40  # real images, not constant
