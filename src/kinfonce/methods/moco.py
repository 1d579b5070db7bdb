"""MoCo (He et al., 2019) with a Kernel-InfoNCE loss over a queue (paper Table 4)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from kinfonce.config import PretrainConfig
from kinfonce.methods.base import PretrainMethod


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """Keys (n, D) of all processes, (world * n, D), rank order; no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, keys.contiguous())
    return torch.cat(gathered)


class MoCo(PretrainMethod):
    """Query encoder trained by the loss; key encoder an exponential moving average of it.

    The queries are the first view through backbone and head; the keys the second view
    through the momentum copy. Each query's positive is its own key, its negatives the
    ``queue_size`` keys of earlier batches (of all processes under DDP). Its loss defaults
    follow Table 4 (temperature 0.1 and lambda 0.8; ``kinfonce.resolve.METHOD_LOSS_DEFAULTS``).

    The key encoder keeps its own batch-norm statistics (computed on key batches). Batch
    norm is not shuffled across devices (MoCo's shuffle-BN).
    """

    def __init__(self, config: PretrainConfig, data: dict):
        super().__init__(config, data)
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        out_dim = self.head[-1].out_features
        self.register_buffer("queue", torch.randn(config.queue_size, out_dim))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.moco_momentum
        for online, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            for p_online, p_key in zip(online.parameters(), key.parameters(), strict=True):
                p_key.lerp_(p_online.detach(), 1.0 - m)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_keys(keys)[-len(self.queue) :]  # more keys than slots: keep the newest
        index = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % len(self.queue))

    def contrastive_step(
        self, view0: torch.Tensor, view1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of queries against keys and queue, (B, F) backbone features of ``view0``)."""
        self._momentum_update()
        features, queries = self.embed(view0)
        with torch.no_grad():
            keys = self.key_head(self.key_backbone(view1))
        loss = self.criterion(queries, keys, queue=self.queue.clone().to(queries.dtype))
        self._enqueue(keys)
        return loss, features
