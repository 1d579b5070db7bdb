"""The settings of every ``kinfonce`` command: one frozen dataclass each, and the flags made from them.

Each field carries its help text, its group and the rule its values obey (field metadata,
see :func:`setting`); a field's flag, its ``--help`` line and its check all come from there.
Making a settings object converts each value to its field's type (strings from the command
line are read, a bool where a number belongs or a list where a string belongs is refused) and
checks it against its rule, naming the field.

The training configuration (:class:`PretrainConfig`, :class:`ClipConfig`) is built in layers:
the defaults, an optional recipe, an optional YAML file (``--config``), then the flags given.
``None`` in some of its fields means "decide for me"; :func:`kinfonce.resolve.resolve` turns
that input into the one fully resolved configuration a run uses and records in
``config.yaml``. A key that is not a field is an error, never ignored.

This module imports no method, loss, model or data module: checks that need them (names in
their registries, rules between fields, a dry build of the loss) are in :mod:`kinfonce.resolve`.

A new setting is one field: ``name: type = setting(default, help, group, rule)``. Its flag,
``--help`` line, YAML key, type check and rule follow; ``runtime=True`` lets it differ on
resume, ``loss_parameter=True`` makes it a preset parameter filled by the resolution step. A
field whose values are a registry's names goes into ``resolve.REGISTERED_NAMES``, a rule
between fields into ``resolve.TRAIN_RULES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kinfonce.errors import KinfonceError, MissingFileError


@dataclass(frozen=True)
class Rule:
    """What values a field allows: a test and the words that say what passes it.

    ``None`` (in an optional field) passes every rule; NaN fails every comparison.
    ``choices`` lists the values of a rule that allows only those (:func:`one_of`).
    """

    test: Callable[[Any], bool]
    allowed: str
    choices: tuple[str, ...] | None = None

    def check(self, name: str, value: Any) -> None:
        """Raise a KinfonceError naming the field unless ``value`` passes."""
        if value is not None and not self.test(value):
            raise KinfonceError(f"{name} must be {self.allowed}, got {value!r}")


def _num(x: float) -> str:
    return f"{x:g}"


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A number in the interval from ``low`` to ``high``, each end included unless open."""

    def test(v: Any) -> bool:
        above = low < v if low_open else low <= v
        below = v < high if high_open else v <= high
        return above and below

    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return Rule(test, f"in {left}{_num(low)}, {_num(high)}{right}")


def at_least(low: float) -> Rule:
    """A finite number >= ``low`` (an integer field says just ">= low")."""
    words = f"a finite number >= {_num(low)}" if isinstance(low, float) else f">= {low}"
    return Rule(lambda v: low <= v < math.inf, words)


def above(low: float) -> Rule:
    """A finite number > ``low``."""
    return Rule(lambda v: low < v < math.inf, f"a finite number > {_num(low)}")


def one_of(*names: str) -> Rule:
    """One of ``names``."""
    return Rule(lambda v: v in names, f"one of {sorted(names)}", names)


def matching(pattern: str, words: str) -> Rule:
    """A string that matches the regular expression ``pattern`` as a whole."""
    compiled = re.compile(pattern)
    return Rule(lambda v: compiled.fullmatch(v) is not None, words)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name, kept as surrogates
        return False
    return True


#: A path that can be written into records and logs: valid UTF-8 (TensorBoard, YAML, JSON).
UTF8_PATH = Rule(_utf8, "a path whose name is valid UTF-8 (the run's logs and records need it)")


def setting(
    default: Any,
    help: str,
    group: str,
    rule: Rule | None = None,
    *,
    runtime: bool = False,
    loss_parameter: bool = False,
) -> Any:
    """A settings field with its metadata.

    Args:
        default: the default value.
        help: what the field sets; the flag generator appends the default. Say what
            ``None`` means where the default is None.
        group: the ``--help`` section of its flag.
        rule: what values it allows (see :class:`Rule`).
        runtime: where and how a run executes, not what it trains: may differ when a run
            is resumed, and a search cannot vary it (:data:`RUNTIME_FIELDS`).
        loss_parameter: a keyword argument of some loss preset, filled from the preset's
            (or the method's) default when the chosen preset takes it and left None
            otherwise (:func:`kinfonce.resolve.resolve`).
    """
    if not help.strip():
        raise ValueError("a setting needs a help text")
    metadata = {
        "help": help,
        "group": group,
        "rule": rule,
        "runtime": runtime,
        "loss_parameter": loss_parameter,
    }
    return field(default=default, metadata=metadata)


@functools.cache
def _types(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional) of a settings class, from its annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            out[spec.name] = (next(a for a in typing.get_args(hint) if a is not type(None)), True)
        else:
            out[spec.name] = (hint, False)
    return out


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional) of a field of a settings class."""
    return _types(cls)[name]


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def convert(cls: type, name: str, value: Any) -> Any:
    """One value from a YAML file, the command line or code, as its field's type.

    Strings are read (``"0.5"``, ``"true"``, ``"none"`` for an optional field); numbers become
    strings where a string belongs (``devices: 2``). A bool where a number or string belongs,
    a list or mapping anywhere, a float with a fraction where an integer belongs are refused.

    Raises:
        KinfonceError: naming the field and the type it takes.
    """
    base, optional = field_type(cls, name)
    if typing.get_origin(base) is tuple:
        return _convert_strings(name, value)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise KinfonceError(f"{name} must not be empty (expected {_TYPE_WORDS[base]})")
    wrong = KinfonceError(f"{name} must be {_TYPE_WORDS[base]}, got {value!r}")
    if isinstance(value, bool):
        if base is bool:
            return value
        raise wrong
    if base is bool:
        text = str(value).lower() if isinstance(value, str) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise wrong
    if base is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise wrong
    if isinstance(value, str):
        try:
            value = float(value) if base is float else _read_int(value)
        except ValueError:
            raise wrong from None
    if not isinstance(value, (int, float)):
        raise wrong
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise wrong
        return int(value)
    return float(value)


def _convert_strings(name: str, value: Any) -> tuple[str, ...]:
    """A list field's value: a list or tuple of strings (one string is a list of one)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise KinfonceError(f"{name} must be a list of strings, got {value!r}")
    return tuple(values)


def _read_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)  # "2.0" or "1e3"; a fraction is refused by the caller


def check_fields(settings: Any) -> None:
    """Convert every field of a settings object to its type and check it against its rule.

    Called when a settings object is made (a frozen dataclass: converted values are set with
    ``object.__setattr__``).
    """
    cls = type(settings)
    for spec in dataclasses.fields(cls):
        value = convert(cls, spec.name, getattr(settings, spec.name))
        object.__setattr__(settings, spec.name, value)
        rule = spec.metadata.get("rule")
        if rule is not None:
            rule.check(spec.name, value)


@dataclass(frozen=True)
class Settings:
    """Base of every command's settings: each field converted and checked when made."""

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (YAML-, JSON- and checkpoint-safe: a list field's tuple
        becomes a list)."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


#: Lightning's ``devices``: "auto", -1 (all), a count, or device indices like "0,1" or "0,".
DEVICES_PATTERN = r"auto|-1|[1-9]\d*|(\d+,)+\d*"
#: Lightning precision settings, and the short aliases :mod:`kinfonce.resolve` expands.
PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
#: Text encoders of ``kinfonce clip``: name -> what it is.
TEXT_ENCODERS = {
    "small": "a small transformer trained from scratch with the image encoder (no download)",
    "minilm": "frozen all-MiniLM-L6-v2 sentence embeddings (extra 'text') + a trainable projection",
}


@dataclass(frozen=True)
class TrainConfig(Settings):
    """The settings every training command shares (defaults: the embedded digits run).

    :class:`PretrainConfig` (``kinfonce pretrain``) and :class:`ClipConfig`
    (``kinfonce clip``) add their own fields; ``command`` says which one a config is.
    """

    command: str = field(default="pretrain", init=False)
    # data
    dataset: str = setting(
        "digits",
        "data set: digits, cifar10, cifar100, stl10, tinyimagenet, imagefolder:PATH",
        "data",
    )
    data_root: str | None = setting(
        None, "directory or zip holding the data set", "data", runtime=True
    )
    download: bool = setting(
        False, "download the data set if it is missing (torchvision sets)", "data", runtime=True
    )
    val_fraction: float = setting(
        0.1,
        "fraction of the whole training set held out for the online probe, drawn before "
        "--train-subset (its size does not follow the subset)",
        "data",
        Rule(lambda v: 0 < v < 1, "in (0, 1): the online probe needs a validation split"),
    )
    train_subset: int | None = setting(
        None,
        "use a seeded random subset of this many training images (CPU-scale runs; none: all)",
        "data",
        at_least(1),
    )
    image_size: int | None = setting(
        None,
        "side in pixels that every image of an image tree (imagefolder, tinyimagenet) is "
        "resized to (none: the most common size)",
        "data",
        at_least(1),
    )
    resize: str = setting(
        "shorter-side-then-centre-crop",
        "how an image of an image tree whose shape is not image_size square is fitted to it: "
        "shorter-side-then-centre-crop (aspect ratio kept, the longer side's ends cut) or "
        "stretch (whole image, aspect ratio lost)",
        "data",
    )
    workers: int | None = setting(
        None,
        "processes that decode an image tree into the cache (none: the cores available); "
        "the cache is the same whatever their number",
        "data",
        at_least(1),
        runtime=True,
    )
    unlabeled: bool = setting(
        False,
        "also pretrain on the data set's unlabelled images (stl10: its 100,000-image "
        "'unlabeled' split; imagefolder:PATH: every image under PATH/unlabelled/); probes "
        "and evaluation use the labelled ones only",
        "data",
    )
    # augmentation
    crop_scale_min: float | None = setting(
        None,
        "smallest crop area fraction of the random resized crop (none: the data set's)",
        "augmentation",
        between(0, 1, low_open=True),
    )
    flip_p: float | None = setting(
        None,
        "probability of a horizontal flip (none: the data set's)",
        "augmentation",
        between(0, 1),
    )
    jitter_strength: float | None = setting(
        None, "colour-jitter strength s (none: the data set's)", "augmentation", at_least(0.0)
    )
    blur: bool = setting(False, "add Gaussian blur to the views", "augmentation")
    # model
    backbone: str = setting(
        "resnet-mini",
        "backbone: a kinfonce ResNet (resnet-mini, resnet18, resnet50-w0.5, ...; see "
        "kinfonce.models.BACKBONES), timm:NAME (extra 'timm') or torchvision:NAME, built "
        "without pretrained weights",
        "model",
    )
    init_weights: str | None = setting(
        None,
        "start the backbone from these weights: a safetensors file, a torch state_dict or "
        "the directory of a `kinfonce export` (none: random weights)",
        "model",
    )
    stem: str = setting(
        "auto",
        "backbone stem: auto (cifar up to 64 px, imagenet above), cifar (3x3, stride 1), "
        "imagenet (7x7, stride 2, max-pool) or imagenet-no-maxpool",
        "model",
    )
    proj_hidden_dim: int = setting(
        2048, "hidden width of the projection head", "model", at_least(1)
    )
    proj_batch_norm: bool = setting(
        True,
        "batch norm after the head's hidden layer (Appendix B); off: MoCo code's head",
        "model",
    )
    proj_out_dim: int | None = setting(
        None,
        "embedding width (none: 128 per part of the loss's features, 256 for the "
        "concatenation presets)",
        "model",
        at_least(1),
    )
    # loss
    loss: str = setting("simple-sum", "loss preset (see kinfonce.losses.LOSS_PRESETS)", "loss")
    temperature: float | None = setting(
        None,
        "temperature tau of a one-kernel preset (none: the preset's or the method's default)",
        "loss",
        loss_parameter=True,
    )
    gamma1: float | None = setting(
        None,
        "kernel exponent gamma of the first term of a sum preset, 1 (Laplacian) by default; "
        "the authors' search draws 0.5 or 1 (none: the preset's default)",
        "loss",
        loss_parameter=True,
    )
    temperature1: float | None = setting(
        None,
        "temperature of the first (gamma1) term of a sum preset (none: the preset's or the "
        "method's default)",
        "loss",
        loss_parameter=True,
    )
    temperature2: float | None = setting(
        None,
        "temperature of the second (Gaussian, gamma 2) term of a sum preset (none: the preset's "
        "or the method's default)",
        "loss",
        loss_parameter=True,
    )
    lam: float | None = setting(
        None,
        "weight lambda of the first (gamma1) term of a sum preset, 1 - lambda the second's "
        "(none: the preset's or the method's default)",
        "loss",
        loss_parameter=True,
    )
    gamma: float | None = setting(
        None,
        "kernel exponent gamma of the exponential preset (none: its default)",
        "loss",
        loss_parameter=True,
    )
    mu: float | None = setting(
        None,
        "spectral only: an embedding longer than sqrt(mu) is scaled back to that length "
        "(none: the preset's default)",
        "loss",
        loss_parameter=True,
    )
    concat_normalization: str | None = setting(
        None,
        "concat-sum only: 'halves' puts each half of the embedding on the unit sphere "
        "(none: this, kinfonce's default), 'whole' the whole embedding before it is split "
        "(the paper's code)",
        "loss",
        loss_parameter=True,
    )
    positive_in_denominator: bool = setting(
        True,
        "count the positive in the loss's denominator (Eq. 8); off: negatives only, as "
        "the paper's MoCo code (queue form only)",
        "loss",
    )
    loss_path: str = setting(
        "auto",
        "how Kernel-InfoNCE computes its rows: auto (fused on a GPU while it fits), fused, blocked",
        "loss",
        runtime=True,
    )
    # optimisation
    optimizer: str = setting("lars", "optimiser: lars, sgd or adam", "optimisation")
    lr: float = setting(1.0, "peak learning rate (after warm-up)", "optimisation", above(0.0))
    momentum: float = setting(
        0.9, "momentum of LARS and SGD", "optimisation", between(0, 1, high_open=True)
    )
    weight_decay: float = setting(
        1e-6,
        "weight decay (not on batch-norm weights and biases with --exclude-bn-bias)",
        "optimisation",
        at_least(0.0),
    )
    exclude_bn_bias: bool = setting(
        True,
        "exempt batch-norm weights and all biases from weight decay and from LARS's trust "
        "ratio (off: every parameter gets both, as the authors' code by default)",
        "optimisation",
    )
    trust_coefficient: float = setting(0.001, "LARS trust coefficient", "optimisation", above(0.0))
    warmup_epochs: float = setting(
        2.0, "epochs of linear learning-rate warm-up", "optimisation", at_least(0.0)
    )
    probe_lr: float = setting(
        0.1,
        "learning rate of the online linear probe (0: a frozen probe)",
        "optimisation",
        at_least(0.0),
    )
    batch_size: int = setting(
        256, "global batch size (split across devices)", "optimisation", at_least(1)
    )
    epochs: int = setting(15, "training epochs", "optimisation", at_least(1))
    seed: int = setting(
        0,
        "random seed (weights, sampling and augmentation)",
        "optimisation",
        Rule(lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    )
    # evaluation
    eval_linear_epochs: int = setting(
        100, "epochs of the final linear probe", "evaluation", at_least(1), runtime=True
    )
    eval_knn_k: int = setting(
        200, "neighbours of the final kNN classifier", "evaluation", at_least(1), runtime=True
    )
    baselines: bool = setting(
        True, "also evaluate a random-weight encoder and raw pixels", "evaluation", runtime=True
    )
    # runtime
    output_dir: str | None = setting(
        None,
        "run directory (none: runs/<command>/<dataset>-<method>-<loss>-<time>)",
        "runtime",
        UTF8_PATH,
        runtime=True,
    )
    accelerator: str = setting(
        "auto",
        "Lightning accelerator: auto (a GPU if there is one, else cpu), cpu, gpu, ...",
        "runtime",
        runtime=True,
    )
    devices: str = setting(
        "1",
        "Lightning devices: a count, a list like '0,1', -1 (all) or auto",
        "runtime",
        matching(DEVICES_PATTERN, "'auto', -1 (all), a count >= 1 or device indices like '0,1'"),
        runtime=True,
    )
    num_nodes: int = setting(
        1, "number of nodes for multi-node DDP", "runtime", at_least(1), runtime=True
    )
    strategy: str = setting(
        "auto", "Lightning strategy: auto, ddp, ddp_spawn, ...", "runtime", runtime=True
    )
    ddp_timeout: float = setting(
        1800.0,
        "seconds a DDP process waits for the others: for all of them to start (then the run "
        "ends with an error), and at each collective operation (30 minutes: PyTorch's default)",
        "runtime",
        above(0.0),
        runtime=True,
    )
    precision: str = setting(
        "32-true",
        "Lightning precision: 32-true, bf16-mixed, 16-mixed, ... (32, 16, bf16 and 64 are "
        "read as Lightning reads them)",
        "runtime",
        one_of(*PRECISIONS, *PRECISION_ALIASES),
        runtime=True,
    )
    sync_batchnorm: bool = setting(False, "synchronise batch norm across GPUs under DDP", "runtime")
    compile: bool = setting(
        False,
        "torch.compile the backbone and projection head for training",
        "runtime",
        runtime=True,
    )
    channels_last: bool | None = setting(
        None,
        "channels-last memory format for the backbone, in training and evaluation (none: on "
        "for a CPU, where it was measured faster, off on a GPU, not yet measured there)",
        "runtime",
        runtime=True,
    )
    progress: bool = setting(True, "show progress bars", "runtime", runtime=True)

    @property
    def method_name(self) -> str:
        """The name of the method this configuration trains (a key of ``METHODS``)."""
        return self.command


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """Every setting of ``kinfonce pretrain`` (defaults: the embedded digits run)."""

    method: str = setting("simclr", "pretraining method", "model", one_of("simclr", "moco"))
    moco_momentum: float = setting(
        0.99, "EMA momentum of the MoCo key encoder", "model", between(0, 1, high_open=True)
    )
    queue_size: int = setting(4096, "number of keys in the MoCo queue", "model", at_least(1))

    @property
    def method_name(self) -> str:
        return self.method


@dataclass(frozen=True)
class ClipConfig(TrainConfig):
    """Every setting of ``kinfonce clip``: image-caption training with the bipartite loss."""

    command: str = field(default="clip", init=False)
    rewrites: int = setting(
        1,
        "captions per class: the plain prompt and rewrites-1 rewritten ones, one drawn "
        "uniformly per image and step (1: the prompt only)",
        "text",
        at_least(1),
    )
    text_encoder: str = setting(
        "small",
        "text encoder: " + "; ".join(f"{k}: {v}" for k, v in TEXT_ENCODERS.items()),
        "text",
        one_of(*TEXT_ENCODERS),
    )
    text_width: int = setting(
        64, "width of the small text encoder (and of the MiniLM projection)", "text", at_least(1)
    )
    text_layers: int = setting(
        2, "transformer layers of the small text encoder", "text", at_least(1)
    )
    # a user's own image-caption pairs (docs/clip.md, "Your own image-caption data")
    captions: str | None = setting(
        None,
        "image-caption pairs to train on instead of class prompts: a CSV or TSV file (one "
        "image path and caption per row; see --image-root and --csv-*-key), or a folder, "
        ".zip or .tar of name.jpg + name.txt pairs (none: class prompts of --dataset)",
        "captions",
    )
    image_root: str | None = setting(
        None,
        "directory or .zip that the image paths of a --captions CSV are relative to (none: "
        "the CSV's folder)",
        "captions",
        runtime=True,
    )
    csv_img_key: str = setting("filepath", "column of the image paths in a CSV", "captions")
    csv_caption_key: str = setting("title", "column of the captions in a CSV", "captions")
    csv_label_key: str | None = setting(
        None,
        "column of class names in a CSV, for zero-shot accuracy and the probes (none: "
        "unlabelled; a folder of pairs reads name.cls)",
        "captions",
    )
    csv_separator: str | None = setting(
        None, "field separator of the CSV (none: a tab for .tsv, else a comma)", "captions"
    )
    rewrite_files: tuple[str, ...] = setting(
        (),
        "text files of caption rewrites, each with one line per caption row (CSV row, or "
        "pair in name order), as LaCLIP's; each step draws one of an image's captions",
        "captions",
    )
    captions_sha256: str | None = setting(
        None,
        "SHA-256 of the caption files' content: the --captions file (a folder of pairs: its "
        ".txt and .cls files), then each --rewrite-files file (none: computed when the run "
        "starts and recorded in config.yaml; a run given one, as a resume reads it from "
        "config.yaml, refuses files that hash otherwise)",
        "captions",
    )
    test_fraction: float = setting(
        0.1,
        "fraction of the --captions images held out as the test split (retrieval recall, "
        "zero-shot accuracy, probes)",
        "captions",
        Rule(lambda v: 0 < v < 1, "in (0, 1): retrieval is measured on held-out pairs"),
    )


#: Config class of each training command (a config's ``command``; a checkpoint's ``kind``).
CONFIG_CLASSES: dict[str, type[TrainConfig]] = {"pretrain": PretrainConfig, "clip": ClipConfig}

ConfigT = typing.TypeVar("ConfigT", bound=TrainConfig)


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """A settings class's fields by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


def settable_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a YAML file or a flag may set (all but a config's fixed ``command``)."""
    return {name: f for name, f in config_fields(cls).items() if f.init}


#: The fields of ``kinfonce pretrain`` (and of its recipes and searches).
FIELDS = settable_fields(PretrainConfig)

#: Fields that may change when a run is resumed: where and how it runs, where its data lies,
#: and how it is evaluated at the end; not what it trains (``runtime`` in their metadata).
RUNTIME_FIELDS = frozenset(
    name
    for cls in CONFIG_CLASSES.values()
    for name, spec in config_fields(cls).items()
    if spec.metadata.get("runtime")
)

#: Fields that are keyword arguments of a loss preset (``loss_parameter`` in their metadata).
LOSS_FIELDS = tuple(
    name for name, spec in config_fields(TrainConfig).items() if spec.metadata.get("loss_parameter")
)


def config_from_mapping(
    values: dict[str, Any], base: Any = None, cls: type[TrainConfig] | None = None
) -> Any:
    """Override ``base`` with ``values``; unknown keys are errors.

    Args:
        values: field name -> value (converted to the field's type, see :func:`convert`). A
            ``command`` key must name the command of ``cls``.
        base: the config to start from (default: the defaults of ``cls``).
        cls: the config class (default: the class of ``base``, else :class:`PretrainConfig`).
    """
    cls = cls or (type(base) if base is not None else PretrainConfig)
    values = dict(values)
    command = values.pop("command", None)
    own = cls.__dataclass_fields__["command"].default if "command" in config_fields(cls) else None
    if command is not None and command != own:
        raise KinfonceError(
            f"this is the configuration of `kinfonce {command}`, not of `kinfonce {own}`; "
            f"run it with `kinfonce {command} --config FILE`"
        )
    return settings_from_mapping(cls, values, base)


def settings_from_mapping(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """``base`` (default: ``cls()``) with the fields in ``values`` replaced; unknown keys
    are errors naming the valid ones."""
    fields = settable_fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KinfonceError(f"unknown config key(s) {unknown}; valid keys are: {', '.join(fields)}")
    return dataclasses.replace(base if base is not None else cls(), **values)


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
    path: str | Path, base: Any = None, cls: type[TrainConfig] | None = None
) -> Any:
    """Read a YAML mapping of config fields on top of ``base`` (see :func:`config_from_mapping`)."""
    return config_from_mapping(read_config_mapping(path), base, cls)


def dump_config(config: Settings, sources: dict[str, str] | None = None) -> str:
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


def build_config(
    config_file: str | Path | None,
    overrides: dict[str, Any],
    *,
    resume: bool = False,
    base: TrainConfig | None = None,
    cls: type[TrainConfig] = PretrainConfig,
) -> Any:
    """``base`` (default: the defaults of ``cls``; e.g. a recipe), then the YAML file (see
    :func:`config_file_for`), then ``overrides`` (the flags given). Not yet resolved."""
    path = config_file_for(config_file, overrides, resume=resume)
    if path is not None:
        base = load_config_file(path, base, cls)
    return config_from_mapping(overrides, base, cls)


# --- the settings of the other commands ------------------------------------------------------


@dataclass(frozen=True)
class SearchSettings(Settings):
    """How ``kinfonce tune`` samples, stops and places its trials (stored with the search)."""

    max_t: int | None = setting(
        None,
        "epochs of a trial that ASHA never stops (none: the config's epochs)",
        "search",
        at_least(1),
    )
    num_samples: int = setting(
        8, "trials to draw, per combination of grid values", "search", at_least(1)
    )
    grace_period: int = setting(1, "epochs before ASHA may stop a trial", "search", at_least(1))
    reduction_factor: float = setting(
        2.0, "ASHA keeps the best 1/F of the trials at each rung", "search", above(1.0)
    )
    cpus_per_trial: float = setting(1.0, "CPUs per trial (its torch threads)", "search", above(0.0))
    gpus_per_trial: float = setting(
        0.0,
        "GPUs per trial; a fraction such as 0.25 shares a GPU",
        "search",
        Rule(
            lambda v: 0 <= v <= 1 or (v > 1 and float(v).is_integer() and v < math.inf),
            "a fraction in [0, 1] or a whole number",
        ),
    )
    max_concurrent: int | None = setting(
        None, "at most this many trials at once (none: as resources allow)", "search", at_least(1)
    )
    max_failures: int = setting(
        0, "retries of a failed trial from its last checkpoint", "search", at_least(0)
    )
    search_seed: int | None = setting(
        0,
        "seed of the sampled values (none: not reproducible)",
        "search",
        Rule(lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    )

    def trial_fields(self) -> dict[str, Any]:
        """The config fields the search sets in every trial: where and how long it runs."""
        return {
            "output_dir": None,
            "epochs": self.max_t,
            "progress": False,
            "accelerator": "gpu" if self.gpus_per_trial > 0 else "cpu",
            "devices": "1",
            "num_nodes": 1,
            "strategy": "auto",
        }


#: Config fields a search sets for each trial (:meth:`SearchSettings.trial_fields`): ``kinfonce
#: tune`` has no flag for them and a search space cannot vary them.
TRIAL_FIELDS = frozenset(SearchSettings(max_t=1).trial_fields())


@dataclass(frozen=True)
class SearchRuntime(Settings):
    """Where ``kinfonce tune`` writes and runs (not stored: a resume may run elsewhere)."""

    output_dir: str | None = setting(
        None,
        "search directory (none: runs/tune/<dataset>-<method>-<loss>-<time>)",
        "where it runs",
        UTF8_PATH,
    )
    address: str | None = setting(
        None, "join this Ray cluster (none: start Ray here)", "where it runs"
    )
    num_cpus: int | None = setting(
        None, "CPUs of the Ray started here (none: all)", "where it runs", at_least(1)
    )


@dataclass(frozen=True)
class EvalSettings(Settings):
    """Settings of ``kinfonce eval``; those left at None come from the checkpoint's run."""

    dataset: str | None = setting(None, "data set name (none: the checkpoint's)", "evaluation")
    data_root: str | None = setting(
        None,
        "directory or zip holding the data set (none: the run's, for its data set)",
        "evaluation",
    )
    download: bool = setting(
        False,
        "download a torchvision data set (cifar10, cifar100, stl10, tinyimagenet) that is not "
        "under --data-root",
        "evaluation",
    )
    protocol: str = setting(
        "both", "linear probe, weighted kNN, or both", "evaluation", one_of("linear", "knn", "both")
    )
    linear_epochs: int | None = setting(
        None, "linear-probe epochs (none: the run's eval_linear_epochs)", "evaluation", at_least(1)
    )
    knn_k: int | None = setting(
        None, "kNN neighbours (none: the run's eval_knn_k)", "evaluation", at_least(1)
    )
    seed: int | None = setting(
        None,
        "linear-probe seed (none: the run's)",
        "evaluation",
        Rule(lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    )
    augment: bool = setting(
        False,
        "train the linear head on crop/flip-augmented images with the encoder in the loop "
        "(slow) instead of on cached features",
        "evaluation",
    )
    device: str | None = setting(
        None,
        "torch device, e.g. cpu or cuda:1 (none: the run's accelerator where this machine has "
        "it, else cpu)",
        "runtime",
        matching(r"(cpu|cuda|mps|xpu)(:\d+)?", "a torch device: cpu, cuda, cuda:N, mps or xpu"),
    )
    batch_size: int = setting(256, "images per feature-extraction batch", "runtime", at_least(1))
    map_points: int = setting(
        1000, "test points in the feature map (0: no map)", "output", at_least(0)
    )
    output_dir: str | None = setting(
        None,
        "output directory (none: RUN_DIR/eval for RUN_DIR/checkpoints/X.ckpt, else X-eval "
        "beside the checkpoint)",
        "output",
        UTF8_PATH,
    )
    progress: bool = setting(True, "show progress bars", "output")


#: Formats of ``kinfonce export``: name -> what it writes.
EXPORT_FORMATS = {
    "safetensors": "weights and config.json, rebuilt with torchvision or timm alone",
    "torchscript": "a traced module for torch.jit.load (also libtorch in C++)",
    "torch-export": "a torch.export program (.pt2) for torch.export.load, any batch size",
    "onnx": "an ONNX graph for onnxruntime (extra 'onnx')",
    "torchvision": "a plain state_dict for torchvision's model (torchvision models only)",
}


@dataclass(frozen=True)
class ExportSettings(Settings):
    """Settings of ``kinfonce export``."""

    format: str = setting(
        "safetensors",
        "what to write: " + "; ".join(f"{k}: {v}" for k, v in EXPORT_FORMATS.items()),
        "export",
        one_of(*EXPORT_FORMATS),
    )
    output: str | None = setting(
        None,
        "directory to write (none: RUN_DIR/export-FORMAT for a run directory or its "
        "checkpoint, else X-export-FORMAT beside checkpoint X)",
        "export",
    )
    head: bool = setting(False, "also export the projection head", "export")
    overwrite: bool = setting(False, "replace an existing output directory", "export")
    check_images: int = setting(
        8, "images of the batch on which the export's features are compared", "export",
        at_least(1),
    )  # fmt: skip


@dataclass(frozen=True)
class ReportSettings(Settings):
    """Settings of ``kinfonce report``."""

    output_dir: str | None = setting(
        None,
        "directory for report.md, curves.png and comparison.png (none: report/ in the "
        "deepest directory that holds every run directory given)",
        "output",
        UTF8_PATH,
    )


@dataclass(frozen=True)
class SyntheticConfig(Settings):
    """Settings of one synthetic run (``kinfonce synthetic``); the defaults are Appendix C's
    (p = 1, q = 0, Gaussian kernel).

    ``num_snapshots`` embeddings are kept for the figure, at steps
    ``T * (i / (num_snapshots - 1))^2`` of a run of T steps (denser early, when the clusters
    form), the last one final.
    """

    num_clusters: int = setting(6, "planted clusters (n in Appendix C)", "graph", at_least(1))
    cluster_size: int = setting(100, "vertices per cluster (k in Appendix C)", "graph", at_least(1))
    p: float = setting(1.0, "within-cluster edge probability", "graph", between(0, 1))
    q: float = setting(0.0, "between-cluster edge probability", "graph", between(0, 1))
    loss: str = setting(
        "gaussian",
        "loss preset with a temperature: gaussian (the paper's), laplacian, exp-0.5, "
        "simple-sum, ...",
        "training",
    )
    temperature: float = setting(
        0.5, "kernel temperature tau (both temperatures of a sum preset)", "training", above(0.0)
    )
    batch_size: int = setting(
        50, "anchor vertices per step, each with its sampled positive", "training", at_least(1)
    )
    lr: float = setting(1.0, "SGD learning rate", "training", above(0.0))
    max_steps: int = setting(10_000, "maximum number of SGD steps", "training", at_least(1))
    patience: int = setting(
        1_000, "stop once the smoothed loss has not improved for this many steps", "training",
        at_least(1),
    )  # fmt: skip
    rel_tol: float = setting(
        2e-3,
        "the smallest relative decrease of the smoothed loss that counts as an improvement",
        "training",
        between(0, 1, high_open=True),
    )
    smoothing: float = setting(
        0.995,
        "decay of the exponential moving average of the loss",
        "training",
        between(0, 1, high_open=True),
    )
    sphere: bool = setting(False, "train on the unit circle instead of the plane", "training")
    seed: int = setting(
        0,
        "seed of the graph, the initial embedding and all sampling",
        "training",
        Rule(lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    )
    num_snapshots: int = setting(4, "embeddings shown in the figure", "output", at_least(2))
    output_dir: str = setting("runs/synthetic", "output directory", "output", UTF8_PATH)
    progress: bool = setting(True, "show a progress bar", "output")


# --- one flag generator for every command ----------------------------------------------------


def add_flags(
    parser: argparse.ArgumentParser, cls: type, exclude: frozenset[str] = frozenset()
) -> None:
    """Add ``--<field>`` for every settable field of ``cls`` not in ``exclude``, grouped by the
    fields' ``group``, with their help text and default.

    Flags default to ``argparse.SUPPRESS`` so that only flags actually given override the
    layers below them (see :func:`given_flags`); bools get ``--x/--no-x``.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, spec in settable_fields(cls).items():
        if name in exclude:
            continue
        group_name = spec.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        base, optional = field_type(cls, name)
        flag = "--" + name.replace("_", "-")
        help_text = spec.metadata["help"]
        if spec.default is not None and spec.default != ():
            help_text += f" (default: {spec.default})"
        common = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            groups[group_name].add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(base) is tuple:
            groups[group_name].add_argument(flag, metavar="FILE", nargs="+", **common)
        else:
            metavar = base.__name__.upper() + ("|none" if optional else "")
            groups[group_name].add_argument(flag, metavar=metavar, **common)


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line, as a mapping of field -> value."""
    return {name: getattr(args, name) for name in settable_fields(cls) if hasattr(args, name)}


def settings_from_flags(args: argparse.Namespace, cls: type) -> Any:
    """The settings ``cls`` with the flags given (checked like any settings object)."""
    return settings_from_mapping(cls, given_flags(args, cls))
