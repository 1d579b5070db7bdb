"""The statistics of benchmarks/table1.py: paired differences from the Gaussian and resolution."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table1.py"


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["table1"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paired_differences_and_resolution(table1):
    # Catches unpaired differences (seed-to-seed spread of 10 points would swamp them), a
    # standard deviation where the standard error belongs, and a wrong seed count.
    gaussian = [0.50, 0.60, 0.40]  # seeds differ by 10 points
    shifts = {"laplacian": [1.0, 1.2, 0.8], "exp-0.5": [0.0, 0.0, 0.0],
              "simple-sum": [-1.0, 1.0, 0.0], "concat-sum": [2.0, 2.0, 2.0]}  # fmt: skip
    results = {"gaussian": {s + 1: {"linear_top1": g} for s, g in enumerate(gaussian)}}
    for loss, d in shifts.items():
        results[loss] = {s + 1: {"linear_top1": g + x / 100} for s, (g, x) in
                         enumerate(zip(gaussian, d, strict=True))}  # fmt: skip
    summary = table1.summarize(results, "linear_top1")
    assert summary["per_loss"]["gaussian"]["mean"] == pytest.approx(50.0)
    assert summary["per_loss"]["gaussian"]["sd"] == pytest.approx(10.0)
    lap = summary["vs_gaussian"]["laplacian"]
    assert lap["mean"] == pytest.approx(1.0) and lap["se"] == pytest.approx(0.2 / math.sqrt(3))
    assert lap["beyond_2se"]
    assert not summary["vs_gaussian"]["simple-sum"]["beyond_2se"]  # mean 0, SE 0.58
    pooled = math.sqrt((0.2**2 + 0 + 1.0**2 + 0) / 4)
    resolution = summary["resolution"]
    assert resolution["pooled_sd_of_differences"] == pytest.approx(pooled)
    assert resolution["detectable_at_2se"] == pytest.approx(2 * pooled / math.sqrt(3))
    assert resolution["seeds_for_1_point"] == 2  # 2 * 0.51 / sqrt(2) = 0.72 <= 1
    # 95% t-test: 4.30 * 0.51 / sqrt(3) = 1.27 > 1, 3.18 * 0.51 / sqrt(4) = 0.81 <= 1.
    assert resolution["seeds_for_1_point_t95"] == 4
    assert resolution["detectable_t95"] == pytest.approx(4.3027 * pooled / math.sqrt(3), rel=1e-4)
    assert lap["p_paired_t"] < 0.05 < summary["vs_gaussian"]["simple-sum"]["p_paired_t"]
