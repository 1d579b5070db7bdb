"""Data-parallel SimCLR on two CPU processes (gloo) equals one process on the full batch.

Two kinds of randomness are taken out so that the comparison is exact:

* batch norm: per-process batch statistics differ from full-batch ones, and torch's
  SyncBatchNorm runs on GPUs only, so batch-norm layers are replaced by identities;
* views: each process seeds its views by rank, so a deterministic view maker (the image,
  then its mirror image) replaces the random one.

What remains is what DDP must get right: the sharded sampler, the negatives gathered
across processes (with gradient) and the averaged gradients.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn

from kinfonce.config import PretrainConfig
from kinfonce.data import load_dataset
from kinfonce.data.augment import EvalTransform
from kinfonce.methods import SimCLR
from kinfonce.train import PretrainData, data_description

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


class MirrorViews(nn.Module):
    """Deterministic views: odd calls give the normalised image, even calls its mirror."""

    def __init__(self, mean, std):
        super().__init__()
        self.transform = EvalTransform(mean, std)
        self.calls = 0

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.transform(batch)
        return x.flip(-1) if self.calls % 2 == 0 else x


def without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)
    return module


def fit(module: SimCLR, data: PretrainData, devices: int, strategy: str) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    return float(trainer.callback_metrics["train_loss"])


def test_two_processes_match_one_process_on_the_full_batch():
    config = PretrainConfig(
        train_subset=128, batch_size=32, proj_hidden_dim=64, lr=1.0, warmup_epochs=0
    ).resolved()
    splits = load_dataset("digits").with_train_subset(128, seed=0)
    torch.manual_seed(0)
    single = without_batchnorm(SimCLR(config, data_description(splits)))
    single.views = MirrorViews(splits.mean, splits.std)
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    parallel = copy.deepcopy(single)
    data = PretrainData(splits, config.batch_size, config.seed)

    loss_single = fit(single, data, devices=1, strategy="auto")
    loss_parallel = fit(parallel, PretrainData(splits, config.batch_size, config.seed),
                        devices=2, strategy="ddp_fork")  # fmt: skip

    assert loss_parallel == pytest.approx(loss_single, rel=1e-5)
    moved = 0
    for key, value in single.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[key], value, rtol=1e-4, atol=1e-6)
        moved += not torch.equal(value, initial[key])
    assert moved > 10, "training changed (almost) no weights; the comparison would be empty"
