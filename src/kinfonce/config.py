"""The pretraining configuration: one dataclass, a YAML file and a flag per field.

The effective configuration is built in three layers: the defaults below, then an
optional YAML file (``--config``), then command-line flags. A key that is not a field
is an error, never ignored. ``None`` in a loss-parameter field means "the preset's (or
the method's) default"; in an augmentation field it means "the data set's default"
(:data:`DATASET_AUGMENTATION`). :meth:`PretrainConfig.resolved` fills these in, and the
resolved form is what a run writes to ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kinfonce.errors import KinfonceError, MissingFileError


def _f(default: Any, help: str, group: str) -> Any:
    return field(default=default, metadata={"help": help, "group": group})


#: Augmentation defaults per data set; others get the SimCLR recipe. The 16 px digits
#: are not mirror-symmetric and lose their identity under tight crops.
DATASET_AUGMENTATION: dict[str, dict[str, float]] = {
    "digits": {"crop_scale_min": 0.4, "flip_p": 0.0, "jitter_strength": 0.5},
}
SIMCLR_AUGMENTATION = {"crop_scale_min": 0.08, "flip_p": 0.5, "jitter_strength": 1.0}

#: Peak learning rate per loss preset when ``lr`` is not set; others get
#: :data:`DEFAULT_LR`. The spectral loss works on unnormalised embeddings, whose scale LARS at
#: 1.0 lets explode (digits, default settings: non-finite loss at lr 1.0, 0.3 and 0.1; stable,
#: and above the random encoder, at 0.03; docs/benchmarks.md).
DEFAULT_LR = 1.0
PRESET_LR = {"spectral": 0.03}

#: Fields that may change when a run is resumed: where and how it runs, where its data lies,
#: and how it is evaluated at the end; not what it trains.
RUNTIME_FIELDS = frozenset(
    {
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
        "precision",
        "progress",
        "output_dir",
        "data_root",
        "download",
        "eval_linear_epochs",
        "eval_knn_k",
        "baselines",
        "loss_path",
        "compile",
        "channels_last",
    }
)


@dataclass
class PretrainConfig:
    """Every setting of ``kinfonce pretrain`` (defaults: the embedded digits run)."""

    # data
    dataset: str = _f(
        "digits",
        "data set: digits, cifar10, cifar100, stl10, tinyimagenet, imagefolder:PATH",
        "data",
    )
    data_root: str | None = _f(None, "directory or zip holding the data set", "data")
    download: bool = _f(False, "download the data set if it is missing (torchvision sets)", "data")
    val_fraction: float = _f(
        0.1, "fraction of the training set held out for the online probe", "data"
    )
    train_subset: int | None = _f(
        None, "use a seeded random subset of this many training images (CPU-scale runs)", "data"
    )
    # augmentation
    crop_scale_min: float | None = _f(
        None,
        "smallest crop area fraction of the random resized crop (None: data set default)",
        "augmentation",
    )
    flip_p: float | None = _f(
        None, "probability of a horizontal flip (None: data set default)", "augmentation"
    )
    jitter_strength: float | None = _f(
        None, "colour-jitter strength s (None: data set default)", "augmentation"
    )
    blur: bool = _f(False, "add Gaussian blur to the views", "augmentation")
    # model
    method: str = _f("simclr", "pretraining method: simclr or moco", "model")
    backbone: str = _f("resnet-mini", "backbone name (see kinfonce.models.BACKBONES)", "model")
    proj_hidden_dim: int = _f(2048, "hidden width of the projection head", "model")
    proj_out_dim: int | None = _f(
        None, "embedding width (None: 128, or 256 for the concatenation presets)", "model"
    )
    moco_momentum: float = _f(0.99, "EMA momentum of the MoCo key encoder", "model")
    queue_size: int = _f(4096, "number of keys in the MoCo queue", "model")
    # loss
    loss: str = _f("simple-sum", "loss preset (see kinfonce.losses.LOSS_PRESETS)", "loss")
    temperature: float | None = _f(None, "temperature tau (None: preset/method default)", "loss")
    temperature1: float | None = _f(
        None, "temperature of the gamma=1 term of a sum preset (None: default)", "loss"
    )
    temperature2: float | None = _f(
        None, "temperature of the gamma=2 term of a sum preset (None: default)", "loss"
    )
    lam: float | None = _f(None, "weight lambda of the gamma=1 term of a sum preset", "loss")
    gamma: float | None = _f(None, "kernel exponent gamma (None: preset default)", "loss")
    loss_path: str = _f(
        "auto",
        "how Kernel-InfoNCE computes its rows: auto (fused on a GPU while it fits), fused, blocked",
        "loss",
    )
    # optimisation
    optimizer: str = _f("lars", "optimiser: lars, sgd or adam", "optimisation")
    lr: float | None = _f(
        None,
        "peak learning rate (after warm-up); none: the loss preset's (1.0, spectral 0.03)",
        "optimisation",
    )
    momentum: float = _f(0.9, "momentum of LARS and SGD", "optimisation")
    weight_decay: float = _f(
        1e-6, "weight decay (not on batch-norm weights and biases)", "optimisation"
    )
    trust_coefficient: float = _f(0.001, "LARS trust coefficient", "optimisation")
    warmup_epochs: float = _f(2.0, "epochs of linear learning-rate warm-up", "optimisation")
    probe_lr: float = _f(0.1, "learning rate of the online linear probe", "optimisation")
    batch_size: int = _f(256, "global batch size (split across devices)", "optimisation")
    epochs: int = _f(15, "training epochs", "optimisation")
    seed: int = _f(0, "random seed (weights, sampling and augmentation)", "optimisation")
    # evaluation
    eval_linear_epochs: int = _f(100, "epochs of the final linear probe", "evaluation")
    eval_knn_k: int = _f(200, "neighbours of the final kNN classifier", "evaluation")
    baselines: bool = _f(True, "also evaluate a random-weight encoder and raw pixels", "evaluation")
    # runtime
    output_dir: str | None = _f(
        None, "run directory (None: runs/pretrain/<dataset>-<method>-<loss>-<time>)", "runtime"
    )
    accelerator: str = _f("auto", "Lightning accelerator: auto, cpu, gpu, ...", "runtime")
    devices: str = _f("1", "Lightning devices: a count, a list like '0,1', or auto", "runtime")
    num_nodes: int = _f(1, "number of nodes for multi-node DDP", "runtime")
    strategy: str = _f("auto", "Lightning strategy: auto, ddp, ddp_spawn, ...", "runtime")
    precision: str = _f("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed", "runtime")
    sync_batchnorm: bool = _f(False, "synchronise batch norm across GPUs under DDP", "runtime")
    compile: bool = _f(
        False, "torch.compile the backbone and projection head for training", "runtime"
    )
    channels_last: bool = _f(
        False,
        "channels-last memory format for the backbone (faster convolutions on GPUs)",
        "runtime",
    )
    progress: bool = _f(True, "show progress bars", "runtime")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (YAML- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    def resolved(self) -> PretrainConfig:
        """A copy with the data set's augmentation defaults and the loss preset's learning
        rate filled in (loss-parameter defaults stay None)."""
        base = DATASET_AUGMENTATION.get(self.dataset, SIMCLR_AUGMENTATION)
        fill = {k: v for k, v in base.items() if getattr(self, k) is None}
        if self.lr is None:
            fill["lr"] = PRESET_LR.get(self.loss, DEFAULT_LR)
        return dataclasses.replace(self, **fill)


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def _field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field from its annotation."""
    hint = typing.get_type_hints(PretrainConfig)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
        return base, True
    return hint, False


def _coerce(name: str, value: Any) -> Any:
    """Check and convert one value to its field's type; ValueError names the field."""
    base, optional = _field_type(name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise KinfonceError(f"config field {name!r} must not be empty (expected {base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise KinfonceError(f"config field {name!r} must be true or false, got {value!r}")
    if base is int and isinstance(value, float) and not value.is_integer():
        raise KinfonceError(f"config field {name!r} must be an integer, got {value!r}")
    try:
        return base(value)
    except (TypeError, ValueError):
        raise KinfonceError(
            f"config field {name!r} must be {base.__name__}, got {value!r}"
        ) from None


def config_from_mapping(
    values: dict[str, Any], base: PretrainConfig | None = None
) -> PretrainConfig:
    """Override ``base`` (default: the defaults) with ``values``; unknown keys are errors."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise KinfonceError(f"unknown config key(s) {unknown}; valid keys are: {', '.join(FIELDS)}")
    changes = {name: _coerce(name, value) for name, value in values.items()}
    return dataclasses.replace(base or PretrainConfig(), **changes)


def load_config_file(path: str | Path, base: PretrainConfig | None = None) -> PretrainConfig:
    """Read a YAML mapping of config fields on top of ``base``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KinfonceError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise KinfonceError(f"config file {str(path)!r} must hold a mapping of config keys")
    return config_from_mapping(values, base)


def dump_config(config: PretrainConfig) -> str:
    """The config as plain YAML, fields in declaration order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--<field>`` for every field, grouped, with its help and default.

    Flags default to ``argparse.SUPPRESS`` so that only flags actually given override
    the YAML file; see :func:`flags_to_mapping`.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, spec in FIELDS.items():
        group_name = spec.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        base, optional = _field_type(name)
        flag = "--" + name.replace("_", "-")
        help_text = f"{spec.metadata['help']} (default: {spec.default})"
        if base is bool:
            groups[group_name].add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = base.__name__.upper() + ("|none" if optional else "")
            groups[group_name].add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar=metavar, help=help_text
            )


def flags_to_mapping(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, as a mapping for :func:`config_from_mapping`."""
    return {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two config dicts, ignoring :data:`RUNTIME_FIELDS`."""
    keys = (set(saved) | set(current)) - RUNTIME_FIELDS
    return [
        f"{key}: checkpoint has {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(keys)
        if saved.get(key) != current.get(key)
    ]


def build_config(
    config_file: str | Path | None, overrides: dict[str, Any], *, resume: bool = False
) -> PretrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (the flags given).

    When resuming without a config file, the run directory's own ``config.yaml`` (of
    ``overrides["output_dir"]``) is the base, so ``--output-dir RUN --resume`` is enough.
    """
    if config_file is None and resume and overrides.get("output_dir"):
        saved = Path(overrides["output_dir"]) / "config.yaml"
        if saved.is_file():
            config_file = saved
    base = load_config_file(config_file) if config_file is not None else None
    return config_from_mapping(overrides, base)
