"""Data-parallel SimCLR on two CPU processes (gloo) equals one process on the full batch.

Two kinds of randomness are taken out, so that only float32 summation order separates them:

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
from kinfonce.data.batches import PretrainData
from kinfonce.errors import DivergedError
from kinfonce.methods import MoCo, SimCLR
from kinfonce.methods.base import data_description
from kinfonce.resolve import build_loss, resolve

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


class MirrorViews(nn.Module):
    """Deterministic views: the normalised image and its mirror image."""

    def __init__(self, mean, std):
        super().__init__()
        self.transform = EvalTransform(mean, std)

    def pair(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(batch)
        return x, x.flip(-1)


def without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)
    return module


def without_gather(module: SimCLR) -> SimCLR:
    """The negative control: each process keeps only its own negatives (a real DDP bug)."""
    module.criterion = build_loss(module.config, gather_distributed=False)
    return module


#: Per-tensor relative difference of the parameter updates allowed between one process and
#: two. float32 sums the gradients in another order on two processes: measured 6.7e-6 with
#: SGD on this model. Dropping the cross-process gather gives 0.12, and summing instead of
#: averaging gradients gives 1.0; 1e-3 lies between noise and either bug.
UPDATE_TOLERANCE = 1e-3


def cpu_trainer(devices: int, strategy) -> L.Trainer:
    """One epoch on ``devices`` CPU processes, no validation, logs or checkpoints."""
    return L.Trainer(
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


def fit(module: SimCLR, data: PretrainData, devices: int, strategy: str) -> float:
    trainer = cpu_trainer(devices, strategy)
    trainer.fit(module, datamodule=data)
    return float(trainer.callback_metrics["train_loss"])


def worst_update_difference(
    initial: dict[str, torch.Tensor], reference: nn.Module, other: nn.Module
) -> tuple[float, str]:
    """max over parameter tensors of ||Δ_other - Δ_ref|| / ||Δ_ref||, and the tensor's name.

    Parameters only: buffers (batch-norm statistics, step counters) are not trained.
    """
    worst, name = 0.0, ""
    others = dict(other.named_parameters())
    for key, value in reference.named_parameters():
        delta_ref = value.detach() - initial[key]
        delta_other = others[key].detach() - initial[key]
        relative = float((delta_other - delta_ref).norm() / delta_ref.norm().clamp_min(1e-30))
        if relative > worst:
            worst, name = relative, key
    return worst, name


def test_two_processes_match_one_process_on_the_full_batch():
    # SGD, not LARS: LARS normalises each layer's update and would hide a wrong gradient scale.
    config = resolve(
        PretrainConfig(
            train_subset=128,
            batch_size=32,
            proj_hidden_dim=64,
            optimizer="sgd",
            lr=0.1,
            warmup_epochs=0,
        )
    )
    splits = load_dataset("digits").with_train_subset(128, seed=0)
    torch.manual_seed(0)
    single = without_batchnorm(SimCLR(config, data_description(splits)))
    single.views = MirrorViews(splits.mean, splits.std)
    initial = {k: v.detach().clone() for k, v in single.named_parameters()}
    parallel = copy.deepcopy(single)
    control = without_batchnorm(without_gather(SimCLR(config, data_description(splits))))
    control.load_state_dict(single.state_dict())
    control.views = MirrorViews(splits.mean, splits.std)

    def data() -> PretrainData:
        return PretrainData(splits, config.batch_size, config.seed)

    loss_single = fit(single, data(), devices=1, strategy="auto")
    loss_parallel = fit(parallel, data(), devices=2, strategy="ddp_fork")
    fit(control, data(), devices=2, strategy="ddp_fork")

    assert all(
        (value.detach() - initial[key]).norm() > 0 for key, value in single.named_parameters()
    ), "training left a parameter tensor unchanged; its comparison would be empty"
    assert loss_parallel == pytest.approx(loss_single, rel=1e-4)
    worst, name = worst_update_difference(initial, single, parallel)
    assert worst < UPDATE_TOLERANCE, f"{name}: updates differ by {worst:.2e} (relative)"
    # The same check must reject a run whose processes do not share negatives.
    worst_control, _ = worst_update_difference(initial, single, control)
    assert worst_control > 10 * UPDATE_TOLERANCE, (
        f"the check cannot see a missing gather (relative difference {worst_control:.2e})"
    )


class DivergesOnRankOne(MoCo):
    """Rank 1's loss is NaN at its first step, and only there: MoCo's queries are not gathered,
    so no other rank's loss sees it, and the NaN is added without a gradient, so the averaged
    gradients stay finite. Each rank that stops notes it in ``records`` before raising."""

    records = None  # set per test (inherited by the forked processes)

    def contrastive_step(self, *inputs):
        loss, features = super().contrastive_step(*inputs)
        if self.global_rank == 1 and self.global_step == 0:
            loss = loss + torch.tensor(float("nan"))
        return loss, features

    def check_finite_loss(self) -> None:
        try:
            super().check_finite_loss()
        except DivergedError as err:
            (self.records / f"rank{self.global_rank}").write_text(str(err))
            torch.distributed.barrier()  # both notes written before either process exits
            raise


def test_divergence_on_one_rank_stops_every_rank(tmp_path):
    """A non-finite loss seen on one rank only must stop every rank with a DivergedError naming
    that step. Kept as a module buffer, the record was overwritten by rank 0's (DDP broadcasts
    buffers before each forward), so the run went on with a NaN behind it; and a rank that
    stopped alone left the others waiting in their next collective."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    config = resolve(
        PretrainConfig(
            method="moco", train_subset=128, batch_size=32, proj_hidden_dim=32, queue_size=64,
            warmup_epochs=0, epochs=1,
        )
    )  # fmt: skip
    splits = load_dataset("digits").with_train_subset(128, seed=0)
    module = DivergesOnRankOne(config, data_description(splits))
    DivergesOnRankOne.records = tmp_path
    trainer = cpu_trainer(2, DDPStrategy(start_method="fork", timeout=timedelta(seconds=60)))
    with pytest.raises(Exception, match="DivergedError"):
        trainer.fit(module, datamodule=PretrainData(splits, config.batch_size, config.seed))
    for rank in (0, 1):
        note = tmp_path / f"rank{rank}"
        assert note.is_file(), f"rank {rank} did not stop"
        assert "not finite at training step 0" in note.read_text()


def test_cpu_time_counts_every_rank(tmp_path):
    """``cpu_time_s`` of a run on two forked processes counts their training, not only the
    main process's (which waits while they train): it counted rank 0 alone, 1.24 s against
    7.29 s of training on two processes. The processes' own CPU time is what the operating
    system charged to the children this run forked."""
    import os

    from kinfonce.train import run_pretrain
    from tests.helpers import tiny_config

    config = tiny_config(tmp_path, accelerator="cpu", devices="2", strategy="ddp_fork", epochs=2)
    before = os.times()
    metrics = run_pretrain(config)
    after = os.times()
    own = after.user + after.system - before.user - before.system
    children = sum(after[2:4]) - sum(before[2:4])
    assert children > 0.2, "the forked ranks did no measurable work; the check would be empty"
    # every rank's training, and the main process's work outside it, none twice
    assert own + 0.5 * children < metrics["cpu_time_s"] <= 1.05 * (own + children)
