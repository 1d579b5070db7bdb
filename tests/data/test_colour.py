"""Colour steps and blur against torchvision's per-image functions."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from kinfonce.data.blur import gaussian_blur
from kinfonce.data.colour import colour_jitter, random_grayscale, rotate_hue

TORCHVISION_STEPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, 12, 12, generator=gen)
    images[:4] = images[:4, :1].expand(-1, 3, -1, -1)  # gray images: hue undefined, unchanged
    images[4, :, :6] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)  # ties between channels
    images[5] = 0.0
    return images


def test_rotate_hue_matches_torchvision():
    images = _images()
    turns = torch.linspace(-0.5, 0.5, images.shape[0])
    out = rotate_hue(images, turns)
    expected = torch.stack(
        [TF.adjust_hue(img, float(t)) for img, t in zip(images, turns, strict=True)]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:4], images[:4])
    torch.testing.assert_close(rotate_hue(images, torch.zeros(48)), images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
def test_colour_jitter_equals_torchvision_per_image(order):
    """Each image's own factors, the batch's order; neutral factors leave an image unchanged
    bit for bit (a step applied with the wrong factor, order or clamp fails here)."""
    images = _images()
    gen = torch.Generator().manual_seed(1)
    factors = torch.rand(48, 4, generator=gen) * torch.tensor([1.6, 1.6, 1.6, 0.4])
    factors += torch.tensor([0.2, 0.2, 0.2, -0.2])
    factors[::3] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # not jittered
    out = colour_jitter(images, factors, order)
    for image, row, got in zip(images, factors.tolist(), out, strict=True):
        want = image
        for step in order:
            want = TORCHVISION_STEPS[step](want, row[step])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert torch.equal(out[::3], images[::3])


def test_grayscale_and_single_channel_jitter():
    images = _images()
    chosen = torch.arange(48) % 2 == 0
    out = random_grayscale(images, chosen)
    gray = TF.rgb_to_grayscale(images, num_output_channels=3)
    torch.testing.assert_close(out[chosen], gray[chosen], atol=1e-6, rtol=0)
    assert torch.equal(out[~chosen], images[~chosen])
    single = images[:, :1]
    factors = torch.tensor([[1.5, 0.5, 0.3, 0.2]]).expand(48, 4)
    out = colour_jitter(single, factors, [3, 2, 1, 0])  # saturation and hue: no effect on gray
    want = TF.adjust_brightness(TF.adjust_contrast(single, 0.5), 1.5)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=0)


def test_blur_equals_torchvision_per_image():
    images = torch.rand(6, 3, 17, 20, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 0.0])
    out = gaussian_blur(images, sigma, kernel_size=5)
    for image, s, got in zip(images, sigma.tolist(), out, strict=True):
        want = image if s == 0 else TF.gaussian_blur(image, [5, 5], [s, s])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(out[0], images[0])
