"""Captions for image-text training: class-name prompts, their rewrites, and the image pairs.

A caption source gives every training image the captions it may be paired with. For a
labelled image set these are prompts made from the class names: the plain prompt
("a photo of a cat.") and, with ``rewrites=K``, K - 1 rewrites of it drawn per class from
the templates shipped in ``caption_templates.txt``. Every step pairs each image with one of
its captions drawn uniformly (Eq. (6), as LaCLIP does with language rewrites), so the pair
graph of the training data (Definition 4.1) links each image to all of its captions:
:meth:`PairedCaptions.edges`.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from kinfonce.errors import KinfonceError

TEMPLATE_FILE = "caption_templates.txt"


@cache
def caption_templates() -> tuple[str, ...]:
    """The caption templates of the package; the first is the plain prompt.

    ``{a}`` stands for the class name with its article ("an airplane"), ``{name}`` for the
    bare name.
    """
    text = importlib.resources.files("kinfonce").joinpath(TEMPLATE_FILE).read_text()
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _fill(template: str, name: str) -> str:
    name = name.replace("_", " ").strip()
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(a=f"{article} {name}", name=name)


def check_class_names(class_names: Sequence[str]) -> None:
    """Raise a KinfonceError unless ``class_names`` is a non-empty list of non-empty names."""
    if len(class_names) == 0:
        raise KinfonceError("class_names is empty: captions need at least one class name")
    blank = [i for i, name in enumerate(class_names) if not str(name).strip()]
    if blank:
        raise KinfonceError(f"class_names has empty names at indices {blank}")


def class_captions(class_names: Sequence[str], rewrites: int = 1, seed: int = 0) -> list[list[str]]:
    """K captions per class: the plain prompt, then K - 1 rewrites drawn without repeats.

    Args:
        class_names: the name of each class (underscores read as spaces).
        rewrites: K, the number of captions per class, in [1, number of templates].
        seed: seeds the draw of each class's rewrites (classes draw different ones).

    Returns:
        C lists of K distinct caption strings; entry 0 of each is the plain prompt.

    Raises:
        KinfonceError: an empty class list or name, or K outside [1, number of templates].
    """
    check_class_names(class_names)
    templates = caption_templates()
    if isinstance(rewrites, bool) or not isinstance(rewrites, int) or rewrites < 1:
        raise KinfonceError(
            f"rewrites must be an integer >= 1 (captions per class; 1 is the plain prompt "
            f"only), got {rewrites!r}"
        )
    if rewrites > len(templates):
        raise KinfonceError(
            f"rewrites must be at most {len(templates)} (the caption templates the package "
            f"ships), got {rewrites}"
        )
    generator = torch.Generator().manual_seed(seed)
    captions = []
    for name in class_names:
        drawn = (
            torch.randperm(len(templates) - 1, generator=generator)[: rewrites - 1] + 1
        ).tolist()
        captions.append([_fill(templates[i], str(name)) for i in (0, *drawn)])
    return captions


@dataclass(frozen=True)
class PairedCaptions:
    """The captions of each image of a training set.

    Attributes:
        texts: the V distinct caption strings.
        options: (N, K) int64 caption ids of each image, rows padded with -1.
        counts: (N,) int64 number of captions of each image, in [1, K].
    """

    texts: tuple[str, ...]
    options: Tensor
    counts: Tensor

    def __post_init__(self) -> None:
        n = self.options.shape[0]
        if self.options.dtype != torch.int64 or self.options.ndim != 2:
            shape = tuple(self.options.shape)
            raise KinfonceError(f"options must be int64 (N, K), got {self.options.dtype} {shape}")
        if self.counts.dtype != torch.int64 or self.counts.shape != (n,):
            raise KinfonceError(f"counts must be int64 ({n},), got {tuple(self.counts.shape)}")
        if n and (self.counts.min() < 1 or self.counts.max() > self.options.shape[1]):
            raise KinfonceError(f"counts must be in [1, {self.options.shape[1]}]")
        valid = torch.arange(self.options.shape[1]) < self.counts[:, None]
        ids = self.options[valid]
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.texts)):
            raise KinfonceError(f"caption ids must be in [0, {len(self.texts)})")

    def __len__(self) -> int:
        return int(self.options.shape[0])

    def check_images(self, num_images: int) -> None:
        """Raise a KinfonceError unless there is one caption row per image."""
        if len(self) != num_images:
            raise KinfonceError(
                f"captions and images differ in count: {len(self)} images' captions for "
                f"{num_images} images; give every image its captions"
            )

    def select(self, index: Tensor) -> PairedCaptions:
        """The caption rows at ``index`` ((M,) int64), e.g. each image's class row."""
        return PairedCaptions(self.texts, self.options[index], self.counts[index])

    def edges(self) -> Tensor:
        """(M, 2) int64 edges (image, caption) of the pair graph: every caption of every image."""
        valid = torch.arange(self.options.shape[1]) < self.counts[:, None]
        images = torch.arange(len(self))[:, None].expand_as(self.options)
        return torch.stack([images[valid], self.options[valid]], dim=1)

    @classmethod
    def from_class_captions(
        cls, labels: Tensor, captions: Sequence[Sequence[str]]
    ) -> PairedCaptions:
        """Every image gets the captions of its class.

        Args:
            labels: (N,) int64 class indices.
            captions: C lists of captions, e.g. from :func:`class_captions`.
        """
        if len(captions) == 0:
            raise KinfonceError("captions is empty: need the captions of at least one class")
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(captions)):
            raise KinfonceError(f"labels must be class indices in [0, {len(captions)})")
        texts, options, counts = _index(captions)
        return cls(texts, options[labels], counts[labels])

    @classmethod
    def from_image_captions(
        cls, captions: Sequence[str | Sequence[str]], num_images: int
    ) -> PairedCaptions:
        """Every image gets its own caption, or its own list of captions (e.g. with rewrites).

        Identical strings are one caption vertex, shared by the images that have it.

        Raises:
            KinfonceError: ``len(captions) != num_images``, or an image without a caption.
        """
        lists = [[c] if isinstance(c, str) else list(c) for c in captions]
        empty = [i for i, c in enumerate(lists) if not c]
        if empty:
            raise KinfonceError(f"images {empty[:5]} have no caption")
        paired = cls(*_index(lists))
        paired.check_images(num_images)
        return paired


def shared_captions(groups: Sequence[Sequence[Sequence[str]]]) -> list[PairedCaptions]:
    """One :class:`PairedCaptions` per group of caption lists, all over one shared list of
    distinct texts (e.g. the class prompts, the training images' and the test images'
    captions of one run); each group's ``options`` are as wide as its longest list.

    Raises:
        KinfonceError: a list without a caption.
    """
    lists = [list(row) for group in groups for row in group]
    empty = [i for i, row in enumerate(lists) if not row]
    if empty:
        raise KinfonceError(f"caption lists {empty[:5]} are empty")
    texts, options, counts = _index(lists)
    out, start = [], 0
    for group in groups:
        end = start + len(group)
        width = int(counts[start:end].max()) if end > start else 1
        out.append(PairedCaptions(texts, options[start:end, :width], counts[start:end]))
        start = end
    return out


def _index(caption_lists: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """Distinct texts, and the (R, K) id rows (padded with -1) and (R,) counts of R lists."""
    ids: dict[str, int] = {}
    rows = [[ids.setdefault(str(text), len(ids)) for text in row] for row in caption_lists]
    width = max(len(row) for row in rows)
    options = torch.full((len(rows), width), -1, dtype=torch.int64)
    for r, row in enumerate(rows):
        options[r, : len(row)] = torch.tensor(row)
    counts = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    return tuple(ids), options, counts


def draw_captions(options: Tensor, counts: Tensor) -> Tensor:
    """One caption per image, uniform over its captions (Eq. (6)); uses the global generator.

    Args:
        options: (B, K) caption ids, padded with -1 beyond ``counts``.
        counts: (B,) number of captions of each image.

    Returns:
        (B,) int64 caption ids.
    """
    pick = (torch.rand(counts.shape, device=counts.device) * counts).long()
    pick = torch.minimum(pick, counts - 1)
    return options.gather(1, pick[:, None]).squeeze(1)
