"""A user's image-caption pairs as train/val/test splits of images, each image with its captions.

The rows of a caption source (:mod:`kinfonce.caption_files`) are grouped by image: an image
named by several rows has several captions of its own, and the rewrite files add the rewrites
of those rows. Images, not rows, are split: a seeded ``test_fraction`` of them is held out for
retrieval and zero-shot evaluation, then ``val_fraction`` of the rest for the online probe
(both stratified by class when the source has labels), then ``train_subset`` of the
training images is drawn. Without labels every label is -1 and there are no classes. Only the
images kept are decoded (:func:`kinfonce.data.decode.decode_images`); an undecodable one is
left out with its captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kinfonce.caption_files import CaptionRows, read_caption_source, read_rewrite_files
from kinfonce.config import ClipConfig
from kinfonce.data import decode
from kinfonce.data.splits import (
    DatasetSplits,
    LabeledImages,
    channel_stats,
    split_index,
    subset_index,
)
from kinfonce.errors import KinfonceError

SPLITS = ("train", "val", "test")


def _distinct(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(texts))


@dataclass(frozen=True)
class ImageCaptions:
    """The captions of the images of one split, image i at index i.

    Attributes:
        own: each image's captions from the source (distinct, in row order).
        rewrites: each image's rewrites of those captions (all files; distinct, none equal
            to one of its own).
    """

    own: tuple[tuple[str, ...], ...]
    rewrites: tuple[tuple[str, ...], ...]

    def select(self, index: Sequence[int]) -> ImageCaptions:
        """The captions of the images at ``index``."""
        return ImageCaptions(
            tuple(self.own[i] for i in index), tuple(self.rewrites[i] for i in index)
        )

    def with_rewrites(self) -> list[tuple[str, ...]]:
        """Each image's own captions, then its rewrites: what a training step draws from."""
        return [own + rewrites for own, rewrites in zip(self.own, self.rewrites, strict=True)]


@dataclass(frozen=True)
class CaptionedSplits(DatasetSplits):
    """:class:`DatasetSplits` of captioned images; ``captions[split]`` are the captions of
    ``split``'s images ("train", "val", "test"). ``train_subset`` was applied when loading."""

    captions: dict[str, ImageCaptions] = field(default_factory=dict)


def group_rows(
    rows: CaptionRows, rewrites: Sequence[Sequence[str]]
) -> tuple[list[str], ImageCaptions, list[str | None]]:
    """(distinct images in order of first row, their captions, each image's class name or
    None when the source has no labels).

    Raises:
        KinfonceError: rows of one image name different classes.
    """
    index: dict[str, list[int]] = {}
    for r, image in enumerate(rows.images):
        index.setdefault(image, []).append(r)
    images, own, rewritten, labels = [], [], [], []
    for image, members in index.items():
        names = {rows.labels[r] if rows.labels is not None else None for r in members}
        if len(names) > 1:
            lines = ", ".join(rows.lines[r] for r in members)
            raise KinfonceError(
                f"{rows.source}: image {image!r} has rows with different labels "
                f"{sorted(names)} ({lines}); an image belongs to one class"
            )
        mine = _distinct([rows.captions[r] for r in members])
        others = _distinct([file[r] for file in rewrites for r in members])
        images.append(image)
        own.append(mine)
        rewritten.append(tuple(t for t in others if t not in mine))
        labels.append(names.pop())
    return images, ImageCaptions(tuple(own), tuple(rewritten)), labels


def split_images(labels: torch.Tensor, config: ClipConfig) -> dict[str, torch.Tensor]:
    """Split -> sorted int64 image indices: test, then val of the rest, then the training
    subset, each drawn with ``config.seed`` (stratified by class; unlabelled images, -1,
    are not stratified)."""
    labels = labels.clamp_min(0)
    rest, test = split_index(labels, config.test_fraction, config.seed)
    train, val = (rest[i] for i in split_index(labels[rest], config.val_fraction, config.seed))
    if config.train_subset is not None and config.train_subset < len(train):
        train = train[subset_index(len(train), config.train_subset, config.seed)]
    return {"train": train, "val": val, "test": test}


def load_caption_splits(config: ClipConfig) -> CaptionedSplits:
    """The captioned images of ``config.captions`` (see the module docstring).

    Raises:
        KinfonceError: a malformed source or rewrite file, a missing image, labels of
            one class only, a split left without images.
    """
    assert config.captions is not None
    rows, tree = read_caption_source(
        config.captions,
        image_root=config.image_root,
        img_key=config.csv_img_key,
        caption_key=config.csv_caption_key,
        label_key=config.csv_label_key,
        separator=config.csv_separator,
    )
    rewrites = read_rewrite_files(config.rewrite_files, rows)
    images, captions, names = group_rows(rows, rewrites)
    class_names = sorted({name for name in names if name is not None})
    if len(class_names) == 1:
        raise KinfonceError(
            f"{rows.source} names 1 class ({class_names[0]!r}): the probes and zero-shot "
            "accuracy need at least 2 (or leave out the labels)"
        )
    ids = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([ids.get(name, -1) for name in names], dtype=torch.int64)
    parts = split_images(labels, config)
    order = torch.cat([parts[s] for s in SPLITS])
    decoded = decode.decode_images(
        tree, [images[i] for i in order.tolist()], size=config.image_size,  # type: ignore[arg-type]
        resize=config.resize,
    )  # fmt: skip
    kept = torch.from_numpy(decoded.kept)  # decode_images warned about the others
    pixels = torch.from_numpy(decoded.images)
    split_of = torch.repeat_interleave(
        torch.arange(3), torch.tensor([len(parts[s]) for s in SPLITS])
    )
    # kept is ascending and `order` runs train, val, test: each split is one block of rows
    sizes = torch.bincount(split_of[kept], minlength=len(SPLITS)).tolist()
    sets, texts = {}, {}
    for split, rows_kept, block in zip(SPLITS, kept.split(sizes), pixels.split(sizes), strict=True):
        chosen = order[rows_kept]
        if len(chosen) == 0:
            raise KinfonceError(
                f"the {split} split of {rows.source} has no decodable image: its "
                f"{len(images)} images are too few for test_fraction {config.test_fraction} "
                f"and val_fraction {config.val_fraction}, or its images do not decode"
            )
        sets[split] = LabeledImages(block, labels[chosen])
        texts[split] = captions.select(chosen.tolist())
    mean, std = channel_stats(pixels[: sizes[0] + sizes[1]])  # train and val
    return CaptionedSplits(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        class_names=class_names,
        num_classes=len(class_names),
        image_size=int(pixels.shape[-1]),
        channels=int(pixels.shape[1]),
        mean=mean,
        std=std,
        name=f"captions:{config.captions}",
        skipped_files=len(decoded.skipped),
        captions=texts,
    )
