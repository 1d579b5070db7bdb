"""Graphs, Laplacian, subgraph sampler and log-kernel matrices of kinfonce.graph."""

import pytest
import scipy.sparse.csgraph
import torch

from kinfonce.graph import (
    bipartite_log_gram,
    laplacian,
    mrf_cross_entropy,
    pair_adjacency,
    pair_graph,
    sample_unit_out_degree,
    similarity_graph,
    stochastic_block_model,
    subgraph_infonce,
    summarize_pair_graph,
    vertex_log_gram,
)
from kinfonce.kernels import ExpKernel


def test_sbm_with_p1_q0_is_disjoint_cliques():
    adjacency, labels = stochastic_block_model(3, 4, 1.0, 0.0, seed=0)
    same = labels[:, None] == labels[None, :]
    expected = same.float() - torch.eye(12)
    assert torch.equal(adjacency, expected)
    assert torch.equal(labels, torch.tensor([0] * 4 + [1] * 4 + [2] * 4))


def test_sbm_edge_densities_match_p_and_q():
    adjacency, labels = stochastic_block_model(4, 60, 0.75, 0.2, seed=1)
    assert torch.equal(adjacency, adjacency.T)
    assert torch.diagonal(adjacency).abs().sum() == 0
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(240, dtype=torch.bool)
    inside = adjacency[same & off_diagonal].mean()
    across = adjacency[~same].mean()
    # 4 * 60 * 59 / 2 = 7080 inside pairs: standard error of the density ~0.005.
    assert abs(float(inside) - 0.75) < 0.02
    assert abs(float(across) - 0.2) < 0.02


def test_sbm_is_seeded():
    first, _ = stochastic_block_model(2, 30, 0.5, 0.1, seed=3)
    again, _ = stochastic_block_model(2, 30, 0.5, 0.1, seed=3)
    other, _ = stochastic_block_model(2, 30, 0.5, 0.1, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(("p", "q", "name"), [(1.5, 0.0, "p"), (-0.1, 0.0, "p"), (1.0, 2.0, "q")])
def test_sbm_rejects_probabilities_outside_unit_interval(p, q, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a probability in \[0, 1\]"):
        stochastic_block_model(2, 3, p, q)


def test_similarity_graph_rows_are_distributions():
    adjacency, _ = stochastic_block_model(3, 10, 0.6, 0.1, seed=0)
    pi = similarity_graph(adjacency)
    torch.testing.assert_close(pi.sum(dim=1), torch.ones(30))
    assert torch.equal(pi > 0, adjacency > 0)


def test_similarity_graph_rejects_isolated_vertex():
    adjacency, _ = stochastic_block_model(2, 3, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"adjacency has 6 vertex.*no out-edges"):
        similarity_graph(adjacency)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (torch.ones(3, 4), r"pi must be a square \(n, n\) matrix, got shape \(3, 4\)"),
        (torch.ones(3, 3), "pi must have a zero diagonal"),
        (torch.tensor([[0.0, -1.0], [1.0, 0.0]]), "pi must be non-negative"),
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), "pi must be finite"),
    ],
)
def test_sampler_rejects_malformed_pi(matrix, message):
    with pytest.raises(ValueError, match=message):
        sample_unit_out_degree(matrix)


def test_pair_graph_normalises_by_out_degree():
    # Ten images of a dog (A) all paired with the one text "dog" (B), plus one lone pair.
    edges = [(image, 0) for image in range(10)] + [(10, 1)]
    pi = pair_graph(edges)
    assert pi.shape == (13, 13)
    dog_text = 11
    torch.testing.assert_close(pi[dog_text, :10], torch.full((10,), 0.1))
    assert torch.all(pi[:10, dog_text] == 1.0)
    assert pi[10, 12] == 1.0 and pi[12, 10] == 1.0
    torch.testing.assert_close(pi.sum(dim=1), torch.ones(13))
    assert not torch.equal(pi, pi.T)
    assert pi[:11, :11].abs().sum() == 0 and pi[11:, 11:].abs().sum() == 0


def test_pair_graph_counts_repeated_edges_once():
    assert torch.equal(pair_graph([(0, 0), (0, 1), (0, 0)]), pair_graph([(0, 0), (0, 1)]))


@pytest.mark.parametrize(
    ("edges", "kwargs", "message"),
    [
        ([(0, 0)], {"num_b": 2}, "edges has 1 vertex.*no out-edges"),
        ([(0, 3)], {"num_b": 2}, "edges refer to vertices outside"),
        ([], {}, "edges must be a non-empty list"),
        ([(0, -1)], {}, "edges must hold non-negative"),
    ],
)
def test_pair_graph_rejects_bad_edges(edges, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair_graph(edges, **kwargs)


def test_sparse_pair_adjacency_row_normalised_is_the_pair_graph():
    # The sparse form behind the graph report must be the same graph as Definition 4.1's
    # dense pi (a transposed or unsymmetrised adjacency normalises to another matrix).
    edges = [(image, image % 3) for image in range(9)] + [(0, 1), (0, 1)]
    adjacency = torch.from_numpy(pair_adjacency(edges, 9, 3).toarray()).float()
    assert torch.equal(adjacency, adjacency.T) and adjacency.max() == 1.0
    torch.testing.assert_close(adjacency / adjacency.sum(1, keepdim=True), pair_graph(edges, 9, 3))


def test_pair_graph_summary_counts_degrees_and_components():
    # Six images with their own captions: six isolated edges, six components. A caption
    # shared by images 0-2 (a rewrite common to them) merges three components into one;
    # an unused caption vertex is its own component and counts as isolated.
    own = [(i, i) for i in range(6)]
    summary = summarize_pair_graph(own, 6, 6)
    assert (summary.edges, summary.components, summary.largest_component) == (6, 6, 2)
    assert summary.degree_a == (1, 1.0, 1) and summary.isolated == 0
    merged = summarize_pair_graph([*own, (0, 6), (1, 6), (2, 6)], 6, 8)
    assert (merged.num_b, merged.edges, merged.components) == (8, 9, 5)
    assert merged.largest_component == 7 and merged.isolated == 1
    assert merged.degree_a == (1, 1.5, 2) and merged.degree_b == (0, 9 / 8, 3)


def test_laplacian_matches_scipy_out_degree_laplacian():
    weights = torch.rand(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = scipy.sparse.csgraph.laplacian(weights.numpy(), use_out_degree=True)
    torch.testing.assert_close(laplacian(weights), torch.from_numpy(expected))
    torch.testing.assert_close(laplacian(weights).sum(dim=1), torch.zeros(7, dtype=torch.float64))


def test_laplacian_quadratic_form_is_dirichlet_energy():
    adjacency, _ = stochastic_block_model(2, 5, 0.8, 0.3, seed=2)
    adjacency = adjacency.double()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    energy = 0.5 * (adjacency * torch.cdist(x, x).square()).sum()
    torch.testing.assert_close(torch.trace(x.T @ laplacian(adjacency) @ x), energy)
    assert torch.linalg.eigvalsh(laplacian(adjacency)).min() > -1e-9


def test_laplacian_rejects_non_square():
    with pytest.raises(ValueError, match="weights must be a square"):
        laplacian(torch.ones(2, 3))


def test_sampler_draws_edges_of_pi_reproducibly():
    adjacency, _ = stochastic_block_model(3, 8, 0.5, 0.1, seed=0)
    pi = similarity_graph(adjacency)
    targets = sample_unit_out_degree(pi, 500, generator=torch.Generator().manual_seed(5))
    again = sample_unit_out_degree(pi, 500, generator=torch.Generator().manual_seed(5))
    assert targets.shape == (500, 24) and targets.dtype == torch.int64
    assert torch.equal(targets, again)
    rows = torch.arange(24).expand_as(targets)
    assert torch.all(adjacency[rows, targets] == 1)
    single = sample_unit_out_degree(pi, generator=torch.Generator().manual_seed(5))
    assert single.shape == (24,)


def test_sampler_rejects_zero_samples():
    pi = similarity_graph(stochastic_block_model(1, 3, 1.0, 0.0)[0])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample_unit_out_degree(pi, 0)


@pytest.mark.parametrize("gamma", [2.0, 1.0, 0.5])
def test_vertex_log_gram_is_log_kernel_without_self_pairs(gamma):
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_k = vertex_log_gram(z, ExpKernel(gamma, 0.5))
    literal = -torch.cdist(z, z).pow(gamma) / 0.5
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(log_k[off_diagonal], literal[off_diagonal])
    assert torch.all(torch.diagonal(log_k) == float("-inf"))


def test_bipartite_log_gram_blocks():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    log_k = bipartite_log_gram(a, b, ExpKernel(2.0, 0.5))
    literal = -torch.cdist(a, b).square() / 0.5
    torch.testing.assert_close(log_k[:3, 3:], literal)
    torch.testing.assert_close(log_k[3:, :3], literal.T)
    assert torch.all(log_k[:3, :3] == float("-inf")) and torch.all(log_k[3:, 3:] == float("-inf"))


def test_subgraph_infonce_matches_literal_formula():
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = torch.tensor([[1, 0, 4, 2, 3], [2, 3, 0, 0, 1]])
    log_k = vertex_log_gram(z, ExpKernel(1.0, 0.5))
    kernel = torch.exp(-torch.cdist(z, z) / 0.5)
    expected = []
    for row in targets:
        total = 0.0
        for i, j in enumerate(row.tolist()):
            total -= torch.log(kernel[i, j] / (kernel[i].sum() - kernel[i, i]))
        expected.append(total)
    torch.testing.assert_close(subgraph_infonce(targets, log_k), torch.stack(expected))


def test_cross_entropy_rejects_mismatched_or_infinite_support():
    pi = similarity_graph(stochastic_block_model(1, 4, 1.0, 0.0)[0])
    z = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="log_k must have the shape of pi"):
        mrf_cross_entropy(pi, vertex_log_gram(z[:3], ExpKernel(2.0, 0.5)))
    bipartite = bipartite_log_gram(z[:2], z[2:], ExpKernel(2.0, 0.5))
    with pytest.raises(ValueError, match="pi has an edge where the kernel is zero"):
        mrf_cross_entropy(pi, bipartite)


def test_subgraph_infonce_rejects_bad_targets():
    log_k = vertex_log_gram(torch.randn(4, 2, dtype=torch.float64), ExpKernel(2.0, 0.5))
    with pytest.raises(ValueError, match=r"targets must have shape \(n,\) or \(S, n\)"):
        subgraph_infonce(torch.tensor([1, 0, 3]), log_k)
    with pytest.raises(ValueError, match=r"targets must be vertex indices in \[0, 4\)"):
        subgraph_infonce(torch.tensor([1, 0, 3, 4]), log_k)
    with pytest.raises(ValueError, match="a target is not a candidate of its anchor"):
        subgraph_infonce(torch.tensor([1, 1, 3, 2]), log_k)
    with pytest.raises(ValueError, match="log_k must not contain NaN"):
        subgraph_infonce(torch.tensor([1, 0, 3, 2]), torch.full((4, 4), float("nan")))
