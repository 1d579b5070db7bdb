"""Text tables, each a pure function of plain values.

The console summaries of a run and of an evaluation, the markdown tables of ``kinfonce
report`` and of a search. The commands print them (a training module returns its metrics and
formats nothing), and nothing here reads a run directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: What each encoder of a run's final evaluation is, by its metric prefix.
ENCODER_NAMES = {
    "": "pretrained encoder",
    "random_encoder_": "random-weight encoder",
    "raw_pixels_": "raw pixels",
}

#: Columns of the trial tables of ``kinfonce tune``, before the searched fields.
TRIAL_COLUMNS = ("rank", "trial", "status", "epochs", "probe top-1", "train loss")


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_percent(value: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal, '-' when missing or not finite."""
    if not is_number(value) or not math.isfinite(value):
        return "-"
    return f"{100 * value:.1f}%"


def format_duration(seconds: Any) -> str:
    """Seconds as '42 s', '3 min 05 s' or '2 h 07 min'; '-' when missing."""
    if not is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_value(value: Any) -> str:
    """A number with four significant digits, other values as text, '-' for None."""
    if value is None:
        return "-"
    return f"{value:.4g}" if is_number(value) else str(value)


def format_parameters(params: Mapping[str, Any]) -> str:
    """``name=value, ...`` in the order given (numbers as ``%g``), '-' when empty."""
    text = [f"{k}={v:g}" if is_number(v) else f"{k}={v}" for k, v in params.items()]
    return ", ".join(text) or "-"


def format_markdown(columns: Sequence[str], rows: list[Mapping[str, str]]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (column -> text)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(row[c].replace("|", "/") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_summary(metrics: Mapping[str, Any]) -> str:
    """A small table of a training run: the pretrained encoder against the two baselines,
    then the zero-shot accuracy and retrieval recall of a ``kinfonce clip`` run (a run on
    captions without labels has only the recall); accuracies in percent, as ``kinfonce
    eval`` and ``kinfonce report`` print them."""
    if "linear_top1" not in metrics:
        return format_retrieval(metrics)
    prefixes = [p for p in ENCODER_NAMES if p + "linear_top1" in metrics]
    lines = [f"{'features':<24}{'linear top-1':>14}{'kNN top-1':>12}"]
    for prefix in prefixes:
        linear, knn = (format_percent(metrics[prefix + k]) for k in ("linear_top1", "knn_top1"))
        lines.append(f"{ENCODER_NAMES[prefix]:<24}{linear:>14}{knn:>12}")
    if len(prefixes) > 1:
        best = max(prefixes, key=lambda prefix: metrics[prefix + "linear_top1"])
        lines.append(f"highest linear-probe accuracy: {ENCODER_NAMES[best]}")
    if "zero_shot_top1" in metrics:
        lines += [
            f"zero-shot top-1 (plain prompt):                {format_percent(metrics['zero_shot_top1'])}",
            "zero-shot top-1 (all captions of each class):  "
            + format_percent(metrics["zero_shot_ensemble_top1"]),
        ]
    if "image_to_text_r1" in metrics:
        lines.append(format_retrieval(metrics))
    return "\n".join(lines)


def format_retrieval(metrics: Mapping[str, Any]) -> str:
    """Retrieval recall at 1, 5 and 10 on the held-out pairs, and the pair graph's components
    without and with rewrites, of a ``kinfonce clip --captions`` run."""
    ks = (1, 5, 10)
    lines = [
        f"retrieval on {metrics['test_images']} held-out images and their "
        f"{metrics['test_captions']} captions",
        f"{'direction':<24}" + "".join(f"{f'R@{k}':>9}" for k in ks),
    ]
    for label, name in (("image to text", "image_to_text"), ("text to image", "text_to_image")):
        lines.append(
            f"{label:<24}" + "".join(f"{format_percent(metrics[f'{name}_r{k}']):>9}" for k in ks)
        )
    if "graph_components" in metrics:
        lines.append(
            f"pair graph components: {metrics['graph_components']} (own captions), "
            f"{metrics['graph_components_with_rewrites']} (with rewrites); largest "
            f"{metrics['graph_largest_component']} -> "
            f"{metrics['graph_largest_component_with_rewrites']} vertices; "
            f"{metrics['graph_images_joined_by_rewrites']} images joined by the rewrites"
        )
    return "\n".join(lines)


def format_eval_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of the linear and kNN accuracies present in ``metrics``."""
    lines = [f"{'protocol':<10}{'top-1':>9}{'top-5':>9}"]
    for label, prefix in (("linear", "linear_"), ("kNN", "knn_")):
        if prefix + "top1" in metrics:
            top1, top5 = (format_percent(metrics[prefix + k]) for k in ("top1", "top5"))
            lines.append(f"{label:<10}{top1:>9}{top5:>9}")
    return "\n".join(lines)


def trial_table(trials: Sequence[Any], keys: Sequence[str]) -> str:
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
            "train loss": format_value(trial.train_loss),
        }
        row.update({key: format_value(trial.params.get(key)) for key in keys})
        rows.append(row)
    return format_markdown((*TRIAL_COLUMNS, *keys), rows)


def search_summary(trials: Sequence[Any], keys: Sequence[str], *, top: int = 5) -> str:
    """Markdown: the ``top`` best trials (ranked as given, failed ones left out), then every
    failed trial with its reason."""
    ranked = [t for t in trials if t.status != "failed"]
    text = f"## Best trials ({min(top, len(ranked))} of {len(trials)})\n\n"
    text += trial_table(ranked[:top], keys) if ranked else "No trial finished an epoch.\n"
    failed = [t for t in trials if t.status == "failed"]
    if failed:
        text += f"\n## Failed trials ({len(failed)})\n\n"
        for trial in failed:
            values = ", ".join(f"{k}={format_value(trial.params.get(k))}" for k in keys)
            text += f"- {trial.trial_id} ({values}): {trial.error}\n"
    return text
