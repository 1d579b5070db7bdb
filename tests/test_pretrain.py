"""End-to-end tests of ``kinfonce pretrain`` on a few hundred digits (tiny backbone, CPU)."""

from __future__ import annotations

import collections
import csv
import json
import signal

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kinfonce.checkpoints import load_checkpoint, load_encoder
from kinfonce.cli import main
from kinfonce.config import PretrainConfig
from kinfonce.errors import DivergedError
from kinfonce.methods import base
from kinfonce.rundir import RUN_DIR_ENV, resolve_run_dir
from kinfonce.tables import format_percent
from kinfonce.train import run_pretrain
from tests.helpers import tiny_config, tiny_flags

METRIC_KEYS = ("linear_top1", "knn_top1", "random_encoder_linear_top1", "raw_pixels_linear_top1")


def state_of(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


class InitialWeights(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.backbone = {k: v.detach().clone() for k, v in pl_module.backbone.named_parameters()}


class HostReads(L.Callback):
    """Counts the operations that read a tensor's value back to the host within each training
    step (on a GPU each one waits for all queued work)."""

    READS = frozenset({"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        reads = self.reads = collections.Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in HostReads.READS:
                    reads[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)
        self.counts = [*getattr(self, "counts", []), dict(self.reads)]


@pytest.mark.parametrize(
    ("method", "loss", "out_dim"),
    [("simclr", "concat-sum", 256), ("moco", "simple-sum", 128)],
)
def test_pretrain_end_to_end(tmp_path, method, loss, out_dim):
    config = tiny_config(
        tmp_path, method=method, loss=loss, epochs=2, baselines=True, eval_linear_epochs=20
    )
    snapshot, reads = InitialWeights(), HostReads()
    metrics = run_pretrain(config, callbacks=[snapshot, reads])
    # the steps read nothing back (the loss was checked for finiteness five times per step)
    assert reads.counts == [{}] * 8
    run = tmp_path / "run"
    # Catches pretraining that does not learn (or evaluates the wrong encoder): a random
    # encoder already reaches 0.72 here, so only a margin over the random-weight copy measured
    # in the same run shows learning (measured: 0.82 against 0.72 for both methods).
    assert metrics["linear_top1"] > metrics["random_encoder_linear_top1"] + 0.02
    assert metrics["linear_top5"] >= metrics["linear_top1"]
    assert json.loads((run / "metrics.json").read_text()) == metrics  # floats round-trip exactly
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"] == loss
    assert (run / "curves.png").stat().st_size > 0
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    assert {int(r["epoch"]) for r in rows if r["train_loss"]} == {0, 1}
    assert {int(r["epoch"]) for r in rows if r["probe_top1"]} == {0, 1}
    assert all(
        torch.isfinite(torch.tensor(float(r["train_loss"]))) for r in rows if r["train_loss"]
    )

    state = state_of(run / "checkpoints" / "last.ckpt")  # weights_only=True inside
    assert state["head.3.weight"].shape[0] == out_dim
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert not (run / "checkpoints" / "interrupted.ckpt").exists()
    backbone, stored = load_encoder(run / "checkpoints" / "last.ckpt")
    assert stored["method"] == method and stored["data"]["channels"] == 1
    # Catches a backbone that is frozen or not saved: every trained parameter tensor moved
    # (parameters only; batch-norm running statistics change without any training).
    unmoved = [
        name
        for name, value in backbone.named_parameters()
        if torch.equal(value, snapshot.backbone[name])
    ]
    assert unmoved == [], f"pretraining left these backbone parameters unchanged: {unmoved}"
    if method == "moco":
        assert not torch.equal(state["key_backbone.conv1.weight"], state["backbone.conv1.weight"])


def test_cli_pretrain_prints_baselines(tmp_path, capsys):
    code = main(
        ["pretrain", *tiny_flags(loss="gaussian", baselines=True),
         "--output-dir", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "random-weight encoder" in out and "raw pixels" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loss"] == "gaussian"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (*METRIC_KEYS, "wall_time_s", "epochs"):
        assert key in metrics
    # Catches a printed table that shows other numbers than the saved ones.
    for key in METRIC_KEYS:
        assert format_percent(metrics[key]) in out, key


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = tiny_config(tmp_path / "a", epochs=2)
    run_pretrain(straight)
    stopped = tiny_config(tmp_path / "b", epochs=2)
    run_pretrain(stopped, callbacks=[StopAfterFirstEpoch()])
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")["epoch"] == 0
    run_pretrain(stopped, resume="last")
    # The CSV log keeps the epoch before the resume (Lightning's logger starts afresh).
    rows = csv.DictReader((tmp_path / "b" / "run" / "logs" / "metrics.csv").open())
    assert {int(r["epoch"]) for r in rows if r["train_loss"]} == {0, 1}
    final_a = state_of(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt")
    final_b = state_of(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-6, msg=key)
    # The resumed run refuses a changed configuration and says what differs.
    with pytest.raises(ValueError, match=r"lr: checkpoint has 1\.0, now 0\.5"):
        run_pretrain(tiny_config(tmp_path / "b", epochs=2, lr=0.5), resume="last")


class InterruptMidEpoch(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise KeyboardInterrupt


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns Ctrl-C into sys.exit(1); run_pretrain raises the KeyboardInterrupt
        # again, so that the command exits 130 (issue 21, point 7)
        with pytest.raises(KeyboardInterrupt):
            run_pretrain(config, callbacks=[InterruptMidEpoch()])
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT after an interrupt
    interrupted = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    assert load_checkpoint(interrupted)["global_step"] == 3
    with pytest.raises(ValueError, match="already holds a run"):
        run_pretrain(config)
    metrics = run_pretrain(config, resume="last")
    assert 0.0 <= metrics["linear_top1"] <= 1.0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_run_dir_name_is_inherited_only_by_ddp_workers(monkeypatch):
    """A second run in one process gets its own directory; a DDP worker shares its launcher's."""
    monkeypatch.setenv(RUN_DIR_ENV, "runs/pretrain/earlier-run")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_run_dir(PretrainConfig()).name != "earlier-run"
    monkeypatch.setenv(RUN_DIR_ENV, "runs/pretrain/launcher-run")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_run_dir(PretrainConfig()).name == "launcher-run"


def test_quiet_lightning_is_scoped():
    # Catches a global side effect: the logger level and matmul precision must come back, and
    # a handled warning is silenced inside the block only.
    import logging
    import warnings

    from kinfonce.train import quiet_lightning

    logger = logging.getLogger("lightning.pytorch")
    before = (logger.level, torch.get_float32_matmul_precision())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning("auto"):
            assert logger.getEffectiveLevel() == logging.WARNING
            warnings.warn(
                "The 'train_dataloader' does not have many workers", UserWarning, stacklevel=2
            )
        warnings.warn(
            "The 'train_dataloader' does not have many workers", UserWarning, stacklevel=2
        )
    assert len(caught) == 1
    assert (logger.level, torch.get_float32_matmul_precision()) == before


def test_spectral_preset_trains_at_the_default_learning_rate(tmp_path):
    # Catches a spectral preset that diverges at the default LARS lr 1.0 (without its norm cap,
    # the loss was non-finite within the first epoch) or does not learn: it must end above the
    # random-weight encoder measured in the same run. Measured over seeds 0-7 at these settings
    # with the default cap (mu 3; docs/benchmarks.md): linear and kNN above random in 8 of 8;
    # seed 0 gave linear 0.936 against 0.881 and kNN 0.928 against 0.875.
    config = tiny_config(
        tmp_path,
        seed=0,
        loss="spectral",
        train_subset=512,
        batch_size=64,
        epochs=15,
        warmup_epochs=1,
        baselines=True,
        eval_linear_epochs=20,
    )
    assert config.lr == 1.0
    metrics = run_pretrain(config)
    assert metrics["linear_top1"] > metrics["random_encoder_linear_top1"]
    assert metrics["knn_top1"] > metrics["random_encoder_knn_top1"]


class PoisonLoss(L.Callback):
    """From a given step on, the loss is NaN (as after a divergence)."""

    def __init__(self, from_step: int):
        self.from_step = from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.from_step:

            class Poisoned(nn.Module):
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def forward(self, z0, z1, queue=None):
                    return self.inner(z0, z1, queue=queue) * float("nan")

            pl_module.criterion = Poisoned(pl_module.criterion)


def test_non_finite_loss_stops_the_run_naming_the_first_bad_step(tmp_path, monkeypatch):
    """The step records a non-finite loss without waiting for it; the check (every few steps and
    at the end of each epoch) stops the run before validation and checkpoints, and names the step
    it went wrong at. A check that never fires, fires late with a later step, or lets NaN
    weights into a checkpoint fails here."""
    monkeypatch.setattr(base, "DIVERGENCE_CHECK_EVERY", 3)  # 4 steps per epoch: checked at 3
    config = tiny_config(tmp_path, epochs=2)
    with pytest.raises(DivergedError, match=r"loss was not finite at training step 1 \(epoch 0\)"):
        run_pretrain(config, callbacks=[PoisonLoss(from_step=1)])
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # no NaN weights saved, not even on exit


class FirstLearningRate(L.Callback):
    """The optimiser's learning rate at the first training step of a fit."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "lr"):
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.step = trainer.global_step


def test_finished_run_trains_longer_with_a_stretched_schedule(tmp_path):
    # Catches a finished run that cannot be extended (--resume with more --epochs was refused
    # as a changed config), an extension that loses the earlier epochs' log, and a schedule
    # that silently continues at 0 instead of being recomputed over the new length.
    import math

    from kinfonce.optim import warmup_cosine

    run_pretrain(tiny_config(tmp_path, epochs=2))
    first = FirstLearningRate()
    run_pretrain(tiny_config(tmp_path, epochs=3), resume="last", callbacks=[first])
    run = tmp_path / "run"
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["epoch"] == 2  # Lightning counts from 0: the third epoch
    assert checkpoint["kinfonce"]["config"]["epochs"] == 3
    rows = csv.DictReader((run / "logs" / "metrics.csv").open())
    assert {int(r["epoch"]) for r in rows if r.get("train_loss")} == {0, 1, 2}
    steps_per_epoch = first.step // 2
    want = 1.0 * warmup_cosine(3 * steps_per_epoch, 0)(first.step)
    assert first.lr > 0 and math.isclose(first.lr, want, rel_tol=1e-6)
    # Fewer epochs than were trained is still a changed configuration.
    with pytest.raises(ValueError, match="epochs"):
        run_pretrain(tiny_config(tmp_path, epochs=1), resume="last")


def test_config_yaml_records_the_run_and_runs_it_again(tmp_path, capsys):
    # Issue 19: a default run's config.yaml stored null loss parameters, channels_last and
    # proj_out_dim (five places filled them in); now it is the resolved configuration, which
    # given back with --config reproduces the run's metrics at the same seed.
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["pretrain", *tiny_flags(), "--output-dir", str(first)]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["command"] == "pretrain" and saved["accelerator"] != "auto"
    for name in ("temperature1", "temperature2", "lam", "channels_last", "proj_out_dim"):
        assert saved[name] is not None, name
    config = str(first / "config.yaml")
    assert main(["pretrain", "--config", config, "--output-dir", str(second)]) == 0
    assert yaml.safe_load((second / "config.yaml").read_text()) == {
        **saved,
        "output_dir": str(second),
    }
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (first, second)]
    for key in ("linear_top1", "linear_top5", "knn_top1", "knn_top5", "final_train_loss"):
        assert metrics[1][key] == metrics[0][key], key
    record = metrics[0]["run"]
    assert record["torch"] == torch.__version__ and record["lightning"] == L.__version__
    assert record["kinfonce"] and record["device"].startswith(saved["accelerator"])
