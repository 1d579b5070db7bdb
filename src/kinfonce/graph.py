"""Similarity graphs and the Markov-random-field view of InfoNCE (paper Sections 2.4, 3 and 4).

The pieces a reader needs to check the paper's claim that contrastive learning is spectral
clustering on the augmentation graph ``pi``:

* graphs: the stochastic block model of Appendix C (:func:`stochastic_block_model`), its
  row-normalised similarity graph (:func:`similarity_graph`), the pair graph of Definition 4.1
  (:func:`pair_graph`; sparse: :func:`pair_adjacency`, counted by :func:`summarize_pair_graph`)
  and the graph Laplacian of Definition 2.6 (:func:`laplacian`);
* the subgraph distribution P(W; pi) of Definition 2.2, sampled row by row as Lemma 2.3 allows
  (:func:`sample_unit_out_degree`);
* the cross-entropy H_pi^k(Z) of Eq. (3), its split into attraction and repulsion (Lemma 2.5,
  Eq. (4)) and the InfoNCE loss of one sampled subgraph (Eq. (9)-(10)), all evaluated from a
  log-kernel matrix (:func:`vertex_log_gram`, :func:`bipartite_log_gram`) so that no kernel value
  is ever exponentiated and divided.

Convention: a subgraph W is stored as its vector of targets, ``targets[i] = j`` for the one edge
i -> j of row i (unit out-degree, Definition 2.2); ``torch.nn.functional.one_hot(targets, n)``
gives the (n, n) 0/1 matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch import Tensor

from kinfonce.errors import KinfonceError
from kinfonce.kernels import ExpKernel, MixtureKernel, log_gram


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise KinfonceError(f"{name} must be a probability in [0, 1], got {value}")


def _check_square(name: str, matrix: Tensor) -> int:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise KinfonceError(
            f"{name} must be a square (n, n) matrix, got shape {tuple(matrix.shape)}"
        )
    return matrix.shape[0]


def check_similarity_graph(pi: Tensor, name: str = "pi") -> int:
    """Check that ``pi`` defines the subgraph distribution of Definition 2.2.

    Args:
        pi: (n, n) edge weights, not necessarily row-normalised.
        name: argument name used in the error messages.

    Returns:
        The number of vertices n.

    Raises:
        ValueError: ``pi`` is not square, has a non-finite or negative entry, has a non-zero
            diagonal (subgraphs in S_W carry no self-loops) or has a vertex with no out-edge
            (its row of P(W; pi) would be undefined).
    """
    n = _check_square(name, pi)
    if n < 2:
        raise KinfonceError(f"{name} needs at least 2 vertices, got {n}")
    if not torch.isfinite(pi).all():
        raise KinfonceError(f"{name} must be finite")
    if (pi < 0).any():
        raise KinfonceError(f"{name} must be non-negative")
    if (torch.diagonal(pi) != 0).any():
        raise KinfonceError(f"{name} must have a zero diagonal (subgraphs have no self-loops)")
    empty = (pi.sum(dim=1) <= 0).nonzero().flatten()
    if empty.numel():
        raise KinfonceError(
            f"{name} has {empty.numel()} vertex(es) with no out-edges (first: vertex "
            f"{int(empty[0])}); every vertex needs at least one edge"
        )
    return n


def stochastic_block_model(
    num_clusters: int, cluster_size: int, p: float, q: float, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Undirected random graph with planted clusters (the graph of Appendix C).

    Vertices ``c * cluster_size ... (c + 1) * cluster_size - 1`` form cluster c. Each unordered
    pair of distinct vertices is an edge with probability ``p`` inside a cluster and ``q``
    across clusters, independently.

    Args:
        num_clusters: number of clusters (n in the paper), >= 1.
        cluster_size: vertices per cluster (k in the paper), >= 1.
        p: within-cluster edge probability in [0, 1].
        q: between-cluster edge probability in [0, 1].
        seed: seed of the edge draws.

    Returns:
        ``(adjacency, labels)``: (N, N) symmetric 0/1 float matrix with a zero diagonal and
        (N,) int64 cluster labels, N = num_clusters * cluster_size.
    """
    if num_clusters < 1:
        raise KinfonceError(f"num_clusters must be >= 1, got {num_clusters}")
    if cluster_size < 1:
        raise KinfonceError(f"cluster_size must be >= 1, got {cluster_size}")
    _check_probability("p", p)
    _check_probability("q", q)
    labels = torch.arange(num_clusters).repeat_interleave(cluster_size)
    same = labels[:, None] == labels[None, :]
    edge_prob = torch.where(same, torch.tensor(p), torch.tensor(q))
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(edge_prob.shape, generator=generator) < edge_prob
    upper = torch.triu(draws, diagonal=1)
    adjacency = (upper | upper.T).to(torch.get_default_dtype())
    return adjacency, labels


def similarity_graph(adjacency: Tensor) -> Tensor:
    """Row-normalise an adjacency into the similarity graph pi (Section 3).

    Args:
        adjacency: (n, n) non-negative edge weights with a zero diagonal.

    Returns:
        (n, n) matrix pi whose row i is the distribution pi_i of vertex i's positive sample.
    """
    check_similarity_graph(adjacency, "adjacency")
    return adjacency / adjacency.sum(dim=1, keepdim=True)


def _pair_edges(
    edges: Sequence[tuple[int, int]] | Tensor, num_a: int | None, num_b: int | None
) -> tuple[Tensor, int, int]:
    """Checked (M, 2) int64 edges with the modality sizes (defaults: 1 + the largest index)."""
    pairs = torch.as_tensor(edges, dtype=torch.int64)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise KinfonceError(
            f"edges must be a non-empty list of (a, b) pairs, got shape {tuple(pairs.shape)}"
        )
    if (pairs < 0).any():
        raise KinfonceError("edges must hold non-negative vertex indices")
    num_a = int(pairs[:, 0].max()) + 1 if num_a is None else num_a
    num_b = int(pairs[:, 1].max()) + 1 if num_b is None else num_b
    if int(pairs[:, 0].max()) >= num_a or int(pairs[:, 1].max()) >= num_b:
        raise KinfonceError(f"edges refer to vertices outside num_a={num_a}, num_b={num_b}")
    return pairs, num_a, num_b


def pair_graph(
    edges: Sequence[tuple[int, int]] | Tensor, num_a: int | None = None, num_b: int | None = None
) -> Tensor:
    """The pair graph pi_{A,B} of Definition 4.1.

    Vertices ``0 .. num_a - 1`` are the objects of modality A, ``num_a .. num_a + num_b - 1``
    those of modality B. Each undirected unit-weight edge (a, b) is an out-edge of both ends,
    and every row is normalised by its vertex's out-degree, so the graph is asymmetric when
    degrees differ (one text linked to ten images sends 1/10 to each image, and each image
    sends 1 to the text). Repeated edges count once, since E is a set.

    Args:
        edges: M pairs (a, b) with a in [0, num_a) and b in [0, num_b), as a sequence or an
            (M, 2) integer tensor.
        num_a: size of modality A; defaults to 1 + the largest a.
        num_b: size of modality B; defaults to 1 + the largest b.

    Returns:
        (num_a + num_b, num_a + num_b) row-stochastic bipartite matrix. For large graphs
        :func:`pair_adjacency` gives the same edges as a sparse matrix.
    """
    pairs, num_a, num_b = _pair_edges(edges, num_a, num_b)
    weights = torch.zeros(num_a + num_b, num_a + num_b, dtype=torch.get_default_dtype())
    weights[pairs[:, 0], num_a + pairs[:, 1]] = 1.0
    weights[num_a + pairs[:, 1], pairs[:, 0]] = 1.0
    check_similarity_graph(weights, "edges")
    return weights / weights.sum(dim=1, keepdim=True)


def pair_adjacency(
    edges: Sequence[tuple[int, int]] | Tensor, num_a: int | None = None, num_b: int | None = None
) -> scipy.sparse.csr_array:
    """The undirected edge set E of Definition 4.1 as a sparse 0/1 adjacency matrix.

    The same vertex numbering as :func:`pair_graph`, whose matrix is this one divided by
    its row sums; sparse, so that a pair graph of a whole training set (tens of thousands
    of images) fits in memory. Vertices without edges are allowed here.

    Args:
        edges, num_a, num_b: as in :func:`pair_graph`.

    Returns:
        (num_a + num_b, num_a + num_b) symmetric scipy CSR array of 0/1 (repeated edges once).
    """
    pairs, num_a, num_b = _pair_edges(edges, num_a, num_b)
    a, b = pairs[:, 0].numpy(), num_a + pairs[:, 1].numpy()
    rows, cols = np.concatenate([a, b]), np.concatenate([b, a])
    size = num_a + num_b
    adjacency = scipy.sparse.csr_array((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    adjacency.data[:] = 1.0  # duplicates were summed
    return adjacency


class PairGraphSummary(NamedTuple):
    """Size, degrees and connected components of a pair graph (see :func:`summarize_pair_graph`).

    Degrees are ``(min, mean, max)`` over the vertices of one modality.
    """

    num_a: int
    num_b: int
    edges: int
    degree_a: tuple[int, float, int]
    degree_b: tuple[int, float, int]
    components: int
    largest_component: int
    isolated: int


def summarize_pair_graph(
    edges: Sequence[tuple[int, int]] | Tensor, num_a: int | None = None, num_b: int | None = None
) -> PairGraphSummary:
    """Count the vertices, edges, degrees and connected components of a pair graph.

    Components are those of the undirected graph (scipy's ``connected_components``); by
    Theorem 4.2 they are what the bipartite loss can separate, so a graph whose components
    are the classes is one on which spectral clustering recovers them.

    Args:
        edges, num_a, num_b: as in :func:`pair_graph`.
    """
    pairs, num_a, num_b = _pair_edges(edges, num_a, num_b)
    adjacency = pair_adjacency(pairs, num_a, num_b)
    degrees = np.asarray(adjacency.sum(axis=1)).astype(np.int64)
    count, labels = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    sizes = np.bincount(labels)

    def stats(values: np.ndarray) -> tuple[int, float, int]:
        return int(values.min()), float(values.mean()), int(values.max())

    return PairGraphSummary(
        num_a=num_a,
        num_b=num_b,
        edges=int(adjacency.nnz // 2),
        degree_a=stats(degrees[:num_a]),
        degree_b=stats(degrees[num_a:]),
        components=int(count),
        largest_component=int(sizes.max()),
        isolated=int((degrees == 0).sum()),
    )


def image_components(
    edges: Sequence[tuple[int, int]] | Tensor, num_a: int | None = None, num_b: int | None = None
) -> np.ndarray:
    """(num_a,) int64 the connected component of each A vertex (image) of a pair graph."""
    pairs, num_a, num_b = _pair_edges(edges, num_a, num_b)
    adjacency = pair_adjacency(pairs, num_a, num_b)
    _, labels = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    return labels[:num_a].astype(np.int64)


def images_joined(before: np.ndarray, after: np.ndarray) -> int:
    """How many images share a component with more images in ``after`` than in ``before``:
    those that added edges (e.g. caption rewrites) joined to images they were apart from.

    Args:
        before, after: (N,) component of each image (:func:`image_components`) in a graph and
            in the same graph with edges added.
    """
    if before.shape != after.shape:
        raise KinfonceError(f"component labels differ in shape: {before.shape}, {after.shape}")
    return int((np.bincount(after)[after] > np.bincount(before)[before]).sum())


def laplacian(weights: Tensor) -> Tensor:
    """Graph Laplacian operator L(W) of Definition 2.6.

    ``L(W)_ij = -W_ij`` off the diagonal and ``L(W)_ii = sum_k W_ik`` (out-degree; the
    diagonal of W is ignored). Equal to ``scipy.sparse.csgraph.laplacian(W, use_out_degree=True)``;
    written as one torch expression to keep autograd, dtype and device.

    Args:
        weights: (n, n) non-negative matrix, symmetric or not.

    Returns:
        (n, n) Laplacian.
    """
    _check_square("weights", weights)
    off_diagonal = weights - torch.diag(torch.diagonal(weights))
    return torch.diag(off_diagonal.sum(dim=1)) - off_diagonal


def sample_unit_out_degree(
    pi: Tensor, num_samples: int | None = None, *, generator: torch.Generator | None = None
) -> Tensor:
    """Sample subgraphs W ~ P(.; pi) of Definition 2.2.

    By Lemma 2.3 the rows of W are independent and row i is one multinomial draw from
    ``pi_i / sum_j pi_ij``, so a whole subgraph is one vectorised ``torch.multinomial`` call.

    Args:
        pi: (n, n) similarity graph (rows need not sum to one).
        num_samples: number of independent subgraphs; ``None`` for a single one.
        generator: random generator for reproducible draws.

    Returns:
        int64 targets, (n,) for a single subgraph or (num_samples, n): ``targets[..., i]`` is the
        one vertex that vertex i points to.
    """
    check_similarity_graph(pi)
    count = 1 if num_samples is None else num_samples
    if count < 1:
        raise KinfonceError(f"num_samples must be >= 1, got {num_samples}")
    targets = torch.multinomial(pi, count, replacement=True, generator=generator).T
    return targets[0] if num_samples is None else targets


def vertex_log_gram(z: Tensor, kernel: ExpKernel | MixtureKernel) -> Tensor:
    """Log of the gram matrix K_Z of Section 2.4 with self-pairs removed.

    Args:
        z: (n, d) embeddings Z.
        kernel: an exponential kernel or a mixture of them (:mod:`kinfonce.kernels`).

    Returns:
        (n, n) matrix of ``log k(Z_i - Z_j)``, ``-inf`` on the diagonal because W_ii = 0 for
        every subgraph in S_W.
    """
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return log_gram(z, z, kernel).masked_fill(eye, float("-inf"))


def bipartite_log_gram(z_a: Tensor, z_b: Tensor, kernel: ExpKernel | MixtureKernel) -> Tensor:
    """Log of the bipartite gram matrix from the proof of Theorem 4.2.

    ``K(i, n_a + j) = K(n_a + j, i) = k(Z_a,i - Z_b,j)``; entries within one modality are 0.

    Args:
        z_a: (n_a, d) embeddings of modality A.
        z_b: (n_b, d) embeddings of modality B.
        kernel: a kernel of :mod:`kinfonce.kernels`.

    Returns:
        (n_a + n_b, n_a + n_b) log-kernel matrix, ``-inf`` inside each modality.
    """
    n_a, n_b = z_a.shape[0], z_b.shape[0]
    cross = log_gram(z_a, z_b, kernel)
    full = cross.new_full((n_a + n_b, n_a + n_b), float("-inf"))
    full[:n_a, n_a:] = cross
    full[n_a:, :n_a] = cross.T
    return full


class MRFTerms(NamedTuple):
    """The two terms of Eq. (4); their sum is the cross-entropy H_pi^k(Z) of Eq. (3)."""

    attraction: Tensor
    log_repulsion: Tensor


def _check_log_k(log_k: Tensor) -> int:
    n = _check_square("log_k", log_k)
    if torch.isnan(log_k).any() or (log_k == float("inf")).any():
        raise KinfonceError("log_k must not contain NaN or +inf")
    return n


def _check_log_gram(pi: Tensor, log_k: Tensor) -> None:
    n = check_similarity_graph(pi)
    if log_k.shape != (n, n):
        raise KinfonceError(f"log_k must have the shape of pi, {(n, n)}, got {tuple(log_k.shape)}")
    _check_log_k(log_k)
    if ((pi > 0) & torch.isinf(log_k)).any():
        raise KinfonceError("pi has an edge where the kernel is zero (log_k = -inf): H is infinite")


def mrf_terms(pi: Tensor, log_k: Tensor) -> MRFTerms:
    """Attraction and repulsion terms of the cross-entropy (Lemma 2.5, Eq. (4)).

    With ``P = E[W] = pi / rowsum(pi)`` (Lemma 2.3):

    * attraction ``-sum_ij P_ij log k(Z_i - Z_j)``;
    * repulsion ``log R(Z) = sum_i log sum_{j != i} k(Z_i - Z_j)``, since
      ``R(Z) = sum_{W in S_W} Omega(W) prod_ij k_ij^W_ij`` factorises over rows (each row of a
      unit out-degree W picks one j != i).

    For the Gaussian kernel ``k(x) = exp(-||x||^2 / tau)`` (``ExpKernel(2, tau)``) the attraction
    is ``(1/tau) sum_ij P_ij ||Z_i - Z_j||^2 = (2/tau) tr(Z^T L(S) Z)`` with S = (P + P^T) / 2,
    which is ``(2/tau) tr(Z^T L(pi) Z)`` for a symmetric row-stochastic pi as in Theorem 3.1
    (the paper's ``exp(-||x||^2 / 2 tau)`` gives the factor ``1/tau`` instead).

    Args:
        pi: (n, n) similarity graph.
        log_k: (n, n) log-kernel matrix, from :func:`vertex_log_gram` or
            :func:`bipartite_log_gram`.

    Returns:
        :class:`MRFTerms` of two scalars.
    """
    _check_log_gram(pi, log_k)
    prob = (pi / pi.sum(dim=1, keepdim=True)).to(log_k.dtype)
    attraction = -torch.where(prob > 0, prob * log_k, torch.zeros_like(log_k)).sum()
    log_repulsion = torch.logsumexp(log_k, dim=1).sum()
    return MRFTerms(attraction, log_repulsion)


def mrf_cross_entropy(pi: Tensor, log_k: Tensor) -> Tensor:
    """Cross-entropy H_pi^k(Z) of Eq. (3), evaluated exactly.

    Both P(.; pi) and P(.; K_Z) are products over rows (Lemma 2.3), so by Lemma 2.4 the
    expectation over all subgraphs reduces to Eq. (9):
    ``-sum_i sum_{j != i} P_ij log(k_ij / sum_{l != i} k_il)``.

    Args:
        pi: (n, n) similarity graph.
        log_k: (n, n) log-kernel matrix (see :func:`mrf_terms`).

    Returns:
        Scalar tensor.
    """
    terms = mrf_terms(pi, log_k)
    return terms.attraction + terms.log_repulsion


def subgraph_infonce(targets: Tensor, log_k: Tensor) -> Tensor:
    """InfoNCE loss of sampled subgraphs, summed over all anchors (Eq. (9)-(10)).

    Vertex i is the anchor, ``targets[i]`` its positive and every other vertex a candidate:
    ``-sum_i log(k(Z_i - Z_t_i) / sum_{l != i} k(Z_i - Z_l))``. Its mean over
    W ~ P(.; pi) is :func:`mrf_cross_entropy` (Theorem 3.1, step 1).

    Args:
        targets: (n,) or (S, n) int64 targets from :func:`sample_unit_out_degree`.
        log_k: (n, n) log-kernel matrix with ``-inf`` where a pair is not a candidate.

    Returns:
        Scalar for (n,) targets, (S,) for S subgraphs.
    """
    n = _check_log_k(log_k)
    if targets.dim() not in (1, 2) or targets.shape[-1] != n:
        raise KinfonceError(
            f"targets must have shape (n,) or (S, n), n = {n}, got {tuple(targets.shape)}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= n):
        raise KinfonceError(f"targets must be vertex indices in [0, {n})")
    log_prob = torch.log_softmax(log_k, dim=1)
    rows = torch.arange(n, device=log_k.device)
    picked = log_prob[rows, targets]
    if torch.isinf(picked).any():
        raise KinfonceError("a target is not a candidate of its anchor (log_k = -inf there)")
    return -picked.sum(dim=-1)
