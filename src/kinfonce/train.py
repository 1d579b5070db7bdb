"""``kinfonce pretrain``: set up and run a pretraining job, then evaluate it.

One function, :func:`run_training`, takes a configuration through the whole job:
checks, data, the method's LightningModule, a Lightning
Trainer (progress bar, CSV and TensorBoard logs, a checkpoint every epoch, a
checkpoint on Ctrl-C or a crash), the final evaluation of the frozen backbone beside
two baselines measured in the same run, and the run directory::

    RUN_DIR/config.yaml   RUN_DIR/metrics.json   RUN_DIR/curves.png
    RUN_DIR/checkpoints/{last,best,interrupted}.ckpt   RUN_DIR/logs/

Resuming (``resume=``) continues from a checkpoint of the same configuration. The
sampler is seeded per epoch and the views per step, so a run resumed at an epoch
boundary ends with the same weights as an uninterrupted one.

What differs between kinds of runs (their checks, module, data and final evaluation) is
a :class:`TrainingJob`: :func:`run_pretrain` runs :data:`PRETRAIN_JOB`, and
``kinfonce clip`` its own job (:mod:`kinfonce.clip`) through the same function.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from kinfonce.config import (
    PretrainConfig,
    TrainConfig,
    config_differences,
    config_from_mapping,
    dump_config,
)
from kinfonce.data import DatasetSplits, load_dataset
from kinfonce.data.batches import PretrainData, check_batch_size
from kinfonce.errors import DivergedError, KinfonceError, MissingFileError
from kinfonce.evaluate import evaluate_baselines
from kinfonce.kernel_lse import PATHS
from kinfonce.losses import LOSS_PRESETS
from kinfonce.methods import METHODS, PretrainMethod, load_checkpoint
from kinfonce.methods.base import CHECKPOINT_KEY, data_description
from kinfonce.models import BACKBONES
from kinfonce.optim import OPTIMIZERS
from kinfonce.report import merge_csv_log, plot_run_curves, read_csv_log

#: Environment variable that hands the run directory to DDP worker processes, which
#: Lightning starts by re-running the same command.
RUN_DIR_ENV = "KINFONCE_RUN_DIR"


def check_choices(config: PretrainConfig) -> None:
    """Raise a KinfonceError listing the valid names for an unknown choice or a bad number."""
    if config.method not in METHODS:
        raise KinfonceError(f"method must be one of {sorted(METHODS)}, got {config.method!r}")
    check_common_choices(config)


def check_common_choices(config: TrainConfig) -> None:
    """:func:`check_choices` for the fields every training command shares."""
    for field, value, valid in (
        ("backbone", config.backbone, BACKBONES),
        ("loss", config.loss, LOSS_PRESETS),
        ("optimizer", config.optimizer, OPTIMIZERS),
        ("loss_path", config.loss_path, PATHS),
    ):
        if value not in valid:
            raise KinfonceError(f"{field} must be one of {sorted(valid)}, got {value!r}")
    for field in (
        "epochs",
        "batch_size",
        "proj_hidden_dim",
        "eval_linear_epochs",
        "eval_knn_k",
        "num_nodes",
    ):
        if getattr(config, field) < 1:
            raise KinfonceError(f"{field} must be >= 1, got {getattr(config, field)}")
    if not 0.0 < config.val_fraction < 1.0:
        raise KinfonceError(
            f"val_fraction must be in (0, 1): the online probe needs a validation split, "
            f"got {config.val_fraction}"
        )


def resolve_run_dir(config: TrainConfig, command: str = "pretrain") -> Path:
    """The run directory: ``output_dir``, else a new time-stamped one.

    New ones are ``runs/<command>/<dataset>-<method>-<loss>-<time>`` (the method of a
    command without methods is the command). A DDP worker (``LOCAL_RANK`` set) takes the
    name its launcher handed on through :data:`RUN_DIR_ENV` (see :func:`shared_with_workers`).
    """
    if config.output_dir:
        return Path(config.output_dir)
    if RUN_DIR_ENV in os.environ and "LOCAL_RANK" in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    method = getattr(config, "method", command)
    name = f"{config.dataset.split(':')[0]}-{method}-{config.loss}-{stamp}"
    return Path("runs") / command / name


@contextlib.contextmanager
def shared_with_workers(run_dir: Path, world_size: int) -> Iterator[None]:
    """Hand ``run_dir`` to the DDP workers Lightning starts (by re-running the command) through
    :data:`RUN_DIR_ENV`, only while they start and only with more than one process; the
    variable's earlier state is restored afterwards."""
    if world_size == 1 or "LOCAL_RANK" in os.environ:
        yield
        return
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``resume`` itself, or the newest of the run's
    ``interrupted.ckpt`` and ``last.ckpt`` when ``resume == "last"``.
    """
    if resume is None:
        return None
    if resume != "last":
        return Path(resume)
    candidates = [run_dir / "checkpoints" / n for n in ("interrupted.ckpt", "last.ckpt")]
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        raise MissingFileError(
            f"nothing to resume in {str(run_dir)!r}: no checkpoints/last.ckpt; pass the "
            "--output-dir of an earlier run"
        )
    return max(existing, key=lambda path: path.stat().st_mtime)


def check_resumable(checkpoint_path: Path, config: TrainConfig) -> None:
    """Refuse a checkpoint written with another configuration, naming the differences."""
    saved = load_checkpoint(checkpoint_path)[CHECKPOINT_KEY]["config"]
    try:
        saved = config_from_mapping(saved, cls=type(config)).resolved().to_dict()
    except KinfonceError as err:
        raise KinfonceError(
            f"cannot resume from {str(checkpoint_path)!r}: it was written by another kind of "
            f"run ({err})"
        ) from None
    differences = config_differences(saved, config.to_dict())
    if differences:
        raise KinfonceError(
            f"cannot resume from {str(checkpoint_path)!r}: it was written with another "
            f"configuration ({'; '.join(differences)}). Pass the same settings, e.g. "
            "--config RUN_DIR/config.yaml"
        )


class ResumableExceptionCheckpoint(OnExceptionCheckpoint):
    """Saves ``interrupted.ckpt`` when the run stops on an exception (Ctrl-C, a crash), except
    on a :class:`DivergedError`: its weights went through steps with a non-finite loss, and
    the run would diverge again from them."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not isinstance(exception, DivergedError):
            super().on_exception(trainer, pl_module, exception)


def make_trainer(
    config: TrainConfig, run_dir: Path, callbacks: Sequence[L.Callback] = ()
) -> L.Trainer:
    """A Trainer with progress bar, CSV + TensorBoard logs and per-epoch checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    checkpoints = run_dir / "checkpoints"
    devices: str | int = int(config.devices) if config.devices.isdigit() else config.devices
    return L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        sync_batchnorm=config.sync_batchnorm,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=config.progress,
        enable_model_summary=config.progress,
        logger=[
            CSVLogger(run_dir, name="logs", version=""),
            TensorBoardLogger(run_dir, name="logs", version="tensorboard"),
        ],
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoints,
                filename="best",
                monitor="probe_top1",
                mode="max",
                every_n_epochs=1,
                enable_version_counter=False,
            ),
            # Lightning's save_last rewrites last.ckpt only in epochs that also save a best
            # checkpoint; this unmonitored one keeps it at the newest epoch.
            ModelCheckpoint(
                dirpath=checkpoints, filename="last", every_n_epochs=1, enable_version_counter=False
            ),
            ResumableExceptionCheckpoint(dirpath=checkpoints, filename="interrupted"),
            *callbacks,
        ],
    )


@contextlib.contextmanager
def quiet_lightning(accelerator: str) -> Iterator[None]:
    """Keep Lightning's console to what a kinfonce user acts on, for the block only.

    - Its info lines (accelerator banner, product tips, "loading train_dataloader") are
      hidden: the run's own output says what ran. The model summary stays.
    - On CUDA, float32 matrix products may use TF32 (``"high"`` precision), which Lightning
      would otherwise advise in a warning; the previous setting is restored afterwards.
    - Warnings about what kinfonce has handled are silenced: data-loader workers (the data
      set is a uint8 tensor in memory, views are made on the device), the non-empty log and
      checkpoint directories of a resume (the CSV history is merged back by
      :func:`kinfonce.report.merge_csv_log`), ``ckpt_path=None`` read as "last" because of the
      OnExceptionCheckpoint (the run directory is checked first, so nothing is resumed by
      accident), and a deprecation inside Lightning itself.
    """
    logger = logging.getLogger("lightning.pytorch")
    summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    levels, precision = (logger.level, summary.level), torch.get_float32_matmul_precision()
    logger.setLevel(logging.WARNING)
    summary.setLevel(logging.INFO)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    try:
        with warnings.catch_warnings():
            for message in (
                r".*does not have many workers.*",
                r".*(directory|ckpt_path=).*",
                r".*LeafSpec.*",
            ):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.setLevel(levels[0])
        summary.setLevel(levels[1])
        torch.set_float32_matmul_precision(precision)


@dataclass(frozen=True)
class TrainingJob:
    """What one kind of training run adds to the machinery of :func:`run_training`.

    Attributes:
        command: the ``kinfonce`` command ("pretrain", "clip"): names run directories and
            the resume hint.
        check: raises a KinfonceError for an invalid configuration, before anything else.
        build: (resolved config, data splits) -> (LightningModule, data module).
        evaluate: (trained module, splits, config, device) -> final metrics.
    """

    command: str
    check: Callable[[Any], None]
    build: Callable[[Any, DatasetSplits], tuple[PretrainMethod, PretrainData]]
    evaluate: Callable[[Any, DatasetSplits, Any, str], dict[str, Any]]


def _build_pretrain(
    config: PretrainConfig, splits: DatasetSplits
) -> tuple[PretrainMethod, PretrainData]:
    module = METHODS[config.method](config, data_description(splits))
    return module, PretrainData(splits, config.batch_size, config.seed)


def _evaluate_pretrain(
    module: PretrainMethod, splits: DatasetSplits, config: PretrainConfig, device: str
) -> dict[str, Any]:
    return evaluate_baselines(module.backbone, splits, config, device)


#: ``kinfonce pretrain``: SimCLR or MoCo, evaluated beside the two baselines.
PRETRAIN_JOB = TrainingJob("pretrain", check_choices, _build_pretrain, _evaluate_pretrain)

#: Metrics logged during training that ``metrics.json`` keeps as ``final_<name>``.
FINAL_LOGGED = ("train_loss", "probe_top1", "val_zero_shot_top1")


def load_training_splits(config: TrainConfig) -> DatasetSplits:
    """The data set of a run, with its seeded training subset."""
    splits = load_dataset(
        config.dataset,
        root=config.data_root,
        download=config.download,
        val_fraction=config.val_fraction,
        seed=config.seed,
        unlabeled=config.unlabeled,
    )
    return splits.with_train_subset(config.train_subset, config.seed)


def run_pretrain(
    config: PretrainConfig,
    *,
    resume: str | None = None,
    callbacks: Sequence[L.Callback] = (),
    evaluate: bool = True,
) -> dict[str, Any]:
    """Pretrain, evaluate and write the run directory: :func:`run_training` of :data:`PRETRAIN_JOB`."""
    return run_training(config, PRETRAIN_JOB, resume=resume, callbacks=callbacks, evaluate=evaluate)


def run_training(
    config: TrainConfig,
    job: TrainingJob,
    *,
    resume: str | None = None,
    callbacks: Sequence[L.Callback] = (),
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and write the run directory.

    Args:
        config: the configuration (data-set defaults are filled in here).
        job: what the kind of run checks, builds and evaluates.
        resume: None, ``"last"`` (the run's newest checkpoint) or a checkpoint path.
        callbacks: extra Lightning callbacks, e.g. early stopping.
        evaluate: run the final linear-probe and kNN evaluation (a search's trials, judged
            by the online probe, skip it).

    Returns:
        The metrics written to ``metrics.json`` (empty on DDP ranks other than 0).

    Raises:
        KinfonceError: unknown names, impossible batch sizes, a checkpoint of another
            configuration, a run directory that already holds a run.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    config = config.resolved()
    job.check(config)
    run_dir = resolve_run_dir(config, job.command)
    checkpoint = resume_checkpoint(run_dir, resume)
    if checkpoint is not None:
        check_resumable(checkpoint, config)
    elif any((run_dir / "checkpoints" / n).exists() for n in ("last.ckpt", "interrupted.ckpt")):
        raise KinfonceError(
            f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose "
            "another --output-dir"
        )
    L.seed_everything(config.seed, verbose=False)
    splits = load_training_splits(config)
    csv_log = run_dir / "logs" / "metrics.csv"
    earlier_log = read_csv_log(csv_log) if checkpoint is not None else []
    with quiet_lightning(config.accelerator):
        trainer = make_trainer(config, run_dir, callbacks)
    check_batch_size(config.batch_size, splits.pretraining_size, trainer.world_size)
    module, data = job.build(config, splits)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    fit_started = time.perf_counter()
    try:
        with quiet_lightning(config.accelerator), shared_with_workers(run_dir, trainer.world_size):
            trainer.fit(module, datamodule=data, ckpt_path=checkpoint, weights_only=True)
    except SystemExit:  # Lightning exits after saving interrupted.ckpt on Ctrl-C
        if trainer.is_global_zero:
            print(
                f"interrupted; continue with: kinfonce {job.command} --output-dir {run_dir} "
                "--resume",
                file=sys.stderr,
            )
        raise
    finally:  # the logger emptied metrics.csv on resume: put the earlier epochs back, always
        if trainer.is_global_zero:
            merge_csv_log(csv_log, earlier_log)
    pretrain_time = time.perf_counter() - fit_started
    if not trainer.is_global_zero:
        return {}
    metrics = {}
    if evaluate:
        eval_started = time.perf_counter()
        # Lightning moved the module back to the CPU when fit ended: evaluate where it trained
        device = str(trainer.strategy.root_device)
        metrics = job.evaluate(module, splits, config, device)
        metrics["evaluation_time_s"] = time.perf_counter() - eval_started
    logged = trainer.callback_metrics
    for key in FINAL_LOGGED:
        if key in logged:
            metrics[f"final_{key}"] = float(logged[key])
    metrics.update(
        epochs=config.epochs,
        train_images=len(splits.train),
        pretrain_time_s=pretrain_time,
        wall_time_s=time.perf_counter() - started,
        # CPU time of all threads: on a busy machine, a better gauge of the work than wall time.
        cpu_time_s=time.process_time() - cpu_started,
        run_dir=str(run_dir),
    )
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_run_curves(run_dir, run_dir / "curves.png")
    return metrics
