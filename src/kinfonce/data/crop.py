"""Random resized crops of a batch, resampled in one ``grid_sample`` call.

Why hand-written: kornia's ``RandomResizedCrop`` draws the crops per image as wanted, but in its
default "slice" mode resizes each crop with its own ``interpolate`` call (a Python loop over the
batch), and its "resample" mode goes through a general perspective warp; on a CPU either costs
more than the whole colour jitter. Here kornia still draws the boxes; one affine grid per image
maps the output's pixel centres into its box (half-pixel convention, coordinates clamped to the
box's edge pixels), which gives the same pixels as cropping then resizing each image bilinearly
(``align_corners=False``), as kornia's slice mode and torchvision's tensor resize do.
"""

from __future__ import annotations

from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F

__all__ = ["BatchRandomResizedCrop"]


class BatchRandomResizedCrop(K.RandomResizedCrop):
    """``kornia.augmentation.RandomResizedCrop`` (same arguments and sampled boxes, bilinear,
    ``align_corners=False``) resampling the whole batch at once.

    Input float (B, C, H, W); output (B, C, *size). The boxes are in ``_params["src"]`` as
    (B, 4, 2) corner pixels (x, y): top-left, top-right, bottom-right, bottom-left, inclusive.
    """

    def __init__(self, size: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(size, align_corners=False, **kwargs)

    def apply_transform(
        self,
        input: torch.Tensor,
        params: dict[str, torch.Tensor],
        flags: dict[str, Any],
        transform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = input.shape
        box = params["src"].to(device=input.device, dtype=input.dtype)
        left, top = box[:, 0, 0], box[:, 0, 1]
        right, bottom = box[:, 2, 0], box[:, 2, 1]
        theta = torch.zeros(batch, 2, 3, dtype=input.dtype, device=input.device)
        theta[:, 0, 0] = (right + 1 - left) / width
        theta[:, 0, 2] = (left + right + 1) / width - 1
        theta[:, 1, 1] = (bottom + 1 - top) / height
        theta[:, 1, 2] = (top + bottom + 1) / height - 1
        grid = F.affine_grid(theta, [batch, channels, *flags["size"]], align_corners=False)
        # keep samples within the box: edge pixels repeat, as when resizing the cropped image
        low = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=-1)
        high = torch.stack([(2 * right + 1) / width - 1, (2 * bottom + 1) / height - 1], dim=-1)
        grid = torch.maximum(
            torch.minimum(grid, high.view(batch, 1, 1, 2)), low.view(batch, 1, 1, 2)
        )
        return F.grid_sample(
            input, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
