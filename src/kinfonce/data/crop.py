"""Random resized crops and horizontal flips of a batch, in one ``grid_sample`` call.

The boxes are drawn as torchvision's ``RandomResizedCrop`` draws them (ten tries of an area
fraction and a log-uniform aspect ratio, the first that fits wins, else the central crop of the
closest ratio), for all images at once on their device, without a host synchronisation. One
sampling grid per image maps the output's pixel centres into its box (half-pixel convention,
coordinates clamped to the box's edge pixels), which gives the same pixels as cropping and then
resizing bilinearly with ``align_corners=False`` and no antialiasing (torchvision's
``resized_crop(..., antialias=False)``, tested); a flip mirrors the grid's columns.

Why hand-written: per-image crops with kornia or torchvision run one small kernel sequence per
image (or a general perspective warp), which dominates the views on a GPU.

:func:`padded_crops` is the other crop of the field, the linear probe's augmentation (a crop
of the image's own size from the image padded by reflection, and a flip), written as boxes of
scale 1 for the same ``grid_sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["TRIES", "padded_crops", "resized_crops", "sample_boxes"]

#: Tries per image before falling back to the central crop, as torchvision makes.
TRIES = 10


def sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device | str,
) -> torch.Tensor:
    """Crop boxes of ``n`` images of ``height`` x ``width``.

    Args:
        scale: range of the box's area as a fraction of the image's.
        ratio: range of the box's aspect ratio (width / height), drawn log-uniformly.

    Returns:
        (n, 4) float32 ``(top, left, box_height, box_width)`` in whole pixels, on ``device``.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    draws = torch.rand(n, 2, TRIES, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[:, 0])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[:, 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # fallback: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback = (round(width / ratio[0]), width)
    elif in_ratio > ratio[1]:
        fallback = (height, round(height * ratio[1]))
    else:
        fallback = (height, width)
    found = fits.any(dim=1)
    h = torch.where(found, h, float(fallback[0]))
    w = torch.where(found, w, float(fallback[1]))
    offsets = torch.rand(n, 2, device=device)
    top = torch.where(found, torch.floor(offsets[:, 0] * (height - h + 1)), (height - h) // 2)
    left = torch.where(found, torch.floor(offsets[:, 1] * (width - w + 1)), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _axis_grid(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """(n, out) normalised sample coordinates along one axis of a box, edge pixels clamped."""
    centres = torch.arange(out, device=start.device, dtype=start.dtype).add_(0.5)
    # source pixel of each output pixel centre within the box, as interpolate() computes it
    source = centres * (length / out).unsqueeze(1) - 0.5
    source = torch.minimum(source.clamp_(min=0.0), (length - 1).unsqueeze(1)) + start.unsqueeze(1)
    return source.mul_(2.0).add_(1.0).div_(size).sub_(1.0)  # grid_sample: (2x + 1) / size - 1


def resized_crops(
    images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flip: torch.Tensor
) -> torch.Tensor:
    """Crop each image to its box, resize it to ``size`` bilinearly, and mirror it where asked.

    Args:
        images: float (n, C, H, W).
        boxes: (n, 4) ``(top, left, box_height, box_width)`` from :func:`sample_boxes`.
        size: (height, width) of the output.
        flip: (n,) bool, mirror the output horizontally.

    Returns:
        float (n, C, *size).
    """
    n, _, height, width = images.shape
    boxes = boxes.to(images.dtype)
    ys = _axis_grid(boxes[:, 0], boxes[:, 2], size[0], height)
    xs = _axis_grid(boxes[:, 1], boxes[:, 3], size[1], width)
    xs = torch.where(flip.unsqueeze(1), xs.flip(1), xs)
    grid = torch.stack(
        [xs.unsqueeze(1).expand(n, size[0], size[1]), ys.unsqueeze(2).expand(n, size[0], size[1])],
        dim=-1,
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def padded_crops(images: torch.Tensor, padding: int, flip_p: float = 0.5) -> torch.Tensor:
    """Random crops of each image's own size from the image padded by reflection, each
    mirrored horizontally with probability ``flip_p``.

    Torchvision's ``RandomCrop(size, padding, padding_mode="reflect")`` then
    ``RandomHorizontalFlip(flip_p)`` per image, for the whole batch at once: the crop is a box
    of the padded image at scale 1, so :func:`resized_crops` samples whole pixels. Offsets and
    flips come from the generator of the images' device.

    Args:
        images: float (n, C, H, W).
        padding: pixels of reflection added on every side (< H and < W).

    Returns:
        float (n, C, H, W).
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=images.device)
    size = torch.tensor([height, width], device=images.device).expand(n, 2)
    boxes = torch.cat([offsets, size], dim=1).float()
    flip = torch.rand(n, device=images.device) < flip_p
    return resized_crops(padded, boxes, (height, width), flip)
