"""kinfonce: contrastive self-supervised learning with Kernel-InfoNCE losses."""

from kinfonce.kernels import ExpKernel, MixtureKernel, concat_sum_kernel, simple_sum_kernel
from kinfonce.losses import (
    LOSS_PRESETS,
    KernelInfoNCE,
    LossMixture,
    SpectralContrastiveLoss,
    make_loss,
)

__version__ = "0.1.0"

__all__ = [
    "LOSS_PRESETS",
    "ExpKernel",
    "KernelInfoNCE",
    "LossMixture",
    "MixtureKernel",
    "SpectralContrastiveLoss",
    "concat_sum_kernel",
    "make_loss",
    "simple_sum_kernel",
]
