"""SimCLR with a Kernel-InfoNCE loss (paper Algorithm 1 and 2, Appendix B)."""

from __future__ import annotations

import torch

from kinfonce.methods.base import PretrainMethod


class SimCLR(PretrainMethod):
    """Two views through one encoder; the other 2N - 2 embeddings of the batch (of all
    processes, under DDP) are the negatives.
    """

    def contrastive_step(
        self, view0: torch.Tensor, view1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of the pair batch, (B, F) backbone features of ``view0``)."""
        features, projections = self.embed(torch.cat([view0, view1]))
        z0, z1 = projections.chunk(2)
        return self.criterion(z0, z1), features[: len(view0)]
