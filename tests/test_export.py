"""`kinfonce export`: every format loaded back as another program loads it reproduces the
checkpoint's features on real digits; the guide's safetensors lines run without kinfonce;
`--init-weights` takes an export back; bad input is refused by name."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kinfonce import rebuild
from kinfonce.checkpoints import load_encoder, load_encoder_parts
from kinfonce.cli import main
from kinfonce.config import ExportSettings
from kinfonce.data import load_dataset
from kinfonce.data.augment import EvalTransform
from kinfonce.errors import KinfonceError
from kinfonce.export import TOLERANCE, export_encoder, relative_difference
from kinfonce.methods import method_class
from kinfonce.methods.base import data_description
from kinfonce.resolve import resolve
from kinfonce.train import run_pretrain
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def images(digits) -> torch.Tensor:
    """32 real test digits, normalised as the run saw them: (32, 1, 16, 16)."""
    return EvalTransform(digits.mean, digits.std)(digits.test.images[:32])


def _tiny_run(tmp_path_factory, **overrides) -> Path:
    root = tmp_path_factory.mktemp("export")
    config = tiny_config(root, train_subset=64, eval_linear_epochs=1, **overrides)
    return Path(run_pretrain(config)["run_dir"])


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory) -> Path:
    """A real tiny run of resnet-mini (widths kinfonce's own: torchvision rebuilds its stages)."""
    return _tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory) -> Path:
    """A real tiny run of kinfonce's resnet18 (torchvision's module tree, CIFAR stem)."""
    return _tiny_run(tmp_path_factory, backbone="resnet18", proj_hidden_dim=16)


def _export(run: Path, tmp_path: Path, fmt: str, **settings) -> Path:
    output = tmp_path / f"export-{fmt}"
    export_encoder(run, ExportSettings(format=fmt, output=str(output), **settings))
    return output


def _reference(run: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    backbone, head, _ = load_encoder_parts(run / "checkpoints" / "last.ckpt", head=True)
    with torch.no_grad():
        features = backbone(images)
        return features, head(features)


def _onnx_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


#: Format -> how another program runs its backbone or head file on a (B, ...) input.
LOADERS = {
    "torchscript": lambda path, x: torch.jit.load(str(path))(x),
    "torch-export": lambda path, x: torch.export.load(path).module()(x),
    "onnx": _onnx_outputs,
}


@pytest.mark.parametrize("fmt", sorted(LOADERS))
def test_each_graph_format_reproduces_the_checkpoint(mini_run, tmp_path, images, fmt):
    # Catches an export whose graph differs from the checkpoint's model (a wrong memory
    # format, a batch size fixed at the traced one, a head left out), on real digits and a
    # batch of 32 where the graph was made from 2.
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    output = _export(mini_run, tmp_path, fmt, head=True)
    features, embeddings = _reference(mini_run, images)
    suffix = {"torchscript": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}[fmt]
    with torch.no_grad():
        exported = LOADERS[fmt](output / f"backbone{suffix}", images)
        exported_head = LOADERS[fmt](output / f"head{suffix}", features)
    assert relative_difference(features, exported) < TOLERANCE
    assert relative_difference(embeddings, exported_head) < TOLERANCE
    config = json.loads((output / "config.json").read_text())
    assert config["check"]["max_relative_difference"]["backbone"] < TOLERANCE
    assert config["feature_dim"] == features.shape[1] == 128


def _guide_safetensors_snippet() -> str:
    blocks = [b for b in _python_blocks(GUIDE.read_text()) if "def load_export" in b]
    assert len(blocks) == 1, "docs/guide.md has one safetensors snippet"
    return blocks[0]


def _python_blocks(text: str) -> list[str]:
    parts = text.split("```python\n")[1:]
    return [part.split("\n```")[0] for part in parts]


def test_the_guide_shows_rebuild_py_as_it_is():
    # Catches the guide's lines drifting from kinfonce/rebuild.py, which every safetensors
    # export is checked with.
    snippet = _guide_safetensors_snippet()
    source = inspect.getsource(rebuild)
    assert source[source.index("import json") :].strip() in snippet


@pytest.mark.parametrize("run_name", ["mini_run", "resnet18_run"])
def test_the_guide_snippet_rebuilds_the_export_without_kinfonce(
    run_name, request, tmp_path, images
):
    # Catches a safetensors export that needs kinfonce to load: the guide's lines run in a
    # process where `import kinfonce` fails, and give the checkpoint's features and embeddings.
    run = request.getfixturevalue(run_name)
    output = _export(run, tmp_path, "safetensors", head=True)
    torch.save(images, tmp_path / "images.pt")
    snippet = _guide_safetensors_snippet().replace("RUN/export-safetensors", str(output))
    script = "\n".join(
        [
            "import sys",
            "sys.modules['kinfonce'] = None  # any import of kinfonce fails",
            snippet,
            f"x = torch.load({str(tmp_path / 'images.pt')!r})",
            "with torch.no_grad():",
            "    f = backbone(x)",
            f"    torch.save({{'features': f, 'embeddings': head(f)}}, {str(tmp_path / 'out.pt')!r})",
        ]
    )
    env_path = [p for p in sys.path if "kinfonce" not in p and not p.endswith("/src")]
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": ":".join(env_path), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = torch.load(tmp_path / "out.pt")
    features, embeddings = _reference(run, images)
    assert relative_difference(features, out["features"]) < TOLERANCE
    assert relative_difference(embeddings, out["embeddings"]) < TOLERANCE


def test_torchvision_format_loads_into_torchvision_resnet18(resnet18_run, tmp_path, images):
    # Catches a state_dict that torchvision's own resnet18 does not take with the guide's
    # stem (the module names or the stem differing from torchvision's).
    import torchvision
    from torch import nn

    output = _export(resnet18_run, tmp_path, "torchvision")
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(output / "backbone.pth", weights_only=True))
    with torch.no_grad():
        exported = model.eval()(images)
    assert relative_difference(_reference(resnet18_run, images)[0], exported) < TOLERANCE


def test_a_format_that_cannot_express_the_backbone_is_refused(mini_run, tmp_path):
    with pytest.raises(KinfonceError, match=r"--format torchvision: backbone 'resnet-mini'"):
        _export(mini_run, tmp_path, "torchvision")
    assert not (tmp_path / "export-torchvision").exists()


def test_an_export_that_does_not_reproduce_is_refused_and_not_written(
    mini_run, tmp_path, monkeypatch
):
    # Catches a check that passes anything: one weight changed in the written file (as a
    # wrong key order or dtype would) makes the export differ, and nothing is left behind.
    import kinfonce.export as export

    def perturbed(module):
        state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
        state["conv1.weight"][0] += 0.1
        return state

    monkeypatch.setattr(export, "_state", perturbed)
    with pytest.raises(KinfonceError, match="does not reproduce the checkpoint"):
        _export(mini_run, tmp_path, "safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_unless_overwrite(mini_run, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    argv = ["export", str(mini_run), "--output", str(output)]
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (output / "mine.txt").exists()
    assert main([*argv, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "largest relative difference to the checkpoint" in printed
    assert sorted(p.name for p in output.iterdir()) == ["backbone.safetensors", "config.json"]


def test_bad_sources_and_formats_are_refused(mini_run, tmp_path, capsys):
    assert main(["export", str(mini_run), "--format", "keras"]) == 2
    assert "format must be one of" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert main(["export", str(foreign)]) == 2
    assert "is not a kinfonce pretraining checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "pass a run directory or a .ckpt file" in capsys.readouterr().err


def _initial_backbone(run: Path, init_weights: Path) -> torch.nn.Module:
    """The backbone a new run of ``run``'s configuration starts from with ``init_weights``."""
    _, config = load_encoder(run / "checkpoints" / "last.ckpt")
    data = config.pop("data")
    train = tiny_config(run, backbone=config["backbone"], init_weights=str(init_weights))
    module = method_class(train)(resolve(train), data)
    return module.backbone.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "torchvision"])
def test_init_weights_from_an_export_reproduce_its_features(resnet18_run, tmp_path, images, fmt):
    # Catches --init-weights that loads nothing, or loads the export's weights into the
    # wrong places: the new run's starting backbone gives the exported features.
    output = _export(resnet18_run, tmp_path, fmt)
    backbone = _initial_backbone(resnet18_run, output)
    with torch.no_grad():
        started = backbone(images)
    assert relative_difference(_reference(resnet18_run, images)[0], started) < TOLERANCE


def test_init_weights_with_mismatched_keys_are_refused_by_name(mini_run, tmp_path, digits):
    output = _export(mini_run, tmp_path, "safetensors")
    train = tiny_config(tmp_path, backbone="resnet18", init_weights=str(output))
    with pytest.raises(KinfonceError, match=r"of another shape: bn1\.bias \(file \(16,\)"):
        method_class(train)(resolve(train), data_description(digits))
    state = load_encoder(mini_run / "checkpoints" / "last.ckpt")[0].state_dict()
    state["extra.weight"] = torch.zeros(1)
    state.pop("layer4.0.bn2.bias")
    torch.save(state, tmp_path / "state.pt")
    train = tiny_config(tmp_path, init_weights=str(tmp_path / "state.pt"))
    with pytest.raises(
        KinfonceError,
        match=r"missing from the file: layer4\.0\.bn2\.bias; not in the backbone: extra\.weight",
    ):
        method_class(train)(resolve(train), data_description(digits))


def test_init_weights_refuse_pickled_code(tmp_path, digits):
    torch.save({"conv1.weight": torch.zeros(1), "hook": print}, tmp_path / "code.pt")
    train = tiny_config(tmp_path, init_weights=str(tmp_path / "code.pt"))
    with pytest.raises(KinfonceError, match="cannot be read safely"):
        method_class(train)(resolve(train), data_description(digits))


def test_a_checkpoint_records_its_recipe_and_refuses_another_build(mini_run, tmp_path):
    # Catches a checkpoint rebuilt otherwise than its run built it (a library release that
    # changed the model): its stored recipe must be the one this machine builds.
    checkpoint = torch.load(mini_run / "checkpoints" / "last.ckpt", weights_only=True)
    recipe = checkpoint["kinfonce"]["backbone_recipe"]
    assert recipe == load_encoder(mini_run / "checkpoints" / "last.ckpt")[0].recipe
    recipe["stages"]["depths"] = [2, 2, 2, 2]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(KinfonceError, match="this machine's libraries build"):
        load_encoder(tmp_path / "other.ckpt")
