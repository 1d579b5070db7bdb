"""The settings dataclasses of every command: types, rules, YAML and the generated flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from kinfonce.cli import build_parser
from kinfonce.config import (
    CONFIG_CLASSES,
    RUNTIME_FIELDS,
    ClipConfig,
    EvalSettings,
    PretrainConfig,
    ReportSettings,
    SearchRuntime,
    SearchSettings,
    SyntheticConfig,
    add_flags,
    build_config,
    config_differences,
    config_from_mapping,
    dump_config,
    given_flags,
    load_config_file,
    settable_fields,
)
from kinfonce.errors import KinfonceError
from kinfonce.flagdoc import subcommands

#: Every command's settings class, and the subcommand whose flags it makes.
SETTINGS = {
    PretrainConfig: "pretrain",
    ClipConfig: "clip",
    SearchSettings: "tune",
    SearchRuntime: "tune",
    EvalSettings: "eval",
    ReportSettings: "report",
    SyntheticConfig: "synthetic",
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"lr": False}, "lr must be a number, got False"),
        ({"output_dir": ["a", "b"]}, "output_dir must be a string, got ['a', 'b']"),
        ({"dataset": {"name": "digits"}}, "dataset must be a string"),
        ({"progress": 1}, "progress must be true or false, got 1"),
        ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
        ({"batch_size": "many"}, "batch_size must be an integer, got 'many'"),
        ({"lr": None}, "lr must not be empty"),
    ],
)
def test_values_of_the_wrong_type_name_the_field(values, message):
    # Catches the old coercion, which ran `epochs: true` as 1 epoch and `output_dir: [a, b]`
    # into a directory named "['a', 'b']".
    with pytest.raises(KinfonceError) as err:
        config_from_mapping(values)
    assert message in str(err.value)


def test_strings_from_the_command_line_are_read():
    config = config_from_mapping(
        {"lr": "0.5", "epochs": "3", "progress": "false", "temperature": "none", "devices": 2}
    )
    assert (config.lr, config.epochs, config.progress, config.temperature) == (0.5, 3, False, None)
    assert config.devices == "2"  # YAML's `devices: 2` is Lightning's "2"
    assert PretrainConfig(lr=1).lr == 1.0 and isinstance(PretrainConfig(lr=1).lr, float)


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (PretrainConfig, {"val_fraction": 1.0}, "val_fraction must be in (0, 1)"),
        (PretrainConfig, {"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        (PretrainConfig, {"moco_momentum": 1.0}, "moco_momentum must be in [0, 1)"),
        (PretrainConfig, {"queue_size": 0}, "queue_size must be >= 1"),
        (PretrainConfig, {"method": "byol"}, "method must be one of ['moco', 'simclr']"),
        (PretrainConfig, {"devices": "two"}, "devices must be 'auto', -1 (all)"),
        (PretrainConfig, {"precision": "8"}, "precision must be one of"),
        (ClipConfig, {"rewrites": 0}, "rewrites must be >= 1"),
        (ClipConfig, {"text_encoder": "bert"}, "text_encoder must be one of ['minilm', 'small']"),
        (SearchSettings, {"num_samples": -3}, "num_samples must be >= 1, got -3"),
        (SearchSettings, {"reduction_factor": 1.0}, "reduction_factor must be a finite number > 1"),
        (SearchSettings, {"gpus_per_trial": 1.5}, "gpus_per_trial must be a fraction in [0, 1]"),
        (SearchRuntime, {"num_cpus": 0}, "num_cpus must be >= 1"),
        (EvalSettings, {"protocol": "svm"}, "protocol must be one of ['both', 'knn', 'linear']"),
        (EvalSettings, {"device": "gpu0"}, "device must be a torch device"),
        (SyntheticConfig, {"p": 1.5}, "p must be in [0, 1], got 1.5"),
        (SyntheticConfig, {"num_snapshots": 1}, "num_snapshots must be >= 2"),
    ],
)
def test_each_field_rule_names_the_field_and_what_is_allowed(cls, values, message):
    # Catches a rule that is not checked when settings are made, whatever made them.
    with pytest.raises(KinfonceError) as err:
        cls(**values)
    assert message in str(err.value)


def test_config_layers_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.3\nloss: laplacian\ntemperature: 0.2\n")
    parser = argparse.ArgumentParser()
    add_flags(parser, PretrainConfig)
    args = parser.parse_args(["--lr", "0.7", "--no-progress", "--temperature", "none"])
    config = build_config(path, given_flags(args, PretrainConfig))
    assert (config.lr, config.loss, config.temperature, config.progress) == (
        0.7, "laplacian", None, False,
    )  # fmt: skip
    assert config_from_mapping(yaml.safe_load(dump_config(config))) == config
    path.write_text("learning_rate: 0.3\n")
    with pytest.raises(KinfonceError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        load_config_file(path)


def test_a_config_file_of_another_command_is_refused(tmp_path):
    # Catches a clip run's config.yaml run by `kinfonce pretrain` (its keys overlap).
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(ClipConfig()))
    assert yaml.safe_load(path.read_text())["command"] == "clip"
    with pytest.raises(KinfonceError, match="configuration of `kinfonce clip`, not of `kinfonce"):
        load_config_file(path, cls=PretrainConfig)
    assert load_config_file(path, cls=ClipConfig) == ClipConfig()


def test_config_differences_ignore_runtime_fields():
    a = PretrainConfig().to_dict()
    b = PretrainConfig(devices="2", accelerator="cpu", lr=0.5, epochs=7).to_dict()
    assert config_differences(a, b) == [
        "epochs: checkpoint has 15, now 7", "lr: checkpoint has 1.0, now 0.5",
    ]  # fmt: skip
    # where and how a run executes may change on resume; nothing of what it trains
    assert {
        "accelerator", "devices", "num_nodes", "strategy", "ddp_timeout", "precision", "progress",
        "output_dir", "data_root", "download", "eval_linear_epochs", "eval_knn_k", "baselines",
        "loss_path", "compile", "channels_last", "image_root", "workers",
    } == RUNTIME_FIELDS  # fmt: skip


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda cls: cls.__name__)
def test_every_field_has_a_flag_with_the_fields_own_help(cls):
    # Catches a field without a flag in its command, and a flag whose help is not the
    # field's (the generator appends the default, so a help text is never empty: the
    # field's own text is what must be there).
    actions = {a.dest: a for a in subcommands(build_parser())[SETTINGS[cls]]._actions}
    for name, spec in settable_fields(cls).items():
        own = spec.metadata["help"]
        assert own.strip(), f"{cls.__name__}.{name} has no help text"
        assert name in actions, f"{cls.__name__}.{name} has no flag"
        assert actions[name].help.startswith(own), name
        assert "(default:" not in own, f"{cls.__name__}.{name} restates its default"


def test_one_naming_for_every_command():
    # Catches --out beside --output-dir, a --no-progress switch without --progress, and any
    # flag spelt otherwise than its field.
    parser = build_parser()
    for name, sub in subcommands(parser).items():
        flags = {f for action in sub._actions for f in action.option_strings}
        assert "--out" not in flags, name
        if "--no-progress" in flags:
            assert "--progress" in flags, name
    synthetic = {f for a in subcommands(parser)["synthetic"]._actions for f in a.option_strings}
    assert {"--loss", "--temperature", "--output-dir", "--num-clusters"} <= synthetic
    assert not {"--kernel", "--tau", "--out", "--clusters"} & synthetic


def test_settings_are_frozen_and_the_command_is_fixed():
    config = PretrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1
    assert {cls().command for cls in CONFIG_CLASSES.values()} == set(CONFIG_CLASSES)
    assert "command" not in settable_fields(PretrainConfig)
