"""``kinfonce report`` (kinfonce.runs) on generated run directories, and the figures and
tables it draws (kinfonce.plots, kinfonce.tables)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from kinfonce.config import ClipConfig, PretrainConfig, ReportSettings, dump_config
from kinfonce.epochlog import read_epoch_curves
from kinfonce.plots import class_styles, embed_2d, plot_feature_map
from kinfonce.resolve import resolve
from kinfonce.runs import comparison_group, load_run, markdown_table, write_report
from kinfonce.tables import format_duration, format_percent


def make_run(
    root: Path,
    name: str,
    *,
    loss: str = "simple-sum",
    linear: float = 0.912,
    knn: float = 0.875,
    epochs: int = 3,
    per_step_loss: bool = False,
) -> Path:
    """A run directory shaped like the one ``kinfonce pretrain`` writes (a resolved config)."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config = resolve(
        PretrainConfig(
            dataset="digits", loss=loss, lam=0.8 if "sum" in loss else None, epochs=epochs,
            batch_size=128,
        )
    )  # fmt: skip
    (run / "config.yaml").write_text(dump_config(config))
    metrics = {"linear_top1": linear, "knn_top1": knn, "wall_time_s": 125.4, "epochs": epochs}
    (run / "metrics.json").write_text(json.dumps(metrics))
    log_dir = run / "logs" / "csv" / "version_0"
    log_dir.mkdir(parents=True)
    lines = ["epoch,step,train_loss,probe_top1"]
    for epoch in range(epochs):
        if per_step_loss:
            lines += [f"{epoch},{10 * epoch + s},{5.0 - epoch + s},," for s in (0, 2)]
        else:
            lines.append(f"{epoch},{10 * epoch},{5.0 - epoch},")
        lines.append(f"{epoch},{10 * epoch + 9},,{0.5 + 0.1 * epoch}")
    (log_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def test_markdown_table_lists_each_run(tmp_path):
    runs = [
        load_run(make_run(tmp_path, "a")),
        load_run(make_run(tmp_path, "b", loss="gaussian", linear=0.5, knn=float("nan"))),
    ]
    table = markdown_table(runs)
    lines = table.strip().splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["run", "method", "loss"]
    first = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    assert first == {
        "run": "a",
        "method": "simclr",
        "loss": "simple-sum",
        "loss parameters": "gamma1=1, temperature1=0.5, temperature2=0.5, lam=0.8",
        "backbone": "resnet-mini",
        "data set": "digits",
        "epochs": "3",
        "batch size": "128",
        "linear top-1": "91.2%",
        "kNN top-1": "87.5%",
        "zero-shot top-1": "-",
        "R@1 image/text": "-",
        "R@1 text/image": "-",
        "run time": "2 min 05 s",
    }
    second = lines[3]
    assert "| gaussian | temperature=0.5 |" in second
    assert "50.0%" in second and "| - |" in second


def test_loss_parameters_are_read_from_config_yaml(tmp_path):
    # The report reads what the run recorded, also for a config kinfonce no longer accepts
    # (an unknown method and loss), and imports no method to fill anything in.
    run = make_run(tmp_path, "a")
    (run / "config.yaml").write_text(
        yaml.safe_dump({"method": "byol", "loss": "other", "temperature": 0.2, "epochs": 1})
    )
    assert "| byol | other | temperature=0.2 |" in markdown_table([load_run(run)])


def test_clip_runs_are_known_by_their_command(tmp_path):
    # A `kinfonce clip` config has no method; the row says clip because config.yaml says so
    # (the report guessed it from a `rewrites` key before), with the parameters it recorded.
    run = make_run(tmp_path, "a")
    (run / "config.yaml").write_text(dump_config(resolve(ClipConfig(loss="laplacian"))))
    assert "| clip | laplacian | temperature=0.5 |" in markdown_table([load_run(run)])
    runs = [load_run(run)]
    assert comparison_group(runs[0]) == "clip: laplacian"


def test_training_curves_average_per_step_values(tmp_path):
    run = make_run(tmp_path, "a", per_step_loss=True)
    path = run / "logs" / "csv" / "version_0" / "metrics.csv"
    curves = read_epoch_curves(path, ["train_loss", "probe_top1"])
    assert curves["train_loss"] == ([1, 2, 3], [6.0, 5.0, 4.0])
    epochs, probe = curves["probe_top1"]
    assert epochs == [1, 2, 3]
    assert probe == pytest.approx([0.5, 0.6, 0.7])


def test_write_report_makes_markdown_and_png(tmp_path):
    dirs = [make_run(tmp_path / "x", "run"), make_run(tmp_path / "y", "run", epochs=5)]
    settings = ReportSettings(output_dir=str(tmp_path / "out"))
    text, md_path, (png_path, comparison) = write_report(dirs, settings)
    assert "x/run" in text and "y/run" in text  # repeated names get their parent
    assert md_path.read_text().count("| simclr |") == 2
    assert "comparison.png" in md_path.read_text() and comparison.stat().st_size > 0
    image = matplotlib.image.imread(png_path)
    assert image.shape[1] > image.shape[0] > 100  # panels side by side


def test_run_without_logs_still_reports(tmp_path):
    run = make_run(tmp_path, "a")
    for path in sorted((run / "logs").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    summary = load_run(run)
    assert summary.curves == {}
    _, _, figures = write_report([run], ReportSettings(output_dir=str(tmp_path / "out")))
    assert all(png.stat().st_size > 0 for png in figures)


def test_bad_run_directories_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    run = make_run(tmp_path, "a")
    (run / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics\.json"):
        load_run(run)
    (run / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        load_run(run)
    (run / "config.yaml").write_text("a: [unclosed")
    with pytest.raises(ValueError, match=r"config\.yaml"):
        load_run(run)
    with pytest.raises(ValueError, match="run_dirs"):
        write_report([], ReportSettings(output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (42.2, "42 s"), (185, "3 min 05 s"), (7620, "2 h 07 min"), (float("inf"), "-")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_percent():
    assert format_percent(0.9876) == "98.8%"
    assert format_percent(None) == "-"
    assert format_percent(True) == "-"


def test_feature_map_separates_clusters_and_subsamples(tmp_path):
    gen = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = 10.0 * np.eye(3, 16)[labels] + gen.normal(size=(60, 16))
    points, method = embed_2d(features)
    assert points.shape == (60, 2) and method in ("t-SNE", "UMAP")
    centres = np.stack([points[labels == c].mean(0) for c in range(3)])
    spread = max(points[labels == c].std(0).max() for c in range(3))
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(3, 1)]
    assert gaps.min() > 2 * spread
    png = plot_feature_map(features, labels, ["a", "b", "c"], tmp_path / "map.png", max_points=30)
    assert matplotlib.image.imread(png).shape[0] > 100


def test_feature_map_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        plot_feature_map(np.zeros((5, 2)), np.zeros(4), ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_points"):
        plot_feature_map(np.zeros((5, 2)), np.zeros(5), ["a"], tmp_path / "x.png", max_points=1)


def test_comparison_groups_runs_by_method_and_loss(tmp_path):
    # Catches runs of different losses (or methods) pooled into one group of the figure.
    runs = [load_run(make_run(tmp_path, f"{loss}-{i}", loss=loss, linear=0.5 + 0.01 * i))
            for loss in ("gaussian", "laplacian") for i in range(2)]  # fmt: skip
    assert [comparison_group(r) for r in runs] == ["gaussian"] * 2 + ["laplacian"] * 2
    runs[0].config["method"] = "moco"
    assert comparison_group(runs[0]) == "moco: gaussian"


def test_a_map_of_many_classes_tells_every_class_apart(tmp_path):
    # Catches a feature map of 100 classes drawn with tab20's 20 colours, five classes to a
    # colour; classes of neighbouring colours must also differ in marker.
    styles = class_styles(100)
    assert len({colour for colour, _ in styles}) == 100
    assert all(a[1] != b[1] for a, b in itertools.pairwise(styles))
    assert [marker for _, marker in class_styles(20)] == ["o"] * 20  # few classes: dots
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(50, 4)), np.arange(50) % 25
    names = [f"c{i}" for i in range(25)]
    assert plot_feature_map(features, labels, names, tmp_path / "many.png").is_file()
