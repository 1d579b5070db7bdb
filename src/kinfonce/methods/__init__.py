"""Training methods by name: the LightningModules that a resolved configuration builds."""

from __future__ import annotations

from kinfonce.config import TrainConfig
from kinfonce.methods.base import PretrainMethod
from kinfonce.methods.clip import ClipMethod
from kinfonce.methods.moco import MoCo
from kinfonce.methods.simclr import SimCLR

#: Method name -> LightningModule class (``kinfonce pretrain --method``, and ``clip``).
METHODS: dict[str, type[PretrainMethod]] = {"simclr": SimCLR, "moco": MoCo, "clip": ClipMethod}

__all__ = ["METHODS", "ClipMethod", "MoCo", "PretrainMethod", "SimCLR", "method_class"]


def method_class(config: TrainConfig) -> type[PretrainMethod]:
    """The LightningModule class a configuration trains: ``METHODS[config.method_name]``."""
    return METHODS[config.method_name]
