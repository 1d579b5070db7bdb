"""Faults of a pretraining run found by the second fault probe (issue 21, points 5-7 and
12-16): each test names the point and the bug of the earlier code it catches.

Signals are real: a forked process sends one to itself at an epoch boundary, or in the
final evaluation, and the parent reads its exit status.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import kinfonce.train
from kinfonce.checkpoints import load_checkpoint
from kinfonce.cli import main
from kinfonce.epochlog import read_csv_log
from kinfonce.errors import KinfonceError, Terminated
from kinfonce.rundir import check_run_dir_free, claim_run_dir
from kinfonce.train import make_trainer, run_pretrain
from tests.helpers import noisy_colour, tiny_config, tiny_flags, write_image_tree

FLAGS = tiny_flags(train_subset=64)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny 1-epoch run (2 steps)."""
    config = tiny_config(tmp_path_factory.mktemp("finished"), train_subset=64)
    run_pretrain(config)
    return Path(config.output_dir)


class SignalAtEpoch(L.Callback):
    """Send ``signum`` to this process when epoch ``epoch`` starts (the one before is saved)."""

    def __init__(self, signum: int, epoch: int = 1):
        self.signum, self.epoch = signum, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


def run_command(argv: list[str], log: Path, *, setup: str = "", env=None) -> int:
    """``kinfonce.cli.main(argv)`` in a new interpreter after the Python lines ``setup``
    (which may patch kinfonce); its exit status, its stderr in ``log``. A fresh process, not
    a fork of this one: a forked child of the test process could hang on a lock held by one
    of its threads."""
    code = "\n".join(["import os, sys", setup, "from kinfonce.cli import main",
                      f"sys.exit(main({argv!r}))"])  # fmt: skip
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            timeout=300,
            check=False,
        )
    return done.returncode


#: Setup lines for :func:`run_command`: the trainer sends SIGNUM to itself when epoch 1 starts.
SIGNAL_AT_EPOCH_1 = """
import lightning as L
import kinfonce.train as train
class SignalAtEpoch1(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            os.kill(os.getpid(), SIGNUM)
make_trainer = train.make_trainer
train.make_trainer = lambda c, r, callbacks=(): make_trainer(c, r, [*callbacks, SignalAtEpoch1()])
"""


# Point 7 -- SIGTERM in training exited 0 without metrics.json (Lightning's SIGTERMException
# is a SystemExit with status 0), SIGINT in training 1; a scheduler read 0 as success.


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_training_exits_with_its_own_status(tmp_path, signum, status):
    run, log = tmp_path / "run", tmp_path / "stderr"
    argv = ["pretrain", *FLAGS, "--epochs", "3", "--output-dir", str(run)]
    setup = SIGNAL_AT_EPOCH_1.replace("SIGNUM", str(int(signum)))
    assert run_command(argv, log, setup=setup) == status
    text = log.read_text()
    assert f"--output-dir {run} --resume" in text and "Traceback" not in text
    assert (run / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (run / "metrics.json").exists()
    assert main(["pretrain", "--output-dir", str(run), "--resume", "--no-progress"]) == 0
    assert [int(row["epoch"]) for row in read_csv_log(run / "logs" / "metrics.csv")] == [0, 1, 2]


def test_sigterm_in_the_final_evaluation_exits_143(tmp_path):
    run, log = tmp_path / "run", tmp_path / "stderr"
    setup = (
        "import signal, kinfonce.train as train\n"
        "train.evaluate_baselines = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)"
    )
    assert run_command(["pretrain", *FLAGS, "--output-dir", str(run)], log, setup=setup) == 143
    assert "--resume" in log.read_text() and not (run / "metrics.json").exists()


def test_sigterm_to_a_library_run_raises_terminated(tmp_path):
    """Without the command's handler, Lightning's own SIGTERM path ended run_pretrain as if
    it had finished (a SystemExit with status 0)."""
    config = tiny_config(tmp_path, epochs=3, train_subset=64)
    with pytest.raises(Terminated):
        run_pretrain(config, callbacks=[SignalAtEpoch(signal.SIGTERM)])
    assert (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").is_file()


# Point 5 -- a DDP run whose other node never came hung after "MEMBER: 1/2", holding
# config.yaml and .lock, and a rerun without --resume was then refused.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ddp_start_without_the_other_node_times_out_and_leaves_the_dir_free(tmp_path):
    run, log = tmp_path / "run", tmp_path / "stderr"
    argv = ["pretrain", *FLAGS, "--accelerator", "cpu", "--strategy", "ddp", "--num-nodes", "2",
            "--ddp-timeout", "2", "--output-dir", str(run)]  # fmt: skip
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0"}
    assert run_command(argv, log, env=env) == 2
    (line,) = [line for line in log.read_text().splitlines() if "error" in line]
    assert "did not all start within ddp_timeout (2 s)" in line and "MASTER_PORT" in line
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    check_run_dir_free(run, resume=False)  # a rerun takes it


# Point 6 -- after a moved run, Lightning's ModelCheckpoint warned "The dirpath has changed"
# and dropped the best score: the next epoch became best.ckpt however it scored.


def test_the_best_score_survives_a_moved_run_directory(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    trainer = make_trainer(tiny_config(tmp_path, output_dir=str(old)), old)
    best = trainer.checkpoint_callback
    best.best_model_score = torch.tensor(0.222)
    best.best_model_path = str(old / "checkpoints" / "best.ckpt")
    best.best_k_models = {best.best_model_path: best.best_model_score}
    state = best.state_dict()
    moved = make_trainer(tiny_config(tmp_path, output_dir=str(new)), new).checkpoint_callback
    moved.load_state_dict(state)
    assert moved.best_model_score == pytest.approx(0.222)
    assert moved.best_model_path == str(new / "checkpoints" / "best.ckpt")
    assert list(moved.best_k_models) == [moved.best_model_path]


def test_a_moved_run_resumes_with_its_best_checkpoint(finished_run, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(finished_run, run)
    config = tiny_config(tmp_path, output_dir=str(run), epochs=2, train_subset=64)
    run_pretrain(config, resume="last")
    probes = [float(r["probe_top1"]) for r in read_csv_log(run / "logs" / "metrics.csv")]
    best = load_checkpoint(run / "checkpoints" / "best.ckpt")
    (state,) = [v for k, v in best["callbacks"].items() if "'monitor': 'probe_top1'" in k]
    assert float(state["best_model_score"]) == max(probes)
    assert best["epoch"] == probes.index(max(probes))


# Point 12 -- a full or read-only disk outside checkpoint writes gave tracebacks.


def test_a_full_disk_at_the_lock_leaves_no_directory(tmp_path, monkeypatch):
    """Writing .lock on a full disk gave a traceback and left a directory holding only it."""
    import kinfonce.rundir

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kinfonce.rundir.os, "pwrite", full)
    with (
        pytest.raises(KinfonceError, match="lock file failed \\(No space left on device\\)"),
        claim_run_dir(tmp_path / "run", resume=False),
    ):
        pass
    assert not (tmp_path / "run").exists()


def test_a_full_disk_at_the_figure_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """curves.png on a full disk, after the last checkpoint: a traceback, the evaluation
    lost, no resume hint."""
    run = tmp_path / "run"

    def full(curves, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(kinfonce.train, "plot_curve_panels", full)
    assert main(["pretrain", *FLAGS, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write '{run / 'curves.png'}': No space left on device" in err
    assert f"--output-dir {run} --resume" in err and "Traceback" not in err
    assert "linear_top1" in json.loads((run / "metrics.json").read_text())  # not lost
    monkeypatch.undo()
    assert main(["pretrain", "--output-dir", str(run), "--resume", "--no-progress"]) == 0
    assert (run / "curves.png").is_file()


def test_a_full_disk_at_the_csv_log_is_named_as_such(tmp_path, capsys, monkeypatch):
    """The message named interrupted.ckpt (whose write then failed too), not the CSV log."""
    import kinfonce.checkpoints
    import kinfonce.epochlog

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    real = kinfonce.checkpoints.atomic_write
    monkeypatch.setattr(kinfonce.epochlog, "write_text_atomic", full)
    monkeypatch.setattr(
        kinfonce.checkpoints,
        "atomic_write",
        lambda path, write: full(path) if "interrupted" in str(path) else real(path, write),
    )
    run = tmp_path / "run"
    assert main(["pretrain", *FLAGS, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "interrupted.ckpt was not written" in err  # a warning line
    assert f"cannot write '{run / 'logs' / 'metrics.csv'}'" in err
    assert "--resume" in err and "Traceback" not in err


# Points 13-16 -- tracebacks where one line belongs, and a checkpoint eval could not read.


def test_eval_on_a_device_this_machine_lacks_is_one_line(finished_run, tmp_path, capsys):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first of none
    out = tmp_path / "eval"
    ckpt = str(finished_run / "checkpoints" / "last.ckpt")
    assert main(["eval", ckpt, "--device", missing, "--output-dir", str(out)]) == 2
    assert f"device '{missing}' is not on this machine" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_dir_that_is_not_utf8_is_refused_at_the_start(tmp_path, capsys):
    """TensorBoard's writer crashed after config.yaml was written, and --resume again."""
    bad = os.fsdecode(os.fsencode(tmp_path) + b"/bad\xffname")
    assert main(["pretrain", *FLAGS, "--output-dir", bad]) == 2
    assert "output_dir must be a path whose name is valid UTF-8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_eval_of_weights_of_another_backbone_is_one_short_line(finished_run, tmp_path, capsys):
    """torch's 62-line list of every missing and unexpected key."""
    checkpoint = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    checkpoint["kinfonce"]["config"]["backbone"] = "resnet18"
    checkpoint["kinfonce"].pop("backbone_recipe", None)  # as a checkpoint of an earlier kinfonce
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    assert main(["eval", str(edited), "--output-dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and len(err) < 500
    assert "not those of its backbone 'resnet18'" in err and "missing (e.g." in err


def test_a_directory_given_as_the_checkpoint_is_called_a_directory(finished_run, capsys):
    assert main(["eval", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert "is a directory: pass a .ckpt file, such as" in err
    assert str(finished_run / "checkpoints" / "last.ckpt") in err


def test_a_run_pretrained_on_larger_unlabelled_images_evaluates_at_its_size(tmp_path):
    """Point 16: 16 px labelled images beside more 24 px unlabelled ones were decoded at 24
    for pretraining, but at 16 by eval, which then refused the checkpoint."""
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    tree, run = tmp_path / "tree", tmp_path / "run"
    write_image_tree(tree, noisy_colour(colours, size=16), colours, {"train": 20, "test": 5})
    write_image_tree(tree, noisy_colour(colours, size=24), colours, {}, unlabelled=40)
    flags = tiny_flags(dataset=f"imagefolder:{tree}", unlabeled=True, train_subset=None)
    assert main(["pretrain", *flags, "--eval-knn-k", "5", "--output-dir", str(run)]) == 0
    out = tmp_path / "eval"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    argv = ["eval", ckpt, "--output-dir", str(out), "--map-points", "0", "--no-progress"]
    assert main(argv) == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["test_images"] == 10
    run_metrics = json.loads((run / "metrics.json").read_text())
    assert evaluated["knn_top1"] == pytest.approx(run_metrics["knn_top1"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("epochs: true", "epochs must be an integer, got True"),
        ("lr: true", "lr must be a number, got True"),
        ("seed: false", "seed must be an integer, got False"),
        ("output_dir: [a, b]", "output_dir must be a string, got ['a', 'b']"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, capsys, monkeypatch, line, message):
    """Point 9: `epochs: true` ran 1 epoch, `seed: false` as 0, and `output_dir: [a, b]`
    into a directory named "['a', 'b']" (fixed with the settings' one validation pass)."""
    config = tmp_path / "config.yaml"
    config.write_text(line + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", str(config), *FLAGS[:2]]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
