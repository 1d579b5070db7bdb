"""Faults that must neither lose nor mix up a pretraining run (issue 10, cases 1-6 and 8).

Each test names the case it reproduces and the bug of the earlier code it catches.
Kills are real: a forked process sends itself SIGKILL at an epoch boundary.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import kinfonce.fileio
from kinfonce.checkpoints import AtomicCheckpointIO, furthest_checkpoint, load_checkpoint
from kinfonce.cli import main
from kinfonce.config import config_differences
from kinfonce.errors import KinfonceError
from kinfonce.rundir import check_run_dir_free, claim_run_dir
from kinfonce.train import run_pretrain
from tests.helpers import KillAtEpochStart, run_in_child, tiny_config, tiny_flags

FORK = multiprocessing.get_context("fork")
TINY_FLAGS = tiny_flags(train_subset=64)


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def log_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "logs" / "metrics.csv").open() as file:
        return [int(row["epoch"]) for row in csv.DictReader(file) if row["train_loss"]]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny 2-epoch run: last.ckpt and best.ckpt at epoch 1 (2 steps per epoch)."""
    config = tiny_config(tmp_path_factory.mktemp("finished"), epochs=2, train_subset=64)
    run_pretrain(config)
    return Path(config.output_dir)


# Case 1 -- two runs into one --output-dir: the second wrote config.yaml over the first's,
# and CSV rows of one run under the other's header. Now the first holds a lock and the
# second, a separate process, is refused before writing anything.


class StartSecondRun(L.Callback):
    """While the first run trains, a second process tries the same directory."""

    def __init__(self, second_config):
        self.second_config, self.message = second_config, None

    def on_train_start(self, trainer, pl_module):
        receive, send = FORK.Pipe(duplex=False)

        def second_run():
            try:
                run_pretrain(self.second_config)
                send.send("second run was not refused")
            except KinfonceError as err:
                send.send(str(err))

        child = FORK.Process(target=second_run)
        child.start()
        child.join(timeout=120)
        self.message = receive.recv() if receive.poll() else f"no answer ({child.exitcode})"


def test_second_process_into_a_running_run_dir_is_refused(tmp_path):
    first = tiny_config(tmp_path, epochs=1, train_subset=64)
    second = tiny_config(tmp_path, epochs=1, train_subset=64, lr=0.5)
    probe = StartSecondRun(second)
    metrics = run_pretrain(first, callbacks=[probe])
    assert "in use by a running kinfonce process" in probe.message
    assert f"pid {os.getpid()}" in probe.message  # names the holder
    run = Path(first.output_dir)
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 1.0  # the first run's
    assert metrics["run_dir"] == str(run) and log_epochs(run) == [0]
    # Once the first has finished, a new run is still refused: the directory holds a run.
    before = files_under(run)
    with pytest.raises(KinfonceError, match="already holds a run"):
        run_pretrain(second)
    assert files_under(run) == before


def test_lock_refuses_a_second_claim_even_after_both_checks(tmp_path):
    """The race both early checks pass: the lock itself decides (catches a check-then-write)."""
    run = tmp_path / "run"
    with claim_run_dir(run, resume=False):
        with pytest.raises(KinfonceError, match=f"in use .*pid {os.getpid()}"):
            check_run_dir_free(run, resume=True)
        with pytest.raises(KinfonceError, match="in use"), claim_run_dir(run, resume=True):
            pass
    with claim_run_dir(run, resume=False):  # released: the directory holds no run files
        pass


# Case 2 -- a directory with config.yaml and metrics.json but no checkpoint was overwritten.


def test_directory_holding_run_files_without_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 0.3\n")
    (run / "metrics.json").write_text("{}\n")
    before = files_under(run)
    code = main(["pretrain", *TINY_FLAGS, "--output-dir", str(run)])
    assert code == 2
    assert files_under(run) == before and sorted(p.name for p in run.iterdir()) == [
        "config.yaml",
        "metrics.json",
    ]


# Case 3 -- checkpoints were written to a temp file in $TMPDIR and renamed without fsync; on
# another file system the "rename" became a copy that a kill or a full disk truncated, and the
# resume then died with EOFError instead of using the good best.ckpt.


def test_checkpoint_write_is_temp_file_fsync_rename_in_its_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b))[1]
    )
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 3}, target)
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1 and Path(replaces[0][1]).parent == target.parent
    assert events.index(replaces[0]) > events.index("fsync")  # file fsynced before the rename
    assert events[-1] == "fsync"  # then the directory
    assert torch.load(target, weights_only=True) == {"epoch": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new file's data cannot be stored
    with pytest.raises(KinfonceError, match=r"no space left .*already written are whole"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_resume_skips_truncated_and_empty_checkpoints(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (run / "checkpoints" / "interrupted.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping checkpoint") as record:
        assert furthest_checkpoint(run / "checkpoints") == run / "checkpoints" / "best.ckpt"
    assert len(record) == 2
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    with pytest.raises(KinfonceError, match="no readable checkpoint"), pytest.warns(UserWarning):
        furthest_checkpoint(run / "checkpoints")


# Case 4 -- the resume took the newest file by modification time: after a copy that did not
# keep times, an older interrupted.ckpt won over a further last.ckpt and epochs were lost.


def test_resume_takes_the_furthest_checkpoint_not_the_newest_file(finished_run, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", checkpoints)
    earlier = load_checkpoint(checkpoints / "last.ckpt")
    earlier.update(epoch=0, global_step=1)
    torch.save(earlier, checkpoints / "interrupted.ckpt")
    os.utime(checkpoints / "last.ckpt", (1, 1))  # far older on disk
    os.utime(checkpoints / "best.ckpt", (1, 1))
    assert furthest_checkpoint(checkpoints) == checkpoints / "last.ckpt"


# Case 5 -- two kills in a row: the CSV logger emptied metrics.csv at each start and the
# earlier rows were merged back only on a clean exit, so epochs before the first kill were
# lost. Also the kill -9 + resume path must end bit-identical to an uninterrupted run.


def test_two_kills_keep_every_epoch_and_end_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order in every process, for bit-identity
    try:
        straight = tiny_config(tmp_path / "a", epochs=4, train_subset=64)
        run_pretrain(straight)
        killed = tiny_config(tmp_path / "b", epochs=4, train_subset=64)
        assert (
            run_in_child(run_pretrain, killed, callbacks=[KillAtEpochStart(2)]) == -signal.SIGKILL
        )
        assert (
            run_in_child(run_pretrain, killed, resume="last", callbacks=[KillAtEpochStart(3)]) == -9
        )
        run = Path(killed.output_dir)
        assert log_epochs(run) == [0, 1, 2]
        run_pretrain(killed, resume="last")
    finally:
        torch.set_num_threads(threads)
    assert log_epochs(run) == [0, 1, 2, 3]
    final_a = load_checkpoint(Path(straight.output_dir) / "checkpoints" / "last.ckpt")
    final_b = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final_b["global_step"] == final_a["global_step"] == 8
    for key, value in final_a["state_dict"].items():
        assert torch.equal(final_b["state_dict"][key], value), key


# Case 6 and the small holes of case 8 -- bad values failed inside fit, after config.yaml and
# an interrupted.ckpt of the untrained model were written (the directory was then stuck);
# --proj-out-dim 0 became 128; --devices abc and a file as --output-dir gave tracebacks.


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--lr", "-1"], "lr must be a finite number > 0"),
        (["--warmup-epochs", "-1"], r"warmup_epochs must be a finite number >= 0, got -1"),
        (["--proj-out-dim", "0"], "proj_out_dim must be >= 1, got 0"),
        (["--devices", "abc"], "devices must be 'auto'"),
        (["--temperature1", "0"], "'simple-sum' loss cannot be built .*temperature must be"),
    ],
)
def test_bad_values_fail_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_FLAGS, *flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("keep")
    assert main(["pretrain", *TINY_FLAGS, "--output-dir", str(path)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert path.read_text() == "keep"


def test_resume_compares_nan_as_equal():
    assert config_differences({"lr": float("nan")}, {"lr": float("nan")}) == []
    assert config_differences({"lr": float("nan")}, {"lr": 1.0}) == [
        "lr: checkpoint has nan, now 1.0"
    ]


def test_ctrl_c_in_the_final_evaluation_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Case 8: Ctrl-C after training printed a traceback and no hint; the resume finishes."""
    import kinfonce.train

    real = kinfonce.train.evaluate_baselines

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = str(tmp_path / "run")
    monkeypatch.setattr(kinfonce.train, "evaluate_baselines", interrupted)
    assert main(["pretrain", *TINY_FLAGS, "--output-dir", out]) == 130
    assert f"--output-dir {out} --resume" in capsys.readouterr().err
    monkeypatch.setattr(kinfonce.train, "evaluate_baselines", real)
    assert main(["pretrain", "--output-dir", out, "--resume", "--no-progress"]) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert log_epochs(tmp_path / "run") == [0]  # the finished epoch is not trained again


def test_eval_and_synthetic_refuse_an_unwritable_out_before_computing(
    finished_run, tmp_path, capsys, monkeypatch
):
    """Case 8: `eval --output-dir` and `synthetic --output-dir` (then `--out`) failed only after
    all the computation."""
    import kinfonce.evaluate
    import kinfonce.synthetic

    def computed(*args, **kwargs):
        raise AssertionError("the output directory was checked only after the computation")

    monkeypatch.setattr(kinfonce.evaluate, "evaluate_checkpoint", computed)
    monkeypatch.setattr(kinfonce.synthetic, "run_experiment", computed)
    blocker = tmp_path / "file"
    blocker.write_text("")
    checkpoint = str(finished_run / "checkpoints" / "last.ckpt")
    assert main(["eval", checkpoint, "--output-dir", str(blocker / "eval")]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert main(["synthetic", "--output-dir", str(blocker / "syn")]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_temp_files_of_killed_writes_are_removed_by_the_next_owner(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    leftover = run / "checkpoints" / f".last.ckpt.123-abcd{kinfonce.fileio.TEMP_SUFFIX}"
    leftover.write_bytes(b"half a checkpoint")
    with claim_run_dir(run, resume=True):
        assert not leftover.exists()


def test_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    """Case 6: a run that failed before any checkpoint left its directory stuck (a rerun
    "already holds a run", a resume "nothing to resume"). Now --resume starts it again."""
    from kinfonce.checkpoints import resume_checkpoint
    from kinfonce.errors import MissingFileError

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MissingFileError, match="nothing to resume"):
        resume_checkpoint(run, "last")
    (run / "config.yaml").write_text("lr: 1.0\n")
    with pytest.warns(UserWarning, match="starts again from epoch 0"):
        assert resume_checkpoint(run, "last") is None
