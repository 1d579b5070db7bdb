"""``kinfonce clip --captions``: a user's own image-caption pairs, rewrite files, retrieval
recall and the pair graph of real captions."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kinfonce.caption_files import caption_files_sha256, read_caption_source
from kinfonce.caption_synth import class_images, generate, write_pairs, write_table
from kinfonce.captions import shared_captions
from kinfonce.checkpoints import load_checkpoint
from kinfonce.cli import main
from kinfonce.clip import caption_graph_metrics, graph_columns, run_clip
from kinfonce.config import ClipConfig
from kinfonce.data.captioned import load_caption_splits
from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError
from kinfonce.graph import image_components, images_joined
from kinfonce.retrieval import match_ranks, retrieval_recall
from kinfonce.text import MAX_TOKENS, WordTokenizer
from tests.helpers import (
    CIFAR10_ZIP,
    KillAtEpochStart,
    pattern,
    run_in_child,
    tiny_config,
    tiny_flags,
    write_image_tree,
)

#: Class -> words that name it in captions (several per class, as users' captions do).
WORDS = {
    "vertical": ("vertical stripes", "upright bars", "columns"),
    "horizontal": ("horizontal stripes", "flat bars", "rows"),
    "checker": ("a checkerboard", "squares", "a grid of tiles"),
    "blob": ("a round blob", "a disc", "a bright spot"),
}


@pytest.fixture(scope="module")
def pattern_pairs(tmp_path_factory) -> Path:
    """A folder of pattern images and captions.csv (filepath, title, label): one caption per
    image naming its class in one of three ways, with a shade word shared across classes;
    images 0-4 of each class also get a second row. rewrites.txt maps every caption to
    "a picture of <first word of the class>"."""
    root = tmp_path_factory.mktemp("pairs")
    write_image_tree(root, pattern, list(WORDS), {"train": 30})
    rng = np.random.default_rng(0)
    rows, rewrites = [], []
    for name, words in WORDS.items():
        for i in [*range(30), *range(5)]:
            shade = ("grey", "pale", "dark")[int(rng.integers(3))]
            rows.append(
                (f"train/{name}/{i}.png", f"{shade} {words[int(rng.integers(3))]} {i}", name)
            )
            rewrites.append(f"a picture of {words[0]}")
    with (root / "captions.csv").open("w", newline="") as file:
        csv.writer(file).writerows([("filepath", "title", "label"), *rows])
    (root / "rewrites.txt").write_text("\n".join(rewrites) + "\n")
    return root


def pair_config(root: Path, **overrides) -> ClipConfig:
    settings = dict(
        captions=str(root / "captions.csv"), csv_label_key="label", test_fraction=0.25,
        val_fraction=0.1, rewrite_files=(str(root / "rewrites.txt"),),
    )  # fmt: skip
    return ClipConfig(**{**settings, **overrides})


# --- retrieval recall ------------------------------------------------------------------------


def test_recall_counts_ties_against_the_query():
    # 3 images x 4 captions; image 0 <-> captions 0 and 1, image 1 <-> 2, image 2 <-> 3.
    scores = torch.tensor(
        [
            [0.5, 0.9, 0.9, 0.1],  # best match 1 (0.9) ties caption 2: rank 2
            [0.2, 0.3, 0.8, 0.8],  # match 2 (0.8) ties caption 3: rank 2
            [0.7, 0.7, 0.7, 0.7],  # all alike: match 3 ranks behind the other three: rank 4
        ]
    )
    matches = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert match_ranks(scores, matches).tolist() == [2, 2, 4]
    # captions as queries: caption 0 -> image 0 (0.5) behind image 2 (0.7): rank 2; caption 1
    # -> image 0 (0.9), alone on top: 1; caption 2 -> image 1 (0.8) behind image 0 (0.9): 2;
    # caption 3 -> image 2 (0.7) behind image 1 (0.8): 2.
    assert match_ranks(scores.T, matches.T).tolist() == [2, 1, 2, 2]
    recall = retrieval_recall(scores, matches, ks=(1, 2, 4))
    assert recall["image_to_text_r1"] == 0.0
    assert recall["image_to_text_r2"] == pytest.approx(2 / 3)
    assert recall["image_to_text_r4"] == 1.0
    assert recall["text_to_image_r1"] == 0.25 and recall["text_to_image_r2"] == 1.0


def test_recall_refuses_a_query_without_a_match_and_non_finite_scores():
    with pytest.raises(KinfonceError, match="true match"):
        match_ranks(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(KinfonceError, match="non-finite"):
        match_ranks(torch.tensor([[float("nan")]]), torch.ones(1, 1, dtype=torch.bool))


# --- the pair graph --------------------------------------------------------------------------


def test_images_joined_on_a_graph_of_known_components():
    # Own captions: images 0, 1 share caption 0; images 2, 3, 4 have captions 1, 2, 3.
    own = [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3)]
    before = image_components(own, 5, 4)
    assert len(set(before.tolist())) == 4
    # A rewrite (caption 4) shared by images 1 and 2 joins {0, 1} with {2}: three images
    # join; 3 and 4 stay apart.
    after = image_components([*own, (1, 4), (2, 4)], 5, 5)
    assert len(set(after.tolist())) == 3
    assert images_joined(before, after) == 3
    assert images_joined(before, before) == 0


def test_caption_graph_metrics_of_pairs_with_rewrites(pattern_pairs):
    # Captions carry the image index, so without rewrites each image is its own component
    # (two rows of one image stay one component); the rewrites leave one per class.
    config = pair_config(pattern_pairs, test_fraction=0.1, val_fraction=0.1)
    splits = load_caption_splits(config)
    metrics = caption_graph_metrics(graph_columns(config, splits))
    assert metrics["graph_components"] == len(splits.train)
    assert metrics["graph_components_with_rewrites"] == 4
    assert metrics["graph_images_joined_by_rewrites"] == len(splits.train)
    plain = pair_config(pattern_pairs, test_fraction=0.1, val_fraction=0.1, rewrite_files=())
    without = caption_graph_metrics(graph_columns(plain, load_caption_splits(plain)))
    assert without["graph_components_with_rewrites"] == len(splits.train)
    assert without["graph_images_joined_by_rewrites"] == 0


# --- reading the captions --------------------------------------------------------------------


def test_rows_of_one_image_become_its_captions_and_splits_are_disjoint(pattern_pairs):
    splits = load_caption_splits(pair_config(pattern_pairs))
    train = splits.captions["train"]
    assert sum(len(own) == 2 for own in train.own) > 0  # images 0-4 of a class: two rows
    assert all(len(r) == 1 for r in train.rewrites)  # one rewrite file, one rewrite each
    assert all(r[0].startswith("a picture of") for r in train.rewrites)
    # every caption of an image names its own class
    names = {name: words for name, words in WORDS.items()}
    for split in ("train", "test"):
        for own, label in zip(
            splits.captions[split].own, getattr(splits, split).labels, strict=True
        ):
            words = names[splits.class_names[int(label)]]
            assert all(any(w in c for w in words) for c in own)
    # held-out images: no caption index (the image number within its class) is shared
    seen = {
        (int(label), c.rsplit(" ", 1)[1])
        for own, label in zip(train.own, splits.train.labels, strict=True)
        for c in own
    }
    held = {
        (int(label), c.rsplit(" ", 1)[1])
        for own, label in zip(splits.captions["test"].own, splits.test.labels, strict=True)
        for c in own
    }
    assert not seen & held and len(splits.test) == 30


def test_shared_captions_index_one_text_list():
    prompts = [["a photo of a cat."], ["a photo of a dog."]]
    train = [("a cat", "a photo of a cat."), ("a dog",)]
    test = [("a cat",), ("a puppy",)]
    classes, images, held = shared_captions([prompts, train, test])
    assert classes.texts == images.texts == held.texts
    assert classes.options.shape == (2, 1)  # each group only as wide as its longest row
    texts = classes.texts
    assert [
        [texts[i] for i in row[:n]]
        for row, n in zip(images.options.tolist(), images.counts.tolist(), strict=True)
    ] == [list(r) for r in train]
    assert [texts[i] for i in held.options[:, 0].tolist()] == ["a cat", "a puppy"]


def test_the_three_layouts_give_the_same_pairs(tmp_path):
    tree = write_image_tree(tmp_path / "images", pattern, list(WORDS), {"train": 3})
    data = generate(ImageTree(tree), class_images(ImageTree(tree)), pairs=12, seed=1)
    rows = {}
    for layout in ("folder", "pairs.zip", "pairs.tar"):
        write_pairs(data, ImageTree(tree), tmp_path / layout)
        found, source = read_caption_source(str(tmp_path / layout))
        rows[layout] = [
            (c, label, source.read(i))
            for i, c, label in zip(found.images, found.captions, found.labels, strict=True)
        ]
    assert rows["folder"] == rows["pairs.zip"] == rows["pairs.tar"]
    assert len(rows["folder"]) == len(set(data.images))


def test_a_tsv_with_other_columns_and_a_byte_order_mark(pattern_pairs, tmp_path):
    rows = list(csv.reader((pattern_pairs / "captions.csv").open()))[1:]
    table = tmp_path / "pairs.tsv"
    lines = ["\ufeffimage\tlabel\ttext", *("\t".join((p, label, t)) for p, t, label in rows)]
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    found, _ = read_caption_source(
        str(table), image_root=str(pattern_pairs), img_key="image", caption_key="text",
        label_key="label",
    )  # fmt: skip
    assert list(found.captions) == [t for _, t, _ in rows]
    assert list(found.labels) == [label for *_, label in rows]


def test_the_caption_digest_follows_captions_and_rewrites_not_images(tmp_path):
    # A resume compares this digest: it must change with any caption, label or rewrite
    # (else a resume trains on changed captions), and not with the images of a folder
    # (which it does not read).
    tree = write_image_tree(tmp_path / "images", pattern, list(WORDS), {"train": 2})
    pairs = tmp_path / "pairs"
    write_pairs(generate(ImageTree(tree), class_images(ImageTree(tree)), 8), ImageTree(tree), pairs)
    rewrite = tmp_path / "r.txt"
    rewrite.write_text("one\n")
    first = caption_files_sha256(str(pairs), [str(rewrite)])
    assert caption_files_sha256(str(pairs), []) != first
    (pairs / "000003.jpg").write_bytes(b"other image")
    assert caption_files_sha256(str(pairs), [str(rewrite)]) == first
    for changed in (pairs / "000003.txt", pairs / "000003.cls", rewrite):
        before = changed.read_bytes()
        changed.write_bytes(before + b"x")
        assert caption_files_sha256(str(pairs), [str(rewrite)]) != first, changed.name
        changed.write_bytes(before)
    with pytest.raises(KinfonceError, match=r"rewrite file .*nothing\.txt does not exist"):
        caption_files_sha256(str(pairs), [str(tmp_path / "nothing.txt")])


def test_pairs_without_their_caption_or_with_some_labels_are_refused(tmp_path):
    tree = write_image_tree(tmp_path / "images", pattern, list(WORDS), {"train": 2})
    pairs = tmp_path / "pairs"
    write_pairs(generate(ImageTree(tree), class_images(ImageTree(tree)), 8), ImageTree(tree), pairs)
    (pairs / "000003.txt").unlink()
    with pytest.raises(KinfonceError, match=r"000003 has an image but no \.txt"):
        read_caption_source(str(pairs))
    (pairs / "000003.jpg").unlink()
    (pairs / "000003.cls").unlink()
    (pairs / "000005.cls").unlink()
    with pytest.raises(
        KinfonceError, match=r"5 of 6 images have a name\.cls label, 000005\.txt has none"
    ):
        read_caption_source(str(pairs))


def test_rows_of_one_image_with_different_labels_are_refused(pattern_pairs, tmp_path):
    table = (pattern_pairs / "captions.csv").read_text().splitlines()
    first = table[1].rsplit(",", 1)[0]
    (pattern_pairs / "conflict.csv").write_text("\n".join([*table, first + ",blob"]) + "\n")
    config = pair_config(
        pattern_pairs, captions=str(pattern_pairs / "conflict.csv"), rewrite_files=()
    )
    with pytest.raises(
        KinfonceError,
        match=r"different labels \[.blob., .vertical.\] \(line 2, line 32, line 142\)",
    ):
        load_caption_splits(config)


def test_tokens_are_cut_at_the_context_length():
    tokens = WordTokenizer(["word " * 100, "short"])(["word " * 100, "short"])
    assert tokens.shape == (2, MAX_TOKENS)


# --- refused before anything is written ------------------------------------------------------


def source_flags(root: Path, *extra: str) -> list[str]:
    """The flags of the pattern pairs' CSV, labelled, then ``extra``."""
    return ["--captions", str(root / "captions.csv"), "--csv-label-key", "label", *extra]


def _refused(pattern_pairs: Path, tmp_path: Path, capsys, *flags: str) -> str:
    """stderr of a refused run, checked to have written nothing."""
    run = tmp_path / "run"
    code = main(["clip", *source_flags(pattern_pairs, *flags), "--output-dir", str(run)])
    assert code != 0 and not run.exists()
    return capsys.readouterr().err


def test_mismatched_rewrite_files_are_refused_before_anything_is_written(
    pattern_pairs, tmp_path, capsys
):
    lines = (pattern_pairs / "rewrites.txt").read_text().splitlines()
    short = tmp_path / "short.txt"
    short.write_text("\n".join(lines[:-1]) + "\n")
    err = _refused(
        pattern_pairs,
        tmp_path,
        capsys,
        "--rewrite-files",
        str(pattern_pairs / "rewrites.txt"),
        str(short),
    )
    assert f"rewrite file {short} has {len(lines) - 1} lines, expected {len(lines)}" in err
    assert f"line {len(lines)} is missing" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n".join([*lines[:6], "  ", *lines[7:]]) + "\n")
    err = _refused(pattern_pairs, tmp_path, capsys, "--rewrite-files", str(empty))
    assert f"rewrite file {empty}, line 7: empty" in err


def test_a_missing_image_or_column_is_refused_with_its_line(pattern_pairs, tmp_path, capsys):
    table = (pattern_pairs / "captions.csv").read_text().splitlines()
    table[3] = table[3].replace("train/", "missing/")
    bad = pattern_pairs / "bad.csv"
    bad.write_text("\n".join(table) + "\n")
    err = _refused(pattern_pairs, tmp_path, capsys, "--captions", str(bad))
    assert f"{bad}, line 4: image 'missing/" in err and "--image-root" in err
    err = _refused(pattern_pairs, tmp_path, capsys, "--csv-caption-key", "caption")
    assert (
        "no column 'caption' (--csv-caption-key); its header has ['filepath', 'title', 'label']"
        in err
    )
    table = (pattern_pairs / "captions.csv").read_text().splitlines()
    table[5] = table[5].split(",")[0] + ",,vertical"
    bad.write_text("\n".join(table) + "\n")
    err = _refused(pattern_pairs, tmp_path, capsys, "--captions", str(bad))
    assert f"{bad}, line 6: column 'title' (--csv-caption-key) is empty" in err


def test_caption_settings_that_do_not_fit_are_refused(tmp_path):
    from kinfonce.resolve import resolve

    with pytest.raises(KinfonceError, match="rewrite_files needs captions"):
        resolve(ClipConfig(rewrite_files=("a.txt",)))
    with pytest.raises(KinfonceError, match="are alternatives"):
        resolve(ClipConfig(captions="c.csv", dataset="cifar10"))
    assert resolve(ClipConfig(captions="c.csv")).dataset == "captions"
    assert ClipConfig(rewrite_files="one.txt").rewrite_files == ("one.txt",)
    with pytest.raises(KinfonceError, match="rewrite_files must be a list of strings"):
        ClipConfig(rewrite_files=[1])


# --- end to end ------------------------------------------------------------------------------


def test_own_captions_train_and_report_retrieval(pattern_pairs, tmp_path, capsys):
    # Captions name the class in three ways; held-out images are retrieved among 30 captions
    # (about 7 per class). A pairing lost anywhere (captions drawn for the wrong image, test
    # captions given the wrong ids, scores of the wrong embeddings) leaves R@10 near chance
    # (10/30 for image to text).
    flags = tiny_flags(
        dataset="digits", train_subset=None, proj_hidden_dim=64, epochs=30, crop_scale_min=0.5,
        text_width=32, text_layers=1, eval_linear_epochs=5,
    )  # fmt: skip
    run = tmp_path / "run"
    rewrites = str(pattern_pairs / "rewrites.txt")
    extra = ["--test-fraction", "0.25", "--rewrite-files", rewrites, "--output-dir", str(run)]
    code = main(["clip", *flags, *source_flags(pattern_pairs, *extra)])
    assert code == 0
    out = capsys.readouterr().out
    assert "image to text" in out and "pair graph components" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 30 and metrics["graph_components_with_rewrites"] == 4
    assert metrics["image_to_text_r10"] > 0.75, metrics
    assert metrics["text_to_image_r10"] > 0.75, metrics
    assert metrics["zero_shot_top1"] > 0.8, metrics
    report = tmp_path / "report"
    assert main(["report", str(run), "--output-dir", str(report)]) == 0
    assert "R@1 image/text" in (report / "report.md").read_text()
    assert main(["eval", str(run / "checkpoints" / "last.ckpt")]) != 0
    assert "choose one with --dataset" in capsys.readouterr().err


def test_captions_without_labels_train_and_report_retrieval_only(pattern_pairs, tmp_path, capsys):
    # No --csv-label-key: no classes, so no online probe, linear probe, kNN or zero-shot;
    # retrieval recall is still measured, and best.ckpt follows the newest epoch.
    flags = tiny_flags(
        dataset="digits", train_subset=None, proj_hidden_dim=64, epochs=30, crop_scale_min=0.5,
        text_width=32, text_layers=1,
    )  # fmt: skip
    run = tmp_path / "run"
    source = ["--captions", str(pattern_pairs / "captions.csv"), "--test-fraction", "0.25"]
    assert main(["clip", *flags, *source, "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "image to text" in out and "linear top-1" not in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert "linear_top1" not in metrics and "zero_shot_top1" not in metrics
    assert "final_probe_top1" not in metrics and metrics["test_images"] == 30
    assert metrics["image_to_text_r10"] > 0.6 and metrics["text_to_image_r10"] > 0.6, metrics
    assert (run / "checkpoints" / "best.ckpt").is_file()


def outcome(run: Path) -> tuple[dict, dict]:
    """(metrics.json without its times and places, the final weights) of a run directory."""
    metrics = json.loads((run / "metrics.json").read_text())
    kept = {k: v for k, v in metrics.items() if "time" not in k and k not in ("run", "run_dir")}
    return kept, load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


def test_an_interrupted_caption_run_resumes_to_the_same_end(pattern_pairs, tmp_path, capsys):
    # Killed at the start of its last epoch, then resumed by `--output-dir RUN --resume`
    # (config.yaml read back): the split, the caption ids and each step's caption draw must be
    # the uninterrupted run's, so on one thread (one summation order) the weights are
    # bit-identical and so are the metrics. A resume that re-reads changed caption files
    # instead trains on other captions: it is refused, naming the digest, writing nothing.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("captions.csv", "rewrites.txt"):
        (data / name).write_bytes((pattern_pairs / name).read_bytes())
    settings = dict(
        train_subset=None, proj_hidden_dim=32, epochs=3, text_width=16, text_layers=1,
        eval_linear_epochs=1, captions=str(data / "captions.csv"),
        image_root=str(pattern_pairs), csv_label_key="label", test_fraction=0.25,
        rewrite_files=(str(data / "rewrites.txt"),),
    )  # fmt: skip
    straight = tiny_config(tmp_path / "a", ClipConfig, **settings)
    killed = tiny_config(tmp_path / "b", ClipConfig, **settings)
    run = Path(killed.output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_clip(straight)
        assert run_in_child(run_clip, killed, callbacks=[KillAtEpochStart(2)]) == -9
        assert not (run / "metrics.json").exists()
        assert main(["clip", "--output-dir", str(run), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "last.ckpt: 2 of 3 epochs trained" in capsys.readouterr().out
    (metrics_a, weights_a), (metrics_b, weights_b) = (
        outcome(Path(straight.output_dir)),
        outcome(run),
    )
    assert metrics_b == metrics_a and metrics_a["test_images"] == 30
    assert weights_b.keys() == weights_a.keys() and any(k.startswith("text.") for k in weights_a)
    for key, value in weights_a.items():
        assert torch.equal(weights_b[key], value), key
    recorded = yaml.safe_load((run / "config.yaml").read_text())["captions_sha256"]
    assert len(recorded) == 64
    config_yaml = (run / "config.yaml").read_bytes()
    # one changed caption in either file
    for name, word, other in (("rewrites.txt", "blob", "spot"), ("captions.csv", " 4,", " 44,")):
        lines = (data / name).read_text().splitlines()
        assert word in lines[-1]
        lines[-1] = lines[-1].replace(word, other)
        (data / name).write_text("\n".join(lines) + "\n")
        assert main(["clip", "--output-dir", str(run), "--resume", "--epochs", "4"]) == 2
        err = capsys.readouterr().err
        assert f"captions_sha256: the caption files ({data / 'captions.csv'} " in err
        assert f"not {recorded} as the configuration records" in err
        with pytest.raises(KinfonceError, match=f"captions_sha256: checkpoint has '{recorded}'"):
            run_clip(dataclasses.replace(killed, epochs=4), resume="last")
        assert (run / "config.yaml").read_bytes() == config_yaml
    # a new run from the old config.yaml trains on the changed files once told to
    fresh = ["clip", "--config", str(run / "config.yaml"), "--output-dir", str(tmp_path / "c")]
    assert main(fresh) == 2 and "--captions-sha256 none" in capsys.readouterr().err
    assert main([*fresh, "--captions-sha256", "none", "--epochs", "1"]) == 0
    saved = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert saved["captions_sha256"] not in (None, recorded)


@pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason="needs the CIFAR-10 zip")
def test_generated_cifar10_captions_train_end_to_end(tmp_path, capsys):
    # 2,000 generated pairs with two rewrite files. The graph: without rewrites almost every
    # image is its own component; with both, one per class. Then one short epoch of training
    # that prints and records recall in both directions, zero-shot top-1 and the components.
    data = generate(
        ImageTree(CIFAR10_ZIP), class_images(ImageTree(CIFAR10_ZIP)), pairs=2000, seed=0
    )
    table, *rewrites = write_table(data, tmp_path / "data")
    source = ["--captions", str(table), "--image-root", str(CIFAR10_ZIP), "--csv-label-key",
              "label", "--rewrite-files", *map(str, rewrites)]  # fmt: skip
    assert main(["clip", *source, "--report-graph"]) == 0
    out = capsys.readouterr().out
    components = next(line for line in out.splitlines() if line.startswith("connected components"))
    assert int(components.split()[-2]) > 1000 and int(components.split()[-1]) == 10
    assert "images joined by the rewrites" in out
    flags = tiny_flags(dataset="digits", train_subset=None, batch_size=128, text_width=32)
    run = tmp_path / "run"
    assert main(["clip", *flags, *source, "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    for line in ("image to text", "text to image", "zero-shot top-1", "pair graph components"):
        assert line in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["graph_components"] > 1000 and metrics["graph_components_with_rewrites"] == 10
    recalls = [f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert all(0 <= metrics[key] <= 1 for key in [*recalls, "zero_shot_top1"])
    assert metrics["test_images"] == 182 and metrics["train_images"] == 1472
