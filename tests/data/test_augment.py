"""Statistics and contract of the batched SimCLR views (fixed seeds)."""

import pytest
import torch

from kinfonce.data.augment import EvalTransform, SimCLRViews, blur_kernel_size

MEAN3, STD3 = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N = 2000  # rates below are checked within ~4.5 standard errors at this batch size


def _batch(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)


def _run(views: SimCLRViews, batch: torch.Tensor, seed: int = 0) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return views(batch)


@pytest.fixture(scope="module")
def sampled():
    """One view of N random images, and the pipeline that made it (its sampled params)."""
    views = SimCLRViews(32, MEAN3, STD3)
    out = _run(views, _batch(N))
    return views, out


def test_crop_area_fractions_span_configured_range(sampled):
    views, _ = sampled
    src = views.pipeline.crop._params["src"]  # (B, 4, 2) corners, inclusive pixel coordinates
    width = src[:, 1, 0] - src[:, 0, 0] + 1
    height = src[:, 2, 1] - src[:, 0, 1] + 1
    area = (width * height) / (32 * 32)
    assert area.min() >= 0.08 * 0.8  # pixel rounding only
    assert area.max() <= 1.0
    assert area.min() < 0.1 and area.max() > 0.95
    # the fraction is drawn uniformly in [0.08, 1] (large crops of extreme aspect ratio that do
    # not fit are redrawn, and sides round down): every part of the range is well populated
    counts = torch.histc(area, bins=4, min=0.08, max=1.0)
    assert (counts > 0.12 * N).all(), counts
    ratio = width / height
    assert ratio.min() >= 0.75 * 0.8 and ratio.max() <= 4 / 3 * 1.25


@pytest.mark.parametrize(("step", "rate"), [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2)])
def test_step_rates_match_probabilities(sampled, step, rate):
    views, _ = sampled
    applied = getattr(views.pipeline, step)._params["batch_prob"].float()
    assert applied.shape == (N,)
    tolerance = 4.5 * (rate * (1 - rate) / N) ** 0.5
    assert abs(applied.mean().item() - rate) < tolerance


def test_per_image_parameters_differ(sampled):
    views, _ = sampled
    boxes = views.pipeline.crop._params["src"].reshape(N, -1)
    assert torch.unique(boxes, dim=0).shape[0] > N // 2
    jitter = views.pipeline.jitter._params
    for key, low, high in (
        ("brightness_factor", 0.2, 1.8),
        ("contrast_factor", 0.2, 1.8),
        ("saturation_factor", 0.2, 1.8),
        ("hue_factor", -0.2, 0.2),
    ):
        values = jitter[key]
        assert values.min() >= low and values.max() <= high
        assert torch.unique(values).numel() > N // 2


def test_grayscale_decisions_are_applied(sampled):
    views, out = sampled
    gray = views.pipeline.grayscale._params["batch_prob"].bool()
    # equal means and stds keep gray images' channels equal after normalisation
    spread = (out.amax(dim=1) - out.amin(dim=1)).amax(dim=(1, 2))
    assert (spread[gray] < 1e-4).all()
    assert (spread[~gray] > 1e-2).all()


def test_flip_decisions_are_applied():
    identity_crop = dict(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0
    )
    views = SimCLRViews(32, MEAN3, STD3, **identity_crop)
    batch = _batch(400)
    out = _run(views, batch)
    plain = EvalTransform(MEAN3, STD3)(batch)
    flipped = views.pipeline.flip._params["batch_prob"].bool()
    assert 0 < flipped.sum() < 400
    torch.testing.assert_close(out[flipped], plain[flipped].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~flipped], plain[~flipped], atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_output_shape_dtype_device_and_normalisation(device):
    batch = _batch(64, size=40).to(device)
    views = SimCLRViews(24, MEAN3, STD3).to(device)
    out = _run(views, batch)
    assert out.shape == (64, 3, 24, 24)
    assert out.dtype == torch.float32
    assert out.device.type == device
    assert torch.isfinite(out).all()
    # all steps off: a full-image crop at the same size is exactly the evaluation transform
    off = SimCLRViews(
        40,
        MEAN3,
        STD3,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0,
        jitter_p=0,
        grayscale_p=0,
    ).to(device)
    torch.testing.assert_close(_run(off, batch), EvalTransform(MEAN3, STD3).to(device)(batch))


def test_eval_transform_normalises_with_data_statistics():
    batch = _batch(256)
    unit = batch.double() / 255
    mean = unit.mean(dim=(0, 2, 3)).tolist()
    std = unit.std(dim=(0, 2, 3), correction=0).tolist()
    out = EvalTransform(mean, std)(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        out.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(EvalTransform(mean, std)(batch), out)  # no randomness


def test_seeded_views_reproduce_and_calls_differ():
    views, batch = SimCLRViews(32, MEAN3, STD3, blur=True), _batch(32)
    torch.testing.assert_close(_run(views, batch, seed=3), _run(views, batch, seed=3))
    assert not torch.equal(_run(views, batch, seed=3), _run(views, batch, seed=4))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert not torch.equal(views(batch), views(batch))


def test_single_channel_input_gets_brightness_and_contrast_only():
    views = SimCLRViews(16, (0.3,), (0.3,))
    assert "grayscale" not in dict(views.pipeline.named_children())
    out = _run(views, _batch(300, size=16, channels=1))
    assert out.shape == (300, 1, 16, 16) and torch.isfinite(out).all()
    params = views.pipeline.jitter._params
    assert (params["saturation_factor"] == 1).all() and (params["hue_factor"] == 0).all()
    assert params["brightness_factor"].std() > 0.1


def test_blur_kernel_and_rate():
    assert [blur_kernel_size(s) for s in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert "blur" not in dict(SimCLRViews(32, MEAN3, STD3).pipeline.named_children())
    views = SimCLRViews(96, MEAN3, STD3, blur=True)
    assert views.pipeline.blur.flags["kernel_size"] in (9, (9, 9))
    out = _run(views, _batch(16, size=96))
    assert out.shape == (16, 3, 96, 96) and torch.isfinite(out).all()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        params = views.pipeline.blur.forward_parameters((N, 3, 96, 96))
    assert abs(params["batch_prob"].float().mean().item() - 0.5) < 4.5 * (0.25 / N) ** 0.5
    sigma = params["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and torch.unique(sigma).numel() > N // 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=0), "image_size"),
        (dict(jitter_strength=-1.0), "jitter_strength"),
        (dict(crop_scale=(0.5, 0.1)), "crop_scale"),
        (dict(flip_p=1.5), "flip_p"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(mean=(0.5, 0.5)), "mean and std"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(image_size=32, mean=MEAN3, std=STD3) | kwargs
    with pytest.raises(ValueError, match=match):
        SimCLRViews(args.pop("image_size"), args.pop("mean"), args.pop("std"), **args)


def test_bad_batches_are_rejected():
    views = SimCLRViews(32, MEAN3, STD3)
    with pytest.raises(ValueError, match="uint8"):
        views(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        views(_batch(2, channels=1))
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform(MEAN3, STD3)(_batch(2)[0])
