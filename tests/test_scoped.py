"""Process-wide state (random generators, thread counts, environment) is scoped and restored."""

from __future__ import annotations

import contextlib
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kinfonce.scoped import cpu_threads, environment, seeded, torch_seeded
from kinfonce.train import run_pretrain
from tests.helpers import tiny_config


def generator_states() -> tuple:
    """Python's, NumPy's and torch's CPU generator states, comparable with ``==``."""
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_seeded_seeds_every_generator_and_restores_each():
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = generator_states()
    with seeded(3):
        draws = (random.random(), np.random.rand(), torch.rand(1).item())
    assert generator_states() == before
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())


def test_torch_seeded_seeds_the_cpu_and_one_gpu_only(monkeypatch):
    """The CPU generator as ``torch.manual_seed`` would seed it, restored afterwards; of the
    GPUs only the given one is seeded and restored (``torch.manual_seed`` reseeds every GPU's
    generator and leaves it so). The GPU side is checked on stand-ins of torch.cuda."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    torch.default_generator.manual_seed(7)
    before = torch.get_rng_state()
    with torch_seeded(3):
        draw = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), before) and not calls
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(3)
        assert torch.equal(draw, torch.rand(2))

    current = []
    forked = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    def fork_rng(devices):
        forked.append(list(devices))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append((current[-1], seed)))
    with torch_seeded(5, "cuda:1"):
        pass
    assert forked == [[torch.device("cuda:1")]]
    assert calls == [(torch.device("cuda:1"), 5)]


def test_threads_and_environment_come_back_also_after_an_error(monkeypatch):
    monkeypatch.delenv("KINFONCE_TEST_VARIABLE", raising=False)
    monkeypatch.setenv("KINFONCE_TEST_KEPT", "old")
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError), cpu_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == threads
    with environment(KINFONCE_TEST_VARIABLE="1", KINFONCE_TEST_KEPT="new"):
        assert os.environ["KINFONCE_TEST_VARIABLE"] == "1"
        assert os.environ["KINFONCE_TEST_KEPT"] == "new"
    assert "KINFONCE_TEST_VARIABLE" not in os.environ
    assert os.environ["KINFONCE_TEST_KEPT"] == "old"


def test_a_run_leaves_the_generators_and_the_environment_as_it_found_them(tmp_path):
    # Catches lightning.seed_everything, which left every generator seeded with the run's
    # seed and PL_GLOBAL_SEED in the environment after the run.
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    before, environ = generator_states(), dict(os.environ)
    run_pretrain(tiny_config(tmp_path))
    assert generator_states() == before
    assert "PL_GLOBAL_SEED" not in os.environ
    assert dict(os.environ) == environ


def test_a_search_trial_restores_torchs_thread_count(tmp_path, monkeypatch):
    # Catches torch.set_num_threads(cpus_per_trial) left set in a reused Ray worker (and in
    # the process of a search run in-process) after the trial.
    from ray import tune

    import kinfonce.tune
    from kinfonce.tune import pretrain_trial

    inside = []
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(
        kinfonce.tune, "run_pretrain", lambda *a, **k: inside.append(torch.get_num_threads())
    )
    threads = torch.get_num_threads()
    base = tiny_config(tmp_path).to_dict()
    pretrain_trial({"lr": 0.5}, base=base, search_dir=str(tmp_path), threads=threads + 1)
    assert inside == [threads + 1]
    assert torch.get_num_threads() == threads


def test_the_ray_session_restores_the_environment(monkeypatch):
    # Catches os.environ.setdefault(TUNE_WARN_...) left behind by a search.
    import ray

    from kinfonce.raysession import ray_session

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray already there: used as is
    monkeypatch.delenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", raising=False)
    environ = dict(os.environ)
    with ray_session(None, None):
        assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"
    assert dict(os.environ) == environ
