"""Loading by name: digits, image trees in directories and zips, tiny standard-layout roots, errors."""

import math
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import cifar

from kinfonce.data import DATASETS, load_dataset
from tests.helpers import flat_colour, image_bytes, write_image_tree

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def _write_tree(root: Path, per_class: dict[str, int], classes=COLOURS) -> None:
    """train/<class>/*.png and test/<class>/*.png, each class one flat colour."""
    write_image_tree(root, flat_colour(COLOURS), classes, per_class)


def _zip_tree(root: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(root).as_posix())


def _check_colours(images, labels, class_names) -> None:
    for image, label in zip(images, labels, strict=True):
        expected = torch.tensor(COLOURS[class_names[label]], dtype=torch.uint8)
        assert torch.equal(image[:, 4, 4], expected)


def test_digits_loads_offline_with_fixed_test_split():
    data = load_dataset("digits")
    assert data.channels == 1 and data.image_size == 16 and data.num_classes == 10
    assert data.class_names == [str(d) for d in range(10)]
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert len(data.test) == 360 and len(data.val) == math.ceil(0.1 * (1797 - 360))
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 16, 16)
        assert split.labels.dtype == torch.int64
        assert set(split.labels.tolist()) == set(range(10))  # stratified
    assert data.train.images.max() == 255 and data.train.images.min() == 0
    assert 0.2 < data.mean[0] < 0.4 and 0.2 < data.std[0] < 0.45
    other = load_dataset("digits", seed=1, val_fraction=0.2)
    assert torch.equal(other.test.images, data.test.images)  # the test split never moves
    assert len(other.val) == math.ceil(0.2 * 1437)
    again = load_dataset("digits")
    assert torch.equal(again.val.labels, data.val.labels)
    assert torch.equal(again.val.images, data.val.images)
    assert not torch.equal(load_dataset("digits", seed=1).val.images, data.val.images)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="known names: digits, cifar10") as err:
        load_dataset("cifar11")
    for name in DATASETS:
        assert name in str(err.value)


def test_bad_val_fraction_and_root_for_digits():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="root"):
        load_dataset("digits", root="/somewhere")


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("stl10", "stl10_binary"),
        ("tinyimagenet", "val_annotations.txt"),
    ],
)
def test_missing_root_offline_says_how_to_obtain(tmp_path, name, layout):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path / "absent", cache_dir=tmp_path)
    message = str(err.value)
    assert "download=True" in message and "--download" in message
    assert layout in message and str(tmp_path / "absent") in message


@pytest.mark.parametrize("as_zip", [False, True])
def test_imagefolder_directory_and_zip(tmp_path, as_zip):
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 10, "test": 3})
    source = tree
    if as_zip:
        source = tmp_path / "tree.zip"
        _zip_tree(tree, source)
    data = load_dataset(f"imagefolder:{source}", cache_dir=tmp_path / "cache", val_fraction=0.2)
    assert data.class_names == ["cat", "dog", "emu"] and data.num_classes == 3
    assert (data.image_size, data.channels) == (8, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 9)
    assert torch.bincount(data.test.labels).tolist() == [3, 3, 3]
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]
    for split in (data.train, data.val, data.test):
        _check_colours(split.images, split.labels, data.class_names)
    assert data.skipped_files == 0


def test_zip_with_a_top_folder_and_mixed_sizes(tmp_path):
    tree = tmp_path / "tree" / "mydata"
    _write_tree(tree, {"train": 2, "test": 1})
    (tree / "train" / "cat" / "big.jpg").write_bytes(image_bytes(COLOURS["cat"], (20, 12), "JPEG"))
    archive = tmp_path / "mydata.zip"
    _zip_tree(tmp_path / "tree", archive)
    data = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache", val_fraction=0)
    assert len(data.train) == 7 and len(data.val) == 0 and data.image_size == 8
    big = data.train.images[data.train.labels == 0]
    assert big.shape[0] == 3
    assert (big[:, :, 4, 4].int() - torch.tensor(COLOURS["cat"])).abs().max() <= 8  # JPEG


def test_undecodable_and_truncated_files_are_skipped_and_counted(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 4, "test": 2})
    (tree / "train" / "dog" / "broken.jpg").write_bytes(b"this is not an image")
    whole = image_bytes(COLOURS["dog"], (16, 16), "JPEG")
    (tree / "train" / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tree / "test" / "cat" / "0.png").write_bytes(b"")
    with pytest.warns(UserWarning) as record:
        data = load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")
    messages = sorted(str(w.message) for w in record if str(w.message).startswith("skipped"))
    (message,) = messages  # one for all splits
    assert message.startswith("skipped 3 undecodable") and "test/cat/0.png" in message
    assert "truncated.jpg" in message and "broken.jpg" in message
    assert data.skipped_files == 3
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 5
    _check_colours(data.test.images, data.test.labels, data.class_names)
    with pytest.warns(UserWarning, match="3 undecodable image file"):
        cached = load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")
    assert cached.skipped_files == 3


def test_class_sets_that_differ_are_named(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 1, "test": 1})
    (tree / "test" / "emu").rename(tree / "test" / "yak")
    with pytest.raises(ValueError, match=r"only in train: \['emu'\]; only in test: \['yak'\]"):
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")


def test_imagefolder_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}", cache_dir=tmp_path)
    (tmp_path / "only" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "only" / "train" / "cat" / "0.png").write_bytes(image_bytes(COLOURS["cat"]))
    with pytest.raises(FileNotFoundError, match="no images under test/<class>/"):
        load_dataset(f"imagefolder:{tmp_path / 'only'}", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="download"):
        load_dataset(f"imagefolder:{tmp_path / 'only'}", download=True, cache_dir=tmp_path)


def _write_tinyimagenet(root: Path) -> None:
    wnids = {"n0001": "cat", "n0002": "dog"}
    for wnid, name in wnids.items():
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(image_bytes(COLOURS[name], fmt="JPEG"))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, (wnid, name) in enumerate([*wnids.items(), *wnids.items()]):
        (root / "val" / "images" / f"val_{i}.JPEG").write_bytes(
            image_bytes(COLOURS[name], fmt="JPEG")
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("n0002\nn0001\n")
    (root / "words.txt").write_text("n0001\tcat, kitty\nn0002\tdog\n")


def test_tinyimagenet_standard_layout(tmp_path):
    _write_tinyimagenet(tmp_path / "raw" / "tiny-imagenet-200")
    data = load_dataset("tinyimagenet", root=tmp_path / "raw", cache_dir=tmp_path, val_fraction=0)
    assert data.class_names == ["dog", "cat"]  # wnids.txt order, words.txt names
    assert (len(data.train), len(data.test), data.image_size) == (6, 4, 8)
    assert torch.bincount(data.test.labels).tolist() == [2, 2]
    for split in (data.train, data.test):
        colours = split.images[:, :, 4, 4].int()
        for colour, label in zip(colours, split.labels, strict=True):
            expected = torch.tensor(COLOURS[data.class_names[label]])
            assert (colour - expected).abs().max() <= 8  # JPEG


def test_cifar10_torchvision_layout(tmp_path, monkeypatch):
    """A tiny root in torchvision's CIFAR-10 layout (its md5 check is bypassed: files are fake)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}
    written = {}
    for name, count in batches.items():
        entry = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": [int(x) for x in rng.integers(0, 10, count)],
        }
        written[name] = entry
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path, val_fraction=0)
    assert data.class_names == names and data.num_classes == 10
    assert (len(data.train), len(data.test), data.image_size, data.channels) == (20, 6, 32, 3)
    test = written["test_batch"]
    assert torch.equal(data.test.images, torch.from_numpy(test["data"]).view(6, 3, 32, 32))
    assert data.test.labels.tolist() == test["labels"]


# Issue 10, case 7: image trees.


def _write_sized_tree(root: Path, odd: dict[str, tuple[int, int]]) -> None:
    """Three classes of 2 train and 1 test 32x32 JPEGs, plus ``odd`` PNGs (name -> (w, h))
    in train/cat/, named so that they sort first."""
    write_image_tree(root, flat_colour(COLOURS, 32), COLOURS, {"train": 2, "test": 1}, fmt="JPEG")
    for name, size in odd.items():
        (root / "train" / "cat" / name).write_bytes(image_bytes(COLOURS["cat"], size))


def test_most_common_size_wins_over_the_first_image(tmp_path):
    """The first image decided the size: one 200x100 PNG made CIFAR-sized images 100x100,
    a 5x3 one 3x3, without a word. Now the most common size wins, with a warning."""
    tree = tmp_path / "tree"
    _write_sized_tree(tree, {"000-wide.png": (200, 100), "001-tiny.png": (5, 3)})
    with pytest.warns(UserWarning, match=r"resized 2 of 11 images .* to 32x32 px") as record:
        data = load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache", val_fraction=0)
    assert data.image_size == 32 and len(data.train) == 8
    assert not any("tiny" in str(w.message) for w in record)
    with pytest.warns(UserWarning, match=r"resized 11 of 11 images .* to 12x12 px \(given"):
        chosen = load_dataset(
            f"imagefolder:{tree}", cache_dir=tmp_path / "cache", val_fraction=0, image_size=12
        )
    assert chosen.image_size == 12
    with pytest.warns(UserWarning, match=r"tiny \(8x8 px\)"):
        load_dataset(
            f"imagefolder:{tree}", cache_dir=tmp_path / "cache", val_fraction=0, image_size=8
        )
    with pytest.raises(ValueError, match="image_size applies to image trees"):
        load_dataset("digits", image_size=32)


def test_bad_crc_in_a_deflated_zip_and_a_decompression_bomb_are_skipped(tmp_path, monkeypatch):
    """A bad CRC-32 in a deflated member (BadZipFile) and a decompression bomb
    (DecompressionBombError) aborted the whole load with a traceback."""
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 3, "test": 1})
    (tree / "train" / "dog" / "bomb.png").write_bytes(image_bytes(COLOURS["dog"], (40, 40)))
    (tree / "train" / "emu" / "bomb.jpg").write_bytes(image_bytes(COLOURS["emu"], (40, 40), "JPEG"))
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(tree).as_posix())
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zipped:
        member = zipped.getinfo("train/cat/1.png")
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    raw[start + member.compress_size // 2] ^= 0xFF  # corrupt the deflated stream in place
    archive.write_bytes(bytes(raw))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 40x40 > 2 * 400: a "bomb" here
    with pytest.warns(UserWarning, match="skipped 3 undecodable") as record:
        data = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    text = " ".join(str(w.message) for w in record)
    assert "train/cat/1.png (BadZipFile: Bad CRC-32" in text
    assert "bomb.png (DecompressionBombError" in text and "bomb.jpg (DecompressionBombError" in text
    assert data.skipped_files == 3 and len(data.train) + len(data.val) == 9 - 1


def test_a_single_class_is_refused(tmp_path):
    """One class trained and reported 100% accuracy, without a warning."""
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 2, "test": 1}, classes=["cat"])
    with pytest.raises(ValueError, match=r"1 class folder\(s\) \(\['cat'\]\).*at least 2 classes"):
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("as_zip", [False, True])
def test_imagefolder_unlabelled_folder_is_read_for_pretraining_only(tmp_path, as_zip):
    # Catches unlabelled images that are ignored, that get a class label, that leak into the
    # probes' splits, or that a cached load forgets.
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 4, "test": 2})
    nested = tree / "unlabelled" / "batch-1"
    nested.mkdir(parents=True)
    for i in range(5):
        (nested / f"{i}.png").write_bytes(image_bytes((90, 90, 90)))
    source = tree
    if as_zip:
        source = tmp_path / "tree.zip"
        _zip_tree(tree, source)
    for _ in range(2):  # decoded, then from the cache
        data = load_dataset(f"imagefolder:{source}", cache_dir=tmp_path / "cache", unlabeled=True)
        assert data.unlabeled is not None and len(data.unlabeled) == 5
        assert torch.all(data.unlabeled.labels == -1)
        assert torch.equal(data.unlabeled.images[:, :, 4, 4][0], torch.tensor([90, 90, 90]).byte())
        assert data.pretraining_size == len(data.train) + 5
        assert (len(data.train) + len(data.val), len(data.test)) == (12, 6)
    labelled_only = load_dataset(f"imagefolder:{source}", cache_dir=tmp_path / "cache")
    assert labelled_only.unlabeled is None


def test_unlabeled_needs_an_unlabelled_folder(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 2, "test": 1})
    with pytest.raises(FileNotFoundError, match="unlabelled/"):
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache", unlabeled=True)
    with pytest.raises(ValueError, match="unlabelled split"):
        load_dataset("digits", unlabeled=True)


def test_a_tree_too_big_for_the_disk_is_refused_before_decoding(tmp_path, monkeypatch):
    # Catches a data set that is decoded until the disk holding the cache is full instead of
    # being refused up front with the sizes it needs and has.
    import kinfonce.data.build as build

    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 2, "test": 1})
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: free)
    monkeypatch.setattr(build, "decode_into", lambda *a, **k: pytest.fail("decoded anyway"))
    with pytest.raises(
        ValueError, match=r"9 images at 8x8 px\) needs 1.7 KiB on disk .* only 1000 B are free"
    ):
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")


def test_a_class_whose_every_image_is_undecodable_is_refused(tmp_path):
    """Issue 21, point 8: every `dog` image (train and test) garbage bytes; the two class
    folders passed the 2-class check, dog vanished and kNN reported 100% on cat alone."""
    tree = tmp_path / "tree"
    _write_tree(tree, {"train": 3, "test": 2}, classes=["cat", "dog"])
    for path in tree.glob("*/dog/*.png"):
        path.write_bytes(b"garbage bytes, not an image")
    refused = pytest.raises(ValueError, match=r"class\(es\) \['dog'\] have no decodable image")
    with pytest.warns(UserWarning, match="skipped"), refused:
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")


def test_a_corrupt_stored_zip_member_is_skipped_by_its_crc(tmp_path):
    """Issue 21, point 10: a stored (uncompressed) member is sliced out of a memory map,
    which skipped the CRC check, so corrupt pixels of a BMP (no checksum of its own) were
    decoded as garbage without a word."""
    tree = tmp_path / "tree"
    write_image_tree(tree, flat_colour(COLOURS), COLOURS, {"train": 2, "test": 1}, fmt="BMP")
    archive = tmp_path / "tree.zip"
    _zip_tree(tree, archive)
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zipped:
        member = zipped.getinfo("train/cat/1.bmp")
    assert member.compress_type == zipfile.ZIP_STORED
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    raw[start + member.compress_size - 5] ^= 0xFF  # one pixel byte
    archive.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="skipped 1 undecodable") as record:
        data = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    assert "train/cat/1.bmp (BadZipFile: Bad CRC-32" in " ".join(str(w.message) for w in record)
    assert len(data.train) + len(data.val) == 5
    _check_colours(data.train.images, data.train.labels, data.class_names)


def test_a_truncated_zip_is_called_truncated(tmp_path):
    """Issue 21, point 15: a zip cut short was reported as "not a zip archive"."""
    tree, archive = tmp_path / "tree", tmp_path / "tree.zip"
    _write_tree(tree, {"train": 2, "test": 1})
    _zip_tree(tree, archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or damaged zip archive"):
        load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
