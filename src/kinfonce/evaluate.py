"""Frozen encoders and checkpoints -> features -> probes -> metrics.

:func:`evaluate_encoders` extracts features of a :class:`kinfonce.data.DatasetSplits` once
per encoder, keeps them on the device, and runs the tensor-level protocols of
:mod:`kinfonce.probes` on them, training the linear heads of all encoders in the same steps;
:func:`evaluate_encoder` does it for one. The end of ``kinfonce pretrain`` (the encoder and
its baselines) and ``kinfonce eval`` both go through it, so their numbers agree.
:func:`linear_probe_augmented` is the slow variant that keeps the encoder in the loop and
crops and flips every training batch. :func:`evaluate_checkpoint` does the same for a
``kinfonce pretrain`` checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kinfonce.errors import KinfonceError
from kinfonce.probes import (
    LinearProbeSettings,
    check_features,
    fit_linear_head,
    knn_classify,
    linear_probes,
    score_head,
    standardizer,
)

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
        for start in tqdm(starts, desc="features", disable=not progress, leave=False):
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


def crop_flip_augmentation(image_size: int) -> nn.Module:
    """Per-sample random crop (padding image_size // 8, reflect) and horizontal flip (kornia)."""
    import kornia.augmentation as K

    pad = max(1, image_size // 8)
    return nn.Sequential(
        K.RandomCrop((image_size, image_size), padding=pad, padding_mode="reflect"),
        K.RandomHorizontalFlip(),
    )


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

    Every training batch is normalized by ``transform``, randomly cropped and flipped per
    sample (:func:`crop_flip_augmentation`), and encoded again by the frozen encoder (eval
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
    train_x = extract_features(encoder, train_images, transform, **extract)
    test_x = extract_features(encoder, test_images, transform, **extract)
    check_features(train_x, train_y, test_x, test_y, num_classes)
    norm = standardizer(train_x)
    augment = crop_flip_augmentation(train_images.shape[-1]).to(device)

    def augmented_features(idx: Tensor) -> Tensor:
        with torch.no_grad():
            batch = augment(transform(train_images[idx].to(device)))
            return norm(_encode(encoder, batch))

    settings = settings or LinearProbeSettings()
    with eval_mode(encoder), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
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
        from kinfonce.data.augment import EvalTransform

        transform = EvalTransform(splits.mean, splits.std).to(device)
    name = dataset_name or getattr(splits, "name", "") or None
    extract = dict(batch_size=batch_size, device=device, progress=progress, to_cpu=False)
    features = {}
    for key, encoder in encoders.items():
        check_encoder_fits(encoder, splits.test.images, transform, name, device)
        train_x = extract_features(encoder, splits.train.images, transform, **extract)
        features[key] = (
            train_x,
            extract_features(encoder, splits.test.images, transform, **extract),
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


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    download: bool = False,
    protocol: str = "both",
    linear_epochs: int | None = None,
    knn_k: int | None = None,
    seed: int | None = None,
    augment: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Evaluate the backbone of a ``kinfonce pretrain`` checkpoint.

    Settings left at None come from the checkpoint's config, and on the checkpoint's own
    data set the same seeded training subset is used, so on the same device and without
    ``augment`` the figures equal those that ``kinfonce pretrain`` printed for its last
    checkpoint.

    Args:
        checkpoint: a ``.ckpt`` file from ``RUN_DIR/checkpoints``.
        dataset: data set name (default: the config's ``dataset``).
        data_root: where its files are (default: the config's ``data_root`` when the data
            set is the config's).
        download: fetch a torchvision data set that is not under the root (also done when
            the run itself downloaded its own data set).
        protocol, augment, device, batch_size, progress: as in :func:`evaluate_encoder`.
        linear_epochs, knn_k, seed: default the config's ``eval_linear_epochs``,
            ``eval_knn_k`` and ``seed``.

    Returns:
        (metrics of :func:`evaluate_encoder` with ``test_features`` (M, F) and the
        settings used, the :class:`kinfonce.data.DatasetSplits` evaluated on).

    Raises:
        FileNotFoundError: no checkpoint or data.
        ValueError: not a kinfonce checkpoint, a corrupt file, or a data set whose image
            shape does not fit the encoder.
    """
    from kinfonce.data import load_dataset
    from kinfonce.methods import load_encoder

    encoder, config = load_encoder(checkpoint)
    own_data = dataset is None or dataset == config["dataset"]
    name = config["dataset"] if dataset is None else dataset
    seed = config["seed"] if seed is None else seed
    splits = load_dataset(
        name,
        root=data_root or (config["data_root"] if own_data else None),
        download=download or (bool(config["download"]) and own_data),
        val_fraction=config["val_fraction"],
        seed=config["seed"],
        image_size=config["image_size"] if own_data else None,
    )
    _check_data_fits_checkpoint(splits, config, str(checkpoint))
    if own_data:  # the training subset pretraining used, hence its probe's figures
        splits = splits.with_train_subset(config.get("train_subset"), config["seed"])
    settings = dict(
        dataset=name,
        protocol=protocol,
        linear_epochs=config["eval_linear_epochs"] if linear_epochs is None else linear_epochs,
        knn_k=config["eval_knn_k"] if knn_k is None else knn_k,
        seed=seed,
        augment=augment,
    )
    metrics = evaluate_encoder(
        encoder.to(device),
        splits,
        protocol=protocol,
        linear_epochs=settings["linear_epochs"],
        knn_k=settings["knn_k"],
        seed=seed,
        augment=augment,
        device=device,
        batch_size=batch_size,
        dataset_name=name,
        progress=progress,
        return_features=True,
    )
    return {**settings, **metrics}, splits


def evaluate_baselines(
    backbone: nn.Module, splits: Any, config: Any, device: str
) -> dict[str, float]:
    """Final evaluation of a pretrained backbone beside a random-weight copy and raw pixels.

    All three go through :func:`evaluate_encoders` together on ``device``: their linear
    heads train in the same steps, each with the result it would get alone. The random
    backbone is drawn with the run's seed.

    Args:
        backbone: the pretrained (B, C, H, W) -> (B, F) encoder.
        splits: the run's :class:`kinfonce.data.DatasetSplits`.
        config: the run's :class:`kinfonce.config.PretrainConfig`.
        device: where to evaluate.

    Returns:
        ``linear_top1``, ``linear_top5``, ``knn_top1``, ``knn_top5``, and the same with the
        prefixes ``random_encoder_`` and ``raw_pixels_`` when ``config.baselines``.
    """
    from kinfonce.models import build_backbone

    encoders = {"": backbone.to(device)}
    if config.baselines:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
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
