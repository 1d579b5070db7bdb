"""Methods, config handling and checkpoint loading (no full training runs here)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
import yaml

from kinfonce.config import (
    PretrainConfig,
    add_config_flags,
    build_config,
    config_differences,
    config_from_mapping,
    dump_config,
    flags_to_mapping,
    load_config_file,
    validate,
)
from kinfonce.data.batches import check_batch_size
from kinfonce.methods import METHODS, MoCo, SimCLR, load_checkpoint, load_encoder
from kinfonce.methods.base import CHECKPOINT_KEY

DATA = {"image_size": 16, "channels": 1, "num_classes": 10, "mean": (0.3,), "std": (0.4,)}


def small(**overrides) -> PretrainConfig:
    base = dict(proj_hidden_dim=32, queue_size=16, backbone="resnet-mini")
    return PretrainConfig(**{**base, **overrides}).resolved()


def test_registry_and_loss_defaults():
    assert set(METHODS) == {"simclr", "moco"}
    assert SimCLR.loss_params(small(loss="simple-sum")) == {}
    assert MoCo.loss_params(small(method="moco", loss="simple-sum")) == {
        "temperature1": 0.1, "temperature2": 0.1, "lam": 0.8,
    }  # fmt: skip
    assert MoCo.loss_params(small(method="moco", loss="laplacian")) == {"temperature": 0.1}
    assert MoCo.loss_params(small(method="moco", loss="laplacian", temperature=0.3)) == {
        "temperature": 0.3
    }


def test_parameter_the_preset_does_not_take_is_an_error():
    with pytest.raises(ValueError, match="lam"):
        SimCLR(small(loss="gaussian", lam=0.5), DATA)
    with pytest.raises(ValueError, match="mu"):
        SimCLR(small(loss="laplacian", mu=2.0), DATA)


def test_mu_reaches_the_spectral_loss_and_a_bad_one_is_refused():
    # Catches --mu being dropped on the way to the loss, or a non-positive cap accepted.
    assert SimCLR(small(loss="spectral"), DATA).criterion.mu == 3.0
    assert SimCLR(small(loss="spectral", mu=8.0), DATA).criterion.mu == 8.0
    with pytest.raises(ValueError, match="mu must be"):
        SimCLR(small(loss="spectral", mu=0.0), DATA)


def test_concat_preset_doubles_embedding_and_checks_width():
    assert SimCLR(small(loss="concat-sum"), DATA).head[-1].out_features == 256
    with pytest.raises(ValueError, match="proj_out_dim must be a positive multiple of 2"):
        SimCLR(small(loss="concat-sum", proj_out_dim=127), DATA)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_contrastive_step_gives_loss_and_probe_features(method):
    torch.manual_seed(0)
    module = METHODS[method](small(method=method), DATA)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    loss, features = module.contrastive_step(module.views(images), module.views(images))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert features.shape == (8, module.backbone.feature_dim)
    loss.backward()
    assert module.backbone.conv1.weight.grad is not None
    if method == "moco":
        assert module.key_backbone.conv1.weight.grad is None  # keys take no gradient
        assert int(module.queue_pointer) == 8  # the keys were enqueued


def test_moco_queue_wraps_around():
    module = MoCo(small(method="moco", queue_size=5), DATA)
    keys = torch.arange(3 * 128, dtype=torch.float32).reshape(3, 128)
    module._enqueue(keys)
    module._enqueue(keys + 1000)
    assert int(module.queue_pointer) == 1
    torch.testing.assert_close(module.queue[0], keys[2] + 1000)
    torch.testing.assert_close(module.queue[3], keys[0] + 1000)


def test_moco_momentum_update_is_an_ema():
    module = MoCo(small(method="moco", moco_momentum=0.9), DATA)
    with torch.no_grad():
        module.backbone.conv1.weight.add_(1.0)
    before = module.key_backbone.conv1.weight.clone()
    module._momentum_update()
    torch.testing.assert_close(module.key_backbone.conv1.weight, before + 0.1)


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [("method", "byol", "moco"), ("backbone", "vit", "resnet18"),
     ("loss", "triplet", "simple-sum"), ("optimizer", "rmsprop", "lars")],
)  # fmt: skip
def test_unknown_choices_list_valid_names(field, value, valid):
    with pytest.raises(ValueError, match=f"{field} must be one of .*{valid}"):
        validate(small(**{field: value}))


def test_batch_size_checks_explain():
    with pytest.raises(ValueError, match="larger than the training set"):
        check_batch_size(512, 300, 1)
    with pytest.raises(ValueError, match="does not divide across 3 processes"):
        check_batch_size(256, 1000, 3)
    check_batch_size(256, 1000, 2)


def test_config_layers_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.3\nloss: laplacian\ntemperature: 0.2\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--lr", "0.7", "--no-progress", "--temperature", "none"])
    config = build_config(path, flags_to_mapping(args))
    assert (config.lr, config.loss, config.temperature, config.progress) == (
        0.7,
        "laplacian",
        None,
        False,
    )
    assert config_from_mapping(yaml.safe_load(dump_config(config))) == config
    path.write_text("learning_rate: 0.3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        load_config_file(path)
    with pytest.raises(ValueError, match="'epochs' must be an integer"):
        config_from_mapping({"epochs": 2.5})
    with pytest.raises(ValueError, match="'batch_size' must be int"):
        config_from_mapping({"batch_size": "many"})


def test_every_field_has_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    actions = {a.dest: a for a in parser._actions}
    for name in PretrainConfig.__dataclass_fields__:
        assert name in actions and actions[name].help


def test_config_differences_ignore_runtime_fields():
    a, b = small().to_dict(), small(devices="2", lr=0.5, epochs=7).to_dict()
    assert config_differences(a, b) == [
        "epochs: checkpoint has 15, now 7", "lr: checkpoint has 1.0, now 0.5",
    ]  # fmt: skip


def test_digits_defaults_differ_from_simclr_augmentation():
    digits, cifar = small(), PretrainConfig(dataset="cifar10").resolved()
    assert digits.flip_p == 0.0 and cifar.flip_p == 0.5 and cifar.crop_scale_min == 0.08


def test_load_encoder_round_trip_and_refusals(tmp_path):
    module = SimCLR(small(), DATA)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "good.ckpt"
    torch.save(checkpoint, path)
    backbone, config = load_encoder(path)
    images = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(backbone(images), module.backbone.eval()(images))
    assert config["backbone"] == "resnet-mini" and config["data"]["num_classes"] == 10

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a kinfonce pretraining checkpoint"):
        load_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_encoder(corrupt)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({CHECKPOINT_KEY: {}, "payload": argparse.Namespace(x=1)}, pickled)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_encoder(pickled)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "missing.ckpt")


def test_print_config_shows_the_effective_config(capsys):
    from kinfonce.cli import main

    assert main(["pretrain", "--print-config", "--lr", "0.5", "--method", "moco"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 0.5 and printed["method"] == "moco"
    assert printed["flip_p"] == 0.0  # digits default filled in
    assert config_from_mapping(printed).lr == 0.5


@pytest.mark.parametrize(
    ("loss", "advice"),
    [
        ("spectral", "lower --lr or --mu"),
        ("gaussian", "lower --lr or raise the temperature (--temperature)"),
        ("concat-sum", "lower --lr or raise the temperature (--temperature1 or --temperature2)"),
    ],
)
def test_divergence_advice_names_only_what_the_preset_takes(loss, advice):
    # Catches advice to raise a temperature that the preset does not have (spectral).
    from kinfonce.methods.base import divergence_advice

    assert divergence_advice(loss) == advice


def test_compile_and_channels_last_keep_the_step(monkeypatch):
    """--compile routes the backbone and head through torch.compile, once (the GPU benchmark
    measures the real compiler; here a recording stand-in keeps the test fast), and
    --channels-last changes the backbone's memory format; neither changes the loss, the
    gradients or the checkpoint's keys (a compiled module saved under another name would)."""
    compiled = []

    def recording_compile(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    # A fixed batch: over 150 random ones the two memory formats' gradients differed by 6e-6
    # relative at the median but up to 2e-2 in a tenth of them (the kernels break ties between
    # equal values differently), which made an unseeded batch fail now and then.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=generator)
    results = []
    for options in ({}, {"compile": True, "channels_last": True}):
        torch.manual_seed(0)
        module = SimCLR(small(**options), DATA)
        for _ in range(2):
            torch.manual_seed(1)
            loss, _ = module.contrastive_step(*module.views.pair(images))
        loss.backward()
        results.append((loss.detach(), module.backbone.conv1.weight.grad, module.state_dict()))
    assert len(compiled) == 1 and compiled[0].__func__ is SimCLR._embed
    assert module.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    (loss0, grad0, state0), (loss1, grad1, state1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    # another convolution algorithm for channels-last: float32 rounding (6e-6 on this batch),
    # not a different step
    assert float((grad1 - grad0).norm() / grad0.norm()) < 1e-4
    assert state1.keys() == state0.keys()


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [(None, "cpu", True), (None, "cuda", False), (False, "cpu", False), (True, "cuda", True)],
)
def test_channels_last_auto_is_on_for_a_cpu_only(setting, device, expected):
    # Catches the auto setting (None) ignoring the training device, overriding an explicit
    # choice, or leaving MoCo's key encoder in the other memory format.
    rgb = {**DATA, "channels": 3}
    module = MoCo(small(method="moco", channels_last=setting), rgb)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    module.setup("fit")
    assert module.channels_last is expected
    for encoder in (module.backbone, module.key_backbone):
        conv = next(p for p in encoder.parameters() if p.ndim == 4 and p.shape[1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) is expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update({CHECKPOINT_KEY: ["not", "a", "mapping"]}), "not a mapping"),
        (lambda c: c[CHECKPOINT_KEY].pop("config"), "no 'config' mapping"),
        (lambda c: c[CHECKPOINT_KEY]["data"].pop("channels"), r"lacks \['channels'\]"),
        (lambda c: c.pop("state_dict"), "no 'state_dict'"),
        (lambda c: c[CHECKPOINT_KEY]["config"].update(backbone=7), "do not make an encoder"),
        (lambda c: c[CHECKPOINT_KEY]["data"].update(channels="x"), "do not make an encoder"),
    ],
)
def test_malformed_kinfonce_entry_is_a_clear_error(tmp_path, capsys, change, message):
    """Issue 10, case 8: a malformed 'kinfonce' entry raised KeyError or TypeError."""
    module = SimCLR(small(), DATA)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    change(checkpoint)
    path = tmp_path / "odd.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=message):
        load_encoder(path)
    from kinfonce.cli import main

    assert main(["eval", str(path), "--out", str(tmp_path / "eval")]) == 2
    assert "malformed" in capsys.readouterr().err
