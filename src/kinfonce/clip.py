"""``kinfonce clip``: image-caption training with the bipartite Kernel-InfoNCE (Section 4).

The module, :class:`kinfonce.methods.clip.ClipMethod`, trains an image encoder and a text
encoder on (image, caption) pairs, one caption drawn uniformly per image and step from the
image's captions (Eq. (6)). The captions are either class-name prompts with optional
rewrites (:mod:`kinfonce.captions`), or the user's own pairs given by ``--captions`` with
aligned ``--rewrite-files`` (:mod:`kinfonce.caption_files`, :mod:`kinfonce.data.captioned`).

Training runs through :func:`kinfonce.train.run_training` like pretraining (same Trainer,
run directory, checkpoints, resume, logs, ``metrics.json``) with :data:`CLIP_JOB`. The final
evaluation adds zero-shot classification to the linear probe and kNN of the same image
encoder: a test image takes the class whose prompt embedding has the largest kernel value
with its own embedding, under the kernel the model was trained with. On the user's own
pairs it adds image-text retrieval recall on the held-out images and the pair graph's
components (:func:`caption_graph_metrics`). :func:`pair_graph_report` describes the pair
graph a run would train on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kinfonce.caption_files import caption_files_sha256
from kinfonce.captions import PairedCaptions, class_captions, shared_captions
from kinfonce.config import ClipConfig
from kinfonce.data import DatasetSplits
from kinfonce.data.batches import PretrainData
from kinfonce.data.captioned import CaptionedSplits, load_caption_splits
from kinfonce.errors import KinfonceError
from kinfonce.evaluate import eval_mode, evaluate_baselines, extract_features
from kinfonce.graph import image_components, images_joined, summarize_pair_graph
from kinfonce.methods.base import data_description
from kinfonce.methods.clip import ClipMethod
from kinfonce.probes import topk_accuracy
from kinfonce.resolve import resolve
from kinfonce.retrieval import retrieval_recall
from kinfonce.train import TrainingJob, load_training_splits, run_training


def training_captions(
    class_names: Sequence[str], labels: Tensor, rewrites: int, seed: int
) -> tuple[PairedCaptions, PairedCaptions]:
    """(the captions of each class, the captions of each training image).

    Both share one caption list; row c of the first is class c's captions, plain prompt
    first; the second gives every image its class's row.
    """
    per_class = class_captions(class_names, rewrites, seed)
    classes = PairedCaptions.from_class_captions(torch.arange(len(per_class)), per_class)
    return classes, classes.select(labels)


def run_captions(
    config: ClipConfig, splits: DatasetSplits
) -> tuple[PairedCaptions, PairedCaptions, PairedCaptions | None]:
    """(class prompts, each training image's captions, each test image's own captions or
    None), over one caption list: the text encoder's.

    On class-labelled data the training images' captions are their class's prompts; on the
    user's own pairs (:class:`CaptionedSplits`) their own captions and rewrites, and the
    class prompts serve zero-shot classification only.
    """
    if not isinstance(splits, CaptionedSplits):
        classes, images = training_captions(
            splits.class_names, splits.train.labels, config.rewrites, config.seed
        )
        return classes, images, None
    prompts = (
        class_captions(splits.class_names, config.rewrites, config.seed)
        if splits.num_classes
        else []
    )
    classes, images, test = shared_captions(
        [prompts, splits.captions["train"].with_rewrites(), splits.captions["test"].own]
    )
    return classes, images, test


def load_clip_splits(config: ClipConfig) -> DatasetSplits:
    """The images of a run: the class-labelled data set of ``--dataset``, or the captioned
    images of ``--captions``."""
    return load_caption_splits(config) if config.captions else load_training_splits(config)


def _build_clip(config: ClipConfig, splits: DatasetSplits) -> tuple[ClipMethod, PretrainData]:
    classes, images, _ = run_captions(config, splits)
    images.check_images(len(splits.train))
    data = {
        **data_description(splits),
        "captions": list(classes.texts),
        "class_captions": classes.options.tolist(),
    }
    module = ClipMethod(config, data)
    return module, PretrainData(
        splits, config.batch_size, config.seed, extra=(images.options, images.counts)
    )


def image_embeddings(
    module: ClipMethod, images: Tensor, device: str, batch_size: int = 256
) -> Tensor:
    """(N, D) embeddings of uint8 images (N, C, H, W) on ``device``. The whole module (image
    and text encoders, class captions) is moved to ``device`` first and stays there: after
    fit, Lightning leaves it on the CPU."""
    module.to(device)
    encoder = nn.Sequential(module.backbone, module.head)
    return extract_features(
        encoder,
        images,
        module.eval_transform,
        batch_size=batch_size,
        device=device,
        to_cpu=False,
    )


def zero_shot_metrics(module: ClipMethod, z: Tensor, labels: Tensor) -> dict[str, float]:
    """Zero-shot top-1/top-5 of labelled images from their embeddings ``z`` (N, D) (see
    :func:`image_embeddings`), with the plain prompts (``zero_shot_*``) and with all
    captions of each class (``zero_shot_ensemble_*``)."""
    metrics = {}
    with eval_mode(module), torch.no_grad():
        for prefix, ensemble in (("zero_shot", False), ("zero_shot_ensemble", True)):
            scores = module.zero_shot(z, ensemble).cpu()
            for key, value in topk_accuracy(scores, labels).items():
                metrics[f"{prefix}_{key}"] = value
    return metrics


def retrieval_metrics(module: ClipMethod, z: Tensor, captions: PairedCaptions) -> dict[str, float]:
    """Recall at 1, 5 and 10 of image-to-text and text-to-image retrieval among held-out
    images, from their embeddings ``z`` (N, D) (see :func:`image_embeddings`), and their own
    captions (N rows of ids into the module's caption list), scored by the training kernel
    (log of the kernel value).

    The candidates are the distinct captions of the N images; a caption shared by several
    images matches each of them."""
    edges = captions.edges()
    ids, column = torch.unique(edges[:, 1], return_inverse=True)
    matches = torch.zeros(len(captions), len(ids), dtype=torch.bool)
    matches[edges[:, 0], column] = True
    with eval_mode(module), torch.no_grad():
        text_z = torch.cat([module.text(chunk.to(z.device)) for chunk in ids.split(1024)])
        kernel = module.kernel
        scores = kernel.log_gram(kernel.normalize(z), kernel.normalize(text_z)).cpu()
    return {
        **retrieval_recall(scores, matches),
        "test_images": len(captions),
        "test_captions": len(ids),
    }


def graph_columns(config: ClipConfig, splits: DatasetSplits) -> list[tuple[str, PairedCaptions]]:
    """The training pair graphs a report compares: (column title, each training image's
    captions), without the rewrites first."""
    if isinstance(splits, CaptionedSplits):
        train = splits.captions["train"]
        return [
            ("own captions", PairedCaptions.from_image_captions(train.own, len(splits.train))),
            (
                "with rewrites",
                PairedCaptions.from_image_captions(train.with_rewrites(), len(splits.train)),
            ),
        ]
    return [
        (
            f"{k} caption(s) per class",
            training_captions(splits.class_names, splits.train.labels, k, config.seed)[1],
        )
        for k in sorted({1, config.rewrites})
    ]


def caption_graph_metrics(columns: Sequence[tuple[str, PairedCaptions]]) -> dict[str, int]:
    """Components of the training pair graph without and with the rewrites (the first and
    last of :func:`graph_columns`), its largest component (vertices), and how many images the
    rewrites joined to images they were apart from (Section 4.1)."""
    (_, own), (_, every) = columns[0], columns[-1]
    own_summary = summarize_pair_graph(own.edges(), len(own), len(own.texts))
    every_summary = summarize_pair_graph(every.edges(), len(every), len(every.texts))
    joined = images_joined(
        image_components(own.edges(), len(own), len(own.texts)),
        image_components(every.edges(), len(every), len(every.texts)),
    )
    return {
        "graph_components": own_summary.components,
        "graph_components_with_rewrites": every_summary.components,
        "graph_largest_component": own_summary.largest_component,
        "graph_largest_component_with_rewrites": every_summary.largest_component,
        "graph_images_joined_by_rewrites": joined,
    }


def evaluate_clip(
    module: ClipMethod, splits: DatasetSplits, config: ClipConfig, device: str
) -> dict[str, Any]:
    """Zero-shot accuracy on the test split beside the linear probe and kNN of the image
    backbone (and the baselines) that ``kinfonce pretrain`` reports; on the user's own
    pairs also retrieval recall on the held-out images and the pair graph's components
    (only these when the pairs have no labels)."""
    metrics: dict[str, Any] = {}
    test_z = image_embeddings(module, splits.test.images, device)
    if splits.num_classes:  # captions without labels have neither probes nor zero-shot
        metrics = evaluate_baselines(module.backbone, splits, config, device)
        metrics.update(zero_shot_metrics(module, test_z, splits.test.labels))
        metrics["captions_per_class"] = config.rewrites
    if isinstance(splits, CaptionedSplits):
        _, _, test = run_captions(config, splits)
        assert test is not None
        metrics.update(retrieval_metrics(module, test_z, test))
        metrics.update(caption_graph_metrics(graph_columns(config, splits)))
    return metrics


#: ``kinfonce clip``.
CLIP_JOB = TrainingJob(_build_clip, evaluate_clip, load_clip_splits)


def with_caption_digest(config: ClipConfig) -> ClipConfig:
    """``config`` with ``captions_sha256`` of its caption files (unchanged without
    ``--captions``).

    Raises:
        KinfonceError: ``config`` gives another digest (e.g. the one a resumed run's
            config.yaml recorded): the files changed since.
    """
    if not config.captions:
        return config
    digest = caption_files_sha256(config.captions, config.rewrite_files)
    if config.captions_sha256 not in (None, digest):
        files = " ".join([config.captions, *config.rewrite_files])
        raise KinfonceError(
            f"captions_sha256: the caption files ({files}) now hash to {digest}, not "
            f"{config.captions_sha256} as the configuration records: --captions or a "
            "--rewrite-files file changed since the run started. Resume with the files it "
            "started with; to train on the changed ones, start a new run in another "
            "--output-dir (with --captions-sha256 none where its --config records a digest)"
        )
    return dataclasses.replace(config, captions_sha256=digest)


def run_clip(
    config: ClipConfig, *, resume: str | None = None, callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """Train, evaluate and write the run directory (:func:`kinfonce.train.run_training`),
    the caption files' digest recorded in the configuration (:func:`with_caption_digest`)."""
    config = with_caption_digest(config)
    return run_training(config, CLIP_JOB, resume=resume, callbacks=callbacks)


def pair_graph_report(config: ClipConfig) -> str:
    """Size, degrees and components of the training pair graph, without and with rewrites.

    Built from the pairs a run of ``config`` trains on (its data set or captions, training
    subset and caption draw), with :func:`kinfonce.graph.summarize_pair_graph`; for the
    user's own pairs, also the images the rewrites joined.
    """
    config = resolve(config)
    splits = load_clip_splits(config)
    columns = graph_columns(config, splits)
    summaries = [
        summarize_pair_graph(images.edges(), len(images), len(images.texts))
        for _, images in columns
    ]

    def degrees(values: tuple[int, float, int]) -> str:
        return f"{values[0]} / {values[1]:.1f} / {values[2]}"

    rows = [
        ("image vertices", lambda s: f"{s.num_a}"),
        ("caption vertices", lambda s: f"{s.num_b}"),
        ("edges", lambda s: f"{s.edges}"),
        ("image degree min / mean / max", lambda s: degrees(s.degree_a)),
        ("caption degree min / mean / max", lambda s: degrees(s.degree_b)),
        ("connected components", lambda s: f"{s.components}"),
        ("largest component (vertices)", lambda s: f"{s.largest_component}"),
        ("isolated vertices", lambda s: f"{s.isolated}"),
    ]
    header = "".join(f"{title:>28}" for title, _ in columns)
    source = config.captions or config.dataset
    lines = [
        f"pair graph of the training pairs of {source} "
        f"({len(splits.train)} images, {splits.num_classes} classes)",
        f"{'':<34}{header}",
    ]
    lines += [f"{label:<34}" + "".join(f"{cell(s):>28}" for s in summaries) for label, cell in rows]
    if isinstance(splits, CaptionedSplits):
        joined = caption_graph_metrics(columns)["graph_images_joined_by_rewrites"]
        lines.append(f"{'images joined by the rewrites':<34}{joined:>56}")
    return "\n".join(lines)
