"""Numerical checks of the paper's theory (Lemma 2.3, Eq. (3)-(4), Theorems 3.1, 4.2 and 5.1).

Small graphs, float64 and fixed seeds. Where a statement is about an expectation over all
subgraphs, the small cases are checked by enumerating S_W literally (Definition 2.2), and the
larger ones by Monte Carlo with a tolerance of a few standard errors that are themselves
required to be small.
"""

import itertools

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import torch

from kinfonce.graph import (
    bipartite_log_gram,
    laplacian,
    mrf_cross_entropy,
    mrf_terms,
    pair_graph,
    sample_unit_out_degree,
    similarity_graph,
    stochastic_block_model,
    subgraph_infonce,
    vertex_log_gram,
)
from kinfonce.kernel_lse import kernel_logsumexp
from kinfonce.kernels import ExpKernel, as_mixture
from kinfonce.losses import KernelInfoNCE

# An asymmetric, unnormalised 4-vertex graph with one missing edge.
WEIGHTS_4 = torch.tensor(
    [
        [0.0, 1.0, 3.0, 0.5],
        [2.0, 0.0, 0.0, 1.0],
        [1.0, 4.0, 0.0, 2.0],
        [0.2, 0.3, 0.5, 0.0],
    ],
    dtype=torch.float64,
)


def _all_subgraphs(n: int) -> torch.Tensor:
    """Every W in S_W (0/1, zero diagonal): (2^(n(n-1)), n, n)."""
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    bits = torch.tensor(
        list(itertools.product([0.0, 1.0], repeat=n * (n - 1))), dtype=torch.float64
    )
    subgraphs = torch.zeros(bits.shape[0], n, n, dtype=torch.float64)
    subgraphs[:, off_diagonal] = bits
    return subgraphs


def _literal_distribution(subgraphs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """P(W; weights) of Definition 2.2: proportional to Omega(W) prod_ij weights_ij^W_ij."""
    omega = (subgraphs.sum(dim=2) == 1).all(dim=1)
    unnormalised = (
        torch.where(subgraphs > 0, weights, torch.ones_like(weights)).flatten(1).prod(dim=1)
    )
    unnormalised = unnormalised * omega
    return unnormalised / unnormalised.sum()


def test_lemma_2_3_rows_are_independent_multinomials_by_enumeration():
    subgraphs = _all_subgraphs(4)
    prob = _literal_distribution(subgraphs, WEIGHTS_4)
    row_distribution = WEIGHTS_4 / WEIGHTS_4.sum(dim=1, keepdim=True)
    support = prob > 0
    assert int(support.sum()) == 3 * 2 * 3 * 3  # one choice per row among its out-edges
    product = torch.where(subgraphs[support] > 0, row_distribution, 1.0).flatten(1).prod(dim=1)
    torch.testing.assert_close(prob[support], product)
    expected_w = (prob[:, None, None] * subgraphs).sum(dim=0)
    torch.testing.assert_close(expected_w, row_distribution)
    expected_laplacian = (prob[:, None, None] * torch.stack([laplacian(w) for w in subgraphs])).sum(
        0
    )
    torch.testing.assert_close(expected_laplacian, laplacian(row_distribution))


@pytest.mark.parametrize("gamma", [2.0, 1.0, 0.5])
def test_eq_3_cross_entropy_and_its_terms_by_enumeration(gamma):
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = ExpKernel(gamma, 0.5)
    log_k = vertex_log_gram(z, kernel)
    subgraphs = _all_subgraphs(4)
    prob_pi = _literal_distribution(subgraphs, WEIGHTS_4)
    prob_k = _literal_distribution(subgraphs, log_k.exp())
    support = prob_pi > 0
    literal = -(prob_pi[support] * prob_k[support].log()).sum()
    torch.testing.assert_close(mrf_cross_entropy(WEIGHTS_4, log_k), literal)

    terms = mrf_terms(WEIGHTS_4, log_k)
    omega = (subgraphs.sum(dim=2) == 1).all(dim=1)
    unnormalised_k = torch.where(subgraphs > 0, log_k.exp(), 1.0).flatten(1).prod(dim=1)
    torch.testing.assert_close(terms.log_repulsion, unnormalised_k[omega].sum().log())
    expected_w = (prob_pi[:, None, None] * subgraphs).sum(dim=0)
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    attraction = -(expected_w * log_k)[off_diagonal].sum()
    torch.testing.assert_close(terms.attraction, attraction)


def test_lemma_2_3_sampled_rows_pass_chi_square_and_the_test_has_power():
    num_samples = 40_000
    targets = sample_unit_out_degree(
        WEIGHTS_4, num_samples, generator=torch.Generator().manual_seed(0)
    )
    row_distribution = (WEIGHTS_4 / WEIGHTS_4.sum(dim=1, keepdim=True)).numpy()
    uniform = (WEIGHTS_4 > 0).double().numpy()
    uniform /= uniform.sum(axis=1, keepdims=True)
    for i in range(4):
        support = row_distribution[i] > 0
        counts = np.bincount(targets[:, i].numpy(), minlength=4)
        assert counts[~support].sum() == 0
        observed = counts[support]
        fit = scipy.stats.chisquare(observed, num_samples * row_distribution[i, support])
        assert fit.pvalue > 1e-3, f"row {i}: {fit}"
        # The same samples reject the uniform distribution on the row's support decisively,
        # so the sample size is large enough that the first test cannot pass by luck.
        wrong = scipy.stats.chisquare(observed, num_samples * uniform[i, support])
        assert wrong.pvalue < 1e-12, f"row {i}: {wrong}"
    joint = np.zeros((4, 4))
    np.add.at(joint, (targets[:, 0].numpy(), targets[:, 2].numpy()), 1)
    independence = scipy.stats.chi2_contingency(joint[joint.sum(1) > 0][:, joint.sum(0) > 0])
    assert independence.pvalue > 1e-3


def _mc_matches_exact(values: torch.Tensor, exact: torch.Tensor) -> None:
    standard_error = values.std() / values.numel() ** 0.5
    assert standard_error < 0.005 * exact.abs()
    assert (values.mean() - exact).abs() < 4 * standard_error


@pytest.mark.parametrize("gamma", [2.0, 1.0])
def test_theorem_3_1_step_1_mean_infonce_is_the_cross_entropy(gamma):
    adjacency, _ = stochastic_block_model(3, 4, 0.75, 0.2, seed=0)
    pi = similarity_graph(adjacency.double())
    z = torch.randn(12, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_k = vertex_log_gram(z, ExpKernel(gamma, 0.5))
    targets = sample_unit_out_degree(pi, 20_000, generator=torch.Generator().manual_seed(2))
    _mc_matches_exact(subgraph_infonce(targets, log_k), mrf_cross_entropy(pi, log_k))


def test_theorem_3_1_step_1_subgraph_infonce_is_the_library_loss():
    """Eq. (10) row by row: the MoCo form with every other vertex as a candidate."""
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = KernelInfoNCE(gamma=1.0, temperature=0.5, normalize=False)
    targets = torch.tensor([3, 0, 5, 1, 2, 4])
    per_anchor = []
    for i, j in enumerate(targets.tolist()):
        others = [other for other in range(6) if other not in (i, j)]
        per_anchor.append(loss(z[i : i + 1], z[j : j + 1], queue=z[others]))
    log_k = vertex_log_gram(z, ExpKernel(1.0, 0.5))
    torch.testing.assert_close(torch.stack(per_anchor).sum(), subgraph_infonce(targets, log_k))


def test_theorem_3_1_step_2_gaussian_attraction_is_the_laplacian_trace():
    tau = 0.5
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(15, 3, generator=generator, dtype=torch.float64)
    kernel = ExpKernel(2.0, tau)
    # Asymmetric row-normalised graph: the trace is taken on the symmetrised P.
    pi = similarity_graph(stochastic_block_model(3, 5, 0.75, 0.2, seed=1)[0].double())
    assert not torch.allclose(pi, pi.T)
    attraction = mrf_terms(pi, vertex_log_gram(z, kernel)).attraction
    symmetric = (pi + pi.T) / 2
    torch.testing.assert_close(attraction, 2 / tau * torch.trace(z.T @ laplacian(symmetric) @ z))
    # A regular graph gives a symmetric pi: the trace of Theorem 3.1 with L(pi) itself.
    pi = similarity_graph(stochastic_block_model(3, 5, 1.0, 0.0)[0].double())
    attraction = mrf_terms(pi, vertex_log_gram(z, kernel)).attraction
    torch.testing.assert_close(attraction, 2 / tau * torch.trace(z.T @ laplacian(pi) @ z))


def _negative_e(alpha: np.ndarray, psi: np.ndarray, tau: float) -> float:
    """-E(alpha) of program (P2)."""
    return -(psi[0] - alpha @ psi + tau * scipy.special.xlogy(alpha, alpha).sum())


@pytest.mark.parametrize(("gamma", "tau"), [(1.0, 0.2), (0.5, 0.5), (2.0, 1.0)])
def test_theorem_5_1_program_p2_optimum_is_the_kernel_infonce_loss(gamma, tau):
    """The optimum of (P2) with similarities psi_j = -||x - y_j||^gamma is tau times the
    library's Kernel-InfoNCE term of anchor x (positive y_0). Catches a kernel or loss in
    kinfonce that is not the maximum-entropy solution (a wrong exponent, temperature or
    normaliser)."""
    rng = np.random.default_rng(0)
    anchor, cands = (
        torch.from_numpy(rng.normal(size=(1, 4))),
        torch.from_numpy(rng.normal(size=(6, 4))),
    )
    psi = -((anchor - cands).norm(dim=1) ** gamma).numpy()
    n = psi.size
    lse, lpos = kernel_logsumexp(
        anchor, cands, as_mixture(ExpKernel(gamma, tau)), pos_idx=torch.tensor([0])
    )
    library_value = tau * float(lse[0] - lpos[0])

    def objective(alpha):
        return -_negative_e(alpha, psi, tau)

    def gradient(alpha):
        return -psi + tau * (np.log(np.maximum(alpha, 1e-300)) + 1)

    solution = scipy.optimize.minimize(
        objective,
        np.full(n, 1 / n),
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(n)}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert solution.success, solution.message
    closed_form = -tau * scipy.special.log_softmax(psi / tau)[0]
    np.testing.assert_allclose(-solution.fun, closed_form, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(library_value, closed_form, rtol=1e-10)
    np.testing.assert_allclose(solution.x, scipy.special.softmax(psi / tau), atol=1e-5)
    # No point of the simplex does better than the closed form.
    others = rng.dirichlet(np.ones(n), size=2000)
    assert max(_negative_e(a, psi, tau) for a in others) <= closed_form + 1e-12


@pytest.mark.parametrize(("gamma", "tau"), [(2.0, 0.5), (1.0, 0.2)])
def test_theorem_4_2_clip_loss_is_cross_entropy_on_bipartite_kernel(gamma, tau):
    num_pairs = 6
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(num_pairs, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(num_pairs, 3, generator=generator, dtype=torch.float64)
    pi = pair_graph([(i, i) for i in range(num_pairs)])
    log_k = bipartite_log_gram(a, b, ExpKernel(gamma, tau))
    clip = KernelInfoNCE(gamma=gamma, temperature=tau, normalize=False, bipartite=True)
    torch.testing.assert_close(mrf_cross_entropy(pi, log_k) / (2 * num_pairs), clip(a, b))


def test_theorem_4_2_asymmetric_pair_graph_mean_infonce_is_the_cross_entropy():
    edges = [(image, 0) for image in range(5)] + [(5, 1), (6, 1), (6, 2)]
    pi = pair_graph(edges).double()
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(7, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    log_k = bipartite_log_gram(a, b, ExpKernel(2.0, 0.5))
    targets = sample_unit_out_degree(pi, 20_000, generator=torch.Generator().manual_seed(7))
    _mc_matches_exact(subgraph_infonce(targets, log_k), mrf_cross_entropy(pi, log_k))
