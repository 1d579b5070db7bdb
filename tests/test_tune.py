"""Tests of ``kinfonce tune``: search spaces, checks before Ray starts, and one real search.

The end-to-end search runs Ray Tune with ASHA in this process on digits (tiny backbone,
3 epochs). Its four trials are a grid, run one at a time so that ASHA's decisions do not
depend on timing: a good trial first, a trial whose online probe cannot learn
(``probe_lr: 0``, so ASHA must stop it early), and two whose learning rate makes the loss
non-finite (they must fail with that reason while the search goes on). The search is
interrupted after the first checkpoint, like Ctrl-C, and continued with
``kinfonce tune --resume``.
"""

from __future__ import annotations

import csv
import os
import signal

import pytest
import ray
import yaml
from ray import tune as ray_tune

from kinfonce.cli import main
from kinfonce.config import PretrainConfig, SearchSettings
from kinfonce.space import (
    Dimension,
    check_space,
    default_space,
    load_space,
    parse_space,
)
from kinfonce.tables import search_summary
from kinfonce.tune import TrialRecord, failure_reason, run_search
from tests.helpers import tiny_config

# --- search spaces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "keys"),
    [
        ("simple-sum", {"lr", "temperature1", "temperature2", "lam", "gamma1"}),
        ("concat-sum", {"lr", "temperature1", "temperature2", "lam", "gamma1"}),
        ("laplacian", {"lr", "temperature"}),
        ("exponential", {"lr", "temperature"}),
        ("spectral", {"lr"}),
    ],
)
def test_default_space_is_table3_for_the_presets_parameters(loss, keys):
    # Bug caught: a default space with a parameter the preset rejects (every trial would
    # fail) or without one it takes (it would never be searched), or off Table 3's ranges.
    # The sums' gamma1 is the authors' code's {0.5, 1} (Table 3 has none); the temperatures'
    # range is the code's [0.01, 1] (Table 3 prints [0, 1]).
    space = default_space(loss)
    assert set(space) == keys
    table3 = {"lr": ("loguniform", (1e-2, 10.0)), "lam": ("uniform", (0.0, 1.0))}
    table3.update(dict.fromkeys(("temperature", "temperature1", "temperature2"),
                                ("loguniform", (1e-2, 1.0))))  # fmt: skip
    table3["gamma1"] = ("choice", (0.5, 1.0))
    for key, dim in space.items():
        assert (dim.kind, dim.values) == table3[key], key
    for method in ("simclr", "moco"):
        check_space(space, PretrainConfig(loss=loss, method=method))


def test_dimensions_draw_inside_their_ranges():
    # Bug caught: Ray's randint excludes its upper bound, so an inclusive "randint: [0, 3]"
    # passed on unchanged would never draw 3; loguniform must stay inside [low, high].
    space = parse_space(
        {"seed": {"randint": [0, 3]}, "lr": {"loguniform": [0.01, 10]}, "lam": {"uniform": [0, 1]}}
    )
    seeds = space["seed"].to_tune().sample(size=400)
    assert set(seeds) == {0, 1, 2, 3}
    lrs = space["lr"].to_tune().sample(size=400)
    assert min(lrs) >= 0.01 and max(lrs) <= 10.0 and min(lrs) < 0.1 and max(lrs) > 1.0


def test_space_file_round_trip(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {loguniform: [0.05, 5]}\nbatch_size: {choice: [64, 128]}\n")
    space = load_space(path)
    assert space["lr"] == Dimension("loguniform", (0.05, 5.0))
    assert space["batch_size"] == Dimension("choice", (64, 128))


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"learning_rate": {"uniform": [0, 1]}}, "'learning_rate' is not a config field"),
        ({"epochs": {"randint": [1, 5]}}, "'epochs' cannot be searched: set it with --max-t"),
        ({"output_dir": {"choice": ["a"]}}, "'output_dir' cannot be searched"),
        ({"lr": {"loguniform": [1.0, 0.1]}}, "'lr': the range [1.0, 0.1] is empty or inverted"),
        ({"lr": {"uniform": [0.5, 0.5]}}, "'lr': the range [0.5, 0.5] is empty or inverted"),
        ({"lr": {"loguniform": [0, 1]}}, "'lr': loguniform needs low > 0"),
        ({"lr": {"uniform": [0.1]}}, "'lr': uniform needs [low, high]"),
        ({"lr": {"uniform": [0.1, float("inf")]}}, "two finite numbers"),
        ({"lr": {"normal": [0, 1]}}, "'lr': unknown distribution 'normal'"),
        ({"lr": 0.5}, "'lr' must map to one distribution"),
        ({"lr": {"choice": []}}, "'lr': choice needs a non-empty list"),
        ({"batch_size": {"uniform": [32, 64]}}, "'batch_size' is a int field"),
        ({"progress": {"choice": [True, False]}}, "'progress' cannot be searched"),
        ({"batch_size": {"choice": [64, "many"]}}, "'batch_size'"),
        ({"seed": {"randint": [0.5, 3]}}, "randint bounds must be integers"),
    ],
)
def test_bad_spaces_name_the_key(mapping, message):
    # Bug caught: a space that Ray would accept and sample from, failing only inside trials
    # (or never), instead of a clear error naming the key before Ray starts.
    with pytest.raises(ValueError) as err:
        parse_space(mapping)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"temperature": {"loguniform": [0.01, 1]}}, "not a parameter of the loss preset"),
        (
            {"loss": {"grid": ["simple-sum", "gaussian"]}, "lam": {"uniform": [0, 1]}},
            "'lam' is not a parameter of the loss preset 'gaussian'",
        ),
        ({"lam": {"uniform": [0, 2]}}, "'lam' = 2.0"),
        ({"loss": {"choice": ["simple-sum", "gausian"]}}, "'loss' = 'gausian'"),
        ({"optimizer": {"grid": ["sgd", "rmsprop"]}}, "optimizer must be one of"),
    ],
)
def test_spaces_invalid_for_the_config_are_refused(mapping, message):
    # Bug caught: values that parse but make a configuration the trials cannot build.
    with pytest.raises(ValueError, match="search space key") as err:
        check_space(parse_space(mapping), PretrainConfig())
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-samples", "-2"], "num_samples must be >= 1, got -2"),
        (["--num-samples", "true"], "num_samples must be an integer, got 'true'"),
        (["--max-t", "2", "--grace-period", "3"], "grace_period (3) must be <= max_t (2)"),
        (["--cpus-per-trial", "64"], "cpus_per_trial (64.0) exceeds"),
        (["--gpus-per-trial", "0.25"], "gpus_per_trial (0.25) exceeds the 0 GPUs"),
        (["--loss", "laplacian", "--lam", "0.5"], "base config: "),
        (["--space", "SPACE"], "'learning_rate' is not a config field"),
        (["--resume", "DIR", "--num-samples", "4", "--lr", "2"], "drop --num-samples, --lr"),
        (["--retry-failed"], "--retry-failed goes with --resume"),
        (["--address", "auto", "--num-cpus", "2"], "num_cpus is for a Ray started here"),
        (["--num-cpus", "0"], "num_cpus must be >= 1"),
    ],
)
def test_cli_errors_come_before_ray_starts(tmp_path, capsys, argv, message):
    # Bug caught: bad input that starts Ray (seconds, a cluster's resources) and fails late,
    # or fails with a traceback instead of one line and exit code 2.
    if "--gpus-per-trial" in argv and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {loguniform: [0.01, 1]}\n")
    argv = [str(space) if a == "SPACE" else str(tmp_path) if a == "DIR" else a for a in argv]
    if "--resume" not in argv:
        argv += ["--output-dir", str(tmp_path / "s")]
    assert main(["tune", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "s").exists()


def test_summary_ranks_and_lists_failures():
    trials = [
        TrialRecord("t0", {"lr": 1.0}, "completed", [1, 2, 3], [0.2, 0.3, 0.4], 3.9),
        TrialRecord("t2", {"lr": 0.1}, "stopped", [1], [0.15], 4.1),
        TrialRecord("t1", {"lr": 1e20}, "failed", error="ValueError: z0 contains non-finite"),
    ]
    text = search_summary(trials, ["lr"])
    assert text.index("| 1 | t0 | completed | 3 | 40.0%") < text.index("| 2 | t2 | stopped | 1")
    assert "- t1 (lr=1e+20): ValueError: z0 contains non-finite" in text


# --- one real search ------------------------------------------------------------------------


class StopAfterFirstCheckpoint(ray_tune.Callback):
    """Interrupts the search as Ctrl-C would, once, after the first trial checkpoint.

    The flag is a class attribute: Tune restores its own pickled copy of the callbacks
    on --resume, and that copy must not interrupt again.
    """

    fired = False

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not StopAfterFirstCheckpoint.fired:
            StopAfterFirstCheckpoint.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own stop signal, as SIGINT


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    # One Ray for the search and its resume (run_search uses a Ray it finds running): each
    # start costs seconds on 2 cores.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("tune")
    space = parse_space(
        {"lr": {"grid": [1.0, 1e20]}, "probe_lr": {"grid": [0.5, 0.0]}}
    )  # trial order: (1, 0.5) good, (1e20, 0.5) fails, (1, 0) frozen probe, (1e20, 0) fails
    settings = SearchSettings(
        max_t=3, num_samples=1, grace_period=1, reduction_factor=2, max_concurrent=1
    )
    first = run_search(
        tiny_config(root, train_subset=256),
        space,
        settings,
        root / "search",
        num_cpus=2,
        callbacks=[StopAfterFirstCheckpoint()],
    )
    code = main(["tune", "--resume", str(root / "search")])
    yield root, first, code
    ray.shutdown()


def test_interrupted_search_resumes_from_checkpoints(search):
    root, first, code = search
    # Bug caught: an interrupted search reported as complete, or resumed trials that start
    # again from epoch 1 (Tune and Lightning disagreeing on the epoch).
    assert first.interrupted
    started = [t for t in first.trials if t.epochs]
    assert [t.epochs for t in started] == [[1]] and started[0].status == "unfinished"
    assert code == 0
    trial_dir = root / "search" / started[0].trial_id
    rows = list(csv.DictReader((trial_dir / "progress.csv").open()))
    resumed = [r for r in rows if r["iterations_since_restore"] == "1"]
    assert any(r["training_iteration"] == "2" for r in resumed)  # continued at epoch 2
    assert all(r["epoch"] == r["training_iteration"] for r in rows)
    log = list(csv.DictReader((trial_dir / "run" / "logs" / "metrics.csv").open()))
    assert sorted(int(r["epoch"]) for r in log if r.get("probe_top1")) == [0, 1, 2]


def test_asha_stops_early_and_failures_are_recorded(search):
    root = search[0]
    rows = {r["trial"]: r for r in csv.DictReader((root / "search" / "trials.csv").open())}
    assert len(rows) == 4
    by_status = sorted(r["status"] for r in rows.values())
    assert by_status == ["completed", "failed", "failed", "stopped"]
    stopped = next(r for r in rows.values() if r["status"] == "stopped")
    # Bug caught: ASHA never consulted (every trial runs max_t epochs), or reports sent per
    # batch instead of per epoch (ASHA's rungs would be steps).
    assert float(stopped["probe_lr"]) == 0.0 and int(stopped["epochs"]) < 3
    for row in rows.values():
        if row["status"] == "failed":
            # Bug caught: a failed trial that stops the search, or loses its reason.
            assert float(row["lr"]) == 1e20 and "not finite" in row["error"]
    summary = (root / "search" / "summary.md").read_text()
    assert "## Failed trials (2)" in summary
    assert (root / "search" / "probe_curves.png").stat().st_size > 10_000


def test_best_config_runs_with_pretrain(search, tmp_path):
    root = search[0]
    best = root / "search" / "best_config.yaml"
    values = yaml.safe_load(best.read_text())
    assert (values["lr"], values["probe_lr"], values["epochs"]) == (1.0, 0.5, 3)
    # Bug caught: a best config that `kinfonce pretrain --config` refuses (unknown keys,
    # trial-only settings such as a trial's run directory) or that lost the base settings.
    assert values["train_subset"] == 256 and values["output_dir"] is None
    argv = ["pretrain", "--config", str(best), "--epochs", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / "metrics.json").is_file()


def test_failure_reason_is_the_exception_line():
    # Bug caught: a failed trial's reason shown as Ray's traceback header, with terminal
    # colour codes, or with the exception's module path.
    text = (
        "Failure # 1 (occurred at 2026-11-28)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m\n"
        '  File "losses.py", line 60\n'
        "kinfonce.errors.KinfonceError: z0 contains non-finite values (nan or inf)\n\n"
    )
    assert failure_reason(text) == "KinfonceError: z0 contains non-finite values (nan or inf)"
    assert failure_reason(None) is None


def test_published_budgets_set_the_search_settings_and_flags_override_them():
    # Catches the paper's budget (500 samples) and the authors' code's (100 samples, grace
    # period 20, max_t 200) not being offered, a flag losing to a budget, and an unknown
    # budget name passing silently.
    from kinfonce.errors import KinfonceError
    from kinfonce.space import budget_settings

    code = budget_settings("authors-code", {})
    assert (code.num_samples, code.grace_period, code.max_t) == (100, 20, 200)
    assert budget_settings("paper", {}).num_samples == 500
    assert budget_settings("authors-code", {"num_samples": 8}).num_samples == 8
    assert budget_settings(None, {}) == SearchSettings()
    with pytest.raises(KinfonceError, match=r"--budget must be one of \['authors-code', 'paper'\]"):
        budget_settings("papers", {})
