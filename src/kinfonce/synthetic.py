"""The synthetic experiment of Appendix C: InfoNCE on a block-model graph finds its clusters.

Free 2-D embeddings of the vertices of a stochastic block model are trained with the InfoNCE
loss of a kernel, on positive pairs drawn from subgraphs W ~ P(.; pi) (Definition 2.2). By
Theorem 3.1 this runs spectral clustering on pi, so the embedding should split into the planted
clusters; :func:`cluster_agreement` measures that against the truth and against scikit-learn's
spectral clustering of the same graph, and :func:`plot_synthetic` draws it like Figure 3.
Its settings are :class:`kinfonce.config.SyntheticConfig`, checked by
:func:`kinfonce.resolve.check_synthetic` before a run starts.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor, nn
from tqdm.auto import tqdm

from kinfonce.config import SyntheticConfig
from kinfonce.errors import DivergedError
from kinfonce.fileio import write_text_atomic
from kinfonce.graph import sample_unit_out_degree, similarity_graph, stochastic_block_model
from kinfonce.losses import make_loss, preset_params
from kinfonce.resolve import check_synthetic
from kinfonce.scoped import one_cpu_thread

#: Subgraphs drawn per call of the sampler (one per training step); amortises its checks of pi.
_SUBGRAPH_BLOCK = 256
#: Steps between recorded embeddings, from which the figure's snapshots are picked.
_RECORD_EVERY = 25


def build_loss(loss: str, temperature: float, *, sphere: bool = False) -> nn.Module:
    """InfoNCE loss of a preset at one temperature (both temperatures of a sum preset).

    Args:
        loss: a name from :func:`kinfonce.resolve.synthetic_losses`, e.g. ``"gaussian"``
            (the paper's).
        temperature: tau > 0.
        sphere: normalise embeddings to the unit circle inside the loss.
    """
    if "temperature" in preset_params(loss):
        return make_loss(loss, temperature=temperature, normalize=sphere)
    return make_loss(loss, temperature1=temperature, temperature2=temperature, normalize=sphere)


class PlateauStopper:
    """Decides when a noisy loss has stopped improving.

    The loss (assumed positive, as InfoNCE is) is smoothed by an exponential moving average
    started at the first value; the run stops once the average has not fallen below
    ``(1 - rel_tol)`` times its best value for ``patience`` consecutive updates. A relative
    threshold, because on the free plane the loss keeps creeping down as the clusters drift
    apart, long after they have formed.
    """

    def __init__(self, patience: int, rel_tol: float, smoothing: float) -> None:
        self.patience, self.rel_tol, self.smoothing = patience, rel_tol, smoothing
        self.smoothed: float | None = None
        self.best = float("inf")
        self.since_best = 0

    def update(self, loss: float) -> bool:
        """Feeds one loss value; returns True when the plateau is reached."""
        if self.smoothed is None:
            self.smoothed = loss
        else:
            self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self.smoothed < self.best * (1 - self.rel_tol):
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


@dataclass
class SyntheticRun:
    """Outcome of :func:`train_synthetic`.

    Attributes:
        config: the settings.
        adjacency: (N, N) 0/1 graph; pi is its row-normalisation.
        labels: (N,) planted clusters.
        embedding: (N, 2) final embedding (on the unit circle with ``sphere``).
        snapshots: (step, (N, 2) embedding) pairs, the last one the final embedding.
        losses: the loss of every step.
        steps: steps taken.
        converged: True if the plateau rule stopped the run before ``max_steps``.
        smoothed_loss: the moving average of the loss at the end.
    """

    config: SyntheticConfig
    adjacency: Tensor
    labels: Tensor
    embedding: Tensor
    snapshots: list[tuple[int, Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    converged: bool = False
    smoothed_loss: float = float("nan")


def train_synthetic(config: SyntheticConfig) -> SyntheticRun:
    """Trains free 2-D embeddings of a block-model graph with InfoNCE (Appendix C).

    Each step draws a subgraph W ~ P(.; pi) (every vertex one positive, Lemma 2.3), picks
    ``batch_size`` anchor vertices without replacement and takes one SGD step on the two-view
    InfoNCE loss of the anchors and their positives. With ``sphere`` the loss normalises its
    inputs and the points are projected back onto the unit circle after every step (projected
    SGD), so the step size stays that of ``lr`` instead of shrinking as the norms grow.

    Args:
        config: the settings (``progress``: show a tqdm progress bar).

    Returns:
        The trained :class:`SyntheticRun`.

    Raises:
        KinfonceError: settings that do not fit together (:func:`kinfonce.resolve.check_synthetic`).
        DivergedError: the loss became non-finite (lower ``lr``).

    Note:
        Runs torch on one thread (restored afterwards): a step works on 100 points, too little
        for threads to pay off, and on a busy machine extra threads only wait for cores.
    """
    check_synthetic(config)
    with one_cpu_thread():
        return _train(config)


def _train(config: SyntheticConfig) -> SyntheticRun:
    adjacency, labels = stochastic_block_model(
        config.num_clusters, config.cluster_size, config.p, config.q, seed=config.seed
    )
    pi = similarity_graph(adjacency)
    n = pi.shape[0]
    generator = torch.Generator().manual_seed(config.seed)
    weights = torch.randn(n, 2, generator=generator).requires_grad_()
    loss_fn = build_loss(config.loss, config.temperature, sphere=config.sphere)
    optimizer = torch.optim.SGD([weights], lr=config.lr)
    stopper = PlateauStopper(config.patience, config.rel_tol, config.smoothing)

    def embedding() -> Tensor:
        current = weights.detach()
        return F.normalize(current, dim=1) if config.sphere else current.clone()

    run = SyntheticRun(config, adjacency, labels, embedding())
    history: list[tuple[int, Tensor]] = []
    bar = tqdm(total=config.max_steps, desc="synthetic", disable=not config.progress, leave=False)
    for step in range(config.max_steps):
        if step % _RECORD_EVERY == 0:
            history.append((step, embedding()))
        if step % _SUBGRAPH_BLOCK == 0:
            subgraphs = sample_unit_out_degree(pi, _SUBGRAPH_BLOCK, generator=generator)
        targets = subgraphs[step % _SUBGRAPH_BLOCK]
        anchors = torch.randperm(n, generator=generator)[: config.batch_size]
        loss = loss_fn(weights[anchors], weights[targets[anchors]])
        if not torch.isfinite(loss):
            raise DivergedError(f"the loss became {loss.item()} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if config.sphere:
            with torch.no_grad():
                weights.copy_(F.normalize(weights, dim=1))
        run.losses.append(loss.item())
        run.steps = step + 1
        run.converged = stopper.update(run.losses[-1])
        bar.update()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{stopper.smoothed:.4f}")
        if run.converged:
            break
    bar.close()
    run.embedding = embedding()
    run.snapshots = _pick_snapshots(history, run.steps, config.num_snapshots)
    run.snapshots.append((run.steps, run.embedding))
    run.smoothed_loss = float(stopper.smoothed)
    return run


def _pick_snapshots(
    history: list[tuple[int, Tensor]], steps: int, count: int
) -> list[tuple[int, Tensor]]:
    """The recorded embeddings nearest to steps ``steps * (i / (count - 1))^2``, i < count - 1."""
    recorded = torch.tensor([step for step, _ in history])
    picked = []
    for i in range(count - 1):
        nearest = int((recorded - steps * (i / (count - 1)) ** 2).abs().argmin())
        if not picked or picked[-1][0] != history[nearest][0]:
            picked.append(history[nearest])
    return picked


def cluster_agreement(
    embedding: Tensor, labels: Tensor, affinity: Tensor, num_clusters: int, *, seed: int = 0
) -> dict[str, float]:
    """How well k-means on an embedding recovers the planted clusters and spectral clustering.

    Args:
        embedding: (N, D) points.
        labels: (N,) true clusters.
        affinity: (N, N) symmetric non-negative graph for ``SpectralClustering``.
        num_clusters: clusters for both k-means and spectral clustering.
        seed: their random state.

    Returns:
        ``ari_truth`` and ``nmi_truth`` (k-means vs truth), ``ari_spectral`` (k-means vs spectral
        clustering of ``affinity``) and ``spectral_ari_truth`` (spectral clustering vs truth).
    """
    points = embedding.detach().cpu().double().numpy()
    truth = labels.cpu().numpy()
    found = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(points)
    with warnings.catch_warnings():
        # A graph with p = 1, q = 0 has one component per cluster, which is what we want to find.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        spectral = SpectralClustering(
            n_clusters=num_clusters, affinity="precomputed", random_state=seed
        ).fit_predict(affinity.cpu().double().numpy())
    return {
        "ari_truth": float(adjusted_rand_score(truth, found)),
        "nmi_truth": float(normalized_mutual_info_score(truth, found)),
        "ari_spectral": float(adjusted_rand_score(spectral, found)),
        "spectral_ari_truth": float(adjusted_rand_score(truth, spectral)),
    }


def plot_synthetic(
    run: SyntheticRun, path: str | Path, *, edges_per_cluster: int = 10, title: str = ""
) -> Path:
    """Draws the embedding over training, like Figure 3 of the paper.

    One panel per snapshot: vertices coloured by their true cluster, and all edges of pi of
    ``edges_per_cluster`` randomly chosen vertices per cluster drawn as thin grey lines.

    Args:
        run: a trained run.
        path: PNG file to write (parent directories are created).
        edges_per_cluster: vertices per cluster whose edges are drawn.
        title: figure title.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(run.config.seed)
    chosen = torch.cat(
        [
            members.nonzero().flatten()[
                torch.randperm(int(members.sum()), generator=generator)[:edges_per_cluster]
            ]
            for members in (run.labels[:, None] == torch.arange(run.config.num_clusters)).T
        ]
    )
    sources, destinations = run.adjacency[chosen].nonzero().unbind(1)
    sources = chosen[sources]

    fig = Figure(figsize=(3.2 * len(run.snapshots), 3.5), layout="constrained")
    axes = fig.subplots(1, len(run.snapshots), squeeze=False)[0]
    edge_alpha = min(0.2, 200 / max(1, sources.numel()))
    for ax, (step, points) in zip(axes, run.snapshots, strict=True):
        segments = torch.stack([points[sources], points[destinations]], dim=1).numpy()
        ax.add_collection(
            LineCollection(segments, colors="0.4", linewidths=0.3, alpha=edge_alpha, zorder=1)
        )
        ax.scatter(
            *points.T.numpy(), c=run.labels.numpy(), cmap="tab10", s=6, vmin=0, vmax=9, zorder=2
        )
        ax.set_title(f"step {step}" + (" (final)" if step == run.steps else ""))
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


def run_experiment(config: SyntheticConfig) -> dict[str, object]:
    """Trains, measures and draws one run; writes ``synthetic.png`` and ``metrics.json`` into
    ``config.output_dir`` (created if missing).

    Args:
        config: the settings.

    Returns:
        The metrics written to ``metrics.json``: those of :func:`cluster_agreement` plus
        ``steps``, ``converged``, ``final_loss`` (smoothed), ``wall_time_s`` and ``config``.
    """
    out_dir = Path(config.output_dir)
    start = time.perf_counter()
    run = train_synthetic(config)
    pi = similarity_graph(run.adjacency)
    metrics: dict[str, object] = cluster_agreement(
        run.embedding, run.labels, (pi + pi.T) / 2, config.num_clusters, seed=config.seed
    )
    title = (
        f"p={config.p:g}, q={config.q:g}, {config.loss} kernel, tau={config.temperature:g}"
        f"{', unit circle' if config.sphere else ''}: ARI vs truth {metrics['ari_truth']:.3f}, "
        f"vs spectral clustering {metrics['ari_spectral']:.3f}"
    )
    plot_synthetic(run, out_dir / "synthetic.png", title=title)
    metrics |= {
        "steps": run.steps,
        "converged": run.converged,
        "final_loss": run.smoothed_loss,
        "wall_time_s": time.perf_counter() - start,
        "config": config.to_dict(),
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
