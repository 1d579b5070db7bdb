"""``kinfonce pretrain``: set up and run a pretraining job, then evaluate it.

One function, :func:`run_training`, takes a configuration through the whole job: its
resolution into the one configuration the run uses (:func:`kinfonce.resolve.resolve`, which
checks every setting before anything is written), the run directory's lock, data,
the method's LightningModule, a Lightning Trainer (progress bar, TensorBoard logs, the
per-epoch CSV log, a checkpoint every epoch and one on Ctrl-C or a crash, all written
atomically), the final evaluation of the frozen backbone beside two baselines measured in
the same run, and the run directory::

    RUN_DIR/config.yaml   RUN_DIR/metrics.json   RUN_DIR/curves.png   RUN_DIR/.lock
    RUN_DIR/checkpoints/{last,best,interrupted}.ckpt   RUN_DIR/logs/metrics.csv

Resuming (``resume=``) continues from the furthest readable checkpoint of the same
configuration. The sampler is seeded per epoch and the views per step, so a run resumed
at an epoch boundary ends with the same weights as an uninterrupted one on a CPU (bit for
bit, tested); on a GPU only up to floating-point noise, since some CUDA kernels (cuDNN's
convolutions, atomic additions in backward passes) sum in a varying order unless PyTorch's
deterministic algorithms are on, which kinfonce does not turn on.

What differs between kinds of runs (their module, data and final evaluation) is a
:class:`TrainingJob`: :func:`run_pretrain` runs :data:`PRETRAIN_JOB`, and ``kinfonce clip``
its own job (:mod:`kinfonce.clip`) through the same function. The random generators are
seeded for the run and restored afterwards (:func:`kinfonce.scoped.seeded`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kinfonce.checkpoints import (
    AtomicCheckpointIO,
    check_resumable,
    describe_resume,
    resume_checkpoint,
    trained_epochs,
)
from kinfonce.config import PretrainConfig, TrainConfig, dump_config
from kinfonce.data import DatasetSplits, load_dataset
from kinfonce.data.batches import PretrainData, check_batch_size
from kinfonce.epochlog import EpochLog, find_epoch_log, read_epoch_curves
from kinfonce.errors import DivergedError, KinfonceError, Terminated
from kinfonce.evaluate import evaluate_baselines
from kinfonce.fileio import UNWRITABLE, write_text_atomic
from kinfonce.methods import PretrainMethod, method_class
from kinfonce.methods.base import data_description
from kinfonce.plots import CURVE_PANELS, plot_curve_panels
from kinfonce.resolve import check_machine, resolve
from kinfonce.runclock import RunClock, run_times
from kinfonce.rundir import (
    check_run_dir_free,
    claim_run_dir,
    resolve_run_dir,
    run_record,
    set_aside_stale_eval,
    shared_with_workers,
)
from kinfonce.scoped import matmul_precision, progress_bars, seeded
from kinfonce.tables import format_percent


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar without the logger's version (``v_num``, which would show the
    end of the TensorBoard directory's name), with accuracies in percent as the summary
    tables print them."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {
            key: format_percent(float(value)) if key.endswith("top1") else value
            for key, value in items.items()
        }


class ResumableExceptionCheckpoint(OnExceptionCheckpoint):
    """Saves ``interrupted.ckpt`` when the run stops on an exception (Ctrl-C, SIGTERM, a
    crash), except on a :class:`DivergedError` (its weights went through steps with a
    non-finite loss, and the run would diverge again from them) and before the first step
    (nothing trained yet: a checkpoint would make a run that never started look like one).

    When the checkpoint itself cannot be written (the disk that failed the run is full), a
    warning says so and the exception that stopped the run propagates, not this one.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if isinstance(exception, DivergedError) or trainer.global_step == 0:
            return
        try:
            super().on_exception(trainer, pl_module, exception)
        except (OSError, KinfonceError) as err:
            warnings.warn(f"{self.ckpt_path} was not written: {err}", stacklevel=2)


class MovableModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose record survives a moved or copied run directory.

    Lightning reloads the best score and the kept paths only when the checkpoint directory
    is the one recorded; after a move it warns and starts with no best score, so that the
    next epoch becomes ``best.ckpt`` however it scores. Here the recorded paths are read as
    the same names under the new directory, and the best score is kept.
    """

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, so that checkpoints written before keep their record."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is None or self.dirpath is None or old == self.dirpath:
            super().load_state_dict(state_dict)
            return

        def moved(path: Any) -> Any:
            if not path:
                return path
            try:
                return str(Path(self.dirpath) / Path(path).relative_to(old))
            except ValueError:  # not under the old directory: kept as it is
                return path

        state = {key: moved(value) if key.endswith("_path") else value
                 for key, value in state_dict.items()}  # fmt: skip
        state["best_k_models"] = {
            moved(path): score for path, score in state_dict.get("best_k_models", {}).items()
        }
        super().load_state_dict({**state, "dirpath": self.dirpath})


def make_strategy(config: TrainConfig) -> str | Strategy:
    """Lightning's ``strategy`` of ``config``, where it starts a process group (DDP and its
    variants, and what Lightning's ``auto`` picks for several processes: ``ddp``) with
    ``ddp_timeout`` as the group's timeout; any other name as it is."""
    name = config.strategy
    if name == "auto" and (config.num_nodes > 1 or _device_count(config) > 1):
        name = "ddp"
    if name not in StrategyRegistry or not issubclass(
        StrategyRegistry[name]["strategy"], DDPStrategy
    ):
        return name
    entry = StrategyRegistry[name]
    timeout = datetime.timedelta(seconds=config.ddp_timeout)
    return entry["strategy"](**{**entry["init_params"], "timeout": timeout})


def _device_count(config: TrainConfig) -> int:
    """Devices per node that ``devices`` names (``auto`` and -1: every GPU, or one CPU)."""
    if config.devices in ("auto", "-1"):
        gpus = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpus else 1
    if config.devices.isdigit():
        return int(config.devices)
    return len([index for index in config.devices.split(",") if index])


def make_trainer(
    config: TrainConfig, run_dir: Path, callbacks: Sequence[L.Callback] = ()
) -> L.Trainer:
    """A Trainer with progress bar, TensorBoard and CSV logs and per-epoch checkpoints, all
    checkpoints written through :class:`~kinfonce.checkpoints.AtomicCheckpointIO`.

    Raises:
        KinfonceError: Lightning cannot use the accelerator, devices, strategy or precision
            here (say, a GPU accelerator on a machine without one).
    """
    checkpoints = run_dir / "checkpoints"
    devices: str | int = int(config.devices) if config.devices.isdigit() else config.devices
    try:
        return L.Trainer(
            max_epochs=config.epochs,
            accelerator=config.accelerator,
            devices=devices,
            num_nodes=config.num_nodes,
            strategy=make_strategy(config),
            precision=config.precision,
            sync_batchnorm=config.sync_batchnorm,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            enable_progress_bar=config.progress,
            enable_model_summary=config.progress,
            logger=TensorBoardLogger(run_dir, name="logs", version="tensorboard"),
            plugins=[AtomicCheckpointIO()],
            callbacks=[
                *([RunProgressBar()] if config.progress else []),
                EpochLog(run_dir / "logs" / "metrics.csv"),
                RunClock(),
                MovableModelCheckpoint(
                    dirpath=checkpoints,
                    filename="best",
                    monitor="probe_top1",
                    mode="max",
                    every_n_epochs=1,
                    enable_version_counter=False,
                ),
                # Lightning's save_last rewrites last.ckpt only in epochs that also save a best
                # checkpoint; this unmonitored one keeps it at the newest epoch.
                MovableModelCheckpoint(
                    dirpath=checkpoints,
                    filename="last",
                    every_n_epochs=1,
                    enable_version_counter=False,
                ),
                ResumableExceptionCheckpoint(dirpath=checkpoints, filename="interrupted"),
                *callbacks,
            ],
        )
    except MisconfigurationException as err:
        raise KinfonceError(
            f"Lightning cannot run with accelerator {config.accelerator!r}, devices "
            f"{config.devices!r}, strategy {config.strategy!r} and precision "
            f"{config.precision!r} here: {err}"
        ) from None


@contextlib.contextmanager
def quiet_lightning(accelerator: str) -> Iterator[None]:
    """Keep Lightning's console to what a kinfonce user acts on, for the block only.

    - Its info lines (accelerator banner, product tips, "loading train_dataloader") are
      hidden: the run's own output says what ran. The model summary stays.
    - On CUDA, float32 matrix products may use TF32 (``"high"`` precision), which Lightning
      would otherwise advise in a warning; the previous setting is restored afterwards.
    - Warnings about what kinfonce has handled are silenced: data-loader workers (the data
      set is a uint8 tensor in memory, views are made on the device), the non-empty log and
      checkpoint directories of a resume (expected there), ``ckpt_path=None`` read as "last"
      because of the OnExceptionCheckpoint (the run directory is checked first, so nothing is
      resumed by accident), and a deprecation inside Lightning itself.
    """
    logger = logging.getLogger("lightning.pytorch")
    summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    levels = (logger.level, summary.level)
    logger.setLevel(logging.WARNING)
    summary.setLevel(logging.INFO)
    cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    try:
        with matmul_precision("high" if cuda else None), warnings.catch_warnings():
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


def follow_newest_epoch(trainer: L.Trainer) -> None:
    """Let ``best.ckpt`` follow the newest epoch, for a module without an online probe (a
    caption set without labels): there is no ``probe_top1`` to rank epochs by."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) == "probe_top1":
            callback.monitor = None


@dataclass(frozen=True)
class TrainingJob:
    """What one kind of training run adds to the machinery of :func:`run_training`.

    Attributes:
        build: (resolved config, data splits) -> (LightningModule, data module).
        evaluate: (trained module, splits, config, device) -> final metrics.
        load: resolved config -> its data splits (None: :func:`load_training_splits`).
    """

    build: Callable[[Any, DatasetSplits], tuple[PretrainMethod, PretrainData]]
    evaluate: Callable[[Any, DatasetSplits, Any, str], dict[str, Any]]
    load: Callable[[Any], DatasetSplits] | None = None


def _build_pretrain(
    config: PretrainConfig, splits: DatasetSplits
) -> tuple[PretrainMethod, PretrainData]:
    module = method_class(config)(config, data_description(splits))
    return module, PretrainData(splits, config.batch_size, config.seed)


def _evaluate_pretrain(
    module: PretrainMethod, splits: DatasetSplits, config: PretrainConfig, device: str
) -> dict[str, Any]:
    return evaluate_baselines(module.backbone, splits, config, device)


#: ``kinfonce pretrain``: SimCLR or MoCo, evaluated beside the two baselines.
PRETRAIN_JOB = TrainingJob(_build_pretrain, _evaluate_pretrain)


class DistributedStartError(KinfonceError):
    """The processes of a DDP run did not all join its process group within ``ddp_timeout``."""


def fit(
    trainer: L.Trainer,
    module: L.LightningModule,
    data: L.LightningDataModule,
    checkpoint: Path | None,
    config: TrainConfig,
) -> None:
    """``trainer.fit``; a process group that did not start in time is a
    :class:`DistributedStartError` that says what to check."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint, weights_only=True)
    except torch.distributed.DistError as err:
        if torch.distributed.is_initialized():  # failed after the start: not ours to explain
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise DistributedStartError(
            f"the {trainer.world_size} processes of this DDP run did not all start within "
            f"ddp_timeout ({config.ddp_timeout:g} s): {reason}. Start every node's command "
            "with the same MASTER_ADDR, MASTER_PORT and --num-nodes (and its own NODE_RANK), "
            "then run it again"
        ) from None


def as_interruption(err: BaseException) -> BaseException:
    """The signal's own exception for Lightning's exits on a signal during fit: its
    ``SIGTERMException`` (a ``SystemExit`` with status 0) after SIGTERM, ``sys.exit(1)``
    after Ctrl-C; so that the command exits 143 or 130. Any other exception as it is."""
    if isinstance(err, SIGTERMException):
        return Terminated(signal.SIGTERM)
    if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
        return err.__context__
    return err


def resumable(err: BaseException) -> bool:
    """Whether a run stopped by ``err`` continues with ``--resume``: an interruption, or a
    disk that could not take a write (once it can)."""
    if isinstance(err, KeyboardInterrupt | Terminated):
        return True
    return isinstance(err, OSError) and err.errno in UNWRITABLE


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
        image_size=config.image_size,
        resize=config.resize,
        workers=config.workers,
    )
    return splits.with_train_subset(config.train_subset, config.seed)


def _set_aside_stale_eval(run_dir: Path, done: int, epochs: int) -> None:
    """``RUN_DIR/eval`` moved aside when the resume of a checkpoint that had trained ``done``
    epochs trains on to ``epochs`` (the evaluation is then of an old checkpoint)."""
    moved = set_aside_stale_eval(run_dir, done) if done < epochs else None
    if moved is not None:
        print(f"moved {run_dir / 'eval'} (an evaluation of an earlier checkpoint) to {moved}")


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

    The configuration is resolved and checked (:func:`kinfonce.resolve.resolve`) and the run
    directory's ownership settled (:mod:`kinfonce.rundir`) before anything is written; a
    refused run writes nothing. The directory is locked from ``config.yaml`` (the resolved
    configuration) to ``metrics.json``.

    Args:
        config: the configuration as given (resolved here).
        job: what the kind of run builds and evaluates.
        resume: None, ``"last"`` (the run's furthest readable checkpoint) or a checkpoint
            path.
        callbacks: extra Lightning callbacks, e.g. early stopping.
        evaluate: run the final linear-probe and kNN evaluation (a search's trials, judged
            by the online probe, skip it).

    Returns:
        The metrics written to ``metrics.json`` (empty on DDP ranks other than 0), with the
        ``run`` record of :func:`kinfonce.rundir.run_record`.

    Raises:
        KinfonceError: a bad setting, impossible batch sizes, a checkpoint of another
            configuration, a run directory that already holds a run or that another
            process is using; a DDP process group that did not start within
            ``ddp_timeout`` (:class:`DistributedStartError`; the directory is left as a new
            run finds it).
        KeyboardInterrupt, Terminated: after SIGINT or SIGTERM, during training or the
            final evaluation; a line on stderr says how to resume, as after an ``OSError``
            of a disk that cannot be written.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    config = resolve(config)
    check_machine(config)
    run_dir = resolve_run_dir(config)
    with quiet_lightning(config.accelerator):
        trainer = make_trainer(config, run_dir, callbacks)
    owner = trainer.is_global_zero  # DDP workers use the directory rank 0 owns
    if owner:
        check_run_dir_free(run_dir, resume=resume is not None)
    checkpoint = resume_checkpoint(run_dir, resume)
    if checkpoint is not None:
        check_resumable(checkpoint, config)
        done = trained_epochs(checkpoint)
        if owner:
            print(describe_resume(checkpoint, done, config.epochs))
    with seeded(config.seed):
        with progress_bars(config.progress):
            splits = (job.load or load_training_splits)(config)
        check_batch_size(config.batch_size, splits.pretraining_size, trainer.world_size)
        module, data = job.build(config, splits)
        if module.probe is None:
            follow_newest_epoch(trainer)
        claim = (
            claim_run_dir(run_dir, resume=resume is not None) if owner else contextlib.nullcontext()
        )
        with claim:
            if owner:
                write_text_atomic(run_dir / "config.yaml", dump_config(config))
                if checkpoint is not None:
                    _set_aside_stale_eval(run_dir, done, config.epochs)
            try:
                fit_started, fit_cpu = time.perf_counter(), time.process_time()
                with (
                    quiet_lightning(config.accelerator),
                    shared_with_workers(run_dir, trainer.world_size),
                ):
                    fit(trainer, module, data, checkpoint, config)
                fit_wall = time.perf_counter() - fit_started
                fit_cpu = time.process_time() - fit_cpu
                if not owner:
                    return {}
                metrics = {}
                if evaluate:
                    eval_started = time.perf_counter()
                    # Lightning moved the module back to the CPU when fit ended: evaluate
                    # where it trained
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
                    # CPU time of all threads and ranks: on a busy machine, a better gauge of
                    # the work than wall time. All three count every segment of a resumed run.
                    **run_times(
                        logged,
                        segment_wall=time.perf_counter() - started,
                        fit_wall=fit_wall,
                        main_cpu_outside_fit=time.process_time() - cpu_started - fit_cpu,
                    ),
                    run_dir=str(run_dir),
                    run=run_record(config.accelerator),
                )
                write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
                columns = [column for _, column in CURVE_PANELS]
                curves = read_epoch_curves(find_epoch_log(run_dir), columns)
                plot_curve_panels({run_dir.name: curves}, run_dir / "curves.png")
            except DistributedStartError:
                if owner and resume is None:  # nothing ran: a rerun may take the directory
                    (run_dir / "config.yaml").unlink(missing_ok=True)
                raise
            except BaseException as err:
                stop = as_interruption(err)
                # interrupted.ckpt (during fit) or last.ckpt (after it) holds the training;
                # a resume after the last epoch only evaluates and writes the results.
                if owner and resumable(stop):
                    what = "stopped" if isinstance(stop, OSError) else "interrupted"
                    print(
                        f"{what}; continue with: kinfonce {config.command} --output-dir "
                        f"{run_dir} --resume",
                        file=sys.stderr,
                    )
                if stop is err:
                    raise
                raise stop from None
    return metrics
