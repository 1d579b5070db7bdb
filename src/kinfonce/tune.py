"""``kinfonce tune``: random search with Ray Tune's ASHA scheduler (paper, Appendix B).

Each trial is an ordinary ``kinfonce pretrain`` run (:func:`kinfonce.train.run_pretrain`,
without the final evaluation) whose config is the base config with the trial's sampled
values and the fields the search sets (:meth:`kinfonce.config.SearchSettings.trial_fields`),
resolved like any run's. It reports the online-probe accuracy ``probe_top1`` to Tune once per epoch, with a
checkpoint, so ASHA can stop poor trials at its rungs and a failed or interrupted trial
resumes from its last epoch. The search directory holds::

    DIR/search.yaml         base config (as given), space and settings (what --resume reads)
    DIR/<trial id>/         Tune's trial records and checkpoints; run/ is the trial's run directory
    DIR/summary.md          best trials, failed trials with their reasons
    DIR/trials.csv          every trial: status, epochs, last probe accuracy, sampled values
    DIR/best_config.yaml    the best trial's config, for ``kinfonce pretrain --config``
    DIR/probe_curves.png    probe accuracy against epoch, one line per trial

Ray is started on this machine's loopback interface by default, or a cluster is joined
(``address``; :mod:`kinfonce.raysession`). ``DIR/.lock`` holds the directory while a search
or its resume runs, as a run directory's lock does (:mod:`kinfonce.rundir`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from kinfonce.config import (
    PretrainConfig,
    SearchRuntime,
    SearchSettings,
    config_from_mapping,
    dump_config,
    settings_from_mapping,
)
from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.fileio import check_writable_dir, write_text_atomic
from kinfonce.plots import plot_search_curves
from kinfonce.raysession import ray_session
from kinfonce.resolve import check_search, resolve
from kinfonce.rundir import hold_directory
from kinfonce.scoped import cpu_threads
from kinfonce.space import Dimension, check_space, num_trials, parse_space, space_to_yaml
from kinfonce.tables import search_summary
from kinfonce.train import run_pretrain

#: The metric ASHA maximises (the online probe's validation accuracy).
METRIC = "probe_top1"
#: File name of a trial's checkpoint inside a Tune checkpoint directory.
CHECKPOINT_FILE = "last.ckpt"
SEARCH_FILE = "search.yaml"


def check_placement(settings: SearchSettings, runtime: SearchRuntime) -> None:
    """On a Ray started here (no ``address``), a trial must fit this machine, or it would
    wait forever."""
    if runtime.address is not None:
        return
    cpus = runtime.num_cpus or os.cpu_count() or 1
    if settings.cpus_per_trial > cpus:
        raise KinfonceError(
            f"cpus_per_trial ({settings.cpus_per_trial}) exceeds the {cpus} CPUs of the local Ray"
        )
    if settings.gpus_per_trial > torch.cuda.device_count():
        raise KinfonceError(
            f"gpus_per_trial ({settings.gpus_per_trial}) exceeds the "
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

    Its run directory is ``search_dir/<trial id>/run``; torch runs on ``threads`` CPU
    threads during the trial. With a Tune checkpoint (a retry, or a resumed search) it
    continues from that checkpoint's epoch; without one it starts afresh, clearing what an
    earlier attempt left.
    """
    from ray import tune

    context = tune.get_context()
    run_dir = Path(search_dir) / context.get_trial_id() / "run"
    config = config_from_mapping({**params, "output_dir": str(run_dir)}, config_from_mapping(base))
    checkpoint, resume = tune.get_checkpoint(), None
    if checkpoint is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        restored = run_dir / "restored"
        shutil.rmtree(restored, ignore_errors=True)
        checkpoint.to_directory(str(restored))
        resume = str(restored / CHECKPOINT_FILE)
    with cpu_threads(threads):
        run_pretrain(config, resume=resume, callbacks=[EpochReport()], evaluate=False)


def default_search_dir(base: PretrainConfig) -> Path:
    """``runs/tune/<dataset>-<method>-<loss>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "tune" / f"{base.dataset.split(':')[0]}-{base.method}-{base.loss}-{stamp}"


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def trial_base(base: PretrainConfig, settings: SearchSettings) -> PretrainConfig:
    """The config every trial starts from: the base with the fields the search sets
    (:meth:`~kinfonce.config.SearchSettings.trial_fields`)."""
    return dataclasses.replace(base, **settings.trial_fields())


def check_search_inputs(
    base: PretrainConfig,
    space: dict[str, Dimension],
    settings: SearchSettings,
    runtime: SearchRuntime,
) -> SearchSettings:
    """Every check that needs no data and no Ray: settings (returned with ``max_t``
    decided), where the search runs, base config, space."""
    settings = check_search(settings, base, runtime)
    check_placement(settings, runtime)
    try:
        resolve(trial_base(base, settings))
    except KinfonceError as err:
        raise KinfonceError(f"base config: {err}") from None
    check_space(space, base)
    return settings


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
        base: the config every trial starts from, as given (each trial's is resolved; the
            fields of :meth:`~kinfonce.config.SearchSettings.trial_fields` are the search's).
        space: field -> distribution (:mod:`kinfonce.space`).
        settings: sampling, ASHA and resources.
        search_dir: a new directory for the search.
        address: a Ray cluster to join (None: start Ray here).
        num_cpus: CPUs of a Ray started here (None: all).
        callbacks: extra Ray Tune callbacks (``ray.tune.Callback``), e.g. loggers.

    The directory is locked as a run directory is (``DIR/.lock``, :mod:`kinfonce.rundir`)
    while the search runs: a second search or a ``--resume`` of it is refused meanwhile.

    Raises:
        KinfonceError: bad settings, config or space, a directory that holds a search or
            that another process holds, checked before Ray starts; a cluster that refuses
            this process.
    """
    search_dir = Path(search_dir).resolve()
    runtime = SearchRuntime(address=address, num_cpus=num_cpus)
    settings = check_search_inputs(base, space, settings, runtime)
    check_writable_dir(search_dir, "--output-dir")
    with hold_directory(search_dir):
        if has_tune_state(search_dir):
            raise KinfonceError(
                f"{str(search_dir)!r} already holds a search; continue it with --resume "
                f"{search_dir} or choose another --output-dir"
            )
        base = trial_base(base, settings)
        record = {"config": base.to_dict(), "space": space_to_yaml(space)}
        record["settings"] = settings.to_dict()
        with ray_session(address, num_cpus):
            # written once Ray runs: a search that could not start leaves nothing a rerun
            # would refuse (without Tune's state, a search.yaml alone does not count)
            write_text_atomic(search_dir / SEARCH_FILE, yaml.safe_dump(record, sort_keys=False))
            _tuner(base, space, settings, search_dir, callbacks).fit()
        return finish_search(search_dir, base, space, settings)


def has_tune_state(search_dir: Path) -> bool:
    """Whether Tune has saved a search's experiment state in ``search_dir`` (what
    ``--resume`` restores): a search that stopped before scheduling a trial has none."""
    from ray import tune

    return search_dir.is_dir() and tune.Tuner.can_restore(search_dir)


def check_trusted(search_dir: Path) -> None:
    """Refuse a search directory that holds anything another user owns or may write.

    ``--resume`` unpickles Tune's state in it (``tuner.pkl``, the trials' records), and a
    crafted pickle runs code; a directory only this user could have written is as trusted
    as the user's own files. Symbolic links are judged by themselves, not followed.

    Raises:
        KinfonceError: naming the first such path, its owner or mode, and what to do.
    """
    uid = os.getuid()
    paths = [search_dir]
    for folder, dirs, files in os.walk(search_dir):
        paths += [Path(folder) / name for name in (*dirs, *files)]
    for path in paths:
        stat = path.lstat()
        if stat.st_uid != uid:
            problem = f"is owned by user id {stat.st_uid}, not by you ({uid})"
        elif stat.st_mode & 0o022 and not path.is_symlink():
            problem = f"can be written by others (mode {stat.st_mode & 0o777:o})"
        else:
            continue
        raise KinfonceError(
            f"refusing to resume {str(search_dir)!r}: {str(path)!r} {problem}. Resuming "
            "unpickles Tune's state in the directory, which can run code: resume only a "
            "search directory that you own and only you can write (chmod -R go-w DIR)"
        )


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
    settings = settings_from_mapping(SearchSettings, record["settings"])
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

    The directory must be trusted: Tune's experiment state in it is unpickled
    (:func:`check_trusted` refuses one that another user owns or may write). Like
    :func:`run_search`, the resume holds the directory's lock: a second search or resume
    of it is refused while it runs.
    """
    from ray import tune

    search_dir = Path(search_dir).resolve()
    base, space, settings = load_search(search_dir)
    check_trusted(search_dir)
    check_search_inputs(base, space, settings, SearchRuntime(address=address, num_cpus=num_cpus))
    with hold_directory(search_dir):
        if not has_tune_state(search_dir):
            raise KinfonceError(
                f"{str(search_dir)!r} holds no Tune experiment state to resume (the search "
                "stopped before its first trial was scheduled); start it again: "
                f"kinfonce tune --output-dir {search_dir}"
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
    """Read the trials, pick the best and write the outputs into ``search_dir``.

    ``best_config.yaml`` is the best trial's resolved configuration with where it runs left
    to ``kinfonce pretrain`` (accelerator auto, memory format decided by the device, its own
    run directory, progress bars), so that it runs on any machine.
    """
    trials = collect_trials(search_dir, settings.max_t)
    interrupted = len(trials) < num_trials(space, settings.num_samples) or any(
        t.status == "unfinished" for t in trials
    )
    best = next((t for t in trials if t.status != "failed" and t.probe_top1), None)
    best_config = None
    files = {}
    if best is not None:
        best_config = dataclasses.replace(
            resolve(config_from_mapping(best.params, base)),
            progress=True,
            accelerator="auto",
            channels_last=None,
            output_dir=None,
        )
        files["best_config"] = write_text_atomic(
            search_dir / "best_config.yaml", dump_config(best_config)
        )
    files.update(write_search_report(trials, list(space), search_dir, METRIC))
    return SearchResult(trials, list(space), best, best_config, interrupted, files)


def write_search_report(
    trials: list[TrialRecord], keys: Sequence[str], out_dir: str | Path, metric: str
) -> dict[str, Path]:
    """Write ``summary.md``, ``trials.csv`` and ``probe_curves.png`` of a search.

    Returns:
        Name ("summary", "trials", "curves") -> path written.
    """
    out = Path(out_dir)
    curves = plot_search_curves(trials, out / "probe_curves.png", metric)
    summary = write_text_atomic(
        out / "summary.md",
        f"# kinfonce tune\n\n{search_summary(trials, keys)}\n![probe curves]({curves.name})\n",
    )
    table = out / "trials.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "status", "epochs", metric, "train_loss", *keys, "error"])
        for t in trials:
            epochs = t.epochs[-1] if t.epochs else 0
            values = [t.params.get(key) for key in keys]
            writer.writerow(
                [t.trial_id, t.status, epochs, t.last_probe, t.train_loss, *values, t.error]
            )
    return {"summary": summary, "trials": table, "curves": curves}
