"""Pretraining on images without labels, then evaluating on a labelled set (CLI, CPU)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from kinfonce.cli import main


def write_tree(root, with_unlabelled: bool) -> None:
    """Two colour classes of noisy 16 px images in train/ and test/; optional unlabelled/."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    folders = [(f"{split}/{name}", colour, n) for split, n in (("train", 40), ("test", 10))
               for name, colour in colours.items()]  # fmt: skip
    if with_unlabelled:
        folders += [("unlabelled", colour, 60) for colour in colours.values()]
    for folder, colour, count in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        start = len(list((root / folder).iterdir()))
        for i in range(count):
            noise = rng.integers(-30, 30, size=(16, 16, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{start + i}.png")


def test_unlabelled_images_pretrain_and_a_labelled_set_evaluates(tmp_path, capsys):
    # Catches --unlabeled images that never reach the training batches (the step count
    # shows them) and an encoder pretrained that way that cannot be evaluated on another
    # labelled set.
    mine, other = tmp_path / "mine", tmp_path / "other"
    write_tree(mine, with_unlabelled=True)
    write_tree(other, with_unlabelled=False)
    run = tmp_path / "run"
    flags = ["--dataset", f"imagefolder:{mine}", "--unlabeled", "--backbone", "resnet-mini",
             "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0",
             "--proj-hidden-dim", "32", "--eval-linear-epochs", "2", "--eval-knn-k", "5",
             "--no-baselines", "--no-progress", "--output-dir", str(run)]  # fmt: skip
    assert main(["pretrain", *flags]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # 72 labelled training images after the validation split, plus 120 unlabelled ones
    assert metrics["train_images"] == 72
    ckpt = run / "checkpoints" / "last.ckpt"
    from kinfonce.methods import load_checkpoint

    assert load_checkpoint(ckpt)["global_step"] == (72 + 120) // 32
    out = tmp_path / "eval"
    assert main(["eval", str(ckpt), "--dataset", f"imagefolder:{other}", "--out", str(out),
                 "--map-points", "0", "--no-progress"]) == 0  # fmt: skip
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["dataset"] == f"imagefolder:{other}" and evaluated["linear_top1"] > 0.9
