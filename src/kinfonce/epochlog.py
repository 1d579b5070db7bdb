"""The per-epoch training log ``RUN_DIR/logs/metrics.csv``, which no fault can shorten.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts and rewrites it
in place when a column appears, so a run killed twice in a row loses the epochs before
the first kill. :class:`EpochLog` instead writes the whole file again after every epoch
with :func:`kinfonce.fileio.atomic_write`: the rows of earlier epochs (also those of the
runs this one resumes) followed by the new row. A row for epoch ``e`` replaces the rows of
epochs ``e`` and later, which a resume from an earlier checkpoint trains again.

It is also the one reader of that log (:func:`read_csv_log`, :func:`read_epoch_curves`),
also of the Lightning ``CSVLogger`` files of older runs.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import lightning as L

from kinfonce.fileio import write_text_atomic

#: The first columns of the log: the epoch (from 0) and the global step at its end; the
#: epoch's logged metrics (``train_loss``, ``probe_top1``, ...) follow by name.
COLUMNS = ("epoch", "step")


def read_csv_log(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV log (empty when there is none)."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def find_epoch_log(run_dir: Path) -> Path | None:
    """The newest ``metrics.csv`` under ``run_dir/logs`` (the epoch log, or an older run's
    CSVLogger file), or None."""
    found = sorted((run_dir / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_epoch_curves(
    path: Path | None, columns: Sequence[str]
) -> dict[str, tuple[list[int], list[float]]]:
    """Per-epoch curves of the given columns of a CSV log: column -> (epochs, values).

    Epochs are counted from 1 (Lightning counts them from 0). Rows with an empty cell are
    skipped; several values of one epoch (per-step logging of older logs) are averaged. A
    column without values, or no log (``path`` None), gives no curve.
    """
    rows = read_csv_log(path) if path is not None else []
    curves = {}
    for column in columns:
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for row in rows:
            if row.get(column) not in (None, "") and row.get("epoch") not in (None, ""):
                per_epoch[int(float(row["epoch"])) + 1].append(float(row[column]))
        epochs = sorted(per_epoch)
        if epochs:
            curves[column] = (epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs])
    return curves


def _epoch_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("epoch") or "nan")
    except ValueError:
        return float("nan")


def append_epoch(path: Path, row: dict[str, object]) -> None:
    """Write ``path`` again as its rows of epochs before ``row["epoch"]``, then ``row``.

    Rows without a readable epoch are dropped; every column of the rows kept and of the new
    one is kept (a row lacking one leaves it empty).
    """
    kept = [r for r in read_csv_log(path) if _epoch_of(r) < int(row["epoch"])]
    extra = sorted({key for r in [*kept, row] for key in r if key and key not in COLUMNS})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[*COLUMNS, *extra], restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows([*({k: v for k, v in r.items() if k} for r in kept), row])
    write_text_atomic(path, text.getvalue())


class EpochLog(L.Callback):
    """Log the metrics of every finished training epoch (with its validation) to ``path``.

    Only the global-zero process writes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        row: dict[str, object] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({name: float(value) for name, value in metrics.items()})
        append_epoch(self.path, row)
