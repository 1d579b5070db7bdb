"""Pretraining on images without labels, then evaluating on a labelled set (CLI, CPU)."""

from __future__ import annotations

import json

from kinfonce.checkpoints import load_checkpoint
from kinfonce.cli import main
from tests.helpers import noisy_colour, tiny_flags, write_image_tree

#: Two colour classes of noisy 16 px images.
COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


def write_tree(root, with_unlabelled: bool) -> None:
    """40 training and 10 test images per class, and 60 unlabelled ones per class."""
    counts = {"train": 40, "test": 10}
    unlabelled = 60 if with_unlabelled else 0
    write_image_tree(root, noisy_colour(COLOURS), COLOURS, counts, unlabelled=unlabelled)


def test_unlabelled_images_pretrain_and_a_labelled_set_evaluates(tmp_path, capsys):
    # Catches --unlabeled images that never reach the training batches (the step count
    # shows them) and an encoder pretrained that way that cannot be evaluated on another
    # labelled set.
    mine, other = tmp_path / "mine", tmp_path / "other"
    write_tree(mine, with_unlabelled=True)
    write_tree(other, with_unlabelled=False)
    run = tmp_path / "run"
    flags = tiny_flags(
        dataset=f"imagefolder:{mine}", unlabeled=True, train_subset=None, eval_knn_k=5
    )
    assert main(["pretrain", *flags, "--output-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # 72 labelled training images after the validation split, plus 120 unlabelled ones
    assert metrics["train_images"] == 72
    ckpt = run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["global_step"] == (72 + 120) // 32
    out = tmp_path / "eval"
    assert main(["eval", str(ckpt), "--dataset", f"imagefolder:{other}", "--output-dir", str(out),
                 "--map-points", "0", "--no-progress"]) == 0  # fmt: skip
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["dataset"] == f"imagefolder:{other}" and evaluated["linear_top1"] > 0.9
