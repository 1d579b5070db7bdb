"""``kinfonce clip``: image-caption training with the bipartite Kernel-InfoNCE (Section 4).

The module, :class:`kinfonce.methods.clip.ClipMethod`, trains an image encoder and a text
encoder on (image, caption) pairs. Captions are class-name prompts with optional rewrites,
one drawn uniformly per image and step (Eq. (6)); see :mod:`kinfonce.captions`.

Training runs through :func:`kinfonce.train.run_training` like pretraining (same Trainer,
run directory, checkpoints, resume, logs, ``metrics.json``) with :data:`CLIP_JOB`. The final
evaluation adds zero-shot classification to the linear probe and kNN of the same image
encoder: a test image takes the class whose prompt embedding has the largest kernel value
with its own embedding, under the kernel the model was trained with.
:func:`pair_graph_report` describes the pair graph a run would train on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kinfonce.captions import PairedCaptions, class_captions
from kinfonce.config import ClipConfig
from kinfonce.data import DatasetSplits
from kinfonce.data.batches import PretrainData
from kinfonce.evaluate import evaluate_baselines, extract_features
from kinfonce.graph import summarize_pair_graph
from kinfonce.methods.base import data_description
from kinfonce.methods.clip import ClipMethod
from kinfonce.probes import topk_accuracy
from kinfonce.resolve import resolve
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


def _build_clip(config: ClipConfig, splits: DatasetSplits) -> tuple[ClipMethod, PretrainData]:
    classes, images = training_captions(
        splits.class_names, splits.train.labels, config.rewrites, config.seed
    )
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


def zero_shot_metrics(
    module: ClipMethod, images: Tensor, labels: Tensor, device: str, batch_size: int = 256
) -> dict[str, float]:
    """Zero-shot top-1/top-5 of labelled uint8 images (N, C, H, W), with the plain prompts
    (``zero_shot_*``) and with all captions of each class (``zero_shot_ensemble_*``).

    The whole module (image and text encoders, class captions) is moved to ``device`` first
    and stays there: after fit, Lightning leaves it on the CPU."""
    module.to(device)
    encoder = nn.Sequential(module.backbone, module.head)
    z = extract_features(
        encoder, images, module.eval_transform, batch_size=batch_size, device=device
    )
    metrics = {}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for prefix, ensemble in (("zero_shot", False), ("zero_shot_ensemble", True)):
                scores = module.zero_shot(z.to(device), ensemble).cpu()
                for key, value in topk_accuracy(scores, labels).items():
                    metrics[f"{prefix}_{key}"] = value
    finally:
        module.train(was_training)
    return metrics


def evaluate_clip(
    module: ClipMethod, splits: DatasetSplits, config: ClipConfig, device: str
) -> dict[str, Any]:
    """Zero-shot accuracy on the test split beside the linear probe and kNN of the image
    backbone (and the baselines) that ``kinfonce pretrain`` reports."""
    metrics = evaluate_baselines(module.backbone, splits, config, device)
    metrics.update(zero_shot_metrics(module, splits.test.images, splits.test.labels, device))
    metrics["captions_per_class"] = config.rewrites
    return metrics


#: ``kinfonce clip``.
CLIP_JOB = TrainingJob(_build_clip, evaluate_clip)


def run_clip(
    config: ClipConfig, *, resume: str | None = None, callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """Train, evaluate and write the run directory (:func:`kinfonce.train.run_training`)."""
    return run_training(config, CLIP_JOB, resume=resume, callbacks=callbacks)


def pair_graph_report(config: ClipConfig) -> str:
    """Size, degrees and components of the training pair graph, without and with rewrites.

    Built from the pairs a run of ``config`` trains on (its data set, training subset and
    caption draw), with :func:`kinfonce.graph.summarize_pair_graph`.
    """
    config = resolve(config)
    splits = load_training_splits(config)
    columns = sorted({1, config.rewrites})
    summaries = []
    for rewrites in columns:
        _, images = training_captions(
            splits.class_names, splits.train.labels, rewrites, config.seed
        )
        summaries.append(summarize_pair_graph(images.edges(), len(images), len(images.texts)))

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
    header = "".join(f"{f'{k} caption(s) per class':>28}" for k in columns)
    lines = [
        f"pair graph of the training pairs of {config.dataset} "
        f"({len(splits.train)} images, {splits.num_classes} classes)",
        f"{'':<34}{header}",
    ]
    lines += [f"{label:<34}" + "".join(f"{cell(s):>28}" for s in summaries) for label, cell in rows]
    return "\n".join(lines)
