"""The fast hue step against torchvision's and kornia's HSV round trips."""

import math

import kornia.augmentation as K
import torch
import torchvision.transforms.v2.functional as TF
from kornia.enhance import adjust_hue

from kinfonce.data.colour import BatchColorJitter, rotate_hue


def _images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, 12, 12, generator=gen)
    images[:4] = images[:4, :1].expand(-1, 3, -1, -1)  # gray images: hue undefined, unchanged
    images[4, :, :6] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)  # ties between channels
    images[5] = 0.0
    return images


def test_rotate_hue_matches_torchvision_and_kornia():
    images = _images()
    turns = torch.linspace(-0.5, 0.5, images.shape[0])
    out = rotate_hue(images, turns)
    expected = torch.stack(
        [TF.adjust_hue(img, float(t)) for img, t in zip(images, turns, strict=True)]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, adjust_hue(images, turns * 2 * math.pi), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:4], images[:4])
    torch.testing.assert_close(rotate_hue(images, torch.zeros(48)), images, atol=1e-6, rtol=0)


def test_batch_colour_jitter_equals_kornia_colour_jitter_on_same_params():
    images = _images()
    reference = K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(images)
        out = BatchColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8)(images, params=reference._params)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
