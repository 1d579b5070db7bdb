"""What the commands print, and where their outputs go: the console a user reads.

One tiny run on an image tree (so that data loading has bars of its own), evaluated and
resumed through the command line.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kinfonce.cli
from kinfonce.cli import main
from kinfonce.data.cache import CACHE_ENV
from kinfonce.evaluate import evaluate_encoders
from kinfonce.tables import format_summary
from kinfonce.train import RunProgressBar
from tests.helpers import random_pixels, tiny_flags, write_image_tree

#: Progress-bar labels of loading an image tree.
LOADING_BARS = ("reading sizes", "decoding")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Two classes of 8x8 images: 24 training and 4 test images each."""
    root = tmp_path_factory.mktemp("tree") / "images"
    return write_image_tree(root, random_pixels(8), ["a", "b"], {"train": 24, "test": 4})


def pretrain_flags(tree: Path, **overrides) -> list[str]:
    settings = dict(dataset=f"imagefolder:{tree}", train_subset=40, batch_size=8, progress=False)
    return tiny_flags(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run_dir(tree, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["pretrain", *pretrain_flags(tree), "--output-dir", str(run)]) == 0
    return run


def test_no_progress_hides_the_data_loading_bars(tree, tmp_path, monkeypatch, capsys):
    # Catches --no-progress that hid Lightning's bars but not those of decoding an image tree
    # ("reading sizes", "decoding"), in pretrain and in eval. Each command gets an
    # empty cache, so that it decodes; the control run with bars shows what is looked for.
    for name, progress in (("quiet", False), ("shown", True)):
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / f"cache-{name}"))
        run = tmp_path / name
        flags = pretrain_flags(tree, progress=progress)
        assert main(["pretrain", *flags, "--output-dir", str(run)]) == 0
        pretrain_err = capsys.readouterr().err
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / f"cache-{name}-eval"))
        checkpoint = str(run / "checkpoints" / "last.ckpt")
        quiet = [] if progress else ["--no-progress"]
        assert main(["eval", checkpoint, "--map-points", "0", "--linear-epochs", "1", *quiet]) == 0
        eval_err = capsys.readouterr().err
        for err in (pretrain_err, eval_err):
            shown = [bar for bar in LOADING_BARS if bar in err]
            assert shown == (list(LOADING_BARS) if progress else []), (name, err[-500:])


@pytest.mark.filterwarnings("ignore:the images of")
def test_each_feature_bar_names_its_encoder_and_split(tree, capsys):
    # Catches the final evaluation's bars all labelled "features:", which left a user
    # guessing which encoder each one was.
    from torch import nn

    from kinfonce.data import load_dataset

    splits = load_dataset(f"imagefolder:{tree}", val_fraction=0.1, seed=0)
    encoders = {"": nn.Flatten(), "random_encoder_": nn.Flatten(), "raw_pixels_": nn.Flatten()}
    evaluate_encoders(encoders, splits, protocol="knn", knn_k=3, progress=True)
    err = capsys.readouterr().err
    for name in ("pretrained encoder", "random-weight encoder", "raw pixels"):
        for split in ("train features", "test features"):
            assert f"{name}: {split}" in err


def test_progress_bar_shows_no_logger_version_and_accuracy_in_percent(monkeypatch):
    # Catches `v_num=oard` (the end of the TensorBoard directory's name) in the bar, and a
    # probe accuracy shown as a fraction where the tables print percentages.
    import lightning.pytorch.callbacks.progress.progress_bar as lightning_bar

    trainer = SimpleNamespace(progress_bar_metrics={"probe_top1": 0.2291, "train_loss": 6.09})

    monkeypatch.setattr(lightning_bar, "get_standard_metrics", lambda trainer: {"v_num": "oard"})
    items = RunProgressBar().get_metrics(trainer, None)
    assert items == {"probe_top1": "22.9%", "train_loss": 6.09}


def test_accuracies_print_in_one_form_in_pretrain_eval_and_report(run_dir, capsys):
    # Catches pretrain printing fractions (0.0779) where eval and report print percentages
    # (7.8%) for the same figure.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = format_summary(metrics)
    assert f"{100 * metrics['linear_top1']:.1f}%" in summary
    assert f"{metrics['linear_top1']:.4f}" not in summary


def test_a_warning_prints_one_line_without_source(monkeypatch, capsys):
    # Catches a warning printed with its file, line number and source line
    # (".../train.py:262: UserWarning ... config = validate(config)").
    def warn(args):
        warnings.warn("something to act on", stacklevel=1)
        return 0

    monkeypatch.setattr(kinfonce.cli, "_run_recipes", warn)
    assert main(["recipes"]) == 0
    assert capsys.readouterr().err == "kinfonce recipes: warning: something to act on\n"


def test_report_goes_beside_the_runs_and_says_where(run_dir, tmp_path, monkeypatch, capsys):
    # Catches `kinfonce report` writing report/ into the current directory by default.
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    expected = run_dir.parent / "report"
    assert (expected / "report.md").is_file() and not (tmp_path / "report").exists()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {expected / 'report.md'}")


def test_resume_says_what_it_continues_sets_stale_eval_aside_and_counts_all_time(
    run_dir, tmp_path, capsys
):
    # Catches a resume that did not say which checkpoint and epoch it continued from; an
    # eval/ of the earlier checkpoint left in place, now stale; and a run time that counted
    # the last segment only.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["eval", str(run / "checkpoints" / "last.ckpt"), "--map-points", "0"]) == 0
    assert (run / "eval" / "metrics.json").is_file()
    # The first segment's times as its checkpoint records them, made large enough to see.
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["callbacks"]["RunClock"]["wall_s"] > 0
    saved["callbacks"]["RunClock"] = {"wall_s": 1000.0, "cpu_s": 500.0}
    torch.save(saved, checkpoint)
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["pretrain", "--output-dir", str(run), "--resume", "--epochs", "2"]) == 0
    segment = time.perf_counter() - started
    out = capsys.readouterr().out
    assert f"resuming from {checkpoint}: 1 of 2 epochs trained, 1 to go" in out
    assert not (run / "eval").exists()
    assert (run / "eval-before-epoch-1" / "metrics.json").is_file()
    assert f"to {run / 'eval-before-epoch-1'}" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert 1000 < metrics["pretrain_time_s"] < metrics["wall_time_s"] < 1000 + segment
    assert metrics["cpu_time_s"] > 500


@pytest.mark.parametrize("as_zip", [True, False])
def test_an_image_tree_as_a_named_sets_root_gets_the_command_that_loads_it(
    tmp_path, capsys, as_zip
):
    # Catches `--recipe cifar100-laplacian --data-root cifar100-jpg.zip` failing with "cifar100
    # not found under ... place it as .../cifar-100-python/" and no word of the flag that reads
    # an image tree; the suggested command must then resolve with the recipe.
    root = tmp_path / ("tree.zip" if as_zip else "tree")
    write_image_tree(root, random_pixels(8), ["a", "b"], {"train": 1, "test": 1})
    recipe = ["pretrain", "--recipe", "cifar100-laplacian"]
    assert main([*recipe, "--data-root", str(root), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    suggested = f"--dataset imagefolder:{root}"
    assert "cifar100 not found" in err and suggested in err
    assert main([*recipe, *suggested.split(), "--print-config"]) == 0
    assert f"imagefolder:{root}" in capsys.readouterr().out
