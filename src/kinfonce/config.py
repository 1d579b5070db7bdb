"""Training configurations: one dataclass per command, a YAML file and a flag per field.

The effective configuration is built in layers: the defaults below, then an optional
recipe (``--recipe``, :mod:`kinfonce.recipes`), then an optional YAML file (``--config``),
then command-line flags. A key that is not a field is an error, never ignored. ``None``
in a loss-parameter field means "the preset's (or the method's) default"; in an
augmentation field it means "the data set's default" (:data:`DATASET_AUGMENTATION`).
:meth:`TrainConfig.resolved` fills these in, and the resolved form is what a run
writes to ``config.yaml``. :func:`validate` checks every field of it before a run
touches the disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
import warnings
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


ConfigT = typing.TypeVar("ConfigT", bound="TrainConfig")


@dataclass
class TrainConfig:
    """The settings every training command shares (defaults: the embedded digits run).

    :class:`PretrainConfig` (``kinfonce pretrain``) and :class:`ClipConfig`
    (``kinfonce clip``) add their own fields.
    """

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
    image_size: int | None = _f(
        None,
        "side in pixels that every image of an image tree (imagefolder, tinyimagenet) is "
        "resized to (None: the most common size)",
        "data",
    )
    unlabeled: bool = _f(
        False,
        "also pretrain on the data set's unlabelled images (stl10: its 100,000-image "
        "'unlabeled' split; imagefolder:PATH: every image under PATH/unlabelled/); probes "
        "and evaluation use the labelled ones only",
        "data",
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
    backbone: str = _f("resnet-mini", "backbone name (see kinfonce.models.BACKBONES)", "model")
    stem: str = _f(
        "auto",
        "backbone stem: auto (cifar up to 64 px, imagenet above), cifar (3x3, stride 1), "
        "imagenet (7x7, stride 2, max-pool) or imagenet-no-maxpool",
        "model",
    )
    proj_hidden_dim: int = _f(2048, "hidden width of the projection head", "model")
    proj_batch_norm: bool = _f(
        True,
        "batch norm after the head's hidden layer (Appendix B); off: MoCo code's head",
        "model",
    )
    proj_out_dim: int | None = _f(
        None, "embedding width (None: 128, or 256 for the concatenation presets)", "model"
    )
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
    mu: float | None = _f(
        None,
        "spectral only: an embedding longer than sqrt(mu) is scaled back to that length "
        "(None: preset default)",
        "loss",
    )
    concat_normalization: str | None = _f(
        None,
        "concat-sum only: 'halves' puts each half of the embedding on the unit sphere "
        "(None: this, kinfonce's default), 'whole' the whole embedding before it is split "
        "(the paper's code)",
        "loss",
    )
    positive_in_denominator: bool = _f(
        True,
        "count the positive in the loss's denominator (Eq. 8); off: negatives only, as "
        "the paper's MoCo code (queue form only)",
        "loss",
    )
    loss_path: str = _f(
        "auto",
        "how Kernel-InfoNCE computes its rows: auto (fused on a GPU while it fits), fused, blocked",
        "loss",
    )
    # optimisation
    optimizer: str = _f("lars", "optimiser: lars, sgd or adam", "optimisation")
    lr: float = _f(1.0, "peak learning rate (after warm-up)", "optimisation")
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
    channels_last: bool | None = _f(
        None,
        "channels-last memory format for the backbone; none: on for a CPU (measured faster), "
        "off on a GPU (not yet measured)",
        "runtime",
    )
    progress: bool = _f(True, "show progress bars", "runtime")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (YAML- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    def resolved(self: ConfigT) -> ConfigT:
        """A copy with the data set's augmentation defaults filled in (loss-parameter defaults
        stay None)."""
        base = DATASET_AUGMENTATION.get(self.dataset, SIMCLR_AUGMENTATION)
        fill = {k: v for k, v in base.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def method_class(self) -> Any:
        """The LightningModule class this configuration trains (a ``PretrainMethod``)."""
        raise NotImplementedError


@dataclass
class PretrainConfig(TrainConfig):
    """Every setting of ``kinfonce pretrain`` (defaults: the embedded digits run)."""

    method: str = _f("simclr", "pretraining method: simclr or moco", "model")
    moco_momentum: float = _f(0.99, "EMA momentum of the MoCo key encoder", "model")
    queue_size: int = _f(4096, "number of keys in the MoCo queue", "model")

    def method_class(self) -> Any:
        """``METHODS[method]``; a KinfonceError lists the methods for an unknown one."""
        from kinfonce.methods import METHODS

        if self.method not in METHODS:
            raise KinfonceError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        return METHODS[self.method]


#: Text encoders of ``kinfonce clip``: name -> what it is.
TEXT_ENCODERS = {
    "small": "a small transformer trained from scratch with the image encoder (no download)",
    "minilm": "frozen all-MiniLM-L6-v2 sentence embeddings (extra 'text') + a trainable projection",
}


@dataclass
class ClipConfig(TrainConfig):
    """Every setting of ``kinfonce clip``: image-caption training with the bipartite loss."""

    output_dir: str | None = _f(
        None, "run directory (None: runs/clip/<dataset>-clip-<loss>-<time>)", "runtime"
    )
    rewrites: int = _f(
        1,
        "captions per class: the plain prompt and rewrites-1 rewritten ones, one drawn "
        "uniformly per image and step (1: the prompt only)",
        "text",
    )
    text_encoder: str = _f("small", f"text encoder: {', '.join(TEXT_ENCODERS)}", "text")
    text_width: int = _f(
        64, "width of the small text encoder (and of the MiniLM projection)", "text"
    )
    text_layers: int = _f(2, "transformer layers of the small text encoder", "text")

    def method_class(self) -> Any:
        """:class:`kinfonce.clip.ClipMethod`."""
        from kinfonce.clip import ClipMethod

        return ClipMethod


#: Config class of each command, the ``kind`` a checkpoint records.
CONFIG_CLASSES: dict[str, type[TrainConfig]] = {"pretrain": PretrainConfig, "clip": ClipConfig}


def config_fields(cls: type[TrainConfig]) -> dict[str, dataclasses.Field]:
    """A config class's fields by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


#: The fields of ``kinfonce pretrain`` (and of its recipes and searches).
FIELDS = config_fields(PretrainConfig)


def field_type(cls: type[TrainConfig], name: str) -> tuple[type, bool]:
    """(base type, optional) of a field from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
        return base, True
    return hint, False


def _coerce(cls: type[TrainConfig], name: str, value: Any) -> Any:
    """Check and convert one value to its field's type; ValueError names the field."""
    base, optional = field_type(cls, name)
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
    values: dict[str, Any], base: TrainConfig | None = None, cls: type[TrainConfig] | None = None
) -> Any:
    """Override ``base`` with ``values``; unknown keys are errors.

    Args:
        values: field name -> value (strings are converted to the field's type).
        base: the config to start from (default: the defaults of ``cls``).
        cls: the config class (default: the class of ``base``, else :class:`PretrainConfig`).
    """
    cls = cls or (type(base) if base is not None else PretrainConfig)
    fields = config_fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KinfonceError(f"unknown config key(s) {unknown}; valid keys are: {', '.join(fields)}")
    changes = {name: _coerce(cls, name, value) for name, value in values.items()}
    return dataclasses.replace(base or cls(), **changes)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping of config keys in a YAML file (not yet checked against the fields)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KinfonceError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise KinfonceError(f"config file {str(path)!r} must hold a mapping of config keys")
    return values


def load_config_file(
    path: str | Path, base: TrainConfig | None = None, cls: type[TrainConfig] | None = None
) -> Any:
    """Read a YAML mapping of config fields on top of ``base`` (see :func:`config_from_mapping`)."""
    return config_from_mapping(read_config_mapping(path), base, cls)


def dump_config(config: TrainConfig, sources: dict[str, str] | None = None) -> str:
    """The config as plain YAML, fields in declaration order.

    With ``sources`` (field -> where its value came from), each line ends in a comment
    naming that source.
    """
    if sources is None:
        return yaml.safe_dump(config.to_dict(), sort_keys=False)
    lines = []
    for name, value in config.to_dict().items():
        line = yaml.safe_dump({name: value}, default_flow_style=True, width=1 << 16)
        line = line.strip()[1:-1]  # "{key: value}" -> "key: value"
        lines.append(f"{line}  # {sources.get(name, 'default')}")
    return "\n".join(lines) + "\n"


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type[TrainConfig] = PretrainConfig,
    exclude: frozenset[str] = frozenset(),
) -> None:
    """Add ``--<field>`` for every field of ``cls`` not in ``exclude``, grouped, with its help
    and default.

    Flags default to ``argparse.SUPPRESS`` so that only flags actually given override
    the YAML file; see :func:`flags_to_mapping`.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, spec in config_fields(cls).items():
        if name in exclude:
            continue
        group_name = spec.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        base, optional = field_type(cls, name)
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


def flags_to_mapping(
    args: argparse.Namespace, cls: type[TrainConfig] = PretrainConfig
) -> dict[str, Any]:
    """The config fields given on the command line, as a mapping for :func:`config_from_mapping`."""
    return {name: getattr(args, name) for name in config_fields(cls) if hasattr(args, name)}


def _same(a: Any, b: Any) -> bool:
    """Equality that also holds between two NaNs."""
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two config dicts, ignoring :data:`RUNTIME_FIELDS`
    (NaN equals NaN)."""
    keys = (set(saved) | set(current)) - RUNTIME_FIELDS
    return [
        f"{key}: checkpoint has {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(keys)
        if not _same(saved.get(key), current.get(key))
    ]


def config_file_for(
    config_file: str | Path | None, overrides: dict[str, Any], *, resume: bool = False
) -> Path | None:
    """The YAML file a config is read from: ``config_file``; when resuming without one,
    the run directory's own ``config.yaml`` (of ``overrides["output_dir"]``), so that
    ``--output-dir RUN --resume`` is enough.
    """
    if config_file is None and resume and overrides.get("output_dir"):
        saved = Path(overrides["output_dir"]) / "config.yaml"
        if saved.is_file():
            return saved
    return None if config_file is None else Path(config_file)


_FINITE = "a finite number"
#: (field, test, what is allowed) for every numeric field of the config classes (a class
#: without the field skips it); None passes where a field is optional. NaN fails every test.
NUMBER_RULES: tuple[tuple[str, typing.Callable[[float], bool], str], ...] = (
    ("val_fraction", lambda v: 0 < v < 1, "in (0, 1): the online probe needs a validation split"),
    ("train_subset", lambda v: v >= 1, ">= 1"),
    ("image_size", lambda v: v >= 1, ">= 1 (pixels)"),
    ("crop_scale_min", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("flip_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("jitter_strength", lambda v: 0 <= v < math.inf, f"{_FINITE} >= 0"),
    ("proj_hidden_dim", lambda v: v >= 1, ">= 1"),
    ("proj_out_dim", lambda v: v >= 1, ">= 1"),
    ("moco_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("queue_size", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: 0 < v < math.inf, f"{_FINITE} > 0"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: 0 <= v < math.inf, f"{_FINITE} >= 0"),
    ("trust_coefficient", lambda v: 0 < v < math.inf, f"{_FINITE} > 0"),
    ("warmup_epochs", lambda v: 0 <= v < math.inf, f"{_FINITE} >= 0 (epochs)"),
    ("probe_lr", lambda v: 0 <= v < math.inf, f"{_FINITE} >= 0 (0: a frozen probe)"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("eval_linear_epochs", lambda v: v >= 1, ">= 1"),
    ("eval_knn_k", lambda v: v >= 1, ">= 1"),
    ("num_nodes", lambda v: v >= 1, ">= 1"),
)
#: Lightning's ``devices``: "auto", -1 (all), a count, or device indices like "0,1" or "0,".
DEVICES_PATTERN = re.compile(r"auto|-1|[1-9]\d*|(\d+,)+\d*")
#: Lightning precision settings (and their short aliases).
PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
PRECISIONS += ("64", "32", "16", "bf16")


def _choice(field_name: str, value: str, valid: typing.Iterable[str]) -> None:
    if value not in valid:
        raise KinfonceError(f"{field_name} must be one of {sorted(valid)}, got {value!r}")


def _check_runtime(config: TrainConfig) -> None:
    """Lightning's settings and the output directory."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    from kinfonce.fileio import check_writable_dir

    _choice("accelerator", config.accelerator, {"auto", "gpu", *AcceleratorRegistry})
    _choice("strategy", config.strategy, {"auto", *StrategyRegistry})
    _choice("precision", config.precision, PRECISIONS)
    if not DEVICES_PATTERN.fullmatch(config.devices):
        raise KinfonceError(
            f"devices must be 'auto', -1 (all), a count >= 1 or device indices like '0,1', "
            f"got {config.devices!r}"
        )
    if config.output_dir is not None:
        check_writable_dir(config.output_dir, "output_dir")


def validate(config: ConfigT) -> ConfigT:
    """Check every field of a configuration; nothing is written.

    Types are checked (and converted) as for a YAML file; numbers against
    :data:`NUMBER_RULES`; names against their registries; the loss is built once by the
    method that would train it (a dry run of its parameters) and the embedding width
    checked against it; Lightning's settings are parsed; ``output_dir`` must be a
    directory that can be written.

    Returns:
        The resolved configuration with every value of its field's type.

    Raises:
        KinfonceError: the first field that is wrong, with what is allowed.
    """
    from kinfonce.data.datasets import check_dataset_name
    from kinfonce.kernel_lse import PATHS
    from kinfonce.losses import LOSS_PRESETS
    from kinfonce.models import BACKBONES
    from kinfonce.optim import OPTIMIZERS

    config = config_from_mapping(config.resolved().to_dict(), cls=type(config))
    for name, test, allowed in NUMBER_RULES:
        value = getattr(config, name, None)
        if value is not None and not test(value):
            raise KinfonceError(f"{name} must be {allowed}, got {value!r}")
    for name, valid in {
        "backbone": BACKBONES,
        "loss": LOSS_PRESETS,
        "optimizer": OPTIMIZERS,
        "loss_path": PATHS,
    }.items():
        _choice(name, getattr(config, name), valid)
    check_dataset_name(config.dataset, config.image_size)
    config.method_class().check_loss(config)
    _check_runtime(config)
    if config.warmup_epochs >= config.epochs:
        warnings.warn(
            f"warmup_epochs {config.warmup_epochs:g} >= epochs {config.epochs}: the learning "
            "rate rises until the last step and never decays",
            stacklevel=2,
        )
    return config


def build_config(
    config_file: str | Path | None,
    overrides: dict[str, Any],
    *,
    resume: bool = False,
    base: TrainConfig | None = None,
    cls: type[TrainConfig] = PretrainConfig,
) -> Any:
    """``base`` (default: the defaults of ``cls``; e.g. a recipe), then the YAML file (see
    :func:`config_file_for`), then ``overrides`` (the flags given)."""
    path = config_file_for(config_file, overrides, resume=resume)
    if path is not None:
        base = load_config_file(path, base, cls)
    return config_from_mapping(overrides, base, cls)
