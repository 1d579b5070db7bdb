"""Compare pretraining runs: a markdown table and one figure of their training curves.

A run directory is what ``kinfonce pretrain`` writes: ``config.yaml`` (the effective
config), ``metrics.json`` (final metrics) and ``logs/metrics.csv`` (per-epoch
``train_loss`` and ``probe_top1``, written by :mod:`kinfonce.epochlog`; older runs hold a
Lightning CSVLogger file, read the same way).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.fileio import atomic_write, write_text_atomic
from kinfonce.losses import LOSS_PARAMETERS

#: Figure panels: (title, CSV column of ``kinfonce pretrain``'s log).
CURVE_PANELS = (
    ("training loss", "train_loss"),
    ("online probe top-1", "probe_top1"),
)
#: Loss-preset parameters shown in the table, in this order.
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
    "run time",
)


@dataclass
class RunSummary:
    """What a run directory holds.

    Attributes:
        path: the run directory.
        config: the parsed ``config.yaml``.
        metrics: the parsed ``metrics.json``.
        curves: panel title -> (epochs, values), from the CSV logs (may be empty).
    """

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` not registered with pyplot: no global backend or state changes."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out and write (creating the folder, atomically) a matplotlib figure; returns the path."""
    fig.tight_layout()
    out = Path(path)
    return atomic_write(
        out, lambda file: fig.savefig(file, dpi=120, format=out.suffix[1:] or "png")
    )


def read_csv_log(path: Path) -> list[dict[str, str]]:
    """Rows of a Lightning CSV log (empty when there is none); the one reader of that log."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _read_mapping(path: Path, parse) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"{path} not found: is {path.parent} a kinfonce pretrain run?")
    try:
        data = parse(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KinfonceError(f"{path} is not readable: {err}") from err
    if not isinstance(data, dict):
        raise KinfonceError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def find_metrics_csv(run_dir: Path) -> Path | None:
    """The newest ``metrics.csv`` under ``run_dir/logs`` (the epoch log, or an older run's
    CSVLogger file), or None."""
    found = sorted((run_dir / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_training_curves(csv_path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per-epoch curves of a CSV log, keyed by the titles of :data:`CURVE_PANELS`.

    Epochs are counted from 1 (Lightning logs them from 0). Rows with an empty cell are
    skipped; several values of one epoch (per-step logging) are averaged.
    """
    rows = read_csv_log(csv_path)
    curves = {}
    for title, column in CURVE_PANELS:
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for row in rows:
            if row.get(column) not in (None, "") and row.get("epoch") not in (None, ""):
                per_epoch[int(float(row["epoch"])) + 1].append(float(row[column]))
        epochs = sorted(per_epoch)
        if epochs:
            curves[title] = (epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs])
    return curves


def load_run(run_dir: str | Path) -> RunSummary:
    """Read a run directory written by ``kinfonce pretrain``.

    Raises:
        FileNotFoundError: the directory, its config.yaml or its metrics.json is missing.
        ValueError: one of them is not a readable mapping.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise MissingFileError(f"run directory {path} does not exist")
    config = _read_mapping(path / "config.yaml", yaml.safe_load)
    metrics = _read_mapping(path / "metrics.json", json.loads)
    csv_path = find_metrics_csv(path)
    curves = read_training_curves(csv_path) if csv_path else {}
    return RunSummary(path=path, config=config, metrics=metrics, curves=curves)


def effective_loss_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The loss parameters a run used: its config's, else its method's or preset's defaults.

    A config that ``kinfonce.config`` no longer accepts falls back to the values it stores.
    """
    from kinfonce.config import CONFIG_CLASSES, config_from_mapping
    from kinfonce.losses import preset_defaults
    from kinfonce.methods import METHODS

    stored = {k: config[k] for k in LOSS_PARAMETERS if config.get(k) is not None}
    kind = run_kind(config)
    try:
        cfg = config_from_mapping(config, cls=CONFIG_CLASSES[kind])
        if kind == "clip":
            from kinfonce.clip import ClipMethod as method
        else:
            method = METHODS[cfg.method]
        defaults = preset_defaults(cfg.loss)
    except (ValueError, KeyError):
        return stored
    return {**defaults, **method.loss_params(cfg)}


def run_kind(config: dict[str, Any]) -> str:
    """The command that wrote a run's config: "clip" when it has caption settings, else
    "pretrain"."""
    return "clip" if "rewrites" in config else "pretrain"


def _format_parameters(params: dict[str, Any]) -> str:
    ordered = [(k, params[k]) for k in LOSS_PARAMETERS if k in params]
    return ", ".join(f"{k}={v:g}" if _is_number(v) else f"{k}={v}" for k, v in ordered) or "-"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_percent(value: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal, '-' when missing or not finite."""
    if not _is_number(value) or not math.isfinite(value):
        return "-"
    return f"{100 * value:.1f}%"


def format_duration(seconds: Any) -> str:
    """Seconds as '42 s', '3 min 05 s' or '2 h 07 min'; '-' when missing."""
    if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


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
        "method": "clip" if run_kind(cfg) == "clip" else text("method"),
        "loss": text("loss"),
        "loss parameters": _format_parameters(effective_loss_parameters(cfg)),
        "backbone": text("backbone"),
        "data set": text("dataset"),
        "epochs": text("epochs"),
        "batch size": text("batch_size"),
        "linear top-1": format_percent(met.get("linear_top1")),
        "kNN top-1": format_percent(met.get("knn_top1")),
        "run time": format_duration(met.get("wall_time_s")),
    }


def format_markdown(columns: Sequence[str], rows: list[dict[str, str]]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (column -> text)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(row[c].replace("|", "/") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(runs: list[RunSummary]) -> str:
    """A GitHub-flavoured markdown table comparing ``runs``, one row each."""
    rows = [summary_row(run, name) for run, name in zip(runs, run_names(runs), strict=True)]
    return format_markdown(TABLE_COLUMNS, rows)


def plot_training_curves(runs: list[RunSummary], path: str | Path) -> Path:
    """Draw the curves of :data:`CURVE_PANELS` side by side, one line per run, as a PNG."""
    named = {name: run.curves for run, name in zip(runs, run_names(runs), strict=True)}
    return plot_curve_panels(named, path)


def plot_run_curves(run_dir: Path, path: Path) -> Path:
    """The training curves of one run directory's CSV log, as a PNG."""
    csv_path = find_metrics_csv(run_dir)
    return plot_curve_panels(
        {run_dir.name: read_training_curves(csv_path) if csv_path else {}}, path
    )


def plot_curve_panels(
    named_curves: dict[str, dict[str, tuple[list[int], list[float]]]], path: str | Path
) -> Path:
    """One panel per :data:`CURVE_PANELS` entry, one line per name (as read by
    :func:`read_training_curves`), as a PNG."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure((5.5 * len(CURVE_PANELS), 4))
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (title, _) in zip(axes, CURVE_PANELS, strict=True):
        for name, curves in named_curves.items():
            if title in curves:
                epochs, values = curves[title]
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


#: Panels of the comparison figure: (title, key of ``metrics.json``).
COMPARISON_PANELS = (("linear top-1 (%)", "linear_top1"), ("kNN top-1 (%)", "knn_top1"))


def comparison_group(run: RunSummary) -> str:
    """The group a run is compared in: its loss, with its method when that is not SimCLR."""
    method, loss = run.config.get("method", "simclr"), run.config.get("loss", "?")
    return str(loss) if method == "simclr" else f"{method}: {loss}"


def plot_loss_comparison(runs: list[RunSummary], path: str | Path) -> Path:
    """Accuracy per loss: one dot per run, each group's mean ± sd, and a thin line joining
    the runs of one seed across groups (the pairs of a paired comparison).

    Groups are :func:`comparison_group`, in the order of their first run.
    """
    import numpy as np

    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for run in runs:
        groups[comparison_group(run)].append(run)
    names = list(groups)
    seeds = sorted({r.config.get("seed", 0) for r in runs})
    spread = 0.15 if len(seeds) > 1 else 0.0
    offsets = dict(zip(seeds, np.linspace(-spread, spread, len(seeds)), strict=True))
    fig = new_figure((max(5.5, 1.3 * len(names)) * len(COMPARISON_PANELS) / 1.6, 4))
    axes = fig.subplots(1, len(COMPARISON_PANELS))
    for ax, (title, key) in zip(axes, COMPARISON_PANELS, strict=True):
        by_seed: dict[Any, list[tuple[float, float]]] = defaultdict(list)
        for x, name in enumerate(names):
            points = [
                (
                    x + offsets[r.config.get("seed", 0)],
                    100 * r.metrics[key],
                    r.config.get("seed", 0),
                )
                for r in groups[name]
                if _is_number(r.metrics.get(key))
            ]
            if not points:
                continue
            for px, py, seed in points:
                by_seed[seed].append((px, py))
            values = [py for _, py, _ in points]
            ax.scatter([px for px, _, _ in points], values, s=14, color="0.4", zorder=2)
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.errorbar(x, np.mean(values), yerr=sd, fmt="D", color="C3", capsize=6, zorder=3)
        for line in by_seed.values():
            if len(line) > 1:
                ax.plot(*zip(*sorted(line), strict=True), color="0.7", lw=0.8, zorder=1)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("dots: runs (a line joins one seed's); diamonds: mean ± sd", fontsize="small")
    return save_figure(fig, path)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[str, Path, list[Path]]:
    """Load runs, write ``report.md``, ``curves.png`` and ``comparison.png`` into ``out_dir``.

    Returns:
        (markdown text, markdown path, figure paths).
    """
    if not run_dirs:
        raise KinfonceError("run_dirs must name at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        plot_training_curves(runs, out / "curves.png"),
        plot_loss_comparison(runs, out / "comparison.png"),
    ]
    text = markdown_table(runs)
    md_path = out / "report.md"
    md_path.write_text(
        f"# kinfonce runs\n\n{text}\n" + "".join(f"![{f.stem}]({f.name})\n" for f in figures)
    )
    return text, md_path, figures


def embed_2d(features, *, seed: int = 0) -> tuple[Any, str]:
    """2-D embedding of (M, F) features: UMAP when ``umap-learn`` is installed, else t-SNE.

    t-SNE runs with one OpenMP thread: on a busy 2-core machine its threaded loops spent
    most of their time waiting (1000 points: 104 s with two threads, 22 s with one).

    Returns:
        ((M, 2) numpy array, name of the method used).
    """
    import numpy as np

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise KinfonceError(f"features must be (M, F) with M >= 3, got shape {x.shape}")
    try:
        import umap
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (x.shape[0] - 1) / 3)
        from threadpoolctl import threadpool_limits

        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        with threadpool_limits(limits=1, user_api="openmp"):
            return tsne.fit_transform(x), "t-SNE"
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"


def plot_feature_map(
    features,
    labels,
    class_names: list[str],
    path: str | Path,
    *,
    max_points: int = 1000,
    seed: int = 0,
    title: str = "test features",
) -> Path:
    """Draw a 2-D map (t-SNE or UMAP) of a random subsample of features, coloured by class.

    Args:
        features: (M, F) features. labels: (M,) class indices into ``class_names``.
        path: PNG file to write.
        max_points: subsample size (t-SNE is quadratic-ish in M).
        seed: seeds the subsample and the embedding.
    """
    import matplotlib
    import numpy as np

    x, y = np.asarray(features), np.asarray(labels)
    if x.shape[0] != y.shape[0]:
        raise KinfonceError(
            f"features and labels must have the same length, got {x.shape[0]}, {y.shape[0]}"
        )
    if max_points < 3:
        raise KinfonceError(f"max_points must be >= 3, got {max_points}")
    keep = np.random.default_rng(seed).permutation(x.shape[0])[:max_points]
    points, method = embed_2d(x[keep], seed=seed)
    fig = new_figure((7, 6))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    for cls, name in enumerate(class_names):
        mask = y[keep] == cls
        if mask.any():
            ax.scatter(*points[mask].T, s=6, color=cmap(cls % cmap.N), label=name)
    ax.set_title(f"{title}: {method} of {len(keep)} points")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(class_names) <= 20:
        ax.legend(fontsize="small", markerscale=2, loc="best")
    return save_figure(fig, path)


def format_summary(metrics: dict[str, Any]) -> str:
    """A small table of a pretraining run: pretrained encoder vs the two baselines."""
    rows = [("pretrained encoder", "")]
    if "random_encoder_linear_top1" in metrics:
        rows += [("random-weight encoder", "random_encoder_"), ("raw pixels", "raw_pixels_")]
    lines = [f"{'features':<24}{'linear top-1':>14}{'kNN top-1':>12}"]
    for label, prefix in rows:
        lines.append(
            f"{label:<24}{metrics[prefix + 'linear_top1']:>14.4f}{metrics[prefix + 'knn_top1']:>12.4f}"
        )
    if len(rows) > 1:
        best = max(rows, key=lambda row: metrics[row[1] + "linear_top1"])[0]
        lines.append(f"highest linear-probe accuracy: {best}")
    return "\n".join(lines)


def format_eval_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of the linear and kNN accuracies present in ``metrics``."""
    lines = [f"{'protocol':<10}{'top-1':>9}{'top-5':>9}"]
    for label, prefix in (("linear", "linear_"), ("kNN", "knn_")):
        if prefix + "top1" in metrics:
            top1, top5 = (format_percent(metrics[prefix + k]) for k in ("top1", "top5"))
            lines.append(f"{label:<10}{top1:>9}{top5:>9}")
    return "\n".join(lines)


def write_eval_outputs(
    metrics: dict[str, Any],
    splits: Any,
    out_dir: str | Path,
    *,
    checkpoint: str | Path,
    map_points: int = 1000,
) -> dict[str, Path]:
    """Write the results of :func:`kinfonce.evaluate.evaluate_checkpoint`.

    Writes ``metrics.json`` (every metric and setting, without the features) and, unless
    ``map_points`` is 0, ``feature_map.png``: a 2-D map of up to ``map_points`` test
    features coloured by class.

    Returns:
        Name ("metrics", "feature_map") -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    if map_points:
        written["feature_map"] = plot_feature_map(
            metrics["test_features"],
            splits.test.labels,
            splits.class_names,
            out / "feature_map.png",
            max_points=map_points,
            seed=metrics["seed"],
            title=f"{splits.name} test features",
        )
    record = {k: v for k, v in metrics.items() if k != "test_features"}
    record.update(checkpoint=str(checkpoint), test_images=len(splits.test.labels))
    written["metrics"] = write_text_atomic(
        out / "metrics.json", json.dumps(record, indent=2) + "\n"
    )
    return written


#: Columns of the trial tables of ``kinfonce tune``, before the searched fields.
TRIAL_COLUMNS = ("rank", "trial", "status", "epochs", "probe top-1", "train loss")
#: Line style of a trial's curve by status.
TRIAL_STYLES = {"completed": "-", "stopped": "-", "unfinished": "--", "failed": ":"}


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if _is_number(value) else str(value)


def trial_table(trials: list[Any], keys: Sequence[str]) -> str:
    """A markdown table of search trials (:class:`kinfonce.tune.TrialRecord`), in the given
    order, with their sampled values of the fields ``keys``."""
    rows = []
    for rank, trial in enumerate(trials, start=1):
        row = {
            "rank": str(rank),
            "trial": trial.trial_id,
            "status": trial.status,
            "epochs": str(trial.epochs[-1] if trial.epochs else 0),
            "probe top-1": format_percent(trial.last_probe),
            "train loss": _format_value(trial.train_loss),
        }
        row.update({key: _format_value(trial.params.get(key)) for key in keys})
        rows.append(row)
    return format_markdown((*TRIAL_COLUMNS, *keys), rows)


def search_summary(trials: list[Any], keys: Sequence[str], *, top: int = 5) -> str:
    """Markdown: the ``top`` best trials (ranked as given, failed ones left out), then every
    failed trial with its reason."""
    ranked = [t for t in trials if t.status != "failed"]
    text = f"## Best trials ({min(top, len(ranked))} of {len(trials)})\n\n"
    text += trial_table(ranked[:top], keys) if ranked else "No trial finished an epoch.\n"
    failed = [t for t in trials if t.status == "failed"]
    if failed:
        text += f"\n## Failed trials ({len(failed)})\n\n"
        for trial in failed:
            values = ", ".join(f"{k}={_format_value(trial.params.get(k))}" for k in keys)
            text += f"- {trial.trial_id} ({values}): {trial.error}\n"
    return text


def plot_search_curves(trials: list[Any], path: str | Path, metric: str) -> Path:
    """Probe accuracy against epoch, one line per trial; ASHA's stopped trials end early."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for trial in trials:
        if trial.epochs:
            ax.plot(
                trial.epochs,
                trial.probe_top1,
                linestyle=TRIAL_STYLES[trial.status],
                marker="o",
                markersize=3,
                label=f"{trial.trial_id} ({trial.status})",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title("online probe accuracy per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.text(0.5, 0.5, "no trial finished an epoch", ha="center", transform=ax.transAxes)
    return save_figure(fig, path)


def write_search_report(
    trials: list[Any], keys: Sequence[str], out_dir: str | Path, metric: str
) -> dict[str, Path]:
    """Write ``summary.md``, ``trials.csv`` and ``probe_curves.png`` of a search.

    Returns:
        Name ("summary", "trials", "curves") -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_search_curves(trials, out / "probe_curves.png", metric)
    summary = out / "summary.md"
    summary.write_text(
        f"# kinfonce tune\n\n{search_summary(trials, keys)}\n![probe curves]({curves.name})\n"
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
