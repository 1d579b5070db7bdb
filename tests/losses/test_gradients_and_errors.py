"""Gradient checks, the zero-distance convention, and bad-input errors of the losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kinfonce import KernelInfoNCE, LossMixture, SpectralContrastiveLoss, make_loss
from kinfonce.errors import KinfonceError
from kinfonce.kernel_lse import kernel_logsumexp, resolve_path
from kinfonce.kernels import (
    ExpKernel,
    KernelTerm,
    MixtureKernel,
    concat_sum_kernel,
    simple_sum_kernel,
)
from kinfonce.losses import LOSS_PRESETS, preset_params


def _double(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("chunk", [None, 3])
def test_gradcheck_two_view(gamma, chunk):
    loss = KernelInfoNCE(gamma=gamma, temperature=0.3, chunk_size=chunk)
    assert torch.autograd.gradcheck(loss, (_double(5, 4), _double(5, 4, seed=1)))


def test_gradcheck_queue_bipartite_and_mixtures():
    z0, z1, queue = _double(4, 6), _double(4, 6, seed=1), _double(7, 6, seed=2)
    assert torch.autograd.gradcheck(
        lambda a, b, q: KernelInfoNCE(gamma=1.0, temperature=0.2)(a, b, queue=q), (z0, z1, queue)
    )
    assert torch.autograd.gradcheck(
        KernelInfoNCE(gamma=0.5, temperature=0.4, bipartite=True), (z0, z1)
    )
    for kernel in (simple_sum_kernel(0.2, 0.5, 0.3), concat_sum_kernel(0.2, 0.5, 0.7)):
        assert torch.autograd.gradcheck(KernelInfoNCE(kernel=kernel, chunk_size=2), (z0, z1))
    assert torch.autograd.gradcheck(make_loss("concat-sum", temperature1=0.2), (z0, z1))
    assert torch.autograd.gradcheck(SpectralContrastiveLoss(), (z0, z1))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_identical_views_give_finite_gradients(gamma, normalize):
    """d^gamma has an infinite slope at d = 0 for gamma < 1; the convention is a zero gradient."""
    z = torch.randn(6, 8)
    z0, z1 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss = KernelInfoNCE(gamma=gamma, temperature=0.05, normalize=normalize)
    value = loss(z0, z1)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(z0.grad).all() and torch.isfinite(z1.grad).all()
    # the positive pair sits at distance 0, so its logit is exactly 0 (no rounding noise)
    _, lpos = kernel_logsumexp(
        torch.cat([z, z]),
        torch.cat([z, z]),
        loss.kernel,
        self_idx=torch.arange(12),
        pos_idx=(torch.arange(12) + 6) % 12,
    )
    assert torch.all(lpos == 0)


def test_zero_distance_pair_exerts_no_force():
    """A query equal to its key: the pull between them is 0 (the key's gradient comes from
    that pull alone), and the push of a negative stays finite."""
    z = torch.tensor([[1.0, 0.0]])
    z0, z1 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    negative = torch.tensor([[0.0, 1.0]])
    KernelInfoNCE(gamma=0.5, temperature=0.1, normalize=False)(z0, z1, negative).backward()
    assert torch.all(z1.grad == 0)
    assert torch.isfinite(z0.grad).all() and z0.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32():
    """Catches a loss computed in the inputs' bfloat16: its 8-bit mantissa puts the result
    about 1e-2 (relative) off the float64 value on the same rounded inputs; float32 is within
    1e-5."""
    from .reference import two_view

    z0, z1 = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    half = KernelInfoNCE(gamma=1.0, temperature=0.1)(z0, z1)
    assert half.dtype == torch.float32
    want = float(two_view(z0, z1, [(1.0, 1.0, 0.1, 0)]))
    assert abs(float(half) - want) <= 1e-5 * max(1.0, abs(want))


def test_stable_where_the_literal_formula_fails():
    """At tau = 0.01 the literal float32 exp(-d^gamma / tau) underflows to 0 / 0."""
    z0, z1 = torch.randn(16, 32), torch.randn(16, 32)
    z = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    kernel = torch.exp(-(torch.cdist(z, z) ** 2) / 0.01)
    assert kernel.max() < 1e-30 or not torch.isfinite(torch.log(kernel)).all()
    assert torch.isfinite(KernelInfoNCE(gamma=2.0, temperature=0.01)(z0, z1))


def test_features_split_between_parts_only_for_the_concatenation_presets():
    # Catches a concatenation preset that does not ask for a width divisible by its parts
    # (the embedding width is resolved from it), or another preset that does.
    parts = {name: make_loss(name).out_dim_multiple for name in LOSS_PRESETS}
    assert parts == {name: 2 if name.startswith("concat") else 1 for name in LOSS_PRESETS}
    assert "lam" in preset_params("simple-sum")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: KernelInfoNCE()(torch.randn(4, 8), torch.randn(5, 8)), "same shape"),
        (lambda: KernelInfoNCE()(torch.randn(4, 8), torch.randn(4, 8).double()), "dtype"),
        (lambda: KernelInfoNCE()(torch.randn(8), torch.randn(8)), "2 dims"),
        (
            lambda: KernelInfoNCE()(torch.randn(4, 8), torch.full((4, 8), float("nan"))),
            "z1 contains non-finite",
        ),
        (
            lambda: KernelInfoNCE()(torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(3, 7)),
            "queue must have the feature dimension",
        ),
        (
            lambda: KernelInfoNCE()(
                torch.randn(4, 8), torch.randn(4, 8), queue=torch.tensor([[float("inf")] * 8])
            ),
            "queue contains non-finite",
        ),
        (
            lambda: KernelInfoNCE(bipartite=True)(
                torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(3, 8)
            ),
            "bipartite",
        ),
        (lambda: KernelInfoNCE(temperature=0.0), "temperature must be a finite number > 0"),
        (lambda: KernelInfoNCE(temperature=-1.0), "temperature"),
        (lambda: KernelInfoNCE(gamma=0.0), r"gamma must be a number in \(0, 2\]"),
        (lambda: KernelInfoNCE(gamma=2.5), "gamma"),
        (lambda: KernelInfoNCE(chunk_size=0), "chunk_size"),
        (lambda: KernelInfoNCE(path="flash"), "path must be one of"),
        (lambda: KernelInfoNCE(path="fused", chunk_size=8), "chunk_size=8 needs path='blocked'"),
        (lambda: simple_sum_kernel(lam=1.5), r"lam must be a number in \[0, 1\]"),
        (lambda: make_loss("simple-sum", lam=-0.1), "lam"),
        (lambda: LossMixture([KernelInfoNCE()], [2.0]), "weight"),
        (lambda: MixtureKernel([KernelTerm(ExpKernel(), 0.5, 3)], parts=2), "part"),
        (
            lambda: KernelInfoNCE(kernel=concat_sum_kernel())(torch.randn(4, 7), torch.randn(4, 7)),
            "divisible by 2",
        ),
        (lambda: make_loss("concat-sum")(torch.randn(4, 7), torch.randn(4, 7)), "divisible by 2"),
        (lambda: make_loss("nope"), "known presets: concat-sum"),
        (lambda: make_loss("laplacian", lam=0.3), "takes no parameter"),
        (
            lambda: SpectralContrastiveLoss()(
                torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(2, 8)
            ),
            "queue",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# Issue 10, case 9: library edge cases.


@pytest.mark.parametrize(
    "loss",
    [KernelInfoNCE(), KernelInfoNCE(bipartite=True), make_loss("simple-sum")],
    ids=["two-view", "bipartite", "simple-sum"],
)
def test_fewer_than_two_pairs_is_an_error_not_a_number(loss):
    """N = 1 returned 0.0 (no negatives) and N = 0 returned nan, silently."""
    with pytest.raises(ValueError, match="at least 2 pairs"):
        loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="z0 is empty"):
        loss(torch.randn(0, 8), torch.randn(0, 8))


def test_empty_queue_is_explained():
    """An empty (0, D) queue raised an unexplained IndexError."""
    with pytest.raises(ValueError, match=r"queue is empty \(shape \(0, 8\)\)"):
        KernelInfoNCE()(torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(0, 8))
    # One query against a non-empty queue is well defined.
    assert torch.isfinite(KernelInfoNCE()(torch.randn(1, 8), torch.randn(1, 8), torch.randn(3, 8)))


@pytest.mark.parametrize(
    "build",
    [
        lambda gather: KernelInfoNCE(gamma=1.0, gather_distributed=gather),
        lambda gather: KernelInfoNCE(bipartite=True, gather_distributed=gather),
        lambda gather: make_loss("concat-sum", gather_distributed=gather),
        lambda gather: make_loss("spectral", gather_distributed=gather),
    ],
    ids=["two-view", "bipartite", "concat-sum", "spectral"],
)
def test_gather_on_a_single_process_is_a_world_of_one(build, monkeypatch):
    """gather_distributed=True without a process group raised; like lightly's and
    solo-learn's losses it now means a world size of 1, so one script runs anywhere. The
    gathered arm must go through the gather (or both arms would run the same code), which
    returns the batch itself, with the same values and gradients."""
    import kinfonce.losses

    gathers = []
    real = kinfonce.losses.gather_with_grad
    monkeypatch.setattr(
        kinfonce.losses, "gather_with_grad", lambda z: (gathers.append(z), real(z))[1]
    )
    assert not torch.distributed.is_initialized()
    z0, z1 = _double(6, 8), _double(6, 8, seed=1)
    gathered = build(True)(z0, z1)
    assert gathers and all(g.shape == (6, 8) or g.shape[1] == 4 for g in gathers)
    gathers.clear()
    gathered.backward()
    grads = z0.grad.clone(), z1.grad.clone()
    z0.grad, z1.grad = None, None
    plain = build(False)(z0, z1)
    plain.backward()
    assert not gathers
    assert torch.equal(gathered, plain)
    assert torch.equal(grads[0], z0.grad) and torch.equal(grads[1], z1.grad)


def test_spectral_loss_closed_form():
    """Orthonormal positives and orthogonal negatives: loss = -2 exactly."""
    z = torch.eye(4)
    assert float(SpectralContrastiveLoss()(z, z)) == pytest.approx(-2.0)
    ones = torch.ones(3, 2) / 2**0.5
    # all pairs identical unit vectors: -2 + 1
    assert float(SpectralContrastiveLoss()(ones, ones)) == pytest.approx(-1.0)


def test_spectral_loss_caps_long_embeddings_at_sqrt_mu():
    """Catches an uncapped spectral loss (its squared term grows as |z|^4, which diverged at the
    old default lr) and a cap that also stretches short rows or ignores mu."""
    z0, z1 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    unit0, unit1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    capped = SpectralContrastiveLoss(mu=1.0)
    assert torch.allclose(capped(3 * unit0, 7 * unit1), capped(unit0, unit1))
    assert torch.allclose(
        capped(0.5 * unit0, unit1), SpectralContrastiveLoss(mu=None)(0.5 * unit0, unit1)
    )
    assert torch.allclose(
        SpectralContrastiveLoss(mu=4.0)(5 * unit0, 5 * unit1),
        SpectralContrastiveLoss(mu=None)(2 * unit0, 2 * unit1),
    )
    free = SpectralContrastiveLoss(mu=None)
    assert not torch.allclose(free(3 * unit0, 7 * unit1), free(unit0, unit1))
    # the default cap (mu 3) and the preset's are the same
    three = SpectralContrastiveLoss(mu=3.0)(5 * unit0, unit1)
    assert torch.allclose(SpectralContrastiveLoss()(5 * unit0, unit1), three)
    assert torch.allclose(make_loss("spectral")(5 * unit0, unit1), three)


@pytest.mark.parametrize("mu", [0.0, -1.0, float("inf"), float("nan")])
def test_spectral_loss_refuses_a_bad_mu(mu):
    with pytest.raises(KinfonceError, match="mu must be"):
        SpectralContrastiveLoss(mu=mu)


def fake_cuda_memory(monkeypatch, free: float, total: float = 141e9, cached: float = 0.0):
    """A CUDA device with ``free`` bytes free of ``total``, and ``cached`` bytes that torch's
    allocator holds unused; also reported as total memory, for a rule that would read it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(total)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(cached) + 10**9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10**9)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total)
    )


def test_auto_path_fuses_on_a_gpu_only_while_it_fits(monkeypatch):
    """The fused path holds two (Na, Nc) float32 matrices (NT-Xent's cross_entropy three); 'auto'
    takes it on a GPU while they use at most a quarter of its available memory, and the blocked
    path on a CPU, with a chunk size, or for a kernel mixture. A rule that fused beyond the memory
    would run out of it; one that never fused would leave the GPU at the blocked path's speed."""
    fake_cuda_memory(monkeypatch, free=141e9)
    cuda = torch.device("cuda")
    assert resolve_path("auto", 32768, 32768, cuda) == "fused"  # 8.6 GB of 35
    assert resolve_path("auto", 131072, 131072, cuda) == "blocked"  # 137 GB
    assert resolve_path("auto", 1024, 1024, cuda, chunk_size=64) == "blocked"
    assert resolve_path("auto", 1024, 1024, cuda, single=False) == "blocked"
    assert resolve_path("auto", 1024, 1024, torch.device("cpu")) == "blocked"
    assert resolve_path("fused", 10**6, 10**6, torch.device("cpu")) == "fused"


def test_auto_path_budget_is_the_memory_available_now(monkeypatch):
    """Tune trials sharing a GPU: with 10 GB of 141 free, 2N = 32,768 (8.6 GB) must not fuse,
    though it would fit a quarter of the total; memory torch's allocator caches unused counts
    as available."""
    cuda = torch.device("cuda")
    fake_cuda_memory(monkeypatch, free=10e9)
    assert resolve_path("auto", 32768, 32768, cuda) == "blocked"
    assert resolve_path("auto", 8192, 8192, cuda) == "fused"  # 0.5 GB of 2.5
    fake_cuda_memory(monkeypatch, free=10e9, cached=30e9)
    assert resolve_path("auto", 32768, 32768, cuda) == "fused"  # 8.6 GB of 10


def test_queue_form_budgets_the_three_matrices_of_its_kept_block(monkeypatch):
    """The queue form's fused path keeps one block of three (Na, Nc) matrices (squared
    distances, log-kernel, exponentials) for the backward pass; its budget must count three.
    4096 queries x 524,288 queue entries: 17.2 GB as two matrices, 25.8 GB as three, against
    a quarter of 80 GB."""
    import inspect

    import kinfonce.losses as losses
    from kinfonce.kernel_lse import FUSED_MATRICES, KEPT_BLOCK_MATRICES

    fake_cuda_memory(monkeypatch, free=80e9)
    cuda = torch.device("cuda")
    assert resolve_path("auto", 4096, 524288, cuda) == "fused"
    assert resolve_path("auto", 4096, 524288, cuda, matrices=KEPT_BLOCK_MATRICES) == "blocked"
    budgets = []

    def spy(*args, **kwargs):
        bound = inspect.signature(resolve_path).bind(*args, **kwargs).arguments
        budgets.append(bound.get("matrices", FUSED_MATRICES))
        return resolve_path(*args, **kwargs)

    monkeypatch.setattr(losses, "resolve_path", spy)
    KernelInfoNCE(gamma=1.0)(torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(6, 8))
    assert budgets == [KEPT_BLOCK_MATRICES]


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_unchecked_non_finite_inputs_give_a_non_finite_loss(path):
    """check_finite=False (the training step's setting, no host synchronisation) must still let a
    NaN through to the loss value, where the training loop's divergence check sees it."""
    z0, z1 = torch.randn(6, 8), torch.randn(6, 8)
    z1[2, 3] = float("nan")
    for gamma in (0.5, 1.0, 2.0):
        loss = KernelInfoNCE(gamma=gamma, path=path, check_finite=False)
        assert not torch.isfinite(loss(z0, z1))
        # a NaN key of the queue form: its distance to the query was read as 0 for gamma < 2
        assert not torch.isfinite(loss(z0, z1, queue=torch.randn(5, 8)))
    assert not torch.isfinite(make_loss("spectral", check_finite=False)(z0, z1))
    # the cifar10-concat-sum recipe's loss: whole-vector normalisation checked its inputs
    # anyway, raising (and syncing with the GPU) where training records a divergence
    for options in ({}, {"concat_normalization": "whole"}):
        loss = make_loss("concat-sum", path=path, check_finite=False, **options)
        assert not torch.isfinite(loss(z0, z1))
        assert not torch.isfinite(loss(z0, z1, queue=torch.randn(5, 8)))
