"""The batched crop resampling against kornia's per-image crop on the same boxes."""

import kornia.augmentation as K
import pytest
import torch

from kinfonce.data.crop import BatchRandomResizedCrop


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (48, 40)])
def test_batch_crop_equals_kornia_slice_crop_on_same_boxes(size):
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 40)
    reference = K.RandomResizedCrop(size, scale=(0.08, 1.0), align_corners=False)
    expected = reference(images)
    out = BatchRandomResizedCrop(size)(images, params=reference._params)
    assert out.shape == (64, 3, *size)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_full_image_box_is_identity():
    images = torch.rand(4, 3, 20, 20)
    crop = BatchRandomResizedCrop((20, 20), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(crop(images), images, atol=1e-6, rtol=0)
