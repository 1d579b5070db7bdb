"""The GPU paths of CLIP training and evaluation, on a CPU: a stand-in GPU (``tests.fake_gpu``)
records every operation that would mix devices, and the meta device refuses every
data-dependent shape (a host synchronisation on a GPU)."""

from __future__ import annotations

import pytest
import torch

from kinfonce.clip import evaluate_clip
from kinfonce.config import ClipConfig
from kinfonce.methods.clip import ClipMethod
from kinfonce.resolve import resolve
from kinfonce.text import SmallTextEncoder
from tests.fake_gpu import FakeGPU

CAPTIONS = ["a photo of a cat.", "a photo of a dog.", "a cat.", "a dog.", "you can see a cat."]
DATA = dict(
    image_size=16,
    channels=3,
    num_classes=2,
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    captions=CAPTIONS,
    class_captions=[[0, 2, 4], [1, 3, 3]],
)


def clip_module(**options) -> ClipMethod:
    config = ClipConfig(
        dataset="cifar10", backbone="resnet-mini", proj_hidden_dim=16, text_width=8,
        text_layers=1, **options,
    )  # fmt: skip
    return ClipMethod(resolve(config), DATA)


def test_fake_gpu_records_mixed_devices_only():
    """The stand-in itself: a product of a meta and a CPU matrix is recorded, a CPU scalar or
    index tensor with meta tensors is not, and reading values gives zeros."""
    with FakeGPU() as gpu:
        a, b = torch.randn(3, 4, device="meta"), torch.randn(4, 2)
        (a @ b).sum()
        a[torch.tensor([0, 2])] * torch.tensor(2.0)
        assert torch.equal(a.cpu(), torch.zeros(3, 4)) and bool(torch.isfinite(a).all())
    assert gpu.mixed == ["mm"]


def test_clip_evaluation_runs_on_the_training_device(monkeypatch):
    """When fit ends Lightning moves the module to the CPU; the final evaluation is asked to
    run on the training GPU ("meta" here). Every operation of the zero-shot evaluation must
    then find its tensors there: the projection head, the text encoder and the class
    captions, not only the backbone (which the linear-probe evaluation moves). Before issue
    22 the head met GPU features on the CPU and the run died before metrics.json."""
    import kinfonce.clip as clip

    def linear_probe_and_knn(backbone, splits, config, device):
        backbone.to(device)  # what evaluate_baselines does to the module, without its probes
        return {}

    monkeypatch.setattr(clip, "evaluate_baselines", linear_probe_and_knn)
    module = clip_module()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    splits = type("Splits", (), {"test": type("Test", (), {"images": images})()})()
    splits.test.labels = torch.tensor([0, 1, 0, 1, 1, 0])
    splits.num_classes = 2
    with FakeGPU() as gpu:
        metrics = evaluate_clip(module, splits, module.config, "meta")
    assert gpu.mixed == [], f"operations that mixed the CPU and the GPU: {gpu.mixed}"
    assert {"zero_shot_top1", "zero_shot_ensemble_top1"} <= set(metrics)


def test_text_encoder_has_no_data_dependent_shapes():
    """A CLIP step must not wait for the GPU: the text encoder's output shape may depend on
    the batch's shape only. ``torch.unique`` (one encoding per distinct caption) has a
    data-dependent shape, which the meta device refuses and which on a GPU is a host
    synchronisation every step."""
    encoder = SmallTextEncoder(CAPTIONS, width=8, layers=1, out_dim=4)
    ids = torch.tensor([4, 0, 0, 1, 2, 4, 3, 1])
    want = encoder(ids)
    got = encoder.to("meta")(ids.to("meta"))
    assert got.shape == want.shape == (8, 4)


@pytest.mark.parametrize("channels_last", [True, False])
def test_clip_step_embeds_through_the_shared_path(channels_last):
    """The CLIP step encodes images through ``embed`` like every method, so that
    ``--channels-last`` (and ``--compile``) reach its backbone; before issue 22 it called the
    backbone directly and both were ignored."""
    module = clip_module(channels_last=channels_last)
    seen = []
    module.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    view = torch.randn(4, 3, 16, 16)
    loss, features = module.contrastive_step(view, torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss) and features.shape[0] == 4
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_nothing_reseeds_every_gpu(monkeypatch, tmp_path):
    """A training step's views, the linear probe's heads and the random baseline encoder are
    seeded on the CPU and the training device only: ``torch.manual_seed`` would reseed the
    generator of every GPU, and leave the others so (before issue 22 each of these did)."""
    from kinfonce.data import load_dataset
    from kinfonce.data.augment import EvalTransform
    from kinfonce.evaluate import evaluate_baselines, linear_probe_augmented
    from kinfonce.methods import SimCLR
    from kinfonce.methods.base import data_description
    from kinfonce.probes import LinearProbeSettings
    from tests.helpers import tiny_config

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    config = resolve(tiny_config(tmp_path, baselines=True))
    splits = load_dataset("digits").with_train_subset(64, seed=0)
    module = SimCLR(config, data_description(splits))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module.training_step((splits.train.images[:8], splits.train.labels[:8]), 0)
    assert not reseeded, "the training step"
    evaluate_baselines(module.backbone, splits, config, "cpu")
    assert not reseeded, "the end-of-run evaluation"
    linear_probe_augmented(
        module.backbone, splits.train.images, splits.train.labels, splits.test.images,
        splits.test.labels, EvalTransform(splits.mean, splits.std), num_classes=10,
        settings=LinearProbeSettings(epochs=1),
    )  # fmt: skip
    assert not reseeded, "the augmented linear probe"
