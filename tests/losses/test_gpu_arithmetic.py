"""What a GPU changes in the loss's arithmetic, shown on a CPU: TF32 matrix products (emulated,
:mod:`tests.losses.tf32`) and a backward pass called inside autocast."""

from __future__ import annotations

import pytest
import torch

from kinfonce import KernelInfoNCE
from kinfonce.kernels import simple_sum_kernel
from kinfonce.scoped import matmul_precision

from . import reference as ref
from .tf32 import EmulatedTF32, tf32_round

#: The forms and paths whose products the loss computes itself (queue and bipartite included).
CASES = {
    "fused gamma 1": (dict(gamma=1.0, temperature=0.05, path="fused"), False),
    "blocked gamma 0.5, 3 blocks": (dict(gamma=0.5, temperature=0.2, chunk_size=8), False),
    "fused gamma 2": (dict(gamma=2.0, temperature=0.005, path="fused"), False),
    "queue gamma 1": (dict(gamma=1.0, temperature=0.05), True),
    "bipartite gamma 1": (dict(gamma=1.0, temperature=0.05, bipartite=True), False),
    "sum kernel": (dict(kernel=simple_sum_kernel(0.05, 0.005, 0.5)), False),
}


def inputs(queue: bool, seed: int = 0) -> list[torch.Tensor]:
    """Two views 24 x 128 in three tight clusters, as late in training: after normalisation
    positives sit ~0.02 apart and negatives of the same cluster ~0.07, where TF32's error in
    ``2 - 2 a.c`` is largest relative to the distance; at temperature 0.05 their logits are
    of order 1, so they set the loss and its gradients."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 128, generator=g)
    z0 = centres.repeat(8, 1) + 0.05 * torch.randn(24, 128, generator=g)
    z1 = z0 + 0.02 * torch.randn(24, 128, generator=g)
    negatives = centres.repeat(14, 1)[:40] + 0.05 * torch.randn(40, 128, generator=g)
    return [z0, z1] + ([negatives] if queue else [])


def value_and_grads(loss, xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    value = loss(xs[0], xs[1], queue=xs[2] if len(xs) > 2 else None)
    value.backward()
    return value.detach(), [x.grad for x in xs]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.fixture
def tf32_precision():
    """Float32 matmul precision "high", as training sets it on CUDA, for the test only."""
    with matmul_precision("high"):
        yield


@pytest.mark.parametrize("case", CASES)
def test_loss_products_stay_float32_under_tf32(case, tf32_precision):
    """Under "high" precision (TF32 on a GPU, emulated) the loss and its gradients equal those
    at "highest" to float32 rounding. Measured with TF32 in the loss's own products (the code
    before issue 22): values off by 3e-2 to 1.2e-1 (relative), gradients by 3e-2 to 1.4e-1;
    with the products at "highest" both are bit-identical. Also catches a precision left
    changed after the loss."""
    kwargs, queue = CASES[case]
    xs = inputs(queue)
    with matmul_precision("highest"):
        want_value, want_grads = value_and_grads(KernelInfoNCE(**kwargs), xs)
    with EmulatedTF32():
        value, grads = value_and_grads(KernelInfoNCE(**kwargs), xs)
    assert torch.get_float32_matmul_precision() == "high"
    assert relative(value, want_value) <= 1e-6, (float(value), float(want_value))
    for got, want in zip(grads, want_grads, strict=True):
        assert relative(got, want) <= 1e-5


def test_the_emulation_rounds_products_at_high_precision_only(tf32_precision):
    """The emulation itself: a product at "high" is rounded (and differs from float32), one
    inside ``matmul_precision("highest")`` is not. Without this the test above could pass with
    an emulation that never rounds."""
    a, b = torch.randn(64, 128), torch.randn(128, 64)
    with EmulatedTF32() as emulated:
        rounded = a @ b
        with matmul_precision("highest"):
            exact = a @ b
    assert emulated.rounded == 1
    torch.testing.assert_close(rounded, tf32_round(a) @ tf32_round(b))
    assert relative(rounded, exact) > 1e-4
    with matmul_precision("highest"):
        torch.testing.assert_close(exact, a @ b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_backward_inside_autocast_stays_float32(case):
    """A backward pass called inside CPU bf16 autocast (as a training loop that calls
    ``loss.backward()`` in its autocast block does) gives the float32 gradients. Measured with
    the backward's products in bf16 (before issue 22): 2e-2 to 8e-2 relative, and the blocked
    path with several blocks crashed (a bf16 block met float32 positives); now bit-identical."""
    kwargs, queue = CASES[case]
    xs = inputs(queue, seed=1)
    _, want = value_and_grads(KernelInfoNCE(**kwargs), xs)
    xs = [x.clone().requires_grad_(True) for x in xs]
    value = KernelInfoNCE(**kwargs)(xs[0], xs[1], queue=xs[2] if queue else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value.backward()
    for x, w in zip(xs, want, strict=True):
        assert relative(x.grad, w) <= 1e-5


def test_autocast_forward_equals_float32_forward():
    """The forward pass under bf16 autocast: the same value as without (inputs in float32)."""
    z0, z1 = inputs(False, seed=2)
    for path in ("fused", "blocked"):
        loss = KernelInfoNCE(gamma=1.0, temperature=0.01, path=path)
        want = loss(z0, z1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss(z0, z1)
        assert relative(got, want) <= 1e-6


GAMMAS = [0.5, 1.0, 2.0]
TAUS = [1e-3, 1e-2, 0.1, 0.5]


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("form", ["two-view", "queue", "bipartite"])
@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_exactness_grid_with_tf32_inputs(gamma, tau, form, path, tf32_precision):
    """The exactness grid (test_exactness.py) on inputs rounded as TF32 rounds them (what a
    projection head on a GPU at "high" precision hands the loss), with TF32 emulated in every
    product. The bound is float32's, |got - ref| <= 1e-5 * max(1, |ref|) against float64 on
    the same rounded inputs: the loss's own products are exact, so rounded inputs are only
    other float32 inputs (measured: at most 8e-8). With TF32 in the loss's products (before
    issue 22) this grid was off by up to 1.4e-4."""
    g = torch.Generator().manual_seed(int(1e4 * tau) + int(10 * gamma))
    z0 = tf32_round(torch.randn(16, 32, generator=g))
    z1 = tf32_round(z0 + 0.3 * torch.randn(16, 32, generator=g))
    queue = tf32_round(torch.randn(24, 32, generator=g))
    terms = [(1.0, gamma, tau, 0)]
    with EmulatedTF32():
        if form == "queue":
            got = KernelInfoNCE(gamma, tau, path=path)(z0, z1, queue=queue)
            want = ref.with_queue(z0, z1, queue, terms)
        elif form == "bipartite":
            got = KernelInfoNCE(gamma, tau, path=path, bipartite=True)(z0, z1)
            want = ref.bipartite(z0, z1, terms)
        else:
            got = KernelInfoNCE(gamma, tau, path=path)(z0, z1)
            want = ref.two_view(z0, z1, terms)
    got, want = float(got), float(want)
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
