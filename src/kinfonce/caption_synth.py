"""Generated image-caption data with the structure the pair graph cares about (Section 4.1).

No image-caption data set can be downloaded here, so this writes one from a class-per-folder
image tree (the CIFAR-10 zip): per-image captions that name the class in many ways (a
synonym and a scene drawn per caption, seeded, and the image's own colour read from its
pixels), words shared across classes (colours, and scenes such as "in the grass" or "on the
road"), and two rewrite files that map the captions onto one another:

* ``rewrites_synonym.txt``: "a photo of a <synonym>." (colour and scene dropped), shared
  by every image captioned with that synonym;
* ``rewrites_scene.txt``: "a <class name> <scene>.", shared by every image of a class in
  that scene, whatever its synonym.

Without rewrites almost every caption is its own, so the pair graph has about one component
per image; with both, the synonym and scene groups of a class join into one component per
class. The data is generated: the captions are templates, so it shows whether training,
retrieval and the graph report behave as the theory says on such a graph, not how kinfonce
does on real captions.

    python -m kinfonce.caption_synth --images ../shared/data/cifar10-jpg.zip --pairs 2000 \\
        --out captions-demo            # captions.csv + two rewrite files (image paths in the zip)
    python -m kinfonce.caption_synth ... --layout tar --out pairs.tar   # name.jpg + name.txt
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from kinfonce.data.decode import decode_one
from kinfonce.data.tree import ImageTree
from kinfonce.errors import KinfonceError

#: Names, synonyms and scenes of the CIFAR-10 classes; other class names get themselves as
#: their one synonym and the shared scenes.
VOCABULARY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "airplane": (("airplane", "plane", "aircraft", "jet", "airliner"),
                 ("in the sky", "on a runway", "above the clouds")),
    "automobile": (("car", "automobile", "sedan", "hatchback", "coupe"),
                   ("on the road", "in a parking lot", "on the street")),
    "bird": (("bird", "sparrow", "songbird", "finch", "robin"),
             ("in the sky", "on a branch", "near the water")),
    "cat": (("cat", "kitten", "tabby", "kitty", "house cat"),
            ("on a sofa", "in the grass", "on the street")),
    "deer": (("deer", "fawn", "stag", "doe", "elk"),
             ("in the forest", "in a field", "in the grass")),
    "dog": (("dog", "puppy", "hound", "terrier", "pup"),
            ("in the grass", "on a sofa", "in a field")),
    "frog": (("frog", "toad", "tree frog", "bullfrog", "amphibian"),
             ("near the water", "on a leaf", "in the grass")),
    "horse": (("horse", "pony", "stallion", "mare", "foal"),
              ("in a field", "on a farm", "on the road")),
    "ship": (("ship", "boat", "vessel", "freighter", "ferry"),
             ("on the water", "in a harbour", "near the coast")),
    "truck": (("truck", "lorry", "pickup", "dump truck", "fire truck"),
              ("on the road", "on the street", "in a parking lot")),
}  # fmt: skip
SHARED_SCENES = ("outdoors", "in the grass", "on the road")
#: Hue bands (upper end of the HSV hue, in turns) and their colour words.
HUES = ((0.05, "red"), (0.11, "orange"), (0.18, "yellow"), (0.45, "green"), (0.72, "blue"),
        (0.92, "purple"), (1.0, "red"))  # fmt: skip
TEMPLATES = (
    "a photo of {a} {attribute} {synonym} {scene}.",
    "{a} {attribute} {synonym} {scene}",
    "there is {a} {attribute} {synonym} {scene}.",
    "a picture showing {a} {synonym}, {attribute}, {scene}.",
    "{attribute} {synonym} {scene}",
)
#: Fraction of the images that get a second caption row.
SECOND_CAPTION = 0.1


def colour_word(pixels: np.ndarray) -> str:
    """The colour of an image (3, H, W) uint8 in a word or two, from its mean pixel: black,
    grey or white when nearly unsaturated, else a hue band, "dark" or "bright" before it
    for a dark or bright mean."""
    red, green, blue = pixels.reshape(3, -1).mean(axis=1) / 255
    hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
    if saturation < 0.15:
        return "black" if value < 0.25 else "white" if value > 0.8 else "grey"
    word = next(name for end, name in HUES if hue <= end)
    return f"dark {word}" if value < 0.35 else f"bright {word}" if value > 0.75 else word


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class SyntheticCaptions:
    """Generated rows: image path, caption and class name of each, and the two rewrite
    files' lines (aligned with the rows)."""

    images: list[str]
    captions: list[str]
    labels: list[str]
    rewrites: dict[str, list[str]]


def class_images(tree: ImageTree, split: str = "train") -> dict[str, list[str]]:
    """Class name -> image members of ``<split>/<class>/*`` in a tree."""
    found: dict[str, list[str]] = {}
    for name in tree.names():
        parts = PurePosixPath(name).parts
        if len(parts) == 3 and parts[0] == split and name.lower().endswith((".jpg", ".png")):
            found.setdefault(parts[1], []).append(name)
    if len(found) < 2:
        raise KinfonceError(f"{tree.path}: fewer than 2 classes under {split}/<class>/")
    return found


def generate(
    tree: ImageTree, images: dict[str, list[str]], pairs: int, seed: int = 0
) -> SyntheticCaptions:
    """``pairs`` rows over images of ``tree`` drawn evenly from the classes of ``images``
    (:func:`class_images`; a tenth of the images get a second row). A caption names the
    class by a synonym, the image's colour (:func:`colour_word`) and a scene, synonym, scene
    and template drawn with ``seed``."""
    rng = random.Random(seed)
    classes = sorted(images)
    count = max(len(classes), round(pairs / (1 + SECOND_CAPTION)))
    chosen = [
        (c, image)
        for i, c in enumerate(classes)
        for image in rng.sample(
            sorted(images[c]), count // len(classes) + (i < count % len(classes))
        )
    ]
    rng.shuffle(chosen)
    rows = chosen + [chosen[i] for i in rng.sample(range(len(chosen)), pairs - len(chosen))]
    out = SyntheticCaptions([], [], [], {"rewrites_synonym.txt": [], "rewrites_scene.txt": []})
    colours = {image: colour_word(decode_one(tree.read(image))) for _, image in chosen}
    for c, image in rows:
        synonyms, scenes = VOCABULARY.get(c, ((c.replace("_", " "),), SHARED_SCENES))
        synonym, scene = rng.choice(synonyms), rng.choice(scenes)
        attribute = colours[image]
        caption = rng.choice(TEMPLATES).format(
            a=_article(attribute), attribute=attribute, synonym=synonym, scene=scene
        )
        out.images.append(image)
        out.captions.append(caption)
        out.labels.append(c)
        out.rewrites["rewrites_synonym.txt"].append(f"a photo of {_article(synonym)} {synonym}.")
        name = synonyms[0]
        out.rewrites["rewrites_scene.txt"].append(f"{_article(name)} {name} {scene}.")
    return out


def write_table(data: SyntheticCaptions, out: Path) -> list[Path]:
    """``out/captions.csv`` (columns filepath, title, label) and the rewrite files."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "captions.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title", "label"])
        writer.writerows(zip(data.images, data.captions, data.labels, strict=True))
    for name, lines in data.rewrites.items():
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [out / "captions.csv", *(out / name for name in data.rewrites)]


def write_pairs(data: SyntheticCaptions, tree: ImageTree, out: Path) -> None:
    """The first row of each image as ``NNNNNN.jpg`` + ``.txt`` + ``.cls`` in a folder, a
    .zip or a .tar shard (written with ``webdataset.TarWriter``)."""
    first: dict[str, tuple[str, str]] = {}
    for image, caption, label in zip(data.images, data.captions, data.labels, strict=True):
        first.setdefault(image, (caption, label))
    samples = [
        {"__key__": f"{i:06d}", "jpg": tree.read(image), "txt": caption, "cls": label}
        for i, (image, (caption, label)) in enumerate(first.items())
    ]
    if out.suffix == ".tar":
        import webdataset

        with webdataset.TarWriter(str(out)) as sink:
            for sample in samples:
                sink.write(sample)
        return
    files = {
        f"{s['__key__']}.{ext}": s[ext] if ext == "jpg" else s[ext].encode("utf-8")
        for s in samples
        for ext in ("jpg", "txt", "cls")
    }
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as archive:
            for name, content in files.items():
                archive.writestr(name, content)
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kinfonce.caption_synth", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", required=True, help="class-per-folder tree or zip")
    parser.add_argument("--pairs", type=int, default=2000, help="caption rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("csv", "folder", "zip", "tar"), default="csv")
    parser.add_argument("--out", required=True, help="folder (csv, folder) or file (zip, tar)")
    args = parser.parse_args(argv)
    tree = ImageTree(args.images)
    data = generate(tree, class_images(tree), args.pairs, args.seed)
    if args.layout == "csv":
        for path in write_table(data, Path(args.out)):
            print(f"wrote {path}")
    else:
        write_pairs(data, tree, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
