"""Recipes of the paper's experiments: sources, precedence, and one training step each."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from kinfonce.cli import main
from kinfonce.config import config_from_mapping
from kinfonce.data import DatasetSplits, LabeledImages
from kinfonce.data.batches import PretrainData
from kinfonce.errors import KinfonceError
from kinfonce.methods import METHODS
from kinfonce.recipes import _layer, build_sourced_config, get_recipe, load_recipes
from kinfonce.resolve import resolve

#: Shape of each data set a recipe names: (image side, classes).
SHAPES = {"cifar10": (32, 10), "cifar100": (32, 100), "tinyimagenet": (64, 200)}


def printed_config(capsys, *argv: str) -> tuple[dict, dict[str, str]]:
    """Parse `kinfonce pretrain --print-config` output into values and per-line comments."""
    assert main(["pretrain", "--print-config", *argv]) == 0
    out = capsys.readouterr().out
    comments = {line.split(":")[0]: line.split("  # ", 1)[1] for line in out.splitlines()}
    return yaml.safe_load(out), comments


def test_print_config_of_a_recipe_shows_appendix_b(capsys):
    # Catches a recipe that lost one of Appendix B's values, or a print-out without sources.
    values, sources = printed_config(capsys, "--recipe", "cifar10-laplacian")
    expected = {
        "method": "simclr",
        "dataset": "cifar10",
        "loss": "laplacian",
        "backbone": "resnet50",
        "proj_hidden_dim": 2048,
        "proj_out_dim": 128,
        "proj_batch_norm": True,
        "optimizer": "lars",
        "momentum": 0.9,
        "weight_decay": 1e-6,
        "batch_size": 256,
        "epochs": 400,
        "eval_linear_epochs": 100,
        "stem": "cifar",
    }
    assert {k: values[k] for k in expected} == expected
    for key in ("backbone", "optimizer", "weight_decay", "batch_size", "epochs"):
        assert "Appendix B" in sources[key], key
    assert "authors' code" in sources["stem"]
    assert sources["seed"] == "default"


def test_flags_override_the_config_file_which_overrides_the_recipe(capsys, tmp_path):
    # Catches a wrong layer order: defaults < recipe < --config < flags.
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 7\nbatch_size: 64\n")
    values, sources = printed_config(
        capsys, "--recipe", "cifar100-concat-sum", "--config", str(path), "--epochs", "3"
    )
    assert (values["epochs"], values["batch_size"], values["proj_out_dim"]) == (3, 64, 256)
    assert sources["epochs"] == "command line"
    assert sources["batch_size"] == f"--config {path}"
    assert sources["proj_out_dim"].startswith("recipe cifar100-concat-sum")


def test_unknown_recipe_lists_the_names(capsys):
    assert main(["pretrain", "--recipe", "cifar11-gaussian", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'cifar11-gaussian'" in err and "moco-cifar100-simple-sum" in err


def test_recipes_command_lists_every_table_cell(capsys):
    # Catches a missing cell of Table 1 (3 data sets x 5 losses) or of Table 4's MoCo rows.
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    losses = ("gaussian", "laplacian", "exp-0.5", "simple-sum", "concat-sum")
    for dataset in SHAPES:
        for loss in losses:
            assert f"{dataset}-{loss} " in out
    for dataset in ("cifar10", "cifar100"):
        for loss in ("gaussian", "laplacian", "simple-sum"):
            assert f"moco-{dataset}-{loss} " in out
    assert len(load_recipes()) == 21


def test_a_value_without_source_or_field_is_refused():
    # Catches recipe files whose values silently lack their evidence.
    with pytest.raises(KinfonceError, match="source"):
        _layer({"lr": {"value": 1.0}}, "x.yaml base")
    with pytest.raises(KinfonceError, match="source"):
        _layer({"lr": 1.0}, "x.yaml base")
    with pytest.raises(KinfonceError, match="not a config field"):
        _layer({"learning_rate": {"value": 1.0, "source": "s"}}, "x.yaml base")


def test_recipes_follow_the_paper_where_it_speaks():
    # Catches the MoCo paragraph's values (ResNet-18, tau 0.1, lambda 0.8) being lost, and
    # the authors'-code choices where the paper is silent.
    moco = get_recipe("moco-cifar10-simple-sum").config()
    assert (moco.method, moco.backbone, moco.lam) == ("moco", "resnet18", 0.8)
    assert moco.temperature1 == moco.temperature2 == 0.1
    assert moco.optimizer == "lars" and moco.positive_in_denominator
    tiny = get_recipe("tinyimagenet-gaussian").config()
    assert tiny.stem == "imagenet" and tiny.blur and tiny.jitter_strength == 1.0
    concat = get_recipe("cifar10-concat-sum").config()
    assert concat.concat_normalization == "whole" and concat.proj_out_dim == 256
    # the authors' code decays and adapts every parameter unless asked not to
    assert not any(get_recipe(name).config().exclude_bn_bias for name in load_recipes())


def tiny_splits(dataset: str, n: int = 8) -> DatasetSplits:
    """Random uint8 images of the recipe's data set's shape; half the training labels -1
    (unlabelled, as STL-10's extra images)."""
    size, classes = SHAPES[dataset]
    generator = torch.Generator().manual_seed(0)

    def images(count: int, labelled: bool) -> LabeledImages:
        x = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        y = torch.randint(0, classes, (count,), generator=generator)
        if not labelled:
            y[: count // 2] = -1
        return LabeledImages(x, y)

    return DatasetSplits(
        train=images(n, labelled=False),
        val=images(4, labelled=True),
        test=images(4, labelled=True),
        class_names=[str(i) for i in range(classes)],
        num_classes=classes,
        image_size=size,
        channels=3,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )


@pytest.mark.parametrize("name", sorted(load_recipes()))
def test_each_recipe_builds_and_takes_a_training_step(name, tmp_path):
    # Catches a recipe whose values do not build a model (bad stem, head, loss options) or
    # cannot train (optimiser, schedule, MoCo queue, unlabelled images in the probe). The
    # backbone is shrunk to resnet-mini for speed; everything else is the recipe's.
    recipe = get_recipe(name)
    fields = {**recipe.values, "backbone": "resnet-mini", "batch_size": 8, "queue_size": 16}
    config = resolve(config_from_mapping(fields))
    splits = tiny_splits(config.dataset)
    torch.manual_seed(0)
    module = METHODS[config.method](config, {k: getattr(splits, k) for k in (
        "image_size", "channels", "num_classes", "mean", "std")})  # fmt: skip
    stem_is_7x7 = module.backbone.conv1.kernel_size == (7, 7)
    assert stem_is_7x7 == (config.dataset == "tinyimagenet")
    assert isinstance(module.backbone.maxpool, nn.MaxPool2d) == stem_is_7x7
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=PretrainData(splits, config.batch_size, config.seed))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    after = list(module.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_sourced_config_of_no_recipe_is_the_plain_config(tmp_path):
    # Catches --recipe handling that changes runs without a recipe.
    config, sources = build_sourced_config(None, None, {"lr": "0.5"})
    assert config.lr == 0.5 and sources["lr"] == "command line" and sources["loss"] == "default"


def test_the_authors_moco_code_settings_as_flags():
    # Catches the documented flags for the MoCo code's settings not reaching the model.
    config, _ = build_sourced_config(
        "moco-cifar10-simple-sum",
        None,
        {"optimizer": "sgd", "lr": "0.06", "weight_decay": "5e-4", "batch_size": "512",
         "proj_hidden_dim": "512", "proj_batch_norm": False, "warmup_epochs": "0",
         "positive_in_denominator": False, "lam": "0.2", "temperature2": "0.3"},
    )  # fmt: skip
    data = {"image_size": 32, "channels": 3, "num_classes": 10, "mean": (0.5,) * 3,
            "std": (0.25,) * 3}  # fmt: skip
    module = METHODS["moco"](resolve(config), data)
    assert [type(m).__name__ for m in module.head] == ["Linear", "ReLU", "Linear"]
    assert module.head[0].in_features == 512 and module.head[0].out_features == 512
    assert [loss.positive_in_denominator for loss in module.criterion.losses] == [False, False]
    assert module.criterion.weights == [0.2, 0.8]
    with pytest.raises(KinfonceError, match="needs method 'moco'"):
        resolve(config_from_mapping({"positive_in_denominator": False}))
