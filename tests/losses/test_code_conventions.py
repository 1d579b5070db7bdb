"""The options that follow the paper's code, against float64 references of its conventions.

The references below restate, in float64 and from the formulas, what the authors' code
computes where the paper is silent: Concatenation Sum on an embedding normalised as a whole
and then split, and the MoCo loss whose denominator holds the queue's negatives only.
"""

from __future__ import annotations

import pytest
import torch

from kinfonce.errors import KinfonceError
from kinfonce.losses import make_loss

# float32 against float64 on losses of order 1 with 2N <= 64 terms per log-sum-exp: the
# float32 rounding (6e-8 relative per operation, a few dozen operations deep) stays far below.
RTOL = 1e-5


def powers(x: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """||x_i - y_j||^gamma, (N, M), float64."""
    return torch.cdist(x.double(), y.double()).pow(gamma)


def two_view_term(a: torch.Tensor, b: torch.Tensor, gamma: float, tau: float) -> torch.Tensor:
    """Algorithm 2 on rows already on whatever sphere the caller chose: 2N anchors, each
    against the other 2N - 1 rows, its other view the positive."""
    z = torch.cat([a, b]).double()
    n = a.shape[0]
    kernel = torch.exp(-powers(z, z, gamma) / tau)
    denominator = kernel.sum(1) - kernel.diagonal()
    positive = kernel[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)]
    return -torch.log(positive / denominator).mean()


def concat_sum_whole(z0, z1, tau1, tau2, lam) -> torch.Tensor:
    """Concatenation Sum with the whole embedding put on the unit sphere, then split."""
    z0 = z0.double() / z0.double().norm(dim=1, keepdim=True)
    z1 = z1.double() / z1.double().norm(dim=1, keepdim=True)
    (l0, r0), (l1, r1) = z0.chunk(2, dim=1), z1.chunk(2, dim=1)
    return lam * two_view_term(l0, l1, 1.0, tau1) + (1 - lam) * two_view_term(r0, r1, 2.0, tau2)


def queue_term(q, k, queue, gamma, tau) -> torch.Tensor:
    """-log K(q, k) / sum_m K(q, queue_m): the positive is not in the denominator."""
    positive = torch.exp(-(q.double() - k.double()).norm(dim=1).pow(gamma) / tau)
    negatives = torch.exp(-powers(q, queue, gamma) / tau).sum(1)
    return -torch.log(positive / negatives).mean()


def unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=1, keepdim=True)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(16, 8, generator=g)
    z1 = z0 + 0.3 * torch.randn(16, 8, generator=g)
    z0[:, :4] *= 4.0  # halves of unequal norm: the two normalisations then disagree
    z1[:, :4] *= 4.0
    return z0, z1


def test_concat_sum_whole_normalisation_matches_the_code_convention(batch):
    # Catches normalising per half (or not at all) under concat_normalization="whole".
    z0, z1 = batch
    loss = make_loss(
        "concat-sum", temperature1=0.3, temperature2=0.5, lam=0.4, concat_normalization="whole"
    )
    expected = concat_sum_whole(z0, z1, 0.3, 0.5, 0.4)
    assert loss(z0, z1).double().item() == pytest.approx(expected.item(), rel=RTOL)


def test_concat_sum_halves_is_kinfonces_default_and_differs(batch):
    # Negative control: the default normalises each half, which on this batch is far from
    # the whole-embedding value (so the test above can tell the two apart).
    z0, z1 = batch
    halves = make_loss("concat-sum", temperature1=0.3, temperature2=0.5, lam=0.4)(z0, z1)
    l0, r0 = z0.chunk(2, dim=1)
    l1, r1 = z1.chunk(2, dim=1)
    expected = 0.4 * two_view_term(unit(l0), unit(l1), 1.0, 0.3) + 0.6 * two_view_term(
        unit(r0), unit(r1), 2.0, 0.5
    )
    assert halves.double().item() == pytest.approx(expected.item(), rel=RTOL)
    whole = concat_sum_whole(z0, z1, 0.3, 0.5, 0.4)
    assert abs(halves.item() - whole.item()) > 0.1


def test_concat_normalization_is_checked():
    with pytest.raises(KinfonceError, match="concat_normalization must be one of"):
        make_loss("concat-sum", concat_normalization="both")
    with pytest.raises(KinfonceError, match="takes no parameter"):
        make_loss("simple-sum", concat_normalization="whole")


@pytest.mark.parametrize("lam", [0.2, 0.8])
def test_moco_loss_without_positive_matches_the_code_convention(lam):
    # Catches the positive left in the denominator, or the sum's terms or weights mixed up.
    g = torch.Generator().manual_seed(5)
    q, k, queue = (torch.randn(n, 16, generator=g) for n in (8, 8, 32))
    k = q + 0.5 * k
    loss = make_loss(
        "simple-sum", temperature1=0.1, temperature2=0.3, lam=lam, positive_in_denominator=False
    )
    qn, kn, qu = unit(q), unit(k), unit(queue)
    expected = lam * queue_term(qn, kn, qu, 1.0, 0.1) + (1 - lam) * queue_term(qn, kn, qu, 2.0, 0.3)
    assert loss(q, k, queue=queue).double().item() == pytest.approx(expected.item(), rel=RTOL)
    # Negative control: the default counts the positive, a larger denominator.
    with_positive = make_loss("simple-sum", temperature1=0.1, temperature2=0.3, lam=lam)
    assert with_positive(q, k, queue=queue).item() > expected.item() + 1e-3


def test_positive_out_of_the_denominator_needs_a_queue(batch):
    # Catches the option being silently ignored by the two-view (SimCLR) form.
    loss = make_loss("gaussian", positive_in_denominator=False)
    with pytest.raises(KinfonceError, match="queue"):
        loss(*batch)


@pytest.mark.parametrize("loss", ["simple-sum", "simple-sum-kernel", "concat-sum"])
def test_gamma1_sets_the_exponent_of_a_sums_first_term(batch, loss):
    # Catches gamma1 not reaching the first term (it was fixed at 1, the Laplacian), or
    # reaching the Gaussian term: the authors' search draws it from {0.5, 1}.
    z0, z1 = (unit(z) for z in batch)
    tau1, tau2, lam = 0.3, 0.5, 0.4
    got = make_loss(loss, temperature1=tau1, temperature2=tau2, lam=lam, gamma1=0.5)(z0, z1)
    if loss == "concat-sum":
        (l0, r0), (l1, r1) = (unit(h) for h in z0.chunk(2, 1)), (unit(h) for h in z1.chunk(2, 1))
        left, right = two_view_term(l0, l1, 0.5, tau1), two_view_term(r0, r1, 2.0, tau2)
        expected = lam * left + (1 - lam) * right
    elif loss == "simple-sum":
        expected = lam * two_view_term(z0, z1, 0.5, tau1) + (1 - lam) * two_view_term(
            z0, z1, 2.0, tau2
        )
    else:  # one mixture kernel in one InfoNCE ratio
        z = torch.cat([z0, z1]).double()
        kernel = lam * torch.exp(-powers(z, z, 0.5) / tau1)
        kernel = kernel + (1 - lam) * torch.exp(-powers(z, z, 2.0) / tau2)
        n = z0.shape[0]
        positive = kernel[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)]
        expected = -torch.log(positive / (kernel.sum(1) - kernel.diagonal())).mean()
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=0)
