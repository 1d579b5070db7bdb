"""Batched SimCLR views made on the training device, with independent random parameters per image.

The pipeline is the one of the SimCLR recipe used for the paper's image experiments (the Lightning
bolts SimCLR defaults): random resized crop (area fraction 0.08 to 1), horizontal flip, colour
jitter (brightness, contrast, saturation ``0.8 s``, hue ``0.2 s``) with probability 0.8, random
grayscale with probability 0.2, optional Gaussian blur with probability 0.5, then normalisation.

Every step is a ``kornia.augmentation`` module, which samples its parameters per image (unlike
torchvision's batched tensor transforms, which draw one set for the whole batch). Two steps are
applied by hand after kornia has drawn their parameters, because kornia's way is slow on a CPU:
the crop's resampling (:mod:`kinfonce.data.crop`) and the jitter's hue step
(:mod:`kinfonce.data.colour`); both give kornia's pixels (tested). Beyond that, this module
chooses the steps and converts uint8 to float.

Reproducibility: kornia draws from PyTorch's global generator, so seeding it fixes the views::

    with torch.random.fork_rng():
        torch.manual_seed(0)
        v0, v1 = views(batch), views(batch)

(or ``lightning.seed_everything(seed)`` once before training). kornia samples on the device the
module was moved to (``views.to(device)``; the CPU otherwise), so a seed reproduces the views on
one device, not across devices.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from kinfonce.data.colour import BatchColorJitter
from kinfonce.data.crop import BatchRandomResizedCrop
from kinfonce.errors import KinfonceError

__all__ = ["EvalTransform", "SimCLRViews", "blur_kernel_size"]


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (at least 3)."""
    size = max(3, int(0.1 * image_size))
    return size if size % 2 == 1 else size + 1


def _stats_tensor(name: str, values: Sequence[float]) -> torch.Tensor:
    tensor = torch.as_tensor(tuple(values), dtype=torch.float32)
    if tensor.ndim != 1 or tensor.numel() == 0 or not torch.isfinite(tensor).all():
        raise KinfonceError(f"{name} must be a non-empty sequence of finite floats, got {values!r}")
    return tensor


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    mean_t, std_t = _stats_tensor("mean", mean), _stats_tensor("std", std)
    if mean_t.shape != std_t.shape:
        raise KinfonceError(
            f"mean and std must have one value per channel each, got {mean!r}, {std!r}"
        )
    if (std_t <= 0).any():
        raise KinfonceError(f"std must be positive per channel, got {std!r}")
    return mean_t, std_t


def _to_unit_float(batch: torch.Tensor, channels: int) -> torch.Tensor:
    """Check a uint8 batch (B, C, H, W) and scale it to float32 in [0, 1]."""
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4:
        got = (
            f"{batch.dtype} tensor of shape {tuple(batch.shape)}"
            if isinstance(batch, torch.Tensor)
            else type(batch).__name__
        )
        raise KinfonceError(f"batch must be a uint8 tensor (B, C, H, W), got {got}")
    if batch.shape[1] != channels:
        raise KinfonceError(
            f"batch has {batch.shape[1]} channels but mean/std give {channels}: (B, C, H, W) expected"
        )
    return batch.float().div_(255.0)


class SimCLRViews(nn.Module):
    """One random SimCLR view per image of a uint8 batch; call it twice for a positive pair.

    Single-channel images (the digits set) get brightness and contrast jitter only and no random
    grayscale: on a gray image saturation, hue and grayscale change nothing, so those steps are left
    out rather than run on three copies of the channel.

    Args:
        image_size: side of the square output views.
        mean: per-channel mean of [0, 1] scaled images, for normalisation.
        std: per-channel standard deviation, same length as ``mean``.
        jitter_strength: ``s``; brightness, contrast, saturation ``0.8 s`` and hue ``0.2 s``
            (hue capped at 0.5, the largest shift there is).
        blur: add Gaussian blur with probability ``blur_p`` (off by default, as in the paper's
            CIFAR runs); kernel side from :func:`blur_kernel_size`, sigma in ``blur_sigma``.
        crop_scale: range of the crop's area as a fraction of the image.
        crop_ratio: range of the crop's aspect ratio.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter.
        grayscale_p: probability of converting to grayscale (3-channel input only).
        blur_p: probability of blurring when ``blur`` is on.
        blur_sigma: range of the blur's standard deviation in pixels.

    Input: uint8 tensor (B, C, H, W) on any device. Output: float32 (B, C, image_size, image_size)
    on the same device, normalised with ``mean`` and ``std``.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        jitter_strength: float = 1.0,
        blur: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 1:
            raise KinfonceError(f"image_size must be a positive int, got {image_size!r}")
        if not jitter_strength >= 0:
            raise KinfonceError(f"jitter_strength must be >= 0, got {jitter_strength!r}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise KinfonceError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        for name, p in (
            ("flip_p", flip_p),
            ("jitter_p", jitter_p),
            ("grayscale_p", grayscale_p),
            ("blur_p", blur_p),
        ):
            if not 0 <= p <= 1:
                raise KinfonceError(f"{name} must be a probability in [0, 1], got {p!r}")
        mean_t, std_t = _check_stats(mean, std)
        self.channels = mean_t.numel()
        if self.channels not in (1, 3):
            raise KinfonceError(f"mean/std must have 1 or 3 channels, got {self.channels}")
        self.image_size = image_size
        colour = self.channels == 3
        s = float(jitter_strength)
        steps: OrderedDict[str, nn.Module] = OrderedDict(
            crop=BatchRandomResizedCrop(
                (image_size, image_size), scale=crop_scale, ratio=crop_ratio
            ),
            flip=K.RandomHorizontalFlip(p=flip_p),
            jitter=BatchColorJitter(
                brightness=0.8 * s,
                contrast=0.8 * s,
                saturation=0.8 * s if colour else 0.0,
                hue=min(0.2 * s, 0.5) if colour else 0.0,
                p=jitter_p,
            ),
        )
        if colour:
            steps["grayscale"] = K.RandomGrayscale(p=grayscale_p)
        if blur:
            kernel = blur_kernel_size(image_size)
            steps["blur"] = K.RandomGaussianBlur((kernel, kernel), blur_sigma, p=blur_p)
        steps["normalize"] = K.Normalize(mean=mean_t, std=std_t)
        self.pipeline = nn.Sequential(steps)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Views (B, C, image_size, image_size) float32 of a uint8 batch (B, C, H, W)."""
        return self.pipeline(_to_unit_float(batch, self.channels))


class EvalTransform(nn.Module):
    """Deterministic evaluation transform: uint8 (B, C, H, W) -> normalised float32, same size.

    Args:
        mean: per-channel mean of [0, 1] scaled images.
        std: per-channel standard deviation, same length as ``mean``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t, std_t = _check_stats(mean, std)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised float32 (B, C, H, W) of a uint8 batch (B, C, H, W)."""
        x = _to_unit_float(batch, self.mean.shape[1])
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
