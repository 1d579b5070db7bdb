"""benchmarks/gpu_speed.py at tiny sizes on the CPU, the way the GPU run drives it: each part
writes its JSON file, and the summary of the files has every figure of the RESULT line.

A GPU's time is short and lent rarely: a part that fails there for a reason a CPU shows too (a
renamed function, a wrong key in the summary) costs the whole measurement. This catches those.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_part_runs_and_the_summary_has_every_figure(tmp_path, monkeypatch, capsys):
    gpu_speed = load_script()
    cpu = torch.device("cpu")
    for part in gpu_speed.PARTS:
        monkeypatch.setattr(gpu_speed, "_JSON", tmp_path / f"{part}.json")
        result = gpu_speed.keep(gpu_speed.run_part(part, cpu, scale="tiny"))
        assert "error" not in result, (part, result)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gpu_speed.py", "--summary", str(tmp_path)])
    gpu_speed.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    figures = dict(item.split("=", 1) for item in last.split()[1:])
    assert figures["failed_parts"] == "none"
    for key in (
        "loss_time_over_ntxent_g2_2n256",
        "loss_time_over_ntxent_g1_2n256",
        "loss_exact_over_tf32_g2_2n256",
        "loss_exact_over_tf32_g1_2n256",
        "step_images_per_s",
        "views_share",
        "peer_images_per_s",
        "step_over_peer",
        "eval_s",
        "pretrain_eval_s",
        "clip_eval_s",
    ):
        assert float(figures[key]) > 0, key


def test_gpu_run_stops_before_any_part_without_the_carried_packages(tmp_path):
    """Without .device/site.tar.xz (``pack.sh`` not run, or .device not carried) the GPU run
    stops at once with a message naming the fix, instead of spending the machine's time on
    parts that fail for want of simplejpeg."""
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SCRIPT.parent / "gpu_run.sh")],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "SITE": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no .device/site.tar.xz" in done.stdout and "pack.sh 2000" in done.stdout
    assert not list(out.glob("*.json")) and not (out / "loss.log").exists()


def test_the_size_past_the_switch_is_past_the_rule_of_auto(monkeypatch):
    """The loss part adds one 2N past the point where "auto" leaves the fused path, from this
    device's available memory; a formula that drifted from ``resolve_path`` would measure the
    fused path twice and the switch never."""
    from types import SimpleNamespace

    from kinfonce.kernel_lse import resolve_path

    gpu_speed = load_script()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(139e9), int(141e9)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=141e9)
    )
    cuda = torch.device("cuda")
    switch = gpu_speed.auto_switch_2n(cuda)
    assert resolve_path("auto", switch, switch, cuda) == "fused"
    assert resolve_path("auto", switch + 8, switch + 8, cuda) == "blocked"
    assert 60_000 < switch < 70_000  # an H200's 139 GB free
