"""Figures, each a pure function of plain values (lists, dicts, arrays) that writes one PNG.

Training curves of runs, accuracy per loss, a 2-D map of features, a search's probe curves.
Nothing here reads a run directory or imports a training module, so that the commands that
train (``curves.png`` of a run, a search's probe curves) and the one that reports
(``kinfonce report``) draw the same figures. Figures use matplotlib's ``Figure`` API: no
pyplot, no global backend or state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from kinfonce.errors import KinfonceError
from kinfonce.fileio import atomic_write
from kinfonce.tables import is_number

#: Per-epoch curves: column of the epoch log -> (epochs counted from 1, values).
Curves = Mapping[str, tuple[list[int], list[float]]]

#: Training-curve panels: (title, column of the epoch log).
CURVE_PANELS = (
    ("training loss", "train_loss"),
    ("online probe top-1", "probe_top1"),
)
#: Panels of the comparison figure: (title, key of ``metrics.json``).
COMPARISON_PANELS = (("linear top-1 (%)", "linear_top1"), ("kNN top-1 (%)", "knn_top1"))
#: Line style of a search trial's curve by status.
TRIAL_STYLES = {"completed": "-", "stopped": "-", "unfinished": "--", "failed": ":"}


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` not registered with pyplot: no global backend or state changes."""
    return Figure(figsize=figsize)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out and write (creating the folder, atomically) a matplotlib figure; returns the path."""
    fig.tight_layout()
    out = Path(path)
    return atomic_write(
        out, lambda file: fig.savefig(file, dpi=120, format=out.suffix[1:] or "png")
    )


def plot_curve_panels(named_curves: Mapping[str, Curves], path: str | Path) -> Path:
    """One panel per :data:`CURVE_PANELS` entry, one line per name, as a PNG.

    Args:
        named_curves: line name (a run) -> its curves by column
            (:func:`kinfonce.epochlog.read_epoch_curves`).
    """
    fig = new_figure((5.5 * len(CURVE_PANELS), 4))
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (title, column) in zip(axes, CURVE_PANELS, strict=True):
        for name, curves in named_curves.items():
            if column in curves:
                epochs, values = curves[column]
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


def plot_loss_comparison(
    runs: Sequence[tuple[str, Any, Mapping[str, Any]]], path: str | Path
) -> Path:
    """Accuracy per group (a loss): one dot per run, each group's mean ± sd, and a thin line
    joining the runs of one seed across groups (the pairs of a paired comparison).

    Args:
        runs: (group, seed, metrics) of each run; groups in the order of their first run.
    """
    groups: dict[str, list[tuple[Any, Mapping[str, Any]]]] = defaultdict(list)
    for group, seed, metrics in runs:
        groups[group].append((seed, metrics))
    names = list(groups)
    seeds = sorted({seed for _, seed, _ in runs})
    spread = 0.15 if len(seeds) > 1 else 0.0
    offsets = dict(zip(seeds, np.linspace(-spread, spread, len(seeds)), strict=True))
    fig = new_figure((max(5.5, 1.3 * len(names)) * len(COMPARISON_PANELS) / 1.6, 4))
    axes = fig.subplots(1, len(COMPARISON_PANELS))
    for ax, (title, key) in zip(axes, COMPARISON_PANELS, strict=True):
        by_seed: dict[Any, list[tuple[float, float]]] = defaultdict(list)
        for x, name in enumerate(names):
            points = [
                (x + offsets[seed], 100 * metrics[key], seed)
                for seed, metrics in groups[name]
                if is_number(metrics.get(key))
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


def embed_2d(features, *, seed: int = 0) -> tuple[Any, str]:
    """2-D embedding of (M, F) features: UMAP when ``umap-learn`` is installed, else t-SNE.

    t-SNE runs with one OpenMP thread: on a busy 2-core machine its threaded loops spent
    most of their time waiting (1000 points: 104 s with two threads, 22 s with one).

    Returns:
        ((M, 2) numpy array, name of the method used).
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise KinfonceError(f"features must be (M, F) with M >= 3, got shape {x.shape}")
    try:
        import umap  # optional: the better map where installed
    except ImportError:
        perplexity = min(30.0, (x.shape[0] - 1) / 3)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        with threadpool_limits(limits=1, user_api="openmp"):
            return tsne.fit_transform(x), "t-SNE"
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"


#: Markers that tell apart classes of neighbouring colours on a map of many classes.
CLASS_MARKERS = ("o", "s", "^", "D")


def class_styles(count: int) -> list[tuple[tuple[float, ...], str]]:
    """(RGBA colour, marker) of each of ``count`` classes on a scatter plot, all distinct.

    Up to 20 classes: the qualitative tab10 or tab20 colours, dots. Beyond, where those would
    repeat: ``count`` colours evenly spaced along turbo (a colour map that runs through every
    hue), and the markers of :data:`CLASS_MARKERS` in turn, so that classes of neighbouring
    colours also differ in shape.
    """
    if count <= 20:
        cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
        return [(cmap(i), "o") for i in range(count)]
    cmap = matplotlib.colormaps["turbo"]
    return [(cmap(i / (count - 1)), CLASS_MARKERS[i % len(CLASS_MARKERS)]) for i in range(count)]


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
    for cls, (name, (colour, marker)) in enumerate(
        zip(class_names, class_styles(len(class_names)), strict=True)
    ):
        mask = y[keep] == cls
        if mask.any():
            ax.scatter(*points[mask].T, s=6, color=colour, marker=marker, label=name)
    ax.set_title(f"{title}: {method} of {len(keep)} points")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(class_names) <= 20:
        ax.legend(fontsize="small", markerscale=2, loc="best")
    return save_figure(fig, path)


def plot_search_curves(trials: Sequence[Any], path: str | Path, metric: str) -> Path:
    """Probe accuracy against epoch, one line per search trial; ASHA's stopped trials end early.

    Args:
        trials: records with ``trial_id``, ``status``, ``epochs`` and ``probe_top1``
            (:class:`kinfonce.tune.TrialRecord`).
    """
    fig = new_figure((8, 4.5))
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
