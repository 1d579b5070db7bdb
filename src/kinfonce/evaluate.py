"""Frozen encoders and checkpoints -> features -> probes -> metrics.

:func:`evaluate_encoders` extracts features of a :class:`kinfonce.data.DatasetSplits` once
per encoder, keeps them on the device, and runs the tensor-level protocols of
:mod:`kinfonce.probes` on them, training the linear heads of all encoders in the same steps;
:func:`evaluate_encoder` does it for one. The end of ``kinfonce pretrain`` (the encoder and
its baselines) and ``kinfonce eval`` both go through it, so their numbers agree.
:func:`linear_probe_augmented` is the slow variant that keeps the encoder in the loop and
crops and flips every training batch. :func:`evaluate_checkpoint` does the same for a
``kinfonce pretrain`` or ``clip`` checkpoint, with the backbone in the memory format and on
the device its run used (:func:`kinfonce.models.place_backbone`, as the end of the run
does), so that it gives the figures the run printed; :func:`write_eval_outputs` writes them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kinfonce.checkpoints import load_encoder
from kinfonce.config import EvalSettings, TrainConfig
from kinfonce.data import load_dataset
from kinfonce.data.augment import EvalTransform
from kinfonce.data.crop import padded_crops
from kinfonce.data.datasets import TREE_DATASETS
from kinfonce.data.decode import DEFAULT_RESIZE
from kinfonce.errors import KinfonceError
from kinfonce.fileio import write_text_atomic
from kinfonce.models import build_backbone, place_backbone
from kinfonce.plots import plot_feature_map
from kinfonce.probes import (
    LinearProbeSettings,
    check_features,
    fit_linear_head,
    knn_classify,
    linear_probes,
    score_head,
    standardizer,
)
from kinfonce.resolve import CAPTIONS_DATASET
from kinfonce.scoped import progress_bars, torch_seeded
from kinfonce.tables import ENCODER_NAMES

PROTOCOLS = ("linear", "knn", "both")


def describe_expected_input(encoder: nn.Module) -> str:
    """Describe the input that the first convolution or linear layer of ``encoder`` takes."""
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            plural = "" if module.in_channels == 1 else "s"
            return f"images with {module.in_channels} channel{plural}"
        if isinstance(module, nn.Linear):
            return f"inputs with {module.in_features} values per sample (C * H * W)"
    return "an input shape it does not declare"


def extract_features(
    encoder: nn.Module,
    images_uint8: Tensor,
    transform: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
    to_cpu: bool = True,
) -> Tensor:
    """Encode images with a frozen encoder, deterministically and without gradients.

    The encoder runs in eval mode under ``torch.no_grad`` (not inference mode, so the
    returned tensor may feed a trainable head); its previous mode is restored afterwards.

    Args:
        encoder: module mapping a (B, C, H, W) float batch to (B, F) features (any
            trailing dimensions are flattened).
        images_uint8: (N, C, H, W) uint8 images.
        transform: deterministic map from a uint8 batch to the encoder's float input,
            e.g. :class:`kinfonce.data.augment.EvalTransform`.
        batch_size: images per forward pass.
        device: device to run the encoder on.
        progress: show a progress bar.
        desc: its label.
        to_cpu: return the features on the CPU; else they stay on ``device``.

    Returns:
        (N, F) float32 features, with ``requires_grad`` False.

    Raises:
        ValueError: on a wrong image tensor, when the encoder cannot take these images,
            or when it produces non-finite features.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise KinfonceError(
            f"images_uint8 must be a uint8 tensor (N, C, H, W), got dtype "
            f"{images_uint8.dtype} and shape {tuple(images_uint8.shape)}"
        )
    if batch_size < 1:
        raise KinfonceError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    with eval_mode(encoder), torch.no_grad():
        starts = range(0, images_uint8.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            batch = transform(images_uint8[start : start + batch_size].to(device))
            chunks.append(_encode(encoder, batch).float())
    features = torch.cat(chunks) if chunks else torch.empty(0, 0)
    if not torch.isfinite(features).all():
        raise KinfonceError("the encoder produced non-finite features (NaN or inf)")
    return features.cpu() if to_cpu else features


@contextlib.contextmanager
def eval_mode(encoder: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block; the encoder's previous mode is restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    try:
        yield encoder
    finally:
        encoder.train(was_training)


def _encode(encoder: nn.Module, batch: Tensor) -> Tensor:
    return encoder(batch).flatten(1)


def crop_padding(image_size: int) -> int:
    """Reflection padding of the augmented probe's random crops: an eighth of the image side
    (4 px for CIFAR's 32), at least 1."""
    return max(1, image_size // 8)


def linear_probe_augmented(
    encoder: nn.Module,
    train_images: Tensor,
    train_y: Tensor,
    test_images: Tensor,
    test_y: Tensor,
    transform: Callable[[Tensor], Tensor],
    *,
    num_classes: int,
    settings: LinearProbeSettings | None = None,
    device: str | torch.device = "cpu",
    feature_batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Linear evaluation with training augmentation and the frozen encoder in the loop.

    Every training batch is normalized by ``transform``, randomly cropped (reflection padding
    :func:`crop_padding`) and flipped per sample (:func:`kinfonce.data.crop.padded_crops`),
    and encoded again by the frozen encoder (eval
    mode, no gradients); the head is trained as in :func:`kinfonce.probes.linear_probe`, with features
    standardized by the statistics of the un-augmented training features. Test features
    are extracted once without augmentation.

    Args:
        encoder: frozen feature extractor, (B, C, H, W) -> (B, F).
        train_images: (N, C, H, W) uint8. train_y: (N,) labels.
        test_images: (M, C, H, W) uint8. test_y: (M,) labels.
        transform: deterministic uint8 -> float map (e.g. ``EvalTransform``).
        settings: SGD settings (default: Appendix B's); ``settings.seed`` also seeds the
            crops and flips.

    Returns:
        ``{"top1": float, "top5": float}`` test accuracy as fractions.
    """
    extract = dict(batch_size=feature_batch_size, device=device, progress=progress, to_cpu=False)
    train_x = extract_features(encoder, train_images, transform, desc="train features", **extract)
    test_x = extract_features(encoder, test_images, transform, desc="test features", **extract)
    check_features(train_x, train_y, test_x, test_y, num_classes)
    norm = standardizer(train_x)
    padding = crop_padding(train_images.shape[-1])

    def augmented_features(idx: Tensor) -> Tensor:
        with torch.no_grad():
            batch = padded_crops(transform(train_images[idx].to(device)), padding)
            return norm(_encode(encoder, batch))

    settings = settings or LinearProbeSettings()
    with eval_mode(encoder), torch_seeded(settings.seed, device):  # the crops draw on device
        head = fit_linear_head(
            augmented_features,
            train_y,
            train_x.shape[1],
            num_classes=num_classes,
            settings=settings,
            device=device,
            progress=progress,
        )
    return score_head(head, norm(test_x), test_y)


def evaluate_encoders(
    encoders: Mapping[str, nn.Module],
    splits: Any,
    *,
    protocol: str = "both",
    linear_epochs: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    augment: bool = False,
    linear_lr: float = 0.3,
    linear_batch_size: int = 64,
    linear_weight_decay: float = 1e-6,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    transform: Callable[[Tensor], Tensor] | None = None,
    dataset_name: str | None = None,
    progress: bool = False,
    return_features: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate frozen encoders: train on ``splits.train``, report on ``splits.test``.

    Features are extracted once per encoder and stay on ``device``; the linear heads of all
    encoders train in the same steps (:func:`kinfonce.probes.linear_probes`), each with the
    result it would get alone.

    Args:
        encoders: name -> (B, C, H, W) to (B, F) feature extractor (a backbone, no projection
            head), e.g. ``{"": backbone, "raw_pixels_": nn.Flatten()}``.
        splits: a :class:`kinfonce.data.DatasetSplits` (fields train, test, num_classes,
            mean, std).
        protocol: "linear", "knn" or "both".
        linear_epochs: epochs of the linear probe (Appendix B: 100).
        seed: seeds the linear probe.
        device: device for the encoders and the probes.
        batch_size: images per forward pass during feature extraction.
        augment: train each linear head with crop/flip augmentation and its encoder in the
            loop (slow, :func:`linear_probe_augmented`) instead of on cached features.
        linear_lr, linear_batch_size, linear_weight_decay: linear-probe SGD settings.
        knn_k, knn_temperature: kNN settings.
        transform: uint8 -> float input map; default ``EvalTransform(splits.mean, splits.std)``.
        dataset_name: named in the error raised when the images do not fit an encoder
            (default ``splits.name``).
        progress: show progress bars.
        return_features: also return the test features (M, F) on the CPU under
            ``"test_features"``.

    Returns:
        Per encoder name: ``linear_top1``, ``linear_top5`` (protocol linear/both) and
        ``knn_top1``, ``knn_top5`` (knn/both), fractions in [0, 1], plus ``feature_dim``.

    Raises:
        ValueError: on an unknown protocol or images that do not fit an encoder.
    """
    if protocol not in PROTOCOLS:
        raise KinfonceError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if transform is None:
        transform = EvalTransform(splits.mean, splits.std).to(device)
    name = dataset_name or getattr(splits, "name", "") or None
    extract = dict(batch_size=batch_size, device=device, progress=progress, to_cpu=False)
    features = {}
    for key, encoder in encoders.items():
        check_encoder_fits(encoder, splits.test.images, transform, name, device)
        label = ENCODER_NAMES.get(key, key.strip("_").replace("_", " "))
        features[key] = tuple(
            extract_features(encoder, part.images, transform, desc=f"{label}: {split}", **extract)
            for split, part in (("train features", splits.train), ("test features", splits.test))
        )
    train_y, test_y, k = splits.train.labels, splits.test.labels, splits.num_classes
    metrics: dict[str, dict[str, Any]] = {
        key: {"feature_dim": train_x.shape[1]} for key, (train_x, _) in features.items()
    }
    if protocol in ("linear", "both"):
        settings = LinearProbeSettings(
            epochs=linear_epochs,
            lr=linear_lr,
            batch_size=linear_batch_size,
            weight_decay=linear_weight_decay,
            seed=seed,
        )
        run = dict(num_classes=k, settings=settings, progress=progress)
        if augment:
            images = (splits.train.images, train_y, splits.test.images, test_y)
            results = [
                linear_probe_augmented(
                    encoder, *images, transform, **run, device=device, feature_batch_size=batch_size
                )
                for encoder in encoders.values()
            ]
        else:
            train_xs = [train_x for train_x, _ in features.values()]
            test_xs = [test_x for _, test_x in features.values()]
            results = linear_probes(train_xs, train_y, test_xs, test_y, **run)
        for key, result in zip(features, results, strict=True):
            metrics[key].update(linear_top1=result["top1"], linear_top5=result["top5"])
    for key, (train_x, test_x) in features.items():
        if protocol in ("knn", "both"):
            result = knn_classify(
                train_x,
                train_y,
                test_x,
                test_y,
                num_classes=k,
                k=knn_k,
                temperature=knn_temperature,
            )
            metrics[key].update(knn_top1=result["top1"], knn_top5=result["top5"])
        if return_features:
            metrics[key]["test_features"] = test_x.cpu()
    return metrics


def evaluate_encoder(encoder: nn.Module, splits: Any, **options: Any) -> dict[str, Any]:
    """Evaluate one frozen encoder: the metrics of :func:`evaluate_encoders` of
    ``{"": encoder}``, with the same keyword arguments (``options``)."""
    return evaluate_encoders({"": encoder}, splits, **options)[""]


def check_encoder_fits(
    encoder: nn.Module,
    images_uint8: Tensor,
    transform: Callable[[Tensor], Tensor],
    dataset_name: str | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Run two images through the encoder; raise a KinfonceError naming the data set if they
    do not fit it. Out-of-memory and other failures keep their own type and traceback."""
    batch = transform(images_uint8[:2].to(device))
    try:
        with eval_mode(encoder), torch.no_grad():
            encoder(batch)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise KinfonceError(
            f"{dataset_name or 'the data set'} does not fit the encoder: it cannot take input of "
            f"shape {tuple(batch.shape[1:])} (C, H, W); it expects "
            f"{describe_expected_input(encoder)}. Original error: {err}"
        ) from err


def _check_data_fits_checkpoint(splits: Any, config: dict[str, Any], path: str) -> None:
    got = (splits.channels, splits.image_size)
    want = (config["data"]["channels"], config["data"]["image_size"])
    if got != want:
        raise KinfonceError(
            f"data set {splits.name!r} has {got[0]}x{got[1]}x{got[1]} images (C x H x W) but the "
            f"encoder in {path!r} was trained on {config['dataset']!r} with "
            f"{want[0]}x{want[1]}x{want[1]} images; choose a --dataset with that image shape"
        )


def run_image_size(config: dict[str, Any]) -> int | None:
    """The image side an image tree is decoded at to evaluate a run on its own data set: the
    run's ``image_size``; for a run pretrained with its unlabelled images (whose most common
    size decided the side), the side its encoder was built for (recorded with the
    checkpoint): say labelled 32 px images beside more unlabelled 48 px ones, decoded at 48
    by pretraining. Otherwise None, as pretraining decoded it (and its cache entry serves)."""
    if config["image_size"] is not None or not config["dataset"].startswith(TREE_DATASETS):
        return config["image_size"]
    return config["data"]["image_size"] if config["unlabeled"] else None


def check_device(device: str) -> None:
    """Refuse a torch device this machine does not have, before any work.

    Raises:
        KinfonceError: naming the device and what this machine has.
    """
    kind, _, index = device.partition(":")
    modules = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None)}
    if kind == "mps":
        count = int(torch.backends.mps.is_available())
    elif kind in modules:
        module = modules[kind]
        count = module.device_count() if module is not None and module.is_available() else 0
    else:
        return
    if int(index or 0) >= count:
        has = f"{count} {kind} device(s)" if count else f"no {kind} device"
        raise KinfonceError(
            f"device {device!r} is not on this machine, which has {has}; use --device cpu "
            "or leave --device unset"
        )


def eval_device(accelerator: str) -> tuple[str, str]:
    """The torch device ``kinfonce eval`` uses by default for a run trained on ``accelerator``,
    and why: the run's own kind of device where this machine has one, else the CPU."""
    if accelerator in ("gpu", "cuda"):
        if torch.cuda.is_available():
            return "cuda", f"the run's accelerator, {accelerator}"
        return "cpu", f"the run trained on {accelerator}, which this machine lacks"
    if accelerator == "mps":
        if torch.backends.mps.is_available():
            return "mps", "the run's accelerator, mps"
        return "cpu", "the run trained on mps, which this machine lacks"
    return "cpu", f"the run's accelerator, {accelerator}"


def evaluate_checkpoint(
    checkpoint: str | Path, settings: EvalSettings | None = None
) -> tuple[dict[str, Any], Any]:
    """Evaluate the backbone of a ``kinfonce pretrain`` or ``clip`` checkpoint.

    Settings left at None come from the checkpoint's config, and on the checkpoint's own
    data set the same seeded training subset is used. The backbone runs in the memory format
    its run used, on its kind of device where this machine has one, so that without
    ``augment`` the figures equal those that the run printed for its last checkpoint.

    Args:
        checkpoint: a ``.ckpt`` file from ``RUN_DIR/checkpoints``.
        settings: what to evaluate and how (:class:`kinfonce.config.EvalSettings`; default:
            all from the run). ``data_root`` defaults to the run's when the data set is the
            run's; the run's ``download`` carries over to its own data set.

    Returns:
        (metrics of :func:`evaluate_encoder` with ``test_features`` (M, F), the settings
        used and ``device``, the :class:`kinfonce.data.DatasetSplits` evaluated on).

    Raises:
        MissingFileError: no checkpoint or data.
        KinfonceError: not a kinfonce checkpoint, a corrupt file, or a data set whose image
            shape does not fit the encoder.
    """
    settings = settings or EvalSettings()
    if settings.device:
        check_device(settings.device)
    encoder, config = load_encoder(checkpoint)
    own_data = settings.dataset is None or settings.dataset == config["dataset"]
    name = config["dataset"] if settings.dataset is None else settings.dataset
    if name == CAPTIONS_DATASET:
        raise KinfonceError(
            f"{checkpoint} was trained on the image-caption pairs of {config.get('captions')!r}; "
            "kinfonce eval probes a backbone on a labelled data set: choose one with --dataset "
            "(the run's own retrieval recall is in its metrics.json)"
        )
    seed = config["seed"] if settings.seed is None else settings.seed
    with progress_bars(settings.progress):
        splits = load_dataset(
            name,
            root=settings.data_root or (config["data_root"] if own_data else None),
            download=settings.download or (bool(config["download"]) and own_data),
            val_fraction=config["val_fraction"],
            seed=config["seed"],
            image_size=run_image_size(config) if own_data else None,
            resize=config["resize"] if own_data else DEFAULT_RESIZE,
        )
    _check_data_fits_checkpoint(splits, config, str(checkpoint))
    if own_data:  # the training subset pretraining used, hence its probe's figures
        splits = splits.with_train_subset(config["train_subset"], config["seed"])
    device, why = (
        (settings.device, "--device") if settings.device else eval_device(config["accelerator"])
    )
    used = dict(
        dataset=name,
        protocol=settings.protocol,
        linear_epochs=settings.linear_epochs or config["eval_linear_epochs"],
        knn_k=settings.knn_k or config["eval_knn_k"],
        seed=seed,
        augment=settings.augment,
        device=device,
        device_reason=why,
        channels_last=config["channels_last"],
    )
    metrics = evaluate_encoder(
        place_backbone(encoder, device, channels_last=config["channels_last"]),
        splits,
        protocol=settings.protocol,
        linear_epochs=used["linear_epochs"],
        knn_k=used["knn_k"],
        seed=seed,
        augment=settings.augment,
        device=device,
        batch_size=settings.batch_size,
        dataset_name=name,
        progress=settings.progress,
        return_features=True,
    )
    return {**used, **metrics}, splits


def write_eval_outputs(
    metrics: dict[str, Any],
    splits: Any,
    out_dir: str | Path,
    *,
    checkpoint: str | Path,
    map_points: int = 1000,
) -> dict[str, Path]:
    """Write the results of :func:`evaluate_checkpoint`.

    Writes ``metrics.json`` (every metric and setting, without the features) and, unless
    ``map_points`` is 0, ``feature_map.png``: a 2-D map of up to ``map_points`` test
    features coloured by class.

    Returns:
        Name ("metrics", "feature_map") -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    if map_points:
        written["feature_map"] = plot_feature_map(
            metrics["test_features"],
            splits.test.labels,
            splits.class_names,
            out / "feature_map.png",
            max_points=map_points,
            seed=metrics["seed"],
            title=f"{splits.name} test features",
        )
    record = {k: v for k, v in metrics.items() if k != "test_features"}
    record.update(checkpoint=str(checkpoint), test_images=len(splits.test.labels))
    written["metrics"] = write_text_atomic(
        out / "metrics.json", json.dumps(record, indent=2) + "\n"
    )
    return written


def evaluate_baselines(
    backbone: nn.Module, splits: Any, config: TrainConfig, device: str
) -> dict[str, float]:
    """Final evaluation of a pretrained backbone beside a random-weight copy and raw pixels.

    All three go through :func:`evaluate_encoders` together on ``device``: their linear
    heads train in the same steps, each with the result it would get alone. The random
    backbone is drawn with the run's seed.

    Args:
        backbone: the pretrained (B, C, H, W) -> (B, F) encoder; placed on ``device`` in the
            run's memory format (:func:`kinfonce.models.place_backbone`).
        splits: the run's :class:`kinfonce.data.DatasetSplits`.
        config: the run's resolved configuration.
        device: where to evaluate.

    Returns:
        ``linear_top1``, ``linear_top5``, ``knn_top1``, ``knn_top5``, and the same with the
        prefixes ``random_encoder_`` and ``raw_pixels_`` when ``config.baselines``.
    """
    encoders = {"": place_backbone(backbone, device, channels_last=config.channels_last)}
    if config.baselines:
        with torch_seeded(config.seed):
            encoders["random_encoder_"] = build_backbone(
                config.backbone,
                in_channels=splits.channels,
                image_size=splits.image_size,
                stem=config.stem,
            ).to(device)
        encoders["raw_pixels_"] = torch.nn.Flatten()
    results = evaluate_encoders(
        encoders,
        splits,
        protocol="both",
        linear_epochs=config.eval_linear_epochs,
        seed=config.seed,
        device=device,
        knn_k=config.eval_knn_k,
        progress=config.progress,
    )
    keys = ("linear_top1", "linear_top5", "knn_top1", "knn_top5")
    return {prefix + key: results[prefix][key] for prefix in encoders for key in keys}
