"""Data sets by name (uint8 tensors, cached) and batched SimCLR views.

``load_dataset(name)`` -> ``DatasetSplits``; ``kinfonce.data.augment`` has ``SimCLRViews`` and
``EvalTransform``.
"""

from kinfonce.data.datasets import DATASETS, load_dataset
from kinfonce.data.splits import DatasetSplits, LabeledImages

__all__ = ["DATASETS", "DatasetSplits", "LabeledImages", "load_dataset"]
