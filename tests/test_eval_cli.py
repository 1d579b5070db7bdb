"""End-to-end tests of `kinfonce eval` and `kinfonce report` on a tiny pretraining run."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinfonce.cli import main
from kinfonce.methods import load_checkpoint
from kinfonce.report import format_percent

PRETRAIN_FLAGS = [
    "--epochs", "2", "--train-subset", "64", "--batch-size", "32", "--eval-linear-epochs", "2",
    "--proj-hidden-dim", "32", "--no-baselines", "--no-progress", "--accelerator", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny `kinfonce pretrain` run on digits (2 epochs of 64 training images, 2 steps each)."""
    out = tmp_path_factory.mktemp("run") / "digits-run"
    assert main(["pretrain", *PRETRAIN_FLAGS, "--output-dir", str(out)]) == 0
    return out


def test_eval_reproduces_pretrain_accuracy(run_dir, tmp_path, capsys):
    pretrain = json.loads((run_dir / "metrics.json").read_text())
    # pretrain evaluates its final weights: last.ckpt must hold them, not the best epoch's.
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    out = tmp_path / "eval"
    # The same device as pretraining (both pinned to the CPU, also on a GPU machine): then the
    # same features and the same seeded probe give bit-identical figures. Catches an eval that
    # loads other weights, another data subset or other probe settings than pretraining used.
    args = ["eval", str(run_dir / "checkpoints" / "last.ckpt"), "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--map-points", "60"]) == 0
    printed = capsys.readouterr().out
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("linear_top1", "linear_top5", "knn_top1", "knn_top5"):
        assert evaluated[key] == pretrain[key], key
    assert format_percent(pretrain["linear_top1"]) in printed
    assert format_percent(pretrain["knn_top1"]) in printed
    assert evaluated["dataset"] == "digits" and evaluated["linear_epochs"] == 2
    assert (out / "feature_map.png").stat().st_size > 0


def test_eval_protocol_knn_without_map_default_out(run_dir):
    assert main(["eval", str(run_dir / "checkpoints" / "best.ckpt"), "--protocol", "knn",
                 "--map-points", "0", "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {"knn_top1", "knn_top5"} <= set(metrics)
    assert "linear_top1" not in metrics
    assert not (run_dir / "eval" / "feature_map.png").exists()


def test_report_cli_writes_table_and_curves(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| digits-run | simclr | simple-sum |" in printed
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 0
    assert "| digits-run |" in (tmp_path / "rep" / "report.md").read_text()


def run_eval_expecting_error(path: Path, capsys, *extra: str) -> str:
    assert main(["eval", str(path), "--no-progress", *extra]) == 2
    return capsys.readouterr().err


def test_eval_rejects_a_checkpoint_from_elsewhere(tmp_path, capsys):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    assert "not a kinfonce" in run_eval_expecting_error(path, capsys)


def test_eval_rejects_a_corrupt_checkpoint(run_dir, tmp_path, capsys):
    path = tmp_path / "broken.ckpt"
    path.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    assert "cannot be read safely" in run_eval_expecting_error(path, capsys)
    assert "does not exist" in run_eval_expecting_error(tmp_path / "missing.ckpt", capsys)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_eval_never_executes_pickled_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Exploit(marker)}, path)
    assert "cannot be read safely" in run_eval_expecting_error(path, capsys)
    assert not marker.exists()


def write_rgb_zip(path: Path, size: int = 8, per_class: int = 4) -> Path:
    """An ImageFolder zip (train/ and test/, two classes) of RGB PNGs of side ``size``."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i in range(per_class):
                    buffer = BytesIO()
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    archive.writestr(f"{split}/{cls}/{i}.png", buffer.getvalue())
    return path


def test_eval_explains_a_data_set_that_does_not_fit(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KINFONCE_CACHE", str(tmp_path / "cache"))
    data = write_rgb_zip(tmp_path / "rgb.zip")
    err = run_eval_expecting_error(
        run_dir / "checkpoints" / "last.ckpt", capsys, "--dataset", f"imagefolder:{data}"
    )
    assert "3x8x8 images" in err and "1x16x16" in err and "'digits'" in err


def test_missing_data_message_names_only_flags_eval_has(run_dir, tmp_path, capsys):
    # Catches advice to pass a flag that `kinfonce eval` does not have (it told users to pass
    # --download before eval had one).
    import re

    from kinfonce.cli import build_parser
    from kinfonce.flagdoc import subcommands

    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    code = main(["eval", ckpt, "--dataset", "cifar10", "--data-root", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err
    named = set(re.findall(r"`(--[a-z-]+)`", err))
    eval_flags = {f for a in subcommands(build_parser())["eval"]._actions for f in a.option_strings}
    assert named and named <= eval_flags, (named, err)
