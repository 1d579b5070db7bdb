"""Batched SimCLR views made on the training device, with independent random parameters per image.

The pipeline is the one of the SimCLR recipe used for the paper's image experiments (the Lightning
bolts SimCLR defaults, torchvision's transforms): random resized crop (area fraction 0.08 to 1),
horizontal flip, colour jitter (brightness, contrast, saturation ``0.8 s``, hue ``0.2 s``) with
probability 0.8, random grayscale with probability 0.2, optional Gaussian blur with probability
0.5, then normalisation. Per image, each step gives torchvision's pixels for the same parameters
(tested): :mod:`kinfonce.data.crop` (crop, resize and flip in one ``grid_sample``),
:mod:`kinfonce.data.colour` (jitter, grayscale), :mod:`kinfonce.data.blur`.

Why not kornia's augmentation modules, which made the views before: on a GPU their cost was not
the pixels but about 280 small kernels and several host synchronisations per call (parameters
copied between devices, boolean masks selecting the images a step applies to); the views took
17 % of a ResNet-18 training step. Here every parameter is drawn with a few batched calls on the
images' device, a step applies to all images with neutral parameters where it is off, nothing
waits for the GPU, and :meth:`SimCLRViews.pair` makes both views of a batch in one pass.

Reproducibility: parameters come from PyTorch's generator of the batch's device (the jitter
order from the CPU generator), so seeding fixes the views::

    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(0)
        v0, v1 = views.pair(batch)

A seed reproduces the views on one device, not across devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kinfonce.data.blur import gaussian_blur, sample_sigma
from kinfonce.data.colour import colour_jitter, jitter_bounds, random_grayscale, sample_jitter
from kinfonce.data.crop import resized_crops, sample_boxes
from kinfonce.errors import KinfonceError

__all__ = ["EvalTransform", "SimCLRViews", "ViewParams", "blur_kernel_size"]


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


def _check_batch(batch: torch.Tensor, channels: int) -> None:
    """Raise unless ``batch`` is a uint8 (B, C, H, W) tensor with ``channels`` channels."""
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


class _Normalized(nn.Module):
    """Holds the per-channel statistics as buffers and normalises [0, 1] images with them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t, std_t = _check_stats(mean, std)
        self.channels = mean_t.numel()
        # on the module's device: a tensor made per call would be a host-to-device copy, which
        # waits for the GPU
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, in place."""
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


@dataclass(frozen=True)
class ViewParams:
    """The parameters one call of :class:`SimCLRViews` drew, one row per view made.

    Attributes:
        boxes: (n, 4) crop boxes ``(top, left, height, width)`` in pixels.
        flip: (n,) bool.
        jitter: (n, 4) brightness, contrast, saturation factors and hue shift (neutral 1, 1, 1, 0
            where the image is not jittered).
        orders: the order of the four jitter steps (indices into those columns), one for each
            group of consecutive rows: one group per call, two for :meth:`SimCLRViews.pair`
            (each view's batch has its own order, as when the views are made by two calls).
        grayscale: (n,) bool (all False for single-channel images).
        sigma: (n,) blur standard deviation, 0 where not blurred (all 0 without blur).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    orders: tuple[list[int], ...]
    grayscale: torch.Tensor
    sigma: torch.Tensor


class SimCLRViews(_Normalized):
    """Random SimCLR views of a uint8 batch: one per image (call), or two (:meth:`pair`).

    Single-channel images (the digits set) get brightness and contrast jitter only and no random
    grayscale: on a gray image saturation, hue and grayscale change nothing.

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
    on the same device, normalised with ``mean`` and ``std``. ``last_params`` holds the
    :class:`ViewParams` of the latest call.
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
        if not isinstance(image_size, int) or image_size < 1:
            raise KinfonceError(f"image_size must be a positive int, got {image_size!r}")
        if not jitter_strength >= 0:
            raise KinfonceError(f"jitter_strength must be >= 0, got {jitter_strength!r}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise KinfonceError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise KinfonceError(f"crop_ratio must satisfy 0 < low <= high, got {crop_ratio!r}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise KinfonceError(f"blur_sigma must satisfy 0 < low <= high, got {blur_sigma!r}")
        for name, p in (
            ("flip_p", flip_p),
            ("jitter_p", jitter_p),
            ("grayscale_p", grayscale_p),
            ("blur_p", blur_p),
        ):
            if not 0 <= p <= 1:
                raise KinfonceError(f"{name} must be a probability in [0, 1], got {p!r}")
        super().__init__(mean, std)
        if self.channels not in (1, 3):
            raise KinfonceError(f"mean/std must have 1 or 3 channels, got {self.channels}")
        colour = self.channels == 3
        s = float(jitter_strength)
        strengths = (0.8 * s, 0.8 * s, 0.8 * s if colour else 0.0, min(0.2 * s, 0.5) * colour)
        self.register_buffer("jitter_bounds", jitter_bounds(strengths), persistent=False)
        self.image_size = image_size
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.flip_p, self.jitter_p = flip_p, jitter_p
        self.grayscale_p = grayscale_p if colour else 0.0
        self.blur_kernel = blur_kernel_size(image_size) if blur else 0
        self.blur_p, self.blur_sigma = blur_p, tuple(blur_sigma)
        self.last_params: ViewParams | None = None

    def sample(
        self, n: int, height: int, width: int, device: torch.device, groups: int = 1
    ) -> ViewParams:
        """Draw the parameters of ``n`` views of ``height`` x ``width`` images on ``device``,
        with one jitter order per each of ``groups`` equal groups of consecutive rows."""
        boxes = sample_boxes(n, height, width, self.crop_scale, self.crop_ratio, device)
        draws = torch.rand(n, 2, device=device)
        jitter, orders = sample_jitter(n, self.jitter_bounds.to(device), self.jitter_p, groups)
        if self.blur_kernel:
            sigma = sample_sigma(n, self.blur_sigma, self.blur_p, device)
        else:
            sigma = torch.zeros(n, device=device)
        flip, grayscale = draws[:, 0] < self.flip_p, draws[:, 1] < self.grayscale_p
        return ViewParams(boxes, flip, jitter, orders, grayscale, sigma)

    def apply(self, batch: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The views of a uint8 batch (n, C, H, W) with the given parameters (one row each)."""
        _check_batch(batch, self.channels)
        size = (self.image_size, self.image_size)
        x = resized_crops(batch.div(255.0), params.boxes, size, params.flip)
        x = self._jitter(x, params)
        if self.channels == 3:
            x = random_grayscale(x, params.grayscale)
        if self.blur_kernel:
            x = gaussian_blur(x, params.sigma, self.blur_kernel)
        return self.normalize(x)

    @staticmethod
    def _jitter(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Colour jitter, each group of rows in its own step order."""
        groups = len(params.orders)
        parts = zip(x.chunk(groups), params.jitter.chunk(groups), params.orders, strict=True)
        jittered = [colour_jitter(images, factors, order) for images, factors, order in parts]
        return jittered[0] if groups == 1 else torch.cat(jittered)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Views (B, C, image_size, image_size) float32 of a uint8 batch (B, C, H, W)."""
        return self._views(batch, groups=1)

    def _views(self, batch: torch.Tensor, groups: int) -> torch.Tensor:
        _check_batch(batch, self.channels)
        n, _, height, width = batch.shape
        self.last_params = self.sample(n, height, width, batch.device, groups)
        return self.apply(batch, self.last_params)

    def pair(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of every image, made in one pass over the doubled batch.

        Returns:
            (view0, view1), each (B, C, image_size, image_size); ``last_params`` has 2B rows,
            the first B for ``view0``.
        """
        _check_batch(batch, self.channels)
        view0, view1 = self._views(torch.cat([batch, batch]), groups=2).chunk(2)
        return view0, view1


class EvalTransform(_Normalized):
    """Deterministic evaluation transform: uint8 (B, C, H, W) -> normalised float32, same size.

    Args:
        mean: per-channel mean of [0, 1] scaled images.
        std: per-channel standard deviation, same length as ``mean``.
    """

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised float32 (B, C, H, W) of a uint8 batch (B, C, H, W)."""
        _check_batch(batch, self.channels)
        return self.normalize(batch.div(255.0))
