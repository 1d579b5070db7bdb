"""scikit-learn's 8x8 handwritten digits, the embedded data set that needs no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kinfonce.data.splits import LabeledImages

__all__ = ["DIGITS_IMAGE_SIZE", "DIGITS_TEST_FRACTION", "load_digits_splits"]

DIGITS_IMAGE_SIZE = 16
"""Side the 8x8 digits are upsampled to, so that random resized crops keep a few pixels."""

DIGITS_TEST_FRACTION = 0.2
"""The digits set has no official test split: this stratified fraction, drawn with seed 0."""


def load_digits_splits() -> tuple[LabeledImages, LabeledImages, list[str]]:
    """The digits as gray uint8 images (N, 1, 16, 16) in 0..255, split into (train, test, names).

    The source values 0..16 are scaled to 0..255 and upsampled bilinearly from 8x8 to 16x16. The
    test split is fixed (seed 0), whatever seed the caller uses for its validation split.
    """
    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
    pixels = F.interpolate(
        pixels, size=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        random_state=0,
        stratify=labels.numpy(),
    )
    full = LabeledImages(images, labels)
    train = full.subset(torch.from_numpy(train_idx).sort().values)
    test = full.subset(torch.from_numpy(test_idx).sort().values)
    return train, test, [str(name) for name in bunch.target_names]
