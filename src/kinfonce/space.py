"""Search spaces of ``kinfonce tune``: a distribution per config field, and Table 3's defaults.

A space maps fields of :class:`~kinfonce.config.PretrainConfig` to distributions. In YAML
(``kinfonce tune --space FILE``), one single-key mapping per field::

    lr: {loguniform: [0.01, 10]}       # a float, uniform in log space on [low, high]
    lam: {uniform: [0, 1]}             # a float, uniform on [low, high]
    seed: {randint: [0, 9]}            # an integer, low..high inclusive
    batch_size: {choice: [128, 256]}   # one of the values, drawn per trial
    loss: {grid: [simple-sum, laplacian]}  # every value in turn, num_samples trials each

Every check runs here, before Ray starts: the field exists and may be searched, the
range is a non-empty ``low < high`` of the field's type, and every bound and option makes
a configuration whose names, loss parameters and loss module are valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kinfonce.config import (
    FIELDS,
    LOSS_FIELDS,
    RUNTIME_FIELDS,
    TRIAL_FIELDS,
    PretrainConfig,
    SearchSettings,
    config_from_mapping,
    field_type,
)
from kinfonce.errors import KinfonceError, MissingFileError
from kinfonce.losses import preset_params
from kinfonce.resolve import resolve

#: Distribution names: the ranges, then the lists of values.
RANGES = ("uniform", "loguniform", "randint")
LISTS = ("choice", "grid")

#: Fields a search may not vary: where and how a trial runs, and its length, which the
#: search sets itself (``kinfonce.config.TRIAL_FIELDS``; epochs: ASHA's ``max_t``).
FIXED_FIELDS = RUNTIME_FIELDS | TRIAL_FIELDS

_SUITABLE = {float: "uniform, loguniform, choice or grid", int: "randint, choice or grid"}


@dataclass(frozen=True)
class Dimension:
    """One searched field's distribution.

    Attributes:
        kind: one of :data:`RANGES` or :data:`LISTS`.
        values: ``(low, high)`` for a range, the options for a list.
    """

    kind: str
    values: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The Ray Tune domain (or grid) of this dimension."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Ray's upper bound is open
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def to_yaml(self) -> dict[str, list[Any]]:
        """The YAML form, ``{kind: [values...]}``, that :func:`parse_dimension` reads back."""
        return {self.kind: list(self.values)}


#: The default space's dimensions, each a config field the preset may take: the learning rate
#: and lambda as Table 3 (paper, Appendix B) draws them; the temperatures log-uniform in
#: [0.01, 1], the authors' code's range (Table 3 prints [0, 1], which a log-uniform draw cannot
#: take); gamma1, the exponent of a sum's first term, from {0.5, 1} as the authors' code
#: draws it (not in the paper).
DEFAULT_DIMENSIONS: dict[str, Dimension] = {
    "lr": Dimension("loguniform", (1e-2, 10.0)),
    "temperature": Dimension("loguniform", (1e-2, 1.0)),
    "temperature1": Dimension("loguniform", (1e-2, 1.0)),
    "temperature2": Dimension("loguniform", (1e-2, 1.0)),
    "lam": Dimension("uniform", (0.0, 1.0)),
    "gamma1": Dimension("choice", (0.5, 1.0)),
}


def parse_dimension(key: str, spec: Any) -> Dimension:
    """Read and check one field's distribution, e.g. ``{"loguniform": [0.01, 10]}``.

    Raises:
        KinfonceError: naming ``key``: an unknown or fixed field, an unknown distribution, a
            range that is empty, inverted or not finite, a list without values, or values
            of the wrong type for the field.
    """
    if key not in FIELDS:
        raise KinfonceError(
            f"search space key {key!r} is not a config field; valid keys are: "
            + ", ".join(name for name in FIELDS if name not in FIXED_FIELDS)
        )
    if key in FIXED_FIELDS:
        reason = "set it with --max-t" if key == "epochs" else "the search sets it for each trial"
        raise KinfonceError(f"search space key {key!r} cannot be searched: {reason}")
    kinds = ", ".join(RANGES + LISTS)
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise KinfonceError(
            f"search space key {key!r} must map to one distribution, e.g. "
            f"{{loguniform: [0.01, 10]}} (one of {kinds}); got {spec!r}"
        )
    ((kind, values),) = spec.items()
    if kind not in RANGES + LISTS:
        raise KinfonceError(f"search space key {key!r}: unknown distribution {kind!r}; use {kinds}")
    if not isinstance(values, (list, tuple)) or not values:
        raise KinfonceError(
            f"search space key {key!r}: {kind} needs a non-empty list, got {values!r}"
        )
    if kind in LISTS:
        try:
            return Dimension(
                kind, tuple(getattr(config_from_mapping({key: v}), key) for v in values)
            )
        except KinfonceError as err:
            raise KinfonceError(f"search space key {key!r}: {err}") from None
    return Dimension(kind, _check_range(key, kind, values))


def _check_range(key: str, kind: str, values: Any) -> tuple[Any, Any]:
    """``(low, high)`` of a range, checked against the field's type."""
    base, _ = field_type(PretrainConfig, key)
    wanted = int if kind == "randint" else float
    if base is not wanted:
        raise KinfonceError(
            f"search space key {key!r} is a {base.__name__} field: {kind} does not fit it; "
            f"use {_SUITABLE.get(base, 'choice or grid')}"
        )
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(values) != 2 or not numbers or not all(math.isfinite(v) for v in values):
        raise KinfonceError(
            f"search space key {key!r}: {kind} needs [low, high], two finite numbers; got {values!r}"
        )
    low, high = values
    if wanted is int and not all(float(v).is_integer() for v in values):
        raise KinfonceError(
            f"search space key {key!r}: randint bounds must be integers, got {values!r}"
        )
    if not low < high:
        raise KinfonceError(
            f"search space key {key!r}: the range [{low}, {high}] is empty or inverted; it needs "
            "low < high (to fix a value, set the config field instead)"
        )
    if kind == "loguniform" and low <= 0:
        raise KinfonceError(f"search space key {key!r}: loguniform needs low > 0, got {low}")
    return wanted(low), wanted(high)


def parse_space(mapping: Any) -> dict[str, Dimension]:
    """A space from a mapping of field -> distribution (see the module docstring)."""
    if not isinstance(mapping, dict) or not mapping:
        raise KinfonceError(
            f"a search space must be a non-empty mapping of config fields, got {mapping!r}"
        )
    return {str(key): parse_dimension(str(key), spec) for key, spec in mapping.items()}


def load_space(path: str | Path) -> dict[str, Dimension]:
    """Read a space from a YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"search space file {str(path)!r} does not exist")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise KinfonceError(f"search space file {str(path)!r} is not valid YAML: {err}") from None
    try:
        return parse_space(mapping)
    except ValueError as err:
        raise KinfonceError(f"search space file {str(path)!r}: {err}") from None


def default_space(loss: str) -> dict[str, Dimension]:
    """The default space for a loss preset (:data:`DEFAULT_DIMENSIONS`): the learning rate
    and the preset's own parameters.

    E.g. ``simple-sum`` gets lr, temperature1, temperature2, lam and gamma1; ``laplacian``
    gets lr and temperature; ``spectral`` only lr.
    """
    takes = set(preset_params(loss))
    return {key: dim for key, dim in DEFAULT_DIMENSIONS.items() if key == "lr" or key in takes}


#: Published search budgets, by source (``kinfonce tune --budget NAME``): the search settings
#: each one fixes. The paper samples 500 configurations per run (Appendix B); the authors'
#: code 100, with ASHA's grace period 20 and max_t 200 epochs (its random_search.py).
SEARCH_BUDGETS: dict[str, dict[str, int]] = {
    "paper": {"num_samples": 500},
    "authors-code": {"num_samples": 100, "grace_period": 20, "max_t": 200},
}


def budget_settings(budget: str | None, given: dict[str, Any]) -> SearchSettings:
    """The search settings of a published budget (:data:`SEARCH_BUDGETS`; None: none), with
    the settings ``given`` on the command line over it.

    Raises:
        KinfonceError: an unknown budget, naming the known ones.
    """
    if budget is not None and budget not in SEARCH_BUDGETS:
        raise KinfonceError(f"--budget must be one of {sorted(SEARCH_BUDGETS)}, got {budget!r}")
    return SearchSettings(**{**SEARCH_BUDGETS.get(budget or "", {}), **given})


def space_to_yaml(space: dict[str, Dimension]) -> dict[str, dict[str, list[Any]]]:
    """The YAML mapping of a space."""
    return {key: dim.to_yaml() for key, dim in space.items()}


def num_trials(space: dict[str, Dimension], num_samples: int) -> int:
    """Trials a search creates: ``num_samples`` per combination of the grid values."""
    return num_samples * math.prod(len(d.values) for d in space.values() if d.kind == "grid")


def check_space(space: dict[str, Dimension], base: PretrainConfig) -> None:
    """Check that every trial of ``space`` on top of ``base`` makes a valid configuration.

    Loss parameters must be taken by every loss preset the search can use; then each bound
    and option, set alone on ``base``, must resolve (:func:`kinfonce.resolve.resolve`).

    Raises:
        KinfonceError: naming the space key and the value at fault.
    """
    if "loss" in space:
        _check_values("loss", space["loss"], base)
    losses = space["loss"].values if "loss" in space else (base.loss,)
    for loss in losses:
        takes = set(preset_params(loss))
        for key in space.keys() & set(LOSS_FIELDS):
            if key not in takes:
                own = [p for p in preset_params(loss) if p in LOSS_FIELDS]
                raise KinfonceError(
                    f"search space key {key!r} is not a parameter of the loss preset {loss!r}, "
                    f"which takes {', '.join(own) or 'none'}"
                )
    for key, dim in space.items():
        _check_values(key, dim, base)


def _check_values(key: str, dim: Dimension, base: PretrainConfig) -> None:
    """Each bound or option of ``dim``, set alone on ``base``, must make a valid config."""
    for value in dim.values:
        try:
            resolve(config_from_mapping({key: value}, base))
        except KinfonceError as err:
            raise KinfonceError(f"search space key {key!r} = {value!r}: {err}") from None
