"""One resolution step: every "decide for me" setting decided once, every rule checked once."""

from __future__ import annotations

import pytest
import torch
import yaml

from kinfonce.cli import main
from kinfonce.config import (
    LOSS_FIELDS,
    ClipConfig,
    PretrainConfig,
    SearchRuntime,
    SearchSettings,
    SyntheticConfig,
    config_from_mapping,
    dump_config,
)
from kinfonce.errors import KinfonceError
from kinfonce.losses import LOSS_PRESETS, preset_params
from kinfonce.resolve import check_search, check_synthetic, resolve
from kinfonce.train import run_pretrain
from tests.helpers import tiny_config

#: The fields issue 19 found null in a default run's config.yaml.
DECIDED = ("temperature1", "temperature2", "lam", "channels_last", "proj_out_dim")


@pytest.mark.parametrize("method", ["simclr", "moco"])
@pytest.mark.parametrize("loss", sorted(LOSS_PRESETS))
def test_every_parameter_of_the_preset_is_decided_and_no_other(method, loss):
    # Catches a parameter left None for the method or preset to fill in (the five places of
    # old), and one filled in although the preset does not take it.
    config = resolve(PretrainConfig(method=method, loss=loss))
    takes = set(preset_params(loss))
    for name in LOSS_FIELDS:
        value = getattr(config, name)
        assert (value is not None) == (name in takes), (name, value)
    assert None not in (config.proj_out_dim, config.channels_last, config.flip_p)
    assert config.accelerator != "auto"


def test_a_default_run_records_what_it_used():
    config = resolve(PretrainConfig())
    assert all(getattr(config, name) is not None for name in DECIDED)
    assert (config.temperature1, config.temperature2, config.lam) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"method": "moco"}, {"temperature1": 0.1, "temperature2": 0.1, "lam": 0.8}),
        ({"method": "moco", "loss": "laplacian"}, {"temperature": 0.1}),
        ({"method": "moco", "loss": "laplacian", "temperature": 0.3}, {"temperature": 0.3}),
        ({"loss": "laplacian"}, {"temperature": 0.5}),
        ({"loss": "exponential"}, {"temperature": 0.5, "gamma": 2.0}),
        ({"loss": "spectral"}, {"mu": 3.0}),
        ({"loss": "concat-sum"}, {"concat_normalization": "halves", "proj_out_dim": 256}),
        ({"loss": "concat-sum", "lam": 0.2}, {"lam": 0.2, "temperature1": 0.5}),
    ],
)
def test_user_then_method_then_preset_defaults(settings, expected):
    # Catches MoCo's Table 4 defaults lost, or put over a value the user set.
    config = resolve(PretrainConfig(**settings))
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"loss": "gaussian", "lam": 0.5},
            "the 'gaussian' loss takes no lam (it takes temperature)",
        ),
        ({"loss": "laplacian", "mu": 2.0}, "takes no mu"),
        ({"loss": "spectral", "mu": 0.0}, "mu must be a finite number > 0"),
        ({"loss": "simple-sum", "lam": 1.5}, "lam must be a number in [0, 1]"),
        (
            {"loss": "concat-sum", "proj_out_dim": 127},
            "proj_out_dim must be a positive multiple of 2",
        ),
        ({"backbone": "vit"}, "backbone must be one of ["),
        ({"loss": "triplet"}, "loss must be one of ["),
        ({"optimizer": "rmsprop"}, "optimizer must be one of ['adam', 'lars', 'sgd']"),
        ({"stem": "big"}, "stem must be one of"),
        ({"accelerator": "tpu9"}, "accelerator must be one of"),
        ({"dataset": "mnist"}, "unknown data set name 'mnist'"),
        ({"dataset": "digits", "image_size": 8}, "image_size applies to image trees"),
        (
            {"positive_in_denominator": False},
            "positive_in_denominator=False needs method 'moco'",
        ),
    ],
)
def test_invalid_settings_are_refused_naming_them(settings, message):
    with pytest.raises(KinfonceError) as err:
        resolve(PretrainConfig(**settings))
    assert message in str(err.value)


def test_rules_between_fields_come_before_the_data(tmp_path):
    # Catches SimCLR's positive_in_denominator rule firing only after the data set had
    # loaded (here the data set does not exist, so that error would come first), and a
    # refused run that wrote anything.
    config = tiny_config(
        tmp_path, dataset=f"imagefolder:{tmp_path / 'none'}", positive_in_denominator=False
    )
    with pytest.raises(KinfonceError, match="positive_in_denominator=False needs method 'moco'"):
        run_pretrain(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loss": "spectral"}, "has no bipartite (CLIP) form"),
        ({"unlabeled": True}, "unlabeled must be false for kinfonce clip"),
        ({"text_width": 30}, "text_width must be a multiple of 4"),
    ],
)
def test_clip_rules(settings, message):
    with pytest.raises(KinfonceError) as err:
        resolve(ClipConfig(**settings))
    assert message in str(err.value)


def test_resolving_twice_or_through_config_yaml_changes_nothing():
    # Catches a resolution that is not a fixed point: a config.yaml given back with --config
    # would then run another configuration than the one it records.
    for config in (
        PretrainConfig(),
        PretrainConfig(method="moco", loss="concat-sum"),
        ClipConfig(),
    ):
        once = resolve(config)
        assert resolve(once) == once
        reread = config_from_mapping(yaml.safe_load(dump_config(once)), cls=type(config))
        assert resolve(reread) == once


def test_runtime_settings_as_this_machine_uses_them(monkeypatch):
    # Catches "auto" written to config.yaml, and channels-last decided without the device.
    cpu = resolve(PretrainConfig(precision="bf16", devices="auto"))
    assert (cpu.accelerator, cpu.devices, cpu.precision, cpu.channels_last) == (
        "cpu", "1", "bf16-mixed", True,
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = resolve(PretrainConfig(devices="auto"))
    assert (gpu.accelerator, gpu.devices, gpu.channels_last) == ("gpu", "2", False)
    chosen = resolve(PretrainConfig(accelerator="cpu", channels_last=False))
    assert (chosen.accelerator, chosen.channels_last) == ("cpu", False)


def test_augmentation_follows_the_data_set():
    digits, cifar = resolve(PretrainConfig()), resolve(PretrainConfig(dataset="cifar10"))
    assert digits.flip_p == 0.0 and cifar.flip_p == 0.5 and cifar.crop_scale_min == 0.08
    assert resolve(PretrainConfig(dataset="cifar10", flip_p=0.2)).flip_p == 0.2


def test_warm_up_longer_than_the_run_is_warned():
    with pytest.warns(UserWarning, match="warmup_epochs 3 >= epochs 2"):
        resolve(PretrainConfig(epochs=2, warmup_epochs=3))


@pytest.mark.parametrize("command", ["pretrain", "clip"])
@pytest.mark.parametrize(
    ("flags", "named"), [(["--loss", "nope"], "loss"), (["--backbone", "vgg"], "backbone")]
)
def test_print_config_is_checked_like_a_run(command, flags, named, capsys):
    # Catches --print-config printing (exit 0) a config that a run would refuse; clip's
    # skipped every check.
    assert main([command, "--print-config", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{named} must be one of" in captured.err


def test_print_config_shows_the_resolved_config_with_sources(capsys):
    assert main(["pretrain", "--print-config", "--lr", "0.5", "--method", "moco"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["lr"] == 0.5 and printed["method"] == "moco" and printed["lam"] == 0.8
    assert "lam: 0.8  # resolved: the moco method's default" in out
    assert "lr: 0.5  # command line" in out
    assert resolve(config_from_mapping(printed)) == config_from_mapping(printed)


def test_search_settings_are_checked_against_each_other_and_the_base():
    base = PretrainConfig(epochs=4)
    assert check_search(SearchSettings(), base).max_t == 4
    with pytest.raises(KinfonceError, match=r"grace_period \(5\) must be <= max_t \(3\)"):
        check_search(SearchSettings(max_t=3, grace_period=5), base)
    with pytest.raises(KinfonceError, match="a trial trains on one device"):
        check_search(SearchSettings(), PretrainConfig(devices="2"))
    with pytest.raises(KinfonceError, match="num_cpus is for a Ray started here"):
        check_search(SearchSettings(), base, SearchRuntime(address="auto", num_cpus=2))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 61, "num_clusters": 3, "cluster_size": 20}, "batch_size must be <= "),
        ({"loss": "spectral"}, "loss must be one of gaussian"),
    ],
)
def test_synthetic_rules(settings, message):
    with pytest.raises(KinfonceError, match=message):
        check_synthetic(SyntheticConfig(**settings))
