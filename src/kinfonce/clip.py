"""``kinfonce clip``: image-caption training with the bipartite Kernel-InfoNCE (Section 4).

The image encoder (backbone + projection head of ``kinfonce pretrain``) and a text encoder
(:mod:`kinfonce.text`) are trained together with ``KernelInfoNCE(bipartite=True)`` of any
kernel preset: in a batch of N (image, caption) pairs, every image is an anchor against all
N captions and every caption against all N images (Theorem 4.2: spectral clustering on the
pair graph of the training data). Captions are class-name prompts with optional rewrites,
one drawn uniformly per image and step (Eq. (6)); see :mod:`kinfonce.captions`.

Training runs through :func:`kinfonce.train.run_training` like pretraining (same Trainer,
run directory, checkpoints, resume, logs, ``metrics.json``). The final evaluation adds
zero-shot classification to the linear probe and kNN of the same image encoder: a test
image takes the class whose prompt embedding has the largest kernel value with its own
embedding, under the kernel the model was trained with (:func:`zero_shot_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from kinfonce.captions import PairedCaptions, class_captions, draw_captions
from kinfonce.config import TEXT_ENCODERS, ClipConfig, validate
from kinfonce.data import DatasetSplits
from kinfonce.data.batches import PretrainData
from kinfonce.errors import KinfonceError
from kinfonce.evaluate import evaluate_baselines, extract_features
from kinfonce.graph import summarize_pair_graph
from kinfonce.kernels import MixtureKernel
from kinfonce.losses import LOSS_PRESETS, preset_params
from kinfonce.methods.base import DATA_FIELDS, PretrainMethod, data_description
from kinfonce.probes import topk_accuracy
from kinfonce.report import format_summary
from kinfonce.text import HEADS, build_text_encoder, minilm_missing
from kinfonce.train import TrainingJob, load_training_splits, run_training


def loss_kernel(criterion: nn.Module) -> MixtureKernel:
    """The kernel a loss trains its embeddings for: a ``KernelInfoNCE``'s own, or the
    weighted mixture of the components' kernels for a ``LossMixture`` (Table 2 presets).

    Raises:
        KinfonceError: the loss has no kernel (e.g. the spectral contrastive loss).
    """
    kernel = getattr(criterion, "kernel", None)
    if not isinstance(kernel, MixtureKernel):
        raise KinfonceError(f"the loss {type(criterion).__name__} has no kernel")
    return kernel


def zero_shot_logits(image_z: Tensor, prompt_z: Tensor, kernel: MixtureKernel) -> Tensor:
    """Class scores of images: log of the mean kernel value with each class's prompts.

    With one prompt per class this ranks classes by the kernel value between the image
    and the class prompt, i.e. picks the nearest prompt under the training kernel; with
    several, by their mean kernel value. Embeddings are projected to the unit sphere
    (per part of a concatenation kernel) as the loss does.

    Args:
        image_z: (N, D) image embeddings.
        prompt_z: (C, K, D) embeddings of K prompts for each of C classes.
        kernel: the training kernel (:func:`loss_kernel`).

    Returns:
        (N, C) scores, higher is nearer.
    """
    classes, prompts, dim = prompt_z.shape
    log_k = kernel.log_gram(kernel.normalize(image_z), kernel.normalize(prompt_z.reshape(-1, dim)))
    return torch.logsumexp(log_k.reshape(-1, classes, prompts), dim=2) - math.log(prompts)


class ClipMethod(PretrainMethod):
    """Image encoder and text encoder trained with the bipartite Kernel-InfoNCE.

    Training batches are ``(images, labels, options, counts)``: the captions each image
    may be paired with (:class:`~kinfonce.captions.PairedCaptions`). Every step draws one
    view per image and one caption per image (Eq. (6)), both seeded per step. The online
    probe and ``probe_top1`` are those of every method; ``val_zero_shot_top1`` is the
    zero-shot accuracy on the validation split with the plain prompts.

    The data description adds ``captions`` (the V caption strings) and
    ``class_captions`` (C lists of K caption ids, the plain prompt first).
    """

    kind: ClassVar[str] = "clip"
    loss_options: ClassVar = {"bipartite": True}
    data_fields: ClassVar = (*DATA_FIELDS, "captions", "class_captions")

    def __init__(self, config: ClipConfig, data: dict[str, Any]):
        super().__init__(config, data)
        self.kernel = loss_kernel(self.criterion)
        self.text = build_text_encoder(
            config.text_encoder,
            data["captions"],
            width=config.text_width,
            layers=config.text_layers,
            out_dim=self.head[-1].out_features,
        )
        ids = torch.as_tensor(data["class_captions"], dtype=torch.int64)
        self.register_buffer("class_captions", ids, persistent=False)

    def make_inputs(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(one (B, C, H, W) view per image, (B,) one caption id per image)."""
        images, _, options, counts = batch
        return self.views(images), draw_captions(options, counts)

    def contrastive_step(self, view: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """(bipartite loss of the (image, caption) pairs, (B, F) backbone features)."""
        features = self.backbone(view)
        return self.criterion(self.head(features), self.text(captions)), features

    def trained_modules(self) -> list[nn.Module]:
        return [*super().trained_modules(), self.text]

    def prompt_embeddings(self, ensemble: bool = False) -> Tensor:
        """(C, K, D) embeddings of each class's captions; K = 1 (the plain prompt) unless
        ``ensemble``."""
        ids = self.class_captions if ensemble else self.class_captions[:, :1]
        return self.text(ids.reshape(-1)).reshape(*ids.shape, -1)

    def zero_shot(self, image_z: Tensor, ensemble: bool = False) -> Tensor:
        """(N, D) image embeddings -> (N, C) zero-shot class scores."""
        return zero_shot_logits(image_z, self.prompt_embeddings(ensemble), self.kernel)

    def log_validation(self, features: Tensor, labels: Tensor) -> None:
        super().log_validation(features, labels)
        logits = self.zero_shot(self.head(features))
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log(
            "val_zero_shot_top1",
            accuracy,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(labels),
        )


def check_clip_config(config: ClipConfig) -> None:
    """Raise a KinfonceError naming the field for what ``kinfonce clip`` adds to
    :func:`kinfonce.config.validate`."""
    if "bipartite" not in preset_params(config.loss):
        kernels = sorted(n for n in LOSS_PRESETS if "bipartite" in preset_params(n))
        raise KinfonceError(
            f"loss {config.loss!r} has no bipartite (CLIP) form; choose a Kernel-InfoNCE "
            f"preset: {', '.join(kernels)}"
        )
    if config.unlabeled:
        raise KinfonceError(
            "unlabeled must be false for kinfonce clip: its captions come from class labels"
        )
    if config.text_encoder not in TEXT_ENCODERS:
        raise KinfonceError(
            f"text_encoder must be one of {sorted(TEXT_ENCODERS)}, got {config.text_encoder!r}"
        )
    if config.rewrites < 1:
        raise KinfonceError(
            f"rewrites must be >= 1 (captions per class; 1 is the plain prompt only), "
            f"got {config.rewrites}"
        )
    for field in ("text_width", "text_layers"):
        if getattr(config, field) < 1:
            raise KinfonceError(f"{field} must be >= 1, got {getattr(config, field)}")
    if config.text_encoder == "small" and config.text_width % HEADS:
        raise KinfonceError(
            f"text_width must be a multiple of {HEADS} (the attention heads of the small text "
            f"encoder), got {config.text_width}"
        )
    missing = minilm_missing() if config.text_encoder == "minilm" else None
    if missing:
        raise KinfonceError(missing)


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
    (``zero_shot_*``) and with all captions of each class (``zero_shot_ensemble_*``)."""
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
CLIP_JOB = TrainingJob("clip", _build_clip, evaluate_clip, check=check_clip_config)


def run_clip(
    config: ClipConfig, *, resume: str | None = None, callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """Train, evaluate and write the run directory (:func:`kinfonce.train.run_training`)."""
    return run_training(config, CLIP_JOB, resume=resume, callbacks=callbacks)


def format_clip_summary(metrics: dict[str, Any]) -> str:
    """The table of :func:`kinfonce.train.format_summary` and the zero-shot accuracy."""
    return "\n".join(
        [
            format_summary(metrics),
            f"zero-shot top-1 (plain prompt):                {metrics['zero_shot_top1']:.4f}",
            f"zero-shot top-1 (all captions of each class):  {metrics['zero_shot_ensemble_top1']:.4f}",
        ]
    )


def pair_graph_report(config: ClipConfig) -> str:
    """Size, degrees and components of the training pair graph, without and with rewrites.

    Built from the pairs a run of ``config`` trains on (its data set, training subset and
    caption draw), with :func:`kinfonce.graph.summarize_pair_graph`.
    """
    check_clip_config(config.resolved())
    config = validate(config)
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
