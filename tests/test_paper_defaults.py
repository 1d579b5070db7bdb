"""The defaults that the paper fixes (Appendix B and C) are kinfonce's defaults.

Each check catches a default changed away from the paper's setting without notice; the
values are cited here rather than read from the code, so such a change must edit this file.
"""

from __future__ import annotations

import pytest

from kinfonce.config import PretrainConfig, SyntheticConfig
from kinfonce.data import load_dataset
from kinfonce.methods import SimCLR
from kinfonce.methods.base import data_description
from kinfonce.probes import LinearProbeSettings
from kinfonce.resolve import METHOD_LOSS_DEFAULTS, resolve


def test_encoder_training_defaults_follow_appendix_b():
    config = PretrainConfig()
    assert config.optimizer == "lars"
    assert config.momentum == 0.9
    assert config.weight_decay == 1e-6
    assert config.batch_size == 256
    assert config.proj_hidden_dim == 2048


@pytest.mark.parametrize(("loss", "out_dim"), [("laplacian", 128), ("concat-sum", 256)])
def test_projection_head_is_2048_then_128_or_256_for_concatenation(loss, out_dim):
    config = resolve(PretrainConfig(loss=loss, dataset="digits", backbone="resnet-mini"))
    splits = load_dataset("digits")
    head = SimCLR(config, data_description(splits)).head
    linears = [m for m in head.modules() if m.__class__.__name__ == "Linear"]
    assert [m.out_features for m in linears] == [2048, out_dim]


def test_linear_evaluation_defaults_follow_appendix_b():
    settings = LinearProbeSettings()
    assert (settings.epochs, settings.lr, settings.batch_size, settings.weight_decay) == (
        100,
        0.3,
        64,
        1e-6,
    )
    assert PretrainConfig().eval_linear_epochs == 100


def test_synthetic_defaults_follow_appendix_c():
    config = SyntheticConfig()
    assert (config.num_clusters, config.cluster_size) == (6, 100)
    assert (config.lr, config.temperature, config.batch_size) == (1.0, 0.5, 50)


def test_moco_loss_defaults_follow_table_4():
    # MoCo: temperature 0.1 for every kernel, lambda 0.8 for the sums (paper, Table 4).
    assert METHOD_LOSS_DEFAULTS["moco"] == {
        "temperature": 0.1, "temperature1": 0.1, "temperature2": 0.1, "lam": 0.8,
    }  # fmt: skip
