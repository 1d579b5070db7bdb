"""Colour jitter and random grayscale for batches, each image with its own factors.

The operations are torchvision's ``ColorJitter`` ones (brightness, contrast and saturation blend
the image with black, its mean gray level and its gray image, clamping to [0, 1] after each;
hue rotates the HSV hue), applied in one random order per batch, and with factors per image;
an image left out of the jitter gets neutral factors, which leave it bit for bit unchanged.

The hue step does not convert to HSV and back. A hue shift leaves each pixel's maximum ``M`` and
minimum ``m`` unchanged and moves it along the hexagon of the HSV model, so the output is
``M - (M - m) * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6`` (``n`` = 5, 3, 1 for
R, G, B; ``h'`` the shifted hue in turns): the same result as the HSV round trip, in a few passes
(measured on a CPU: the round trip cost about ten times all the other view steps together).
"""

from __future__ import annotations

import torch

__all__ = [
    "GRAY_WEIGHTS",
    "JITTER_STEPS",
    "colour_jitter",
    "gray",
    "jitter_bounds",
    "random_grayscale",
    "rotate_hue",
    "sample_jitter",
]

#: ITU-R 601-2 luma weights of R, G, B (torchvision's ``rgb_to_grayscale``).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: The jitter steps, in the order of the columns of the factor matrix.
JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")
_NEUTRAL = (1.0, 1.0, 1.0, 0.0)


def gray(images: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) gray level of float RGB (n, 3, H, W), or the image itself if it has 1 channel.

    Weights as Python numbers (a weight tensor would be a host-to-device copy per call on a GPU).
    """
    if images.shape[1] == 1:
        return images
    red, green, blue = images.split(1, dim=1)
    r, g, b = GRAY_WEIGHTS
    return red.mul(r).add_(green, alpha=g).add_(blue, alpha=b)


def rotate_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of each image by ``turns`` of the colour circle.

    Args:
        images: float RGB (B, 3, H, W) in [0, 1].
        turns: (B,) hue shifts; 0.5 turns is the opposite colour (torchvision's ``hue_factor``).

    Returns:
        (B, 3, H, W), saturation and value of every pixel unchanged.
    """
    red, green, blue = images.unbind(dim=1)
    # elementwise max/min: a reduction over a 3-long channel dim is several times slower on a CPU
    high = torch.maximum(torch.maximum(red, green), blue)
    low = torch.minimum(torch.minimum(red, green), blue)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, 1.0)
    # hue in sextants [-1, 5) before the shift, by which channel is largest
    hue = torch.where(
        red == high,
        (green - blue) / safe,
        torch.where(green == high, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    hue = hue + 6.0 * turns.to(images).view(-1, 1, 1)
    offsets = torch.arange(5.0, 0.0, -2.0, dtype=images.dtype, device=images.device)  # 5, 3, 1
    k = torch.remainder(hue.unsqueeze(1) + offsets.view(1, 3, 1, 1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return high.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def jitter_bounds(strengths: tuple[float, float, float, float]) -> torch.Tensor:
    """(3, 4) lowest factors, highest factors and neutral factors of :func:`sample_jitter`.

    Args:
        strengths: brightness, contrast, saturation (factors uniform in
            ``[max(0, 1 - s), 1 + s]``) and hue (shift uniform in ``[-s, s]`` turns).
    """
    low = [max(0.0, 1.0 - s) for s in strengths[:3]] + [-strengths[3]]
    high = [1.0 + s for s in strengths[:3]] + [strengths[3]]
    return torch.tensor([low, high, list(_NEUTRAL)])


def sample_jitter(
    n: int, bounds: torch.Tensor, p: float, groups: int = 1
) -> tuple[torch.Tensor, tuple[list[int], ...]]:
    """Per-image jitter factors and step orders.

    Args:
        n: images.
        bounds: :func:`jitter_bounds`, on the device to sample on.
        p: probability that an image is jittered; the others get neutral factors.
        groups: step orders to draw (one per group of images).

    Returns:
        ((n, 4) factors in the order of :data:`JITTER_STEPS`, on ``bounds``' device; the step
        orders, drawn from the CPU generator, so that no host synchronisation is needed).
    """
    draws = torch.rand(n, 5, device=bounds.device)
    factors = torch.addcmul(bounds[0], bounds[1] - bounds[0], draws[:, :4])
    factors = torch.where((draws[:, 4] < p).unsqueeze(1), factors, bounds[2])
    orders = tuple(torch.randperm(len(JITTER_STEPS)).tolist() for _ in range(groups))
    return factors, orders


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other``, clamped to [0, 1]; factor 1 returns images."""
    factor = factor.view(-1, 1, 1, 1)
    return torch.addcmul(other * (1.0 - factor), images, factor).clamp_(0.0, 1.0)


def colour_jitter(images: torch.Tensor, factors: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Jitter float images (n, C, H, W) in [0, 1] with :func:`sample_jitter`'s factors and order.

    Saturation and hue are skipped for single-channel images (they change nothing there).
    """
    out = images
    for step in order:
        factor = factors[:, step]
        name = JITTER_STEPS[step]
        if name == "brightness":
            out = out.mul(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        elif name == "contrast":
            out = _blend(out, gray(out).mean(dim=(1, 2, 3), keepdim=True), factor)
        elif out.shape[1] == 1:
            continue
        elif name == "saturation":
            out = _blend(out, gray(out), factor)
        else:
            out = torch.where((factor == 0).view(-1, 1, 1, 1), out, rotate_hue(out, factor))
    return out


def random_grayscale(images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Float RGB (n, 3, H, W) with the images where ``chosen`` (n,) is True made gray."""
    return torch.where(chosen.view(-1, 1, 1, 1), gray(images).expand_as(images), images)
