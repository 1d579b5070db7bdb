"""The image-caption method of ``kinfonce clip``: bipartite Kernel-InfoNCE (Section 4).

The image encoder (backbone + projection head of the other methods) and a text encoder
(:mod:`kinfonce.text`) are trained together with ``KernelInfoNCE(bipartite=True)`` of any
kernel preset: in a batch of N (image, caption) pairs, every image is an anchor against all
N captions and every caption against all N images (Theorem 4.2: spectral clustering on the
pair graph of the training data). Zero-shot classification scores a test image against the
class prompts under the kernel the model was trained with (:func:`zero_shot_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kinfonce.captions import draw_captions
from kinfonce.config import ClipConfig
from kinfonce.errors import KinfonceError
from kinfonce.kernels import MixtureKernel
from kinfonce.methods.base import DATA_FIELDS, PretrainMethod
from kinfonce.text import build_text_encoder


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
        """(bipartite loss of the (image, caption) pairs, (B, F) backbone features); the images
        go through :meth:`embed`, as every method's do (memory format, compilation)."""
        features, image_z = self.embed(view)
        return self.criterion(image_z, self.text(captions)), features

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
        if self.class_captions.numel() == 0:  # no classes, no zero-shot
            return
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
