"""The linear heads' SGD against torch.optim.SGD, and several heads against one at a time."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch import nn

from kinfonce.linear_heads import LinearHeads, cosine_lrs, train_on_features
from kinfonce.probes import LinearProbeSettings, fit_linear_head, fit_linear_heads

N, C = 70, 5  # 70 = 4 batches of 16 and one of 6


def data(dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, dim, generator=gen), torch.randint(0, C, (N,), generator=gen)


def reference_head(x, y, s: LinearProbeSettings) -> nn.Linear:
    """The probe as written with torch's own pieces: seeded nn.Linear, autograd cross-entropy,
    torch.optim.SGD and CosineAnnealingLR stepped per batch, a seeded randperm per epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        head = nn.Linear(x.shape[1], C)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
    )
    steps = s.epochs * math.ceil(N / s.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
    generator = torch.Generator().manual_seed(s.seed)
    for _ in range(s.epochs):
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, s.batch_size):
            idx = order[start : start + s.batch_size]
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


@pytest.mark.parametrize(
    "settings",
    [
        LinearProbeSettings(epochs=3, batch_size=16, seed=4),
        LinearProbeSettings(epochs=2, batch_size=16, lr=0.05, momentum=0.5, weight_decay=0.01),
    ],
)
def test_closed_form_sgd_follows_torch_optim_sgd(settings):
    """A wrong gradient (e.g. a missing 1/B), momentum, weight decay on the bias, schedule or
    batch order moves the weights by far more than the float32 rounding of 20 steps (the two
    differ only in the order of a few float operations per step: about 1e-7 relative each)."""
    x, y = data(12)
    want = reference_head(x, y, settings)
    got = fit_linear_heads([x], y, num_classes=C, settings=settings)[0]
    assert relative_error(got.weight, want.weight) < 1e-5
    assert relative_error(got.bias, want.bias) < 1e-5
    assert cosine_lrs(0.3, 4) == pytest.approx([0.3, 0.256066, 0.15, 0.043934], rel=1e-5)


def test_heads_trained_together_equal_heads_trained_alone():
    """Bit for bit: no head's update leaks into another's (they share only the batch order)."""
    settings = LinearProbeSettings(epochs=2, batch_size=16, seed=1)
    xs = [data(8, seed=0)[0], data(8, seed=1)[0], data(20, seed=2)[0]]
    y = data(1)[1]
    together = fit_linear_heads(xs, y, num_classes=C, settings=settings)
    for x, joint in zip(xs, together, strict=True):
        alone = fit_linear_heads([x], y, num_classes=C, settings=settings)[0]
        assert torch.equal(joint.weight, alone.weight) and torch.equal(joint.bias, alone.bias)
    # features made per batch (the augmented probe's way) give the same head as cached ones
    streamed = fit_linear_head(lambda idx: xs[2][idx], y, 20, num_classes=C, settings=settings)
    assert torch.equal(streamed.weight, together[2].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_equals_eager_steps():
    """On the last GPU (not the current one when there are several, as with ``kinfonce eval
    --device cuda:1``): the replayed steps equal the eager ones, and they were replayed (a
    failed capture falls back to eager steps with a warning, and would pass the comparison)."""
    device = f"cuda:{torch.cuda.device_count() - 1}"
    x, y = (t.to(device) for t in data(32))
    results = []
    for graphs in (False, True):
        heads = LinearHeads([32], C, seed=0, momentum=0.9, weight_decay=1e-6, device=device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_on_features(heads, [x], y, epochs=3, batch_size=16, lr=0.3, seed=0, graphs=graphs)
        assert not [w for w in caught if "capture failed" in str(w.message)]
        results.append(heads.params)
    for eager, graphed in zip(*results, strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-7)


class FakeCuda:
    """Stand-ins for the torch.cuda pieces a graph capture uses, recording which device was
    current (set by ``torch.cuda.device``) when each was made or used."""

    def __init__(self, monkeypatch):
        self.current, self.seen = None, []
        fake = self

        class Device:
            def __init__(self, device):
                self.device = torch.device(device)

            def __enter__(self):
                self.previous, fake.current = fake.current, self.device

            def __exit__(self, *exc):
                fake.current = self.previous

        class Stream:
            def __init__(self):
                fake.seen.append(("stream", fake.current))

            def wait_stream(self, other):
                pass

        class Graph:
            def __init__(self):
                fake.seen.append(("graph", fake.current))

            def replay(self):
                fake.seen.append(("replay", fake.current))

        class Capture(contextlib.nullcontext):
            def __enter__(self):
                fake.seen.append(("capture", fake.current))

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", lambda graph: Capture())


def test_graph_capture_and_replay_run_on_the_features_device(monkeypatch):
    """Streams made for the capture live on the current device; with the features on another
    GPU the capture fails and the probe silently runs eager steps. Every stream, capture and
    replay must happen with the features' device current. (CPU tensors stand in for the GPU's;
    the fakes only record the current device.)"""
    fake = FakeCuda(monkeypatch)
    x, y = data(8)
    heads = LinearHeads([8], C, seed=0, momentum=0.9, weight_decay=1e-6, device="cpu")
    train_on_features(heads, [x], y, epochs=2, batch_size=16, lr=0.3, seed=0, graphs=True)
    kinds = {kind for kind, _ in fake.seen}
    assert kinds == {"stream", "graph", "capture", "replay"}, kinds
    assert all(device == y.device for _, device in fake.seen), fake.seen


def test_seeded_heads_leave_the_cuda_generators_alone(monkeypatch):
    """The heads' initialisation seeds the CPU generator only: ``torch.manual_seed`` would
    also reseed every CUDA generator, and the training's random views draw from them."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    state = torch.get_rng_state()
    heads = LinearHeads([8], C, seed=3, momentum=0.9, weight_decay=0.0, device="cpu")
    assert not reseeded
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(3)
        want = nn.Linear(8, C)
    assert torch.equal(heads.params[0], want.weight) and torch.equal(heads.params[1], want.bias)


def test_divergence_names_the_head():
    x, y = data(6)
    settings = LinearProbeSettings(epochs=1, batch_size=16)
    with pytest.raises(RuntimeError, match="linear probe 1 diverged"):
        fit_linear_heads([x, x * 1e30], y, num_classes=C, settings=settings)
