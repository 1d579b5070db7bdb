"""The paper's experiments as named recipes, each setting with its source.

A recipe is three layers of config fields, later ones winning: a family's ``base``, a data
set's layer (``datasets.yaml``) and a loss's layer (in the family's ``losses``). A family
file (``table1.yaml``, ``table4.yaml``) names its recipes with a pattern such as
``"{dataset}-{loss}"`` and makes one for every data set it lists and every loss it has; with
``inherit: OTHER`` its base starts from another family's base. Every value is written
``field: {value: V, source: "where V comes from"}``, so that ``kinfonce pretrain --recipe
NAME --print-config`` can show each value's source.

The effective configuration of ``kinfonce pretrain --recipe NAME`` is, in order: the
defaults, the recipe, the ``--config`` file, the flags (:func:`build_sourced_config`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kinfonce.config import (
    FIELDS,
    PretrainConfig,
    build_config,
    config_file_for,
    config_from_mapping,
    read_config_mapping,
)
from kinfonce.errors import KinfonceError

#: Family files, in listing order.
FAMILIES = ("table1", "table4")
DATASETS_FILE = "datasets.yaml"

Layer = tuple[dict[str, Any], dict[str, str]]  # field -> value, field -> source


@dataclass(frozen=True)
class Recipe:
    """One named experiment: its config fields and where each value comes from.

    Attributes:
        name: e.g. ``"cifar10-laplacian"``.
        family: the family file it comes from, e.g. ``"table1"``.
        description: the family's description.
        values: config field -> value (fields not set keep their defaults).
        sources: config field -> ``"<file>: <source>"``.
    """

    name: str
    family: str
    description: str
    values: dict[str, Any]
    sources: dict[str, str]

    def config(self) -> PretrainConfig:
        """The defaults overridden by this recipe's values."""
        return config_from_mapping(self.values)


def _read(file: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(file).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise KinfonceError(f"recipe file {file} must hold a mapping")
    return data


def _layer(entries: Any, where: str) -> Layer:
    """Check a mapping of ``field: {value, source}`` and split it into values and sources."""
    if not isinstance(entries, dict):
        raise KinfonceError(f"{where} must be a mapping of config fields")
    values, sources = {}, {}
    for name, entry in entries.items():
        if name not in FIELDS:
            raise KinfonceError(f"{where}: {name!r} is not a config field")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"value", "source"}
            or not str(entry["source"]).strip()
        ):
            raise KinfonceError(f"{where}: {name} must be written {{value: V, source: '...'}}")
        values[name], sources[name] = entry["value"], f"{where.split(' ')[0]}: {entry['source']}"
    return values, sources


def _merge(*layers: Layer) -> Layer:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer_values, layer_sources in layers:
        values.update(layer_values)
        sources.update(layer_sources)
    return values, sources


def _family_base(family: str) -> Layer:
    data = _read(f"{family}.yaml")
    parent = data.get("inherit")
    inherited = _family_base(parent) if parent else ({}, {})
    return _merge(inherited, _layer(data.get("base", {}), f"{family}.yaml base"))


@functools.cache
def load_recipes() -> dict[str, Recipe]:
    """Every recipe of every family, by name (read once from the package data)."""
    dataset_layers = _read(DATASETS_FILE)
    recipes = {}
    for family in FAMILIES:
        data = _read(f"{family}.yaml")
        base = _family_base(family)
        for dataset in data["datasets"]:
            data_layer = _layer(dataset_layers[dataset], f"{DATASETS_FILE} {dataset}")
            for loss, entries in data["losses"].items():
                name = data["name"].format(dataset=dataset, loss=loss)
                loss_layer = _layer(entries, f"{family}.yaml losses.{loss}")
                values, sources = _merge(base, data_layer, loss_layer)
                recipes[name] = Recipe(name, family, data["description"], values, sources)
    return recipes


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a KinfonceError lists the names otherwise."""
    recipes = load_recipes()
    if name not in recipes:
        raise KinfonceError(f"unknown recipe {name!r}; recipes: {', '.join(recipes)}")
    return recipes[name]


def build_sourced_config(
    recipe: str | None,
    config_file: str | Path | None,
    overrides: dict[str, Any],
    *,
    resume: bool = False,
) -> tuple[PretrainConfig, dict[str, str]]:
    """The defaults, then ``recipe``, then the YAML file, then ``overrides`` (the flags).

    Returns:
        (the config, field -> the source of its value: ``"default"``, the recipe's
        source, ``"--config FILE"`` or ``"command line"``).
    """
    sources = dict.fromkeys(FIELDS, "default")
    base = None
    if recipe is not None:
        chosen = get_recipe(recipe)
        base = chosen.config()
        sources.update({k: f"recipe {recipe}, {v}" for k, v in chosen.sources.items()})
    path = config_file_for(config_file, overrides, resume=resume)
    if path is not None:
        sources.update(dict.fromkeys(read_config_mapping(path), f"--config {path}"))
    sources.update(dict.fromkeys(overrides, "command line"))
    return build_config(path, overrides, base=base), sources


def format_recipe_list() -> str:
    """A plain-text table of the recipes: name, method, data set, loss, backbone, epochs."""
    columns = ("method", "dataset", "loss", "backbone", "epochs", "batch_size")
    rows = [
        (r.name, *(str(getattr(r.config(), c)) for c in columns)) for r in load_recipes().values()
    ]
    header = ("recipe", *columns)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    return "\n".join(lines)
