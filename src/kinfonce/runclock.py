"""What a run's training cost, over every segment of a resumed run and every DDP rank.

A run that was interrupted, or finished and resumed with more epochs, trains in segments,
each a separate process (or set of DDP processes). :class:`RunClock` is a Lightning callback
whose state travels in the checkpoints: the training wall time and CPU time of the segments
before the one that runs now. At the end of training it hands over, through
``trainer.callback_metrics`` (which Lightning brings back to the main process even from
spawned or forked DDP workers), those earlier totals and this segment's CPU time summed
over the ranks; :func:`run_times` adds the main process's own times to them.

What an earlier segment spent after its last checkpoint (an interrupted epoch, its final
evaluation) is not counted: that work is not part of the result.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

#: Keys the clock leaves in ``trainer.callback_metrics`` at the end of training.
EARLIER_WALL, EARLIER_CPU, SEGMENT_CPU = "earlier_wall_s", "earlier_cpu_s", "segment_cpu_s"


class RunClock(L.Callback):
    """Training wall time (rank 0's) and CPU time (summed over ranks) of a run's segments.

    The CPU time of all ranks is summed where every rank meets anyway: at the start of each
    validation, and at the end of training. A checkpoint holds the sum of its last
    validation.
    """

    def __init__(self) -> None:
        self.earlier_wall = 0.0
        self.earlier_cpu = 0.0
        self._ranks_cpu = 0.0
        self._wall_start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._wall_start, self._cpu_start = time.perf_counter(), time.process_time()

    def _sum_over_ranks(self, trainer: L.Trainer) -> float:
        own = torch.tensor(time.process_time() - self._cpu_start, dtype=torch.float64)
        total = trainer.strategy.reduce(own.to(trainer.strategy.root_device), reduce_op="sum")
        return float(total)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._ranks_cpu = self._sum_over_ranks(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        segment = self._sum_over_ranks(trainer)
        values = {EARLIER_WALL: self.earlier_wall, EARLIER_CPU: self.earlier_cpu}
        values[SEGMENT_CPU] = segment
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)

    def state_dict(self) -> dict[str, float]:
        return {
            "wall_s": self.earlier_wall + time.perf_counter() - self._wall_start,
            "cpu_s": self.earlier_cpu + self._ranks_cpu,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.earlier_wall = float(state_dict.get("wall_s", 0.0))
        self.earlier_cpu = float(state_dict.get("cpu_s", 0.0))


def run_times(
    logged: dict[str, Any], segment_wall: float, fit_wall: float, main_cpu_outside_fit: float
) -> dict[str, float]:
    """The times ``metrics.json`` records, over every segment of the run.

    Args:
        logged: ``trainer.callback_metrics`` after fit (the :class:`RunClock` keys).
        segment_wall: wall time of this segment, from the start of the command.
        fit_wall: wall time of this segment's training (``trainer.fit``).
        main_cpu_outside_fit: CPU time of the main process before and after ``trainer.fit``
            (loading data, the final evaluation; inside fit its ranks are counted).

    Returns:
        ``pretrain_time_s`` (training), ``wall_time_s`` (the whole run) and ``cpu_time_s``
        (every rank's training and the main process's work around it).
    """
    earlier_wall, earlier_cpu, segment_cpu = (
        float(logged.get(key, 0.0)) for key in (EARLIER_WALL, EARLIER_CPU, SEGMENT_CPU)
    )
    return {
        "pretrain_time_s": earlier_wall + fit_wall,
        "wall_time_s": earlier_wall + segment_wall,
        "cpu_time_s": earlier_cpu + segment_cpu + main_cpu_outside_fit,
    }
