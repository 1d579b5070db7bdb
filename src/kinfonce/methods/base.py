"""The LightningModule every pretraining method builds on.

It owns what the methods share (in the manner of solo-learn's base method): the
backbone and projection head (Appendix B), the loss built by preset name, the views
made on the training device, the optimiser with its per-step warm-up/cosine schedule,
and the online linear probe. The probe is a linear classifier trained on detached
backbone features of the first view with the training labels; its accuracy on the
labelled validation split is logged every epoch as ``probe_top1`` (the metric the
paper's tuner maximises, Appendix B). Subclasses implement :meth:`contrastive_step`,
and may draw other inputs than two views (:meth:`make_inputs`), train more modules
(:meth:`trained_modules`) and log more validation metrics (:meth:`log_validation`).

Nothing in a training step waits for the GPU: a non-finite loss is recorded on the
device and checked every :data:`DIVERGENCE_CHECK_EVERY` steps and at the end of every
epoch, before validation and checkpoints, where it stops the run (every process of it)
with a :class:`~kinfonce.errors.DivergedError` that names the first bad step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kinfonce.config import TrainConfig
from kinfonce.data.augment import EvalTransform, SimCLRViews
from kinfonce.errors import DivergedError, KinfonceError
from kinfonce.losses import preset_params
from kinfonce.models import ProjectionHead, build_backbone
from kinfonce.optim import build_optimizer, parameter_groups, warmup_cosine
from kinfonce.resolve import build_loss
from kinfonce.scoped import torch_seeded
from kinfonce.weights import load_initial_weights

#: Key under which a checkpoint stores the config and data description.
CHECKPOINT_KEY = "kinfonce"

#: Fields of the data description a method needs (from ``DatasetSplits``).
DATA_FIELDS = ("image_size", "channels", "num_classes", "mean", "std")

#: Training steps between checks that the loss is finite (each check waits for the GPU).
DIVERGENCE_CHECK_EVERY = 50


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed for (run seed, training step, rank), independent across the three."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class PretrainMethod(L.LightningModule):
    """Base of the pretraining methods.

    Args:
        config: the run configuration, resolved by :func:`kinfonce.resolve.resolve` (its
            values are not checked again here).
        data: the data description, keys :attr:`data_fields` (plain values).

    Batches are ``(images, labels, ...)`` with images uint8 (B, C, H, W) and labels int64
    (B,), then whatever :meth:`make_inputs` of a subclass reads.
    """

    #: Keys of the data description the method is built from (stored in checkpoints).
    data_fields: ClassVar[tuple[str, ...]] = DATA_FIELDS

    def __init__(self, config: TrainConfig, data: dict[str, Any]):
        super().__init__()
        missing = [key for key in self.data_fields if key not in data]
        if missing:
            raise KinfonceError(f"data description lacks {missing}; needs {list(self.data_fields)}")
        self.config = config
        self.data_info = {key: data[key] for key in self.data_fields}
        self.criterion = build_loss(config)
        self.backbone = build_backbone(
            config.backbone,
            in_channels=data["channels"],
            image_size=data["image_size"],
            stem=config.stem,
        )
        if config.init_weights is not None:  # before MoCo copies the backbone
            load_initial_weights(self.backbone, config.init_weights)
        self.head = ProjectionHead(
            self.backbone.feature_dim,
            config.proj_hidden_dim,
            config.proj_out_dim,
            batch_norm=config.proj_batch_norm,
        )
        if config.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # No classes (a caption set without labels): no probe, nothing logged for it.
        self.probe = (
            nn.Linear(self.backbone.feature_dim, data["num_classes"])
            if data["num_classes"]
            else None
        )
        self.views = SimCLRViews(
            data["image_size"],
            data["mean"],
            data["std"],
            jitter_strength=config.jitter_strength,
            blur=config.blur,
            crop_scale=(config.crop_scale_min, 1.0),
            flip_p=config.flip_p,
        )
        self.eval_transform = EvalTransform(data["mean"], data["std"])
        # The global step at which the loss was first not finite, -1 while it has been; made on
        # the loss's device at the first step. Not a buffer: DDP broadcasts rank 0's buffers
        # before every forward pass, which would erase a record made on another rank.
        self._first_nonfinite: torch.Tensor | None = None
        self._compiled_embed = None

    def make_inputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The random inputs of :meth:`contrastive_step`: two views of the batch's images."""
        return self.views.pair(batch[0])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) backbone features and (B, D) projections of float views (B, C, H, W), through
        ``torch.compile`` when the config asks for it (compiled at the first call)."""
        if self.config.compile:
            if self._compiled_embed is None:
                self._compiled_embed = torch.compile(self._embed)
            return self._compiled_embed(images)
        return self._embed(images)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        return features, self.head(features)

    def contrastive_step(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one batch.

        Args:
            inputs: from :meth:`make_inputs`; here view0, view1, (B, C, H, W) float views
                of the same images.

        Returns:
            (scalar loss, (B, F) backbone features of the first view for the probe).
        """
        raise NotImplementedError

    def trained_modules(self) -> list[nn.Module]:
        """The modules the contrastive loss trains."""
        return [self.backbone, self.head]

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int):
        labels = batch[1]
        # The inputs draw from the generator of the module's device, seeded here per (step,
        # rank) inside a fork that restores it: a resumed run draws the same views as an
        # uninterrupted one, whatever else used the generator in between (data-loader set-up
        # does). They are made in float32 outside the autocast that mixed precision runs this
        # step in (the blur is a convolution, which autocast would run in half precision).
        seed = step_seed(self.config.seed, self.global_step, self.global_rank)
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, enabled=False),
            torch_seeded(seed, self.device),
        ):
            inputs = self.make_inputs(batch)
        loss, features = self.contrastive_step(*inputs)
        self._record_nonfinite(loss.detach())
        size = len(labels)
        self.log(
            "train_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=size,
        )
        if self.probe is None:
            return loss
        # Unlabelled images (label -1, e.g. STL-10's unlabelled split) train no probe; masked
        # rather than indexed, so that nothing waits for the GPU.
        labelled = (labels >= 0).float()
        per_image = F.cross_entropy(
            self.probe(features.detach()), labels.clamp_min(0), reduction="none"
        )
        probe_loss = (per_image * labelled).sum() / labelled.sum().clamp_min(1.0)
        self.log(
            "probe_train_loss",
            probe_loss,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=size,
        )
        return loss + probe_loss

    def _record_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep the first step with a non-finite loss, on the device (nothing waits for it)."""
        first = self._first_nonfinite
        if first is None or first.device != loss.device:
            first = self._first_nonfinite = torch.full((), -1, device=loss.device)
        bad = ~torch.isfinite(loss) & (first < 0)
        first.copy_(torch.where(bad, self.global_step, first))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every :data:`DIVERGENCE_CHECK_EVERY` steps and at the epoch's last batch (before
        validation and checkpoints): stop a run whose loss was not finite."""
        if (batch_idx + 1) % DIVERGENCE_CHECK_EVERY == 0 or self.trainer.is_last_batch:
            self.check_finite_loss()

    def check_finite_loss(self) -> None:
        """Raise a DivergedError if a training step since the start had a non-finite loss, on
        this process or any other: the first such step over all processes, so that all stop
        together (a process that stopped alone would leave the others waiting for it, and a
        NaN seen by one only, as MoCo's ungathered queries can, would stop none)."""
        first = self._first_nonfinite
        if first is None:  # no step yet
            first = torch.full((), -1, device=self.device)
        never = torch.iinfo(first.dtype).max
        step = int(self.trainer.strategy.reduce(first.where(first >= 0, never), reduce_op="min"))
        if step != never:
            raise DivergedError(
                f"the {self.config.loss!r} loss was not finite at training step {step} "
                f"(epoch {self.current_epoch}); {divergence_advice(self.config.loss)}"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        self.log_validation(self.backbone(self.eval_transform(images)), labels)

    def log_validation(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Log the validation metrics of (B, F) backbone features: here ``probe_top1``
        (nothing without classes)."""
        if self.probe is None:
            return
        logits = self.probe(features)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log(
            "probe_top1",
            accuracy,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(labels),
        )

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.config
        # The contrastive loss trains backbone and head; the probe has its own rate.
        groups = parameter_groups(
            nn.ModuleList(self.trained_modules()),
            cfg.weight_decay,
            exclude_bn_bias=cfg.exclude_bn_bias,
        )
        if self.probe is not None:
            groups.append(
                {
                    "params": list(self.probe.parameters()),
                    "weight_decay": 0.0,
                    "lars_adapt": False,
                    "lr": cfg.probe_lr,
                }
            )
        optimizer = build_optimizer(
            cfg.optimizer,
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(round(cfg.warmup_epochs * total / max(1, cfg.epochs)), total - 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        """Set each learning rate to the schedule's value at the current step.

        A no-op for a new run or an ordinary resume; when a resumed run trains for more
        epochs than before, the restored optimiser still holds the old schedule's last rate,
        which the recomputed (stretched) schedule replaces from the first step on.
        """
        schedule = self.lr_schedulers()
        for group, base, factor in zip(
            schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(schedule.last_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain types only, so that checkpoints load with torch.load(weights_only=True).
        checkpoint[CHECKPOINT_KEY] = {
            "kind": self.config.command,
            "config": self.config.to_dict(),
            "data": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_info.items()},
            # how torchvision or timm alone rebuild the backbone (kinfonce.rebuild)
            "backbone_recipe": self.backbone.recipe,
        }


def data_description(splits: Any) -> dict[str, Any]:
    """The plain-valued facts about a data set that a method is built from."""
    return {key: getattr(splits, key) for key in DATA_FIELDS}


def divergence_advice(loss: str) -> str:
    """What to change when the loss became non-finite, naming only what ``loss`` takes."""
    takes = preset_params(loss)
    temperatures = [p for p in takes if p.startswith("temperature")]
    flags = " or ".join(f"--{p}" for p in temperatures)
    advice = "lower --lr" + (" or --mu" if "mu" in takes else "")
    return advice + (f" or raise the temperature ({flags})" if temperatures else "")
