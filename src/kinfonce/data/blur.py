"""Gaussian blur of a batch, each image with its own standard deviation, in two grouped convolutions.

Per image the result is torchvision's ``gaussian_blur`` (kernel ``exp(-x^2 / (2 sigma^2))``
normalised to sum 1, reflected borders), applied as a horizontal then a vertical pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "sample_sigma"]


def sample_sigma(
    n: int, sigma_range: tuple[float, float], p: float, device: torch.device | str
) -> torch.Tensor:
    """(n,) standard deviations uniform in ``sigma_range`` with probability ``p``, else 0 (none)."""
    draws = torch.rand(n, 2, device=device)
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * draws[:, 0]
    return torch.where(draws[:, 1] < p, sigma, 0.0)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur float images (n, C, H, W) with an odd ``kernel_size`` and per-image ``sigma`` (n,);
    images with sigma 0 come back unchanged."""
    n, channels, height, width = images.shape
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - half
    safe = torch.where(sigma > 0, sigma, 1.0).to(images.dtype).unsqueeze(1)
    kernel = torch.exp(-0.5 * (offsets / safe).square())
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    padded = F.pad(images, (half, half, half, half), mode="reflect").reshape(
        1, n * channels, height + 2 * half, width + 2 * half
    )
    groups = n * channels
    out = F.conv2d(padded, kernel.view(groups, 1, 1, kernel_size), groups=groups)
    out = F.conv2d(out, kernel.view(groups, 1, kernel_size, 1), groups=groups)
    out = out.view(n, channels, height, width)
    return torch.where((sigma > 0).view(-1, 1, 1, 1), out, images)
