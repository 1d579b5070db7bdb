"""Read run directories and compare them: ``kinfonce report``.

A run directory is what ``kinfonce pretrain`` or ``kinfonce clip`` writes: ``config.yaml``
(the resolved configuration, with the ``command`` that ran it), ``metrics.json`` (final
metrics) and ``logs/metrics.csv`` (per-epoch ``train_loss`` and ``probe_top1``, read by
:mod:`kinfonce.epochlog`). :func:`write_report` writes a markdown table of runs, their
training curves side by side and their accuracy per loss. No training module imports this
one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kinfonce.config import ReportSettings
from kinfonce.epochlog import find_epoch_log, read_epoch_curves
from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.fileio import write_text_atomic
from kinfonce.losses import LOSS_PARAMETERS
from kinfonce.plots import CURVE_PANELS, Curves, plot_curve_panels, plot_loss_comparison
from kinfonce.tables import format_duration, format_markdown, format_parameters, format_percent

#: Columns of the run table.
TABLE_COLUMNS = (
    "run",
    "method",
    "loss",
    "loss parameters",
    "backbone",
    "data set",
    "epochs",
    "batch size",
    "linear top-1",
    "kNN top-1",
    "zero-shot top-1",
    "R@1 image/text",
    "R@1 text/image",
    "run time",
)


@dataclass
class RunSummary:
    """What a run directory holds.

    Attributes:
        path: the run directory.
        config: the parsed ``config.yaml``.
        metrics: the parsed ``metrics.json``.
        curves: column of the epoch log -> (epochs, values) (may be empty).
    """

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    curves: Curves = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command that wrote the run: its config's ``command`` (config files written
        before that key existed came from ``kinfonce pretrain``)."""
        return str(self.config.get("command", "pretrain"))


def _read_mapping(path: Path, parse) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"{path} not found: is {path.parent} a kinfonce run directory?")
    try:
        data = parse(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KinfonceError(f"{path} is not readable: {err}") from err
    if not isinstance(data, dict):
        raise KinfonceError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def load_run(run_dir: str | Path) -> RunSummary:
    """Read a run directory written by ``kinfonce pretrain`` or ``kinfonce clip``.

    Raises:
        MissingFileError: the directory, its config.yaml or its metrics.json is missing.
        KinfonceError: one of them is not a readable mapping.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise MissingFileError(f"run directory {path} does not exist")
    config = _read_mapping(path / "config.yaml", yaml.safe_load)
    metrics = _read_mapping(path / "metrics.json", json.loads)
    columns = [column for _, column in CURVE_PANELS]
    return RunSummary(path, config, metrics, read_epoch_curves(find_epoch_log(path), columns))


def loss_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The loss parameters a run used, as its ``config.yaml`` records them (resolved: every
    parameter of its preset), in display order."""
    return {k: config[k] for k in LOSS_PARAMETERS if config.get(k) is not None}


def run_names(runs: list[RunSummary]) -> list[str]:
    """Short distinct names: the directory name, with its parent where names repeat."""
    names = [run.path.name or str(run.path) for run in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{run.path.parent.name}/{run.path.name}" for run in runs]


def summary_row(run: RunSummary, name: str) -> dict[str, str]:
    """One table row (keys :data:`TABLE_COLUMNS`) describing a run."""
    cfg, met = run.config, run.metrics

    def text(key: str) -> str:
        return "-" if cfg.get(key) is None else str(cfg[key])

    return {
        "run": name,
        "method": "clip" if run.command == "clip" else text("method"),
        "loss": text("loss"),
        "loss parameters": format_parameters(loss_parameters(cfg)),
        "backbone": text("backbone"),
        "data set": text("dataset"),
        "epochs": text("epochs"),
        "batch size": text("batch_size"),
        "linear top-1": format_percent(met.get("linear_top1")),
        "kNN top-1": format_percent(met.get("knn_top1")),
        "zero-shot top-1": format_percent(met.get("zero_shot_top1")),
        "R@1 image/text": format_percent(met.get("image_to_text_r1")),
        "R@1 text/image": format_percent(met.get("text_to_image_r1")),
        "run time": format_duration(met.get("wall_time_s")),
    }


def markdown_table(runs: list[RunSummary]) -> str:
    """A GitHub-flavoured markdown table comparing ``runs``, one row each."""
    rows = [summary_row(run, name) for run, name in zip(runs, run_names(runs), strict=True)]
    return format_markdown(TABLE_COLUMNS, rows)


def comparison_group(run: RunSummary) -> str:
    """The group a run is compared in: its loss, with its method when that is not SimCLR."""
    method = "clip" if run.command == "clip" else run.config.get("method", "simclr")
    loss = run.config.get("loss", "?")
    return str(loss) if method == "simclr" else f"{method}: {loss}"


def report_dir(run_dirs: list[str | Path], settings: ReportSettings) -> Path:
    """Where a report goes: ``settings.output_dir``, else ``report/`` in the deepest
    directory that holds every run directory (beside the runs, not in the current one)."""
    if not run_dirs:
        raise KinfonceError("run_dirs must name at least one run directory")
    if settings.output_dir is not None:
        return Path(settings.output_dir)
    parents = [str(Path(d).resolve().parent) for d in run_dirs]
    return Path(os.path.commonpath(parents)) / "report"


def write_report(
    run_dirs: list[str | Path], settings: ReportSettings | None = None
) -> tuple[str, Path, list[Path]]:
    """Load runs, write ``report.md``, ``curves.png`` and ``comparison.png`` into
    :func:`report_dir`.

    Returns:
        (markdown text, markdown path, figure paths).
    """
    settings = settings or ReportSettings()
    out = report_dir(run_dirs, settings)
    runs = [load_run(d) for d in run_dirs]
    named = {name: run.curves for run, name in zip(runs, run_names(runs), strict=True)}
    points = [(comparison_group(r), r.config.get("seed", 0), r.metrics) for r in runs]
    figures = [
        plot_curve_panels(named, out / "curves.png"),
        plot_loss_comparison(points, out / "comparison.png"),
    ]
    text = markdown_table(runs)
    md_path = write_text_atomic(
        out / "report.md",
        f"# kinfonce runs\n\n{text}\n" + "".join(f"![{f.stem}]({f.name})\n" for f in figures),
    )
    return text, md_path, figures
