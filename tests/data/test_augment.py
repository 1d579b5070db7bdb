"""Statistics and contract of the batched SimCLR views (fixed seeds)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    top, left, height, width = views.last_params.boxes.unbind(1)
    assert top.min() >= 0 and left.min() >= 0
    assert (top + height).max() <= 32 and (left + width).max() <= 32  # boxes inside the image
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
    params = views.last_params
    if step == "jitter":  # jittered images have at least one non-neutral factor
        applied = (params.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1).float()
    else:
        applied = getattr(params, step).float()
    assert applied.shape == (N,)
    tolerance = 4.5 * (rate * (1 - rate) / N) ** 0.5
    assert abs(applied.mean().item() - rate) < tolerance


def test_per_image_parameters_differ(sampled):
    views, _ = sampled
    params = views.last_params
    assert torch.unique(params.boxes, dim=0).shape[0] > N // 2
    for column, low, high in ((0, 0.2, 1.8), (1, 0.2, 1.8), (2, 0.2, 1.8), (3, -0.2, 0.2)):
        values = params.jitter[:, column]
        assert values.min() >= low and values.max() <= high
        assert torch.unique(values).numel() > N // 2
    assert len(params.orders) == 1 and sorted(params.orders[0]) == [0, 1, 2, 3]


def test_grayscale_decisions_are_applied(sampled):
    views, out = sampled
    gray = views.last_params.grayscale
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
    flipped = views.last_params.flip
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
        view0, view1 = views.pair(batch)
        assert view0.shape == view1.shape == (32, 3, 32, 32)
        assert not torch.equal(view0, view1)  # the two views of an image are drawn independently


def test_single_channel_input_gets_brightness_and_contrast_only():
    views = SimCLRViews(16, (0.3,), (0.3,))
    out = _run(views, _batch(300, size=16, channels=1))
    assert out.shape == (300, 1, 16, 16) and torch.isfinite(out).all()
    params = views.last_params
    assert not params.grayscale.any()
    assert (params.jitter[:, 2] == 1).all() and (params.jitter[:, 3] == 0).all()
    assert params.jitter[:, 0].std() > 0.1


def test_blur_kernel_and_rate():
    assert [blur_kernel_size(s) for s in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert SimCLRViews(32, MEAN3, STD3).blur_kernel == 0
    views = SimCLRViews(96, MEAN3, STD3, blur=True)
    assert views.blur_kernel == 9
    out = _run(views, _batch(16, size=96))
    assert out.shape == (16, 3, 96, 96) and torch.isfinite(out).all()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sigma = views.sample(N, 96, 96, torch.device("cpu")).sigma
    blurred = sigma > 0
    assert abs(blurred.float().mean().item() - 0.5) < 4.5 * (0.25 / N) ** 0.5
    sigma = sigma[blurred]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and torch.unique(sigma).numel() > N // 4


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


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("channels", "blur"), [(3, True), (1, False)])
def test_views_never_wait_for_the_device_and_are_few_operations(channels, blur):
    """On a GPU, a step that reads a value back (an item, a boolean mask, a tolist) makes the
    host wait, and each operation is a kernel launch; kornia's modules, used before, did both
    (365 operations and several reads per view). On the meta device any such read raises,
    and the count of operations of both views of a batch is bounded (a per-image loop would
    scale with the batch)."""
    stats = ((0.5,) * channels, (0.25,) * channels)
    views = SimCLRViews(32, *stats, blur=blur).to("meta")
    batch = torch.empty(64, channels, 40, 40, dtype=torch.uint8, device="meta")
    with _CountOps() as counter:
        view0, view1 = views.pair(batch)
    assert view0.shape == view1.shape == (64, channels, 32, 32)
    assert sum(counter.ops.values()) < 320, counter.ops.most_common(10)  # kornia: 730
