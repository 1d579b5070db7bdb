"""A user's image-caption pairs as rows: a CSV or TSV, or ``name.jpg`` + ``name.txt`` pairs,
and rewrite files aligned with the rows.

Three layouts are read into :class:`CaptionRows` (one row per caption; several rows may name
one image, which then has several captions):

* a CSV or TSV with a header, one image path and caption per row, columns named as
  open_clip's ``--csv-img-key`` / ``--csv-caption-key`` (``filepath`` and ``title`` by
  default), image paths relative to an image root (a directory or a zip);
* a directory or zip of WebDataset-style pairs: ``dir/name.jpg`` beside ``dir/name.txt``
  (the caption), optionally ``dir/name.cls`` (the class name); rows in name order;
* the same pairs in a tar shard, read with the ``webdataset`` package.

Rewrite files (LaCLIP's ``--augmented_caption_filelist``) are plain text, line i rewriting
the caption of row i. Every mismatch is a :class:`~kinfonce.errors.KinfonceError` naming the
file, the line and what was expected, raised before anything is trained or written.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kinfonce.data.imagefolder import is_image
from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError, MissingFileError

#: Suffixes of a caption table; anything else given as ``--captions`` is a layout of pairs.
TABLE_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class CaptionRows:
    """The rows of a caption source, all of length R.

    Attributes:
        source: the file or folder they were read from (for messages).
        images: the image of each row, a path inside the image tree.
        captions: the caption of each row.
        labels: the class name of each row, or None when the source has no labels.
        lines: where each row is in the source, e.g. ``"line 7"`` (for messages).
    """

    source: str
    images: tuple[str, ...]
    captions: tuple[str, ...]
    labels: tuple[str, ...] | None
    lines: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.captions)


class MemoryTree:
    """Files held in memory by name, read like an :class:`~kinfonce.data.tree.ImageTree`
    (the members of a tar shard)."""

    def __init__(self, path: Path, files: dict[str, bytes]):
        self.path, self._files = path, files

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        return self._files[name]


def _separator(path: Path, separator: str | None) -> str:
    if separator is not None:
        return separator.replace("\\t", "\t")
    return "\t" if path.suffix.lower() == ".tsv" else ","


def read_caption_table(
    path: str | Path,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
    separator: str | None = None,
) -> CaptionRows:
    """The rows of a CSV or TSV file with a header line (read by Python's ``csv``).

    Raises:
        MissingFileError: no such file.
        KinfonceError: a named column is not in the header, or a row's image path, caption
            or label is empty (the line is named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"captions file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as file:  # a BOM is no column name
        reader = csv.DictReader(file, delimiter=_separator(path, separator))
        columns = reader.fieldnames or []
        keys = {"--csv-img-key": img_key, "--csv-caption-key": caption_key}
        if label_key is not None:
            keys["--csv-label-key"] = label_key
        for flag, key in keys.items():
            if key not in columns:
                raise KinfonceError(f"{path}: no column {key!r} ({flag}); its header has {columns}")
        images, captions, labels, lines = [], [], [], []
        for row in reader:
            line = f"line {reader.line_num}"
            for flag, key in keys.items():
                if not (row.get(key) or "").strip():
                    raise KinfonceError(
                        f"{path}, {line}: column {key!r} ({flag}) is empty; every row needs "
                        "an image path, a caption (and a label, with --csv-label-key)"
                    )
            images.append(PurePosixPath(row[img_key].strip()).as_posix())
            captions.append(row[caption_key].strip())
            if label_key is not None:
                labels.append(row[label_key].strip())
            lines.append(line)
    if not captions:
        raise KinfonceError(f"{path}: no caption rows below the header")
    return CaptionRows(
        str(path),
        tuple(images),
        tuple(captions),
        tuple(labels) if label_key is not None else None,
        tuple(lines),
    )


def _pair_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member the WebDataset way: the key runs to the first dot of the
    file name, ``dir/a.b.jpg`` -> (``dir/a``, ``b.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def rows_of_pairs(source: str, tree: ImageTree | MemoryTree) -> CaptionRows:
    """The rows of a tree of ``name.<image>`` + ``name.txt`` (+ ``name.cls``) pairs, in key
    order.

    Raises:
        KinfonceError: an image without its ``.txt``, a ``.txt`` without its image, an
            empty caption, or ``.cls`` files for some images but not all.
    """
    members: dict[str, dict[str, str]] = {}
    for name in tree.names():
        key, extension = _pair_key(name)
        kind = "image" if is_image(name) else extension.lower()
        if kind in ("image", "txt", "cls"):
            members.setdefault(key, {})[kind] = name
    if not members:
        raise KinfonceError(f"{source}: no name.jpg + name.txt pairs in it")
    images, captions, labels, lines = [], [], [], []
    for key in sorted(members):
        found = members[key]
        if "image" not in found or "txt" not in found:
            have, lack = ("an image", ".txt") if "image" in found else ("a .txt", "image")
            raise KinfonceError(
                f"{source}: {key} has {have} but no {lack}; each image needs its caption "
                "in name.txt beside name.jpg"
            )
        caption = tree.read(found["txt"]).decode("utf-8").strip()
        if not caption:
            raise KinfonceError(f"{source}: {found['txt']} is empty; it must hold the caption")
        images.append(found["image"])
        captions.append(" ".join(caption.split()))
        labels.append(tree.read(found["cls"]).decode("utf-8").strip() if "cls" in found else None)
        lines.append(found["txt"])
    with_labels = sum(label is not None for label in labels)
    if with_labels not in (0, len(labels)):
        missing = next(line for line, label in zip(lines, labels, strict=True) if label is None)
        raise KinfonceError(
            f"{source}: {with_labels} of {len(labels)} images have a name.cls label, "
            f"{missing} has none; give every image one, or none"
        )
    return CaptionRows(
        source,
        tuple(images),
        tuple(captions),
        tuple(labels) if with_labels else None,  # type: ignore[arg-type]
        tuple(lines),
    )


def read_tar_pairs(path: Path) -> MemoryTree:
    """The members of a WebDataset tar shard, in memory (read with ``webdataset``)."""
    import webdataset

    files: dict[str, bytes] = {}
    dataset = webdataset.WebDataset(str(path), shardshuffle=False, empty_check=False)
    for sample in dataset:
        key = sample["__key__"]
        for extension, value in sample.items():
            if not extension.startswith("__"):
                files[f"{key}.{extension}"] = value
    return MemoryTree(path, files)


def check_images_exist(rows: CaptionRows, tree: ImageTree | MemoryTree) -> None:
    """Raise a KinfonceError naming the first row whose image is not in ``tree``."""
    present = set(tree.names())
    for image, line in zip(rows.images, rows.lines, strict=True):
        if image not in present:
            raise MissingFileError(
                f"{rows.source}, {line}: image {image!r} is not in {tree.path} (image paths "
                "are relative to --image-root)"
            )


def read_rewrite_files(paths: Sequence[str | Path], rows: CaptionRows) -> list[tuple[str, ...]]:
    """Each rewrite file's R lines, line i the rewrite of row i's caption.

    Raises:
        MissingFileError: a file is missing.
        KinfonceError: a file whose line count is not R, or an empty line (both named).
    """
    rewrites = []
    for path in map(Path, paths):
        if not path.is_file():
            raise MissingFileError(f"rewrite file {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise KinfonceError(
                    f"rewrite file {path}, line {number}: empty; line {number} must rewrite "
                    f"the caption of caption row {number} of {rows.source}"
                )
        if len(lines) != len(rows):
            raise KinfonceError(
                f"rewrite file {path} has {len(lines)} lines, expected {len(rows)}: one per "
                f"caption row of {rows.source}, in the same order"
                + (f"; line {len(lines) + 1} is missing" if len(lines) < len(rows) else "")
            )
        rewrites.append(tuple(line.strip() for line in lines))
    return rewrites


def read_caption_source(
    captions: str,
    *,
    image_root: str | None = None,
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
    separator: str | None = None,
) -> tuple[CaptionRows, ImageTree | MemoryTree]:
    """The rows of ``captions`` and the tree their images are read from, every image checked.

    ``captions`` ending in .csv or .tsv is a table whose image paths are relative to
    ``image_root`` (default: its folder); a directory, .zip or .tar is a layout of pairs.
    """
    path = Path(captions).expanduser()
    if path.suffix.lower() in TABLE_SUFFIXES:
        rows = read_caption_table(
            path, img_key=img_key, caption_key=caption_key, label_key=label_key,
            separator=separator,
        )  # fmt: skip
        tree: ImageTree | MemoryTree = ImageTree(image_root or path.parent)
    else:
        if image_root is not None:
            raise KinfonceError(
                f"image_root is for a CSV or TSV of captions; {path} is a layout of "
                "name.jpg + name.txt pairs, whose images lie beside their captions"
            )
        if not path.exists():
            raise MissingFileError(f"captions {path} does not exist")
        tree = read_tar_pairs(path) if path.suffix.lower() == ".tar" else ImageTree(path)
        rows = rows_of_pairs(str(path), tree)
    check_images_exist(rows, tree)
    return rows, tree


#: Files of a folder of pairs that :func:`caption_files_sha256` hashes (not its images).
CAPTION_MEMBER_SUFFIXES = (".txt", ".cls")


def _sized_chunks(path: Path) -> Iterator[bytes]:
    """``path``'s size (8 bytes), then its bytes in chunks of 1 MiB."""
    yield path.stat().st_size.to_bytes(8, "little")
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            yield chunk


def caption_files_sha256(captions: str, rewrite_files: Sequence[str]) -> str:
    """SHA-256 (hex) of the caption files a run reads: the bytes of ``captions`` (a CSV, TSV,
    .zip or .tar file; of a folder of pairs, the names and bytes of its .txt and .cls files
    in name order, not its images), then of each rewrite file in order. Each name and file
    is prefixed by its length, so that moving a line from one file to the next changes the
    digest.

    Raises:
        MissingFileError: ``captions`` or a rewrite file does not exist.
    """
    path = Path(captions).expanduser()
    if path.is_dir():
        files = [
            (member.relative_to(path).as_posix(), member)
            for member in sorted(path.rglob("*"))
            if member.suffix.lower() in CAPTION_MEMBER_SUFFIXES and member.is_file()
        ]
    elif path.is_file():
        files = [("", path)]
    else:
        raise MissingFileError(f"captions {path} does not exist")
    for rewrite in map(Path, rewrite_files):
        if not rewrite.is_file():
            raise MissingFileError(f"rewrite file {rewrite} does not exist")
        files.append(("", rewrite))
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(len(name.encode()).to_bytes(8, "little") + name.encode())
        for chunk in _sized_chunks(file):
            digest.update(chunk)
    return digest.hexdigest()
