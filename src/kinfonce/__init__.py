"""kinfonce: contrastive self-supervised learning with Kernel-InfoNCE losses."""

__version__ = "0.1.0"
