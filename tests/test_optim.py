"""LARS, parameter groups and the warm-up/cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from kinfonce.optim import LARS, build_optimizer, parameter_groups, warmup_cosine


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()


def test_lars_matches_lightly_reference():
    lars_module = pytest.importorskip("lightly.utils.lars")
    ours, theirs = small_net(), small_net()
    train_steps(ours, LARS(parameter_groups(ours, 1e-4), lr=0.5, momentum=0.9, weight_decay=1e-4))
    # lightly excludes groups with weight decay 0 from adaptation: the same split.
    reference = lars_module.LARS(
        [{k: v for k, v in g.items() if k != "lars_adapt"} for g in parameter_groups(theirs, 1e-4)],
        lr=0.5,
        momentum=0.9,
        weight_decay=1e-4,
    )
    train_steps(theirs, reference)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_lars_trust_ratio_closed_form_also_without_weight_decay():
    # With weight decay 0 the step is still adapted (implementations that tie adaptation to
    # weight decay take a plain SGD step of 10 here): trust * ||w|| / ||g|| * g.
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    weight.grad = torch.tensor([0.0, 10.0])  # norm 10
    LARS([weight], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.1).step()
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 3.5]))  # 0.1 * 5 / 10 * g


def test_lars_trust_ratio_closed_form_with_weight_decay():
    # Catches weight decay left out of the direction or of the ratio's denominator:
    # trust * ||w|| / (||g|| + wd ||w||) * (g + wd w) = 0.1 * 5 / 3.5 * (1.5, 3).
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))
    weight.grad = torch.tensor([0.0, 1.0])
    LARS([weight], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.1).step()
    step = 0.1 * 5 / 3.5 * torch.tensor([1.5, 3.0])
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 4.0]) - step)


def test_parameter_groups_exclude_norm_and_bias():
    net = small_net()
    decayed, plain = parameter_groups(net, 1e-6)
    assert all(p.ndim == 2 for p in decayed["params"]) and len(decayed["params"]) == 2
    assert len(plain["params"]) == 4  # two linear biases, batch-norm weight and bias
    assert plain["weight_decay"] == 0.0 and plain["lars_adapt"] is False


def test_without_exclude_bn_bias_every_parameter_is_decayed_and_adapted():
    # Catches exclude_bn_bias=False (the authors' code's default) still exempting batch-norm
    # weights and biases from weight decay and the trust ratio.
    net = small_net()
    (group,) = parameter_groups(net, 1e-6, exclude_bn_bias=False)
    assert len(group["params"]) == len(list(net.parameters()))
    assert group["weight_decay"] == 1e-6 and group["lars_adapt"] is True


def test_the_optimiser_of_a_run_follows_exclude_bn_bias(monkeypatch):
    # Catches the config field not reaching the parameter groups a run's optimiser gets.
    from kinfonce.config import PretrainConfig
    from kinfonce.data import load_dataset
    from kinfonce.methods import SimCLR, base
    from kinfonce.methods.base import data_description
    from kinfonce.resolve import resolve

    class Built(Exception):
        pass

    def capture(name, groups, **options):
        raise Built(groups)

    monkeypatch.setattr(base, "build_optimizer", capture)
    description = data_description(load_dataset("digits"))
    for exclude in (True, False):
        module = SimCLR(resolve(PretrainConfig(exclude_bn_bias=exclude)), description)
        with pytest.raises(Built) as built:
            module.configure_optimizers()
        trained = built.value.args[0][:-1]  # the last group is the online probe's
        one_dim = [p for g in trained for p in g["params"] if p.ndim == 1]
        decayed = [p for g in trained if g["lars_adapt"] and g["weight_decay"] > 0
                   for p in g["params"] if p.ndim == 1]  # fmt: skip
        assert one_dim and len(decayed) == (0 if exclude else len(one_dim))


@pytest.mark.parametrize("name", ["lars", "sgd", "adam"])
def test_build_optimizer_steps(name):
    net = small_net()
    weights = [p for p in net.parameters() if p.ndim > 1]
    before = [p.detach().clone() for p in weights]
    train_steps(net, build_optimizer(name, parameter_groups(net, 1e-6), lr=0.1), steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, weights, strict=True))


def test_unknown_optimizer_lists_names():
    with pytest.raises(ValueError, match=r"optimizer must be one of \['lars', 'sgd', 'adam'\]"):
        build_optimizer("rmsprop", parameter_groups(small_net(), 0.0), lr=0.1)


def test_warmup_cosine_shape():
    factor = warmup_cosine(total_steps=110, warmup_steps=10)
    assert factor(0) == pytest.approx(1 / 11)
    assert factor(9) == pytest.approx(10 / 11)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert warmup_cosine(5, 0)(0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(5, 5)
    assert math.isfinite(factor(10_000))
