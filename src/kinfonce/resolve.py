"""One resolution step: the settings a command was given -> the one configuration it runs with.

The layers defaults < recipe < ``--config`` < flags (< the run's own ``config.yaml`` on
``--resume``) give an input :class:`~kinfonce.config.TrainConfig`, whose fields may say "decide
for me" (None, ``"auto"``). :func:`resolve` decides each of them once and checks the whole:

* every loss parameter the chosen preset takes: the user's value, else the method's default
  (:data:`METHOD_LOSS_DEFAULTS`, Table 4's MoCo settings), else the preset's own; those it
  does not take stay None (a value given for one is an error naming what the preset takes);
* the embedding width from a dry build of the loss (128 per part of its features);
* the augmentation from the data set's defaults (:data:`DATASET_AUGMENTATION`);
* accelerator, devices, precision, the memory format and the processes that decode an image
  tree as this machine will use them.

It returns a frozen config of the same class, of which no field listed above is None: what a
run uses, writes to ``config.yaml`` and stores in its checkpoints. Given that file again,
:func:`resolve` returns it unchanged, so a second run reproduces the first. Modules below the
commands receive only resolved configurations and check nothing again.

What a run needs of the machine it runs on (a writable output directory, an optional text
encoder) is checked apart, by :func:`check_machine`, so that a stored configuration resolves
anywhere. The checks of the other commands' settings that need more than one field or a
registry are here too (:func:`check_search`, :func:`check_synthetic`), so that every command
is checked before it writes anything.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from kinfonce.config import (
    LOSS_FIELDS,
    PRECISION_ALIASES,
    ClipConfig,
    ConfigT,
    SearchRuntime,
    SearchSettings,
    SyntheticConfig,
    TrainConfig,
)
from kinfonce.data.build import default_workers
from kinfonce.data.datasets import check_dataset_name
from kinfonce.data.decode import RESIZE_POLICIES
from kinfonce.errors import KinfonceError
from kinfonce.fileio import check_writable_dir
from kinfonce.kernel_lse import PATHS
from kinfonce.losses import LOSS_PRESETS, make_loss, preset_defaults, preset_params
from kinfonce.models import STEMS, check_backbone_name
from kinfonce.optim import OPTIMIZERS
from kinfonce.text import HEADS, minilm_missing
from kinfonce.weights import weights_file

#: Names a training field must be one of: the registries of the modules that define them.
REGISTERED_NAMES: dict[str, Iterable[str]] = {
    "stem": STEMS,
    "loss": LOSS_PRESETS,
    "loss_path": PATHS,
    "optimizer": OPTIMIZERS,
    "accelerator": {"auto", "gpu", *AcceleratorRegistry},
    "strategy": {"auto", *StrategyRegistry},
    "resize": RESIZE_POLICIES,
}

#: Loss parameters of a method where they differ from the preset's defaults: MoCo's
#: temperature 0.1 and lambda 0.8 (paper, Table 4).
METHOD_LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "moco": {"temperature": 0.1, "temperature1": 0.1, "temperature2": 0.1, "lam": 0.8},
}

#: Augmentation defaults per data set; others get the SimCLR recipe. The 16 px digits
#: are not mirror-symmetric and lose their identity under tight crops.
DATASET_AUGMENTATION: dict[str, dict[str, float]] = {
    "digits": {"crop_scale_min": 0.4, "flip_p": 0.0, "jitter_strength": 0.5},
}
SIMCLR_AUGMENTATION = {"crop_scale_min": 0.08, "flip_p": 0.5, "jitter_strength": 1.0}

#: Embedding width per part of a loss's features (the paper's 128; 256 for Concatenation Sum).
WIDTH_PER_PART = 128

#: Field -> what decided its value (for ``--print-config``).
Sources = dict[str, str]
#: What one resolution step decides: field -> (value, what decided it).
Decisions = dict[str, tuple[Any, str]]


def resolve(config: ConfigT) -> ConfigT:
    """The fully resolved, checked configuration of ``config`` (see the module docstring).

    Raises:
        KinfonceError: the first setting that is wrong, naming it and what is allowed.
    """
    return resolve_with_sources(config)[0]


def resolve_with_sources(config: ConfigT) -> tuple[ConfigT, Sources]:
    """:func:`resolve`, and for each field it decided, what decided it (for
    ``--print-config``)."""
    check_names(config)
    sources: Sources = {}
    for step in (
        _caption_source,
        _runtime,
        _augmentation,
        _loss_parameters,
        _check_rules,
        _embedding_width,
    ):
        decided = {k: v for k, v in step(config).items() if getattr(config, k) != v[0]}
        config = dataclasses.replace(config, **{k: value for k, (value, _) in decided.items()})
        sources.update({k: why for k, (_, why) in decided.items()})
    if config.warmup_epochs >= config.epochs:
        warnings.warn(
            f"warmup_epochs {config.warmup_epochs:g} >= epochs {config.epochs}: the learning "
            "rate rises until the last step and never decays",
            stacklevel=3,
        )
    return config, sources


def check_names(config: TrainConfig) -> None:
    """Each name-valued field is in its registry, and the data set name is known."""
    for name, valid in REGISTERED_NAMES.items():
        value = getattr(config, name)
        if value not in valid:
            raise KinfonceError(f"{name} must be one of {sorted(valid)}, got {value!r}")
    check_backbone_name(config.backbone)
    if not getattr(config, "captions", None):
        check_dataset_name(config.dataset, config.image_size, config.resize)


def _runtime(config: TrainConfig) -> Decisions:
    """Accelerator, devices, precision, memory format and decoding processes as this machine
    uses them."""
    accelerator = config.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "mps" if _has_mps() else "cpu"
    devices = config.devices
    if accelerator in ("gpu", "cuda") and devices in ("auto", "-1"):
        devices = str(torch.cuda.device_count())
    elif devices == "auto":
        devices = "1"
    channels_last = config.channels_last
    if channels_last is None:  # faster on a CPU (docs/benchmarks.md); not measured on a GPU
        channels_last = accelerator == "cpu"
    return {
        "accelerator": (accelerator, "this machine's"),
        "devices": (devices, f"all of this machine's for {accelerator}"),
        "precision": (
            PRECISION_ALIASES.get(config.precision, config.precision),
            "Lightning's name",
        ),
        "channels_last": (channels_last, f"on for a CPU only, and this run's is {accelerator}"),
        "workers": (config.workers or default_workers(), "the cores available to this process"),
    }


#: The ``dataset`` of a ``kinfonce clip`` run on the user's own pairs (``--captions``).
CAPTIONS_DATASET = "captions"


def _caption_source(config: TrainConfig) -> Decisions:
    """A run on ``--captions`` names its data set ``captions`` (run directory, report)."""
    if not getattr(config, "captions", None):
        return {}
    if config.dataset not in (TrainConfig.dataset, CAPTIONS_DATASET):
        raise KinfonceError(
            f"dataset {config.dataset!r} and captions {config.captions!r} are alternatives: "
            "kinfonce clip trains on class prompts of --dataset or on the pairs of --captions"
        )
    return {"dataset": (CAPTIONS_DATASET, "--captions")}


def _has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _augmentation(config: TrainConfig) -> Decisions:
    if config.dataset in DATASET_AUGMENTATION:
        base, why = DATASET_AUGMENTATION[config.dataset], f"the {config.dataset} data set's default"
    else:
        base, why = SIMCLR_AUGMENTATION, "the SimCLR recipe's default"
    return {k: (v, why) for k, v in base.items() if getattr(config, k) is None}


def _loss_parameters(config: TrainConfig) -> Decisions:
    """Every loss parameter the preset takes: the user's, the method's, else the preset's."""
    takes = set(preset_params(config.loss))
    given = [f for f in LOSS_FIELDS if f not in takes and getattr(config, f) is not None]
    if given:
        own = [f for f in LOSS_FIELDS if f in takes]
        raise KinfonceError(
            f"the {config.loss!r} loss takes no {', '.join(given)} (it takes "
            f"{', '.join(own) or 'no parameter'}); leave {', '.join(given)} unset (none)"
        )
    preset = preset_defaults(config.loss, names=LOSS_FIELDS)
    method = METHOD_LOSS_DEFAULTS.get(config.method_name, {})
    decided = {}
    for name in LOSS_FIELDS:
        if name in takes and getattr(config, name) is None:
            if name in method:
                decided[name] = (method[name], f"the {config.method_name} method's default")
            else:
                decided[name] = (preset[name], f"the {config.loss} preset's default")
    return decided


def _embedding_width(config: TrainConfig) -> Decisions:
    """``proj_out_dim``: 128 per part of the loss's features, checked against a given one."""
    parts = build_loss(config, gather_distributed=False).out_dim_multiple  # a dry build
    width = config.proj_out_dim
    if width is None:
        why = f"{WIDTH_PER_PART} per part of the {config.loss} loss's features ({parts})"
        return {"proj_out_dim": (WIDTH_PER_PART * parts, why)}
    if width % parts:
        raise KinfonceError(
            f"proj_out_dim must be a positive multiple of {parts} for the {config.loss!r} "
            f"loss, got {width}"
        )
    return {}


def loss_arguments(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of ``make_loss`` for a configuration's preset.

    The loss parameters the preset takes (after :func:`resolve`, none of them None), the
    queue-only option when it is off, the path when set or taken, and the bipartite form for
    ``kinfonce clip``.
    """
    takes = preset_params(config.loss)
    params = {
        f: getattr(config, f) for f in LOSS_FIELDS if f in takes and getattr(config, f) is not None
    }
    if not config.positive_in_denominator:
        params["positive_in_denominator"] = False
    if config.loss_path != "auto" or "path" in takes:
        params["path"] = config.loss_path  # a preset without paths rejects a non-default
    if config.command == "clip":
        params["bipartite"] = True
    return params


def build_loss(config: TrainConfig, *, gather_distributed: bool = True) -> nn.Module:
    """The loss module of a configuration, in its command's form.

    By default it gathers the in-batch negatives of all processes under DDP; on one process
    that is a no-op. Its inputs are not checked for finiteness (a host synchronisation per
    call on a GPU): a non-finite input gives a non-finite loss, which the training step records.

    Raises:
        KinfonceError: the preset cannot be built from these parameters (naming them).
    """
    params = loss_arguments(config)
    try:
        return make_loss(
            config.loss, **params, gather_distributed=gather_distributed, check_finite=False
        )
    except KinfonceError as err:
        raise KinfonceError(
            f"the {config.loss!r} loss cannot be built from {params}: {err}"
        ) from None


def _positive_in_denominator(config: TrainConfig) -> None:
    if not config.positive_in_denominator and config.method_name != "moco":
        raise KinfonceError(
            "positive_in_denominator=False needs method 'moco' (a queue of negatives); the "
            f"{config.method_name} loss counts the positive (Algorithm 2)"
        )


def _clip_rules(config: TrainConfig) -> None:
    if not isinstance(config, ClipConfig):
        return
    if "bipartite" not in preset_params(config.loss):
        kernels = sorted(n for n in LOSS_PRESETS if "bipartite" in preset_params(n))
        raise KinfonceError(
            f"loss {config.loss!r} has no bipartite (CLIP) form; choose a Kernel-InfoNCE "
            f"preset: {', '.join(kernels)}"
        )
    if config.unlabeled:
        raise KinfonceError(
            "unlabeled must be false for kinfonce clip: its captions come from class labels"
        )
    for name in ("image_root", "rewrite_files"):
        if getattr(config, name) and not config.captions:
            raise KinfonceError(
                f"{name} needs captions (--captions FILE): it belongs to a user's own pairs"
            )
    if config.text_encoder == "small" and config.text_width % HEADS:
        raise KinfonceError(
            f"text_width must be a multiple of {HEADS} (the attention heads of the small text "
            f"encoder), got {config.text_width}"
        )


#: Rules between fields of a training configuration: each raises a KinfonceError naming the
#: fields. Checked once its loss parameters are decided, before the dry build of the loss.
TRAIN_RULES: tuple[Callable[[TrainConfig], None], ...] = (_positive_in_denominator, _clip_rules)


def _check_rules(config: TrainConfig) -> Decisions:
    for rule in TRAIN_RULES:
        rule(config)
    return {}


def check_machine(config: TrainConfig) -> None:
    """What a run of a resolved configuration needs of this machine: an ``output_dir`` that
    can be written, its ``init_weights`` file, and the optional extra of the MiniLM text encoder. Kept out of
    :func:`resolve`, which a stored configuration also goes through on another machine (to
    evaluate its encoder, which needs neither).

    Raises:
        KinfonceError: naming what is missing.
    """
    if config.output_dir is not None:
        check_writable_dir(config.output_dir, "output_dir")
    if config.init_weights is not None:
        weights_file(Path(config.init_weights))
    missing = minilm_missing() if getattr(config, "text_encoder", None) == "minilm" else None
    if missing:
        raise KinfonceError(missing)


# --- the other commands --------------------------------------------------------------------


def check_search(
    settings: SearchSettings, base: TrainConfig, runtime: SearchRuntime | None = None
) -> SearchSettings:
    """The search settings with ``max_t`` decided (the base config's epochs), checked against
    each other, the base config and where the search runs.

    Raises:
        KinfonceError: naming the setting at fault.
    """
    if settings.max_t is None:
        settings = dataclasses.replace(settings, max_t=base.epochs)
    if settings.grace_period > settings.max_t:
        raise KinfonceError(
            f"grace_period ({settings.grace_period}) must be <= max_t ({settings.max_t}): ASHA "
            "cannot stop a trial after its last epoch"
        )
    if base.devices != "1" or base.num_nodes != 1:
        raise KinfonceError(
            f"a trial trains on one device; devices={base.devices!r} and "
            f"num_nodes={base.num_nodes} are not for tune (use gpus_per_trial)"
        )
    if runtime is not None and runtime.address is not None and runtime.num_cpus is not None:
        raise KinfonceError("num_cpus is for a Ray started here; a cluster has its own")
    return settings


def synthetic_losses() -> tuple[str, ...]:
    """Names of the loss presets ``kinfonce synthetic`` can use: every kernel preset with a
    temperature."""
    return tuple(
        name for name in LOSS_PRESETS if {"temperature", "temperature1"} & set(preset_params(name))
    )


def check_synthetic(config: SyntheticConfig) -> None:
    """The rules between the fields of a synthetic run, and its loss's name.

    Raises:
        KinfonceError: naming the setting at fault.
    """
    if config.loss not in synthetic_losses():
        raise KinfonceError(
            f"loss must be one of {', '.join(synthetic_losses())}; got {config.loss!r}"
        )
    vertices = config.num_clusters * config.cluster_size
    if config.batch_size > vertices:
        raise KinfonceError(
            f"batch_size must be <= the number of vertices num_clusters * cluster_size = "
            f"{vertices}, got {config.batch_size}"
        )
