"""``kinfonce export``: the encoder of a checkpoint in a format that runs without kinfonce.

One output directory per export: the backbone (and with ``head`` the projection head) in the
format's file, and ``config.json``: the architecture, the stem, the feature width, the input
size and normalisation, the recipe that rebuilds the model with torchvision or timm alone
(:mod:`kinfonce.rebuild`) and the export's own check.

Formats (``config.EXPORT_FORMATS``):

* ``safetensors``: the weights; rebuilt by :func:`kinfonce.rebuild.load_export`.
* ``torchscript``: ``torch.jit.trace`` of the module, for ``torch.jit.load`` (and libtorch).
* ``torch-export``: ``torch.export`` of the module with a dynamic batch dimension, for
  ``torch.export.load``: the format current torch maintains (TorchScript gets no new
  features); its program holds the weights and checks its input shapes when called.
* ``onnx``: torch's ONNX exporter (``dynamo=True``, the one current torch maintains; it
  needs onnxscript), with a dynamic batch dimension; checked with onnxruntime.
* ``torchvision``: a plain ``state_dict`` for the torchvision model of the recipe, for the
  backbones torchvision can build (kinfonce's ResNets at width 1, ``torchvision:NAME``).

Every export is loaded back the way another program would load it, and its outputs on a
seeded batch are compared with the checkpoint's: the relative difference
``|a - b| / |a|`` of each image's features, whose largest must stay within
:data:`TOLERANCE`. The files are written into a temporary directory that becomes the output
only when the check passed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kinfonce import __version__
from kinfonce.checkpoints import load_encoder_parts
from kinfonce.config import ExportSettings
from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.models import resolved_stem
from kinfonce.rebuild import build_model, make_layer

#: Largest relative difference between an export's and the checkpoint's features. float32
#: rounds each operation to within u = 2^-24 = 6e-8; the export runs other kernels (another
#: memory format, onnxruntime's fused convolutions), whose sums of K terms round in another
#: order, a relative difference of about sqrt(K) u per layer: 2e-6 for K = 3x3x128 in
#: resnet-mini, 4e-6 for K = 3x3x512 in a ResNet-18. A layer's error is not amplified by the
#: ones after it (batch norm in eval mode and ReLU are 1-Lipschitz per channel), so ten such
#: layers stay below 1e-5; an export with a wrong weight, layer or stem is off by far more.
TOLERANCE = 1e-5
#: Images of the batch the torchscript, torch-export and ONNX graphs are made from (the
#: check uses another batch size, so that the batch dimension is shown to be free).
TRACE_IMAGES = 2


@dataclass(frozen=True)
class Part:
    """One exported module: the backbone or the head, and how it is rebuilt."""

    name: str
    module: nn.Module
    spec: Any  # the backbone's recipe, or the head's list of layers (kinfonce.rebuild)

    def rebuild(self) -> nn.Module:
        """The module with random weights, made as another program makes it."""
        if self.name == "backbone":
            return build_model(self.spec)
        return nn.Sequential(*(make_layer(layer) for layer in self.spec))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _loaded(part: Part, state: dict[str, torch.Tensor]) -> nn.Module:
    model = part.rebuild()
    model.load_state_dict(state)
    return model.eval()


def _write_safetensors(part: Part, example: torch.Tensor, path: Path) -> None:
    save_file(_state(part.module), path)


def _load_safetensors(part: Part, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    return _loaded(part, load_file(path))


def _write_torchvision(part: Part, example: torch.Tensor, path: Path) -> None:
    torch.save(_state(part.module), path)


def _load_torchvision(part: Part, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    return _loaded(part, torch.load(path, map_location="cpu", weights_only=True))


@contextlib.contextmanager
def _torchscript_deprecation_said() -> Iterator[None]:
    """Silence torch's FutureWarnings that TorchScript is deprecated: the docs say so once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", FutureWarning)
        yield


def _write_torchscript(part: Part, example: torch.Tensor, path: Path) -> None:
    with _torchscript_deprecation_said():
        torch.jit.save(torch.jit.trace(part.module, example), str(path))


def _load_torchscript(part: Part, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _torchscript_deprecation_said():
        return torch.jit.load(str(path), map_location="cpu")


def _batch_free() -> tuple[dict[int, Any]]:
    """The dynamic shapes of a module of one input: any batch size."""
    return ({0: torch.export.Dim("batch", min=1)},)


def _write_torch_export(part: Part, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(part.module, (example,), dynamic_shapes=_batch_free())
    torch.export.save(program, path)


def _load_torch_export(part: Part, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.export.load(path).module()


def _write_onnx(part: Part, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise KinfonceError("--format onnx needs onnx: pip install 'kinfonce[onnx]'") from None
    torch.onnx.export(
        part.module,
        (example,),
        str(path),
        dynamo=True,
        verbose=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=_batch_free(),
    )


def _load_onnx(part: Part, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


#: Format -> (file suffix, writer, loader as another program loads it).
WRITERS = {
    "safetensors": (".safetensors", _write_safetensors, _load_safetensors),
    "torchscript": (".pt", _write_torchscript, _load_torchscript),
    "torch-export": (".pt2", _write_torch_export, _load_torch_export),
    "onnx": (".onnx", _write_onnx, _load_onnx),
    "torchvision": (".pth", _write_torchvision, _load_torchvision),
}


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The largest ``|a - b| / |a|`` over the rows of two (B, F) tensors (float64 norms)."""
    reference, other = reference.double(), other.double()
    error = (other - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-30)
    return float(error.max())


def source_checkpoint(source: str | Path) -> Path:
    """The checkpoint of ``source``: itself, or a run directory's ``checkpoints/last.ckpt``
    (the weights its end-of-run evaluation measured)."""
    source = Path(source)
    if source.is_dir():
        source = source / "checkpoints" / "last.ckpt"
    if not source.is_file():
        raise MissingFileError(
            f"{str(source)!r} does not exist: pass a run directory or a .ckpt file"
        )
    return source


def default_output(checkpoint: Path, fmt: str) -> Path:
    """``RUN_DIR/export-FORMAT`` for ``RUN_DIR/checkpoints/X.ckpt``, else ``X-export-FORMAT``
    beside the checkpoint."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / f"export-{fmt}"
    return checkpoint.with_name(f"{checkpoint.stem}-export-{fmt}")


def _head_layers(head: nn.Module) -> list[dict[str, Any]]:
    """The head's layers as :func:`kinfonce.rebuild.make_layer` specifications."""
    layers = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            args = {"in_features": layer.in_features, "out_features": layer.out_features}
            layers.append({"type": "Linear", "args": {**args, "bias": layer.bias is not None}})
        elif isinstance(layer, nn.BatchNorm1d):
            layers.append({"type": "BatchNorm1d", "args": {"num_features": layer.num_features}})
        else:
            layers.append({"type": type(layer).__name__})
    return layers


def _check_expressible(fmt: str, backbone: nn.Module, name: str) -> None:
    recipe = backbone.recipe
    if fmt == "torchvision" and (recipe["library"] != "torchvision" or "stages" in recipe):
        raise KinfonceError(
            f"--format torchvision: backbone {name!r} is no torchvision model (torchvision "
            "builds kinfonce's resnet18, resnet34 and resnet50 at width 1 and "
            "torchvision:NAME); use --format safetensors"
        )


def export_encoder(source: str | Path, settings: ExportSettings) -> tuple[Path, dict[str, Any]]:
    """Export the encoder of a run directory or checkpoint (see the module docstring).

    Returns:
        (output directory, its config.json as a dict).

    Raises:
        KinfonceError: the output exists (without ``overwrite``), the source is no kinfonce
            checkpoint, the format cannot express the backbone, or the export's features
            differ from the checkpoint's by more than :data:`TOLERANCE`.
    """
    checkpoint = source_checkpoint(source)
    output = (
        Path(settings.output) if settings.output else default_output(checkpoint, settings.format)
    )
    if output.exists() and not settings.overwrite:
        raise KinfonceError(f"output {str(output)!r} exists; pass --overwrite to replace it")
    backbone, head, config = load_encoder_parts(checkpoint, head=settings.head)
    _check_expressible(settings.format, backbone, config["backbone"])
    data = config["data"]
    parts = [
        Part(
            "backbone",
            copy.deepcopy(backbone).to(memory_format=torch.contiguous_format),
            backbone.recipe,
        )
    ]
    if head is not None:
        parts.append(Part("head", head, _head_layers(head)))
    generator = torch.Generator().manual_seed(0)
    shape = (data["channels"], data["image_size"], data["image_size"])
    images = torch.randn(settings.check_images, *shape, generator=generator)
    with torch.no_grad():
        features = backbone(images)
        inputs = {"backbone": images, "head": features}
        references = {"backbone": features, "head": head(features) if head is not None else None}
    suffix, write, load = WRITERS[settings.format]
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        differences = {}
        for part in parts:
            path = temporary / f"{part.name}{suffix}"
            write(part, inputs[part.name][:TRACE_IMAGES], path)
            with torch.no_grad():
                exported = load(part, path)(inputs[part.name])
            differences[part.name] = relative_difference(references[part.name], exported)
        description = _description(settings, checkpoint, config, parts, suffix, differences)
        (temporary / "config.json").write_text(json.dumps(description, indent=2) + "\n")
        failed = {k: v for k, v in differences.items() if not v <= TOLERANCE}
        if failed:
            raise KinfonceError(
                f"the {settings.format} export does not reproduce the checkpoint: relative "
                f"difference {failed} above {TOLERANCE:g}; nothing written"
            )
        if output.exists():
            shutil.rmtree(output)
        temporary.rename(output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return output, description


def _description(
    settings: ExportSettings,
    checkpoint: Path,
    config: dict[str, Any],
    parts: list[Part],
    suffix: str,
    differences: dict[str, float],
) -> dict[str, Any]:
    """The export's config.json."""
    data = config["data"]
    backbone = parts[0].module
    return {
        "format": settings.format,
        "kinfonce_version": __version__,
        "torch_version": torch.__version__,
        "source": str(checkpoint),
        "architecture": config["backbone"],
        "stem": resolved_stem(config["stem"], data["image_size"]),
        "feature_dim": backbone.feature_dim,
        "input": {
            "channels": data["channels"],
            "image_size": data["image_size"],
            "mean": list(data["mean"]),
            "std": list(data["std"]),
            "scaling": "uint8 images / 255, then (x - mean) / std per channel",
        },
        "model": backbone.recipe,
        "head": parts[1].spec if len(parts) > 1 else None,
        "files": {part.name: f"{part.name}{suffix}" for part in parts},
        "check": {
            "images": settings.check_images,
            "max_relative_difference": differences,
            "tolerance": TOLERANCE,
        },
    }
