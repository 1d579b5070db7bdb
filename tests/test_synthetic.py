"""The Appendix C experiment (kinfonce.synthetic) and the `kinfonce synthetic` command, on small graphs."""

import json
from dataclasses import replace

import pytest
import torch

from kinfonce.cli import main
from kinfonce.config import SyntheticConfig
from kinfonce.resolve import synthetic_losses
from kinfonce.synthetic import PlateauStopper, run_experiment, train_synthetic

SMALL = SyntheticConfig(
    num_clusters=3, cluster_size=20, batch_size=20, max_steps=1500, patience=200, smoothing=0.98,
    progress=False,
)  # fmt: skip


def test_disjoint_cliques_are_recovered_exactly(tmp_path):
    metrics = run_experiment(replace(SMALL, output_dir=str(tmp_path)))
    assert metrics["ari_truth"] == 1.0
    assert metrics["nmi_truth"] == 1.0
    assert metrics["ari_spectral"] == 1.0
    assert metrics["converged"] and metrics["steps"] < SMALL.max_steps
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["ari_truth"] == 1.0 and saved["config"]["num_clusters"] == 3
    assert (tmp_path / "synthetic.png").read_bytes().startswith(b"\x89PNG")


def test_noisy_block_model_is_recovered_with_laplacian_kernel():
    config = replace(SMALL, cluster_size=30, p=0.75, q=0.1, loss="laplacian", batch_size=30)
    run = train_synthetic(config)
    from kinfonce.graph import similarity_graph
    from kinfonce.synthetic import cluster_agreement

    pi = similarity_graph(run.adjacency)
    metrics = cluster_agreement(run.embedding, run.labels, (pi + pi.T) / 2, 3)
    assert metrics["spectral_ari_truth"] == 1.0
    assert metrics["ari_truth"] >= 0.9


def test_unit_circle_option_keeps_points_on_the_circle():
    run = train_synthetic(replace(SMALL, sphere=True, max_steps=400))
    torch.testing.assert_close(run.embedding.norm(dim=1), torch.ones(60))
    assert all(torch.allclose(points.norm(dim=1), torch.ones(60)) for _, points in run.snapshots)


def test_training_is_reproducible_and_records_snapshots():
    config = replace(SMALL, max_steps=150)
    first = train_synthetic(config)
    again = train_synthetic(config)
    assert torch.equal(first.embedding, again.embedding)
    # Snapshots at steps 150 * (i / 3)^2 for i < 3, rounded to the recorded ones, then the last.
    assert [step for step, _ in first.snapshots] == [0, 25, 75, 150]
    assert first.steps == len(first.losses) == 150 and not first.converged


@pytest.mark.parametrize("loss", synthetic_losses())
def test_every_kernel_preset_trains_to_a_finite_lower_loss(loss):
    run = train_synthetic(replace(SMALL, loss=loss, max_steps=120))
    losses = torch.tensor(run.losses)
    assert torch.isfinite(losses).all() and torch.isfinite(run.embedding).all()
    assert losses[-30:].mean() < losses[:30].mean()


def test_plateau_stopper():
    flat = PlateauStopper(patience=5, rel_tol=0.01, smoothing=0.5)
    assert [flat.update(1.0) for _ in range(6)] == [False] * 5 + [True]
    falling = PlateauStopper(patience=5, rel_tol=0.01, smoothing=0.5)
    assert not any(falling.update(10.0 - 0.1 * step) for step in range(50))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"p": 1.5}, r"p must be in \[0, 1\]"),
        ({"q": -0.2}, r"q must be in \[0, 1\]"),
        ({"batch_size": 61}, "batch_size must be <= the number of vertices .* = 60, got 61"),
        ({"loss": "cosine"}, "loss must be one of gaussian, laplacian"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ],
)
def test_bad_settings_are_refused_before_training(changes, message):
    with pytest.raises(ValueError, match=message):
        train_synthetic(replace(SMALL, **changes))


def test_graph_with_isolated_vertices_is_rejected():
    with pytest.raises(ValueError, match=r"adjacency has .* no out-edges"):
        train_synthetic(replace(SMALL, p=0.0, q=0.0))


def test_cli_writes_figure_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["synthetic", "--num-clusters", "3", "--cluster-size", "10", "--batch-size", "10"]
    args += ["--max-steps", "300", "--loss", "laplacian", "--temperature", "0.4"]
    assert main([*args, "--output-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ari_truth", "nmi_truth", "ari_spectral"} <= set(metrics)
    assert metrics["config"]["loss"] == "laplacian" and metrics["steps"] <= 300
    assert metrics["config"]["temperature"] == 0.4
    assert (out / "synthetic.png").is_file()
    assert "ari_truth=" in capsys.readouterr().out


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    assert main(["synthetic", "--p", "2", "--output-dir", str(tmp_path)]) == 2
    assert "p must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert main(["synthetic", "--batch-size", "601", "--output-dir", str(tmp_path)]) == 2
    assert "batch_size must be <= the number of vertices" in capsys.readouterr().err
