"""``kinfonce tune``: random search with Ray Tune's ASHA scheduler (paper, Appendix B).

Each trial is an ordinary ``kinfonce pretrain`` run (:func:`kinfonce.train.run_pretrain`,
without the final evaluation) whose config is the base config with the trial's sampled
values. It reports the online-probe accuracy ``probe_top1`` to Tune once per epoch, with a
checkpoint, so ASHA can stop poor trials at its rungs and a failed or interrupted trial
resumes from its last epoch. The search directory holds::

    DIR/search.yaml         base config, space and settings (what --resume reads)
    DIR/<trial id>/         Tune's trial records and checkpoints; run/ is the trial's run directory
    DIR/summary.md          best trials, failed trials with their reasons
    DIR/trials.csv          every trial: status, epochs, last probe accuracy, sampled values
    DIR/best_config.yaml    the best trial's config, for ``kinfonce pretrain --config``
    DIR/probe_curves.png    probe accuracy against epoch, one line per trial

Ray runs in-process on this machine by default, or joins a cluster (``address``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from kinfonce.config import PretrainConfig, config_from_mapping, dump_config
from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.space import (
    Dimension,
    check_space,
    check_trial_config,
    num_trials,
    parse_space,
    space_to_yaml,
)

#: The metric ASHA maximises (the online probe's validation accuracy).
METRIC = "probe_top1"
#: File name of a trial's checkpoint inside a Tune checkpoint directory.
CHECKPOINT_FILE = "last.ckpt"
SEARCH_FILE = "search.yaml"


@dataclass
class SearchSettings:
    """How the search samples, stops and places its trials (the ``kinfonce tune`` flags).

    Attributes:
        max_t: epochs of a trial that ASHA never stops (its ``max_t``).
        num_samples: trials drawn (per combination of ``grid`` values).
        grace_period: epochs before ASHA may stop a trial; rungs at grace * rf^k < max_t.
        reduction_factor: ASHA keeps the best 1/reduction_factor of the trials at a rung.
        cpus_per_trial: CPUs Ray reserves for a trial (its torch threads).
        gpus_per_trial: GPUs per trial; a fraction (e.g. 0.25) shares one GPU.
        max_concurrent: at most this many trials at once (None: as resources allow).
        max_failures: retries of a failed trial, each from its last checkpoint.
        search_seed: seed of the sampled values (None: not reproducible).
    """

    max_t: int
    num_samples: int = 8
    grace_period: int = 1
    reduction_factor: float = 2.0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_failures: int = 0
    search_seed: int | None = 0

    def check(self) -> None:
        """Raise a KinfonceError naming the first setting out of range."""
        for name in ("max_t", "num_samples", "grace_period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KinfonceError(f"{name} must be an integer >= 1, got {value!r}")
        if self.grace_period > self.max_t:
            raise KinfonceError(
                f"grace_period ({self.grace_period}) must be <= max_t ({self.max_t}): ASHA "
                "cannot stop a trial after its last epoch"
            )
        if not self.reduction_factor > 1:
            raise KinfonceError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        if not self.cpus_per_trial > 0:
            raise KinfonceError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        gpus = self.gpus_per_trial
        if not (gpus >= 0 and (gpus <= 1 or float(gpus).is_integer())):
            raise KinfonceError(
                f"gpus_per_trial must be a fraction in [0, 1] or a whole number, got {gpus}"
            )
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise KinfonceError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_failures < 0:
            raise KinfonceError(f"max_failures must be >= 0, got {self.max_failures}")

    def check_placement(self, address: str | None, num_cpus: int | None) -> None:
        """On a Ray started here (no ``address``), a trial must fit this machine, or it
        would wait forever; ``num_cpus`` sizes that Ray and is not for a cluster."""
        import torch

        if address is not None:
            if num_cpus is not None:
                raise KinfonceError("num_cpus is for a Ray started here; a cluster has its own")
            return
        if num_cpus is not None and num_cpus < 1:
            raise KinfonceError(f"num_cpus must be >= 1, got {num_cpus}")
        cpus = num_cpus or os.cpu_count() or 1
        if self.cpus_per_trial > cpus:
            raise KinfonceError(
                f"cpus_per_trial ({self.cpus_per_trial}) exceeds the {cpus} CPUs of the local Ray"
            )
        if self.gpus_per_trial > torch.cuda.device_count():
            raise KinfonceError(
                f"gpus_per_trial ({self.gpus_per_trial}) exceeds the "
                f"{torch.cuda.device_count()} GPUs of this machine"
            )


@dataclass
class TrialRecord:
    """What one trial did.

    Attributes:
        trial_id: Tune's id, also the name of the trial's folder.
        params: its sampled values.
        status: ``completed`` (ran max_t epochs), ``stopped`` (by ASHA), ``failed`` or
            ``unfinished`` (the search was interrupted).
        epochs, probe_top1: the per-epoch curve (epochs from 1).
        train_loss: the last epoch's training loss, if any.
        error: why it failed (the exception's last line).
    """

    trial_id: str
    params: dict[str, Any]
    status: str
    epochs: list[int] = field(default_factory=list)
    probe_top1: list[float] = field(default_factory=list)
    train_loss: float | None = None
    error: str | None = None

    @property
    def last_probe(self) -> float | None:
        return self.probe_top1[-1] if self.probe_top1 else None


@dataclass
class SearchResult:
    """The outcome of :func:`run_search`: trials best first, the best config, files written."""

    trials: list[TrialRecord]
    keys: list[str]
    best: TrialRecord | None
    best_config: PretrainConfig | None
    interrupted: bool
    files: dict[str, Path]


class EpochReport(L.Callback):
    """Reports ``probe_top1``, ``train_loss`` and ``epoch`` to Tune once per epoch, with a
    checkpoint of the whole training state.

    At ``on_train_epoch_end`` the epoch's validation (the probe accuracy) has run and the
    epoch-level training loss is aggregated; a checkpoint taken there resumes at the next
    epoch, as Lightning's own per-epoch checkpoints do.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ray import tune

        logged = trainer.callback_metrics
        metrics = {key: float(logged[key]) for key in (METRIC, "train_loss") if key in logged}
        bad = {key: value for key, value in metrics.items() if not math.isfinite(value)}
        if METRIC not in metrics or bad:
            raise RuntimeError(
                f"epoch {trainer.current_epoch + 1} ended without a finite {METRIC} and "
                f"train_loss: {metrics}"
            )
        metrics["epoch"] = trainer.current_epoch + 1
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def pretrain_trial(
    params: dict[str, Any], *, base: dict[str, Any], search_dir: str, threads: int
) -> None:
    """One Tune trial: ``kinfonce pretrain`` of ``base`` with the sampled ``params``.

    Its run directory is ``search_dir/<trial id>/run``. With a Tune checkpoint (a retry,
    or a resumed search) it continues from that checkpoint's epoch; without one it starts
    afresh, clearing what an earlier attempt left.
    """
    import torch
    from ray import tune

    from kinfonce.train import run_pretrain

    context = tune.get_context()
    run_dir = Path(search_dir) / context.get_trial_id() / "run"
    config = config_from_mapping({**params, "output_dir": str(run_dir)}, config_from_mapping(base))
    torch.set_num_threads(threads)
    checkpoint, resume = tune.get_checkpoint(), None
    if checkpoint is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        restored = run_dir / "restored"
        shutil.rmtree(restored, ignore_errors=True)
        checkpoint.to_directory(str(restored))
        resume = str(restored / CHECKPOINT_FILE)
    run_pretrain(config, resume=resume, callbacks=[EpochReport()], evaluate=False)


def default_search_dir(base: PretrainConfig) -> Path:
    """``runs/tune/<dataset>-<method>-<loss>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "tune" / f"{base.dataset.split(':')[0]}-{base.method}-{base.loss}-{stamp}"


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def trial_base(base: PretrainConfig, settings: SearchSettings) -> PretrainConfig:
    """The config every trial starts from: ``max_t`` epochs on one device, no progress bars."""
    if base.devices != "1" or base.num_nodes != 1:
        raise KinfonceError(
            f"a trial trains on one device; devices={base.devices!r} and "
            f"num_nodes={base.num_nodes} are not for tune (use gpus_per_trial)"
        )
    return dataclasses.replace(
        base,
        epochs=settings.max_t,
        progress=False,
        accelerator="gpu" if settings.gpus_per_trial > 0 else "cpu",
        strategy="auto",
        output_dir=None,
    )


def check_search(
    base: PretrainConfig, space: dict[str, Dimension], settings: SearchSettings
) -> None:
    """Every check that needs no data and no Ray: settings, base config, space."""
    settings.check()
    try:
        check_trial_config(base)
    except ValueError as err:
        raise KinfonceError(f"base config: {err}") from None
    check_space(space, base)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for the search: joined at ``address``, or started here (no dashboard) and shut
    down after. A Ray already initialised in this process is used as it is.
    """
    import logging

    import ray

    # Tune snapshots the experiment state at every trial checkpoint (what lets --resume lose
    # nothing) and warns about it when epochs are short; the warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        yield
        return
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()


def _trainable(base: PretrainConfig, settings: SearchSettings, search_dir: Path) -> Any:
    from ray import tune

    trainable = tune.with_parameters(
        pretrain_trial,
        base=base.to_dict(),
        search_dir=str(search_dir),
        threads=max(1, int(settings.cpus_per_trial)),
    )
    return tune.with_resources(
        trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    )


def _tuner(base, space, settings, search_dir: Path, callbacks: Sequence[Any]) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return tune.Tuner(
        _trainable(base, settings, search_dir),
        param_space={key: dim.to_tune() for key, dim in space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=ASHAScheduler(
                max_t=settings.max_t,
                grace_period=settings.grace_period,
                reduction_factor=settings.reduction_factor,
            ),
            search_alg=BasicVariantGenerator(
                random_state=settings.search_seed, max_concurrent=settings.max_concurrent or 0
            ),
            num_samples=settings.num_samples,
            trial_dirname_creator=_trial_dirname,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=search_dir.name,
            storage_path=str(search_dir.parent),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks),
            verbose=1,
        ),
    )


def run_search(
    base: PretrainConfig,
    space: dict[str, Dimension],
    settings: SearchSettings,
    search_dir: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    callbacks: Sequence[Any] = (),
) -> SearchResult:
    """Run a search and write its outputs (see the module docstring).

    Args:
        base: the config every trial starts from (its ``epochs`` is replaced by ``max_t``).
        space: field -> distribution (:mod:`kinfonce.space`).
        settings: sampling, ASHA and resources.
        search_dir: a new directory for the search.
        address: a Ray cluster to join (None: start Ray here).
        num_cpus: CPUs of a Ray started here (None: all).
        callbacks: extra Ray Tune callbacks (``ray.tune.Callback``), e.g. loggers.

    Raises:
        KinfonceError: bad settings, config or space, or a directory that holds a search;
            all checked before Ray starts.
    """
    search_dir = Path(search_dir).resolve()
    check_search(base, space, settings)
    settings.check_placement(address, num_cpus)
    if (search_dir / SEARCH_FILE).exists():
        raise KinfonceError(
            f"{str(search_dir)!r} already holds a search; continue it with --resume "
            f"{search_dir} or choose another --output-dir"
        )
    base = trial_base(base, settings)
    search_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": base.to_dict(), "space": space_to_yaml(space)}
    record["settings"] = dataclasses.asdict(settings)
    (search_dir / SEARCH_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
    with ray_session(address, num_cpus):
        _tuner(base, space, settings, search_dir, callbacks).fit()
    return finish_search(search_dir, base, space, settings)


def load_search(
    search_dir: str | Path,
) -> tuple[PretrainConfig, dict[str, Dimension], SearchSettings]:
    """The base config, space and settings a search directory was started with."""
    path = Path(search_dir) / SEARCH_FILE
    if not path.is_file():
        raise MissingFileError(
            f"{str(search_dir)!r} holds no search ({SEARCH_FILE} is missing): pass the "
            "--output-dir of an earlier `kinfonce tune`"
        )
    record = yaml.safe_load(path.read_text())
    if not (isinstance(record, dict) and {"config", "space", "settings"} <= record.keys()):
        raise KinfonceError(f"{str(path)!r} is not a search record of `kinfonce tune`")
    settings = SearchSettings(**record["settings"])
    return config_from_mapping(record["config"]), parse_space(record["space"]), settings


def resume_search(
    search_dir: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    retry_failed: bool = False,
) -> SearchResult:
    """Continue an interrupted search: unfinished trials resume from their last checkpoint,
    trials not yet started start, finished ones are kept.

    Args:
        retry_failed: also resume failed trials from their last checkpoint.

    The directory must be trusted: Tune's experiment state in it is unpickled.
    """
    from ray import tune

    search_dir = Path(search_dir).resolve()
    base, space, settings = load_search(search_dir)
    check_search(base, space, settings)
    settings.check_placement(address, num_cpus)
    if not tune.Tuner.can_restore(search_dir):
        raise KinfonceError(
            f"{str(search_dir)!r} holds no Tune experiment state to resume (the search stopped "
            "before its first trial was scheduled); start it again with another --output-dir"
        )
    with ray_session(address, num_cpus):
        tuner = tune.Tuner.restore(
            str(search_dir),
            trainable=_trainable(base, settings, search_dir),
            resume_unfinished=True,
            resume_errored=retry_failed,
        )
        tuner.fit()
    return finish_search(search_dir, base, space, settings)


def failure_reason(error: str | None) -> str | None:
    """The last line of a Tune error text (the exception), without terminal colours."""
    if not error:
        return None
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", error).splitlines()]
    last = next((line for line in reversed(lines) if line), None)
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", last) if last else None  # the class, no module


def collect_trials(search_dir: Path, max_t: int) -> list[TrialRecord]:
    """Every trial of a search directory, from Tune's records, ranked best first.

    The ranking follows ASHA's verdict, then the probe: trials that ran more epochs first,
    then by their last probe accuracy; failed trials last.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(search_dir))
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        record = TrialRecord(trial.trial_id, dict(trial.config), status="unfinished")
        if frame is not None and METRIC in frame:
            # A resumed trial may have logged epochs past its checkpoint twice: keep the last.
            frame = frame.dropna(subset=[METRIC]).drop_duplicates("training_iteration", keep="last")
            frame = frame.sort_values("training_iteration")
            record.epochs = [int(e) for e in frame["training_iteration"]]
            record.probe_top1 = [float(v) for v in frame[METRIC]]
            if "train_loss" in frame and len(frame):
                record.train_loss = float(frame["train_loss"].iloc[-1])
        if trial.status == "ERROR":
            record.status, record.error = "failed", failure_reason(trial.get_error())
        elif trial.status == "TERMINATED":
            done = bool(record.epochs) and record.epochs[-1] >= max_t
            record.status = "completed" if done else "stopped"
        records.append(record)
    return sorted(
        records,
        key=lambda r: (r.status != "failed", len(r.epochs), r.last_probe or 0.0),
        reverse=True,
    )


def finish_search(
    search_dir: Path, base: PretrainConfig, space: dict[str, Dimension], settings: SearchSettings
) -> SearchResult:
    """Read the trials, pick the best and write the outputs into ``search_dir``."""
    from kinfonce.report import write_search_report

    trials = collect_trials(search_dir, settings.max_t)
    interrupted = len(trials) < num_trials(space, settings.num_samples) or any(
        t.status == "unfinished" for t in trials
    )
    best = next((t for t in trials if t.status != "failed" and t.probe_top1), None)
    best_config = None
    files = {}
    if best is not None:
        best_config = config_from_mapping(best.params, base)
        best_config = dataclasses.replace(
            best_config, progress=True, accelerator="auto", output_dir=None
        )
        files["best_config"] = search_dir / "best_config.yaml"
        files["best_config"].write_text(dump_config(best_config))
    files.update(write_search_report(trials, list(space), search_dir, METRIC))
    return SearchResult(trials, list(space), best, best_config, interrupted, files)
