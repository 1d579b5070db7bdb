"""Evaluation of frozen encoders: feature extraction, linear probe and kNN.

The linear probe follows the linear evaluation protocol of the paper (Appendix B): the
encoder is frozen and a linear classifier is trained with SGD, a cosine learning rate
from 0.3 to 0, batch size 64, weight decay 1e-6 and 100 epochs. Two paths are offered:
the fast one trains on features extracted once without augmentation
(:func:`linear_probe`); the slow one keeps the encoder in the loop and augments every
training batch with a random crop and a horizontal flip
(:func:`linear_probe_augmented`). kNN (:func:`knn_classify`) is the usual
temperature-weighted cosine vote of the SSL literature (k = 200, T = 0.1).
:func:`evaluate_encoder` runs them on a :class:`kinfonce.data.DatasetSplits`; both the
end of ``kinfonce pretrain`` and ``kinfonce eval`` call it, so their numbers agree.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

PROTOCOLS = ("linear", "knn", "both")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_labeled(name: str, x: Tensor, y: Tensor, num_classes: int) -> None:
    if x.ndim != 2:
        raise ValueError(
            f"{name}_x must be a 2-D (N, F) feature tensor, got shape {tuple(x.shape)}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name}_y must be a 1-D label tensor with {x.shape[0]} entries, "
            f"got shape {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}_x must hold at least one sample")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}_x contains non-finite values (NaN or inf)")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"{name}_y must hold class indices in [0, num_classes={num_classes}), "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def _check_features(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int
) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_labeled("train", train_x, train_y, num_classes)
    _check_labeled("test", test_x, test_y, num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x must have the same feature dimension, "
            f"got {train_x.shape[1]} and {test_x.shape[1]}"
        )


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy of class scores.

    Args:
        scores: (N, C) class scores (logits or votes), higher is better.
        labels: (N,) true class indices.

    Returns:
        ``{"top1": float, "top5": float}`` as fractions in [0, 1]; with fewer than five
        classes top-5 counts all C classes (and is therefore 1.0).
    """
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item()}


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

    Returns:
        (N, F) float32 features on the CPU, with ``requires_grad`` False.

    Raises:
        ValueError: on a wrong image tensor, when the encoder cannot take these images,
            or when it produces non-finite features.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"images_uint8 must be a uint8 tensor (N, C, H, W), got dtype "
            f"{images_uint8.dtype} and shape {tuple(images_uint8.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = encoder.training
    encoder.eval()
    chunks = []
    try:
        with torch.no_grad():
            starts = range(0, images_uint8.shape[0], batch_size)
            for start in tqdm(starts, desc="features", disable=not progress, leave=False):
                batch = transform(images_uint8[start : start + batch_size].to(device))
                chunks.append(_encode(encoder, batch).float().cpu())
    finally:
        encoder.train(was_training)
    features = torch.cat(chunks) if chunks else torch.empty(0, 0)
    if not torch.isfinite(features).all():
        raise ValueError("the encoder produced non-finite features (NaN or inf)")
    return features


def _encode(encoder: nn.Module, batch: Tensor) -> Tensor:
    try:
        out = encoder(batch)
    except RuntimeError as err:
        raise ValueError(
            f"the encoder cannot take input of shape {tuple(batch.shape[1:])} (C, H, W); it "
            f"expects {describe_expected_input(encoder)}. Original error: {err}"
        ) from err
    return out.flatten(1)


def _seeded_head(feature_dim: int, num_classes: int, seed: int, device) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(feature_dim, num_classes).to(device)


def _fit_linear_head(
    batch_features: Callable[[Tensor], Tensor],
    train_y: Tensor,
    feature_dim: int,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    momentum: float,
    seed: int,
    device,
    progress: bool,
) -> nn.Linear:
    """Train a linear head with SGD and a per-step cosine schedule from ``lr`` to 0.

    A plain loop instead of a Lightning Trainer: on cached features each step is one small
    matrix product, and a Trainer's per-step hooks and logging would dominate it.

    Args:
        batch_features: maps (B,) sample indices to the (B, F) head input on ``device``.
        train_y: (N,) training labels.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    _check_positive("lr", lr)
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"weight_decay must be >= 0 and momentum in [0, 1), got {weight_decay}, {momentum}"
        )
    head = _seeded_head(feature_dim, num_classes, seed, device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    n = train_y.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * steps_per_epoch, eta_min=0.0
    )
    generator = torch.Generator().manual_seed(seed)
    train_y = train_y.to(device)
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(head(batch_features(idx)), train_y[idx.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if not all(torch.isfinite(p).all() for p in head.parameters()):
            raise RuntimeError(f"linear probe diverged (non-finite weights); lower lr (now {lr})")
    return head.eval()


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread, then restore the previous count.

    A linear head's steps are tiny (batch x F x C); splitting them over threads costs more
    in synchronisation than it saves. On a loaded 2-core machine, 5 epochs of a
    (1000, 32) -> 10 probe took 4.8 s on two threads and 0.16 s on one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _standardizer(train_x: Tensor) -> Callable[[Tensor], Tensor]:
    """Per-dimension standardization with training-feature statistics (keeps SGD at lr 0.3 stable)."""
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False).clamp_min(1e-6)
    return lambda x: (x - mean.to(x.device)) / std.to(x.device)


def _score_head(head: nn.Linear, test_x: Tensor, test_y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = head(test_x.to(head.weight.device)).cpu()
    return topk_accuracy(logits, test_y)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.3,
    batch_size: int = 64,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Linear evaluation on cached features (paper, Appendix B).

    Features are standardized per dimension with the training statistics (an affine map
    that a linear head could absorb; it only conditions SGD), then a linear layer is
    trained with SGD (momentum 0.9), cosine learning rate ``lr`` -> 0, and cross-entropy.

    Args:
        train_x: (N, F) training features. train_y: (N,) labels in [0, num_classes).
        test_x: (M, F) test features. test_y: (M,) labels.
        num_classes: number of classes C.
        epochs, lr, batch_size, weight_decay, momentum: SGD settings.
        standardize: standardize features with training statistics first.
        seed: seeds the head's initialization and the batch order.

    Returns:
        ``{"top1": float, "top5": float}`` test accuracy as fractions.
    """
    _check_features(train_x, train_y, test_x, test_y, num_classes)
    norm = _standardizer(train_x) if standardize else (lambda x: x)
    train_in = norm(train_x.float()).to(device)
    with _one_cpu_thread():
        head = _fit_linear_head(
            lambda idx: train_in[idx.to(device)],
            train_y,
            train_x.shape[1],
            num_classes=num_classes,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            momentum=momentum,
            seed=seed,
            device=device,
            progress=progress,
        )
    return _score_head(head, norm(test_x.float()), test_y)


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
    epochs: int = 100,
    lr: float = 0.3,
    batch_size: int = 64,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    seed: int = 0,
    device: str | torch.device = "cpu",
    feature_batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Linear evaluation with training augmentation and the frozen encoder in the loop.

    Every training batch is normalized by ``transform``, randomly cropped and flipped per
    sample (:func:`crop_flip_augmentation`), and encoded again by the frozen encoder (eval
    mode, no gradients); the head is trained as in :func:`linear_probe`, with features
    standardized by the statistics of the un-augmented training features. Test features
    are extracted once without augmentation.

    Args:
        encoder: frozen feature extractor, (B, C, H, W) -> (B, F).
        train_images: (N, C, H, W) uint8. train_y: (N,) labels.
        test_images: (M, C, H, W) uint8. test_y: (M,) labels.
        transform: deterministic uint8 -> float map (e.g. ``EvalTransform``).
        Other arguments as in :func:`linear_probe`.

    Returns:
        ``{"top1": float, "top5": float}`` test accuracy as fractions.
    """
    extract = dict(batch_size=feature_batch_size, device=device, progress=progress)
    train_x = extract_features(encoder, train_images, transform, **extract)
    test_x = extract_features(encoder, test_images, transform, **extract)
    _check_features(train_x, train_y, test_x, test_y, num_classes)
    norm = _standardizer(train_x)
    augment = crop_flip_augmentation(train_images.shape[-1]).to(device)
    was_training = encoder.training
    encoder.eval()

    def augmented_features(idx: Tensor) -> Tensor:
        with torch.no_grad():
            batch = augment(transform(train_images[idx].to(device)))
            return norm(_encode(encoder, batch))

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = _fit_linear_head(
                augmented_features,
                train_y,
                train_x.shape[1],
                num_classes=num_classes,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                weight_decay=weight_decay,
                momentum=momentum,
                seed=seed,
                device=device,
                progress=progress,
            )
    finally:
        encoder.train(was_training)
    return _score_head(head, norm(test_x), test_y)


def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Weighted kNN on cosine similarity, as in the SSL literature (Wu et al., 2018).

    Each test sample takes its k most cosine-similar training samples; neighbour j votes
    for its class with weight exp(s_j / temperature). Written in torch rather than with
    scikit-learn's KNeighborsClassifier, which has no top-5 and no exponential weights.

    Args:
        train_x: (N, F) training features. train_y: (N,) labels.
        test_x: (M, F) test features. test_y: (M,) labels.
        num_classes: number of classes C.
        k: neighbours, clipped to N.
        temperature: vote temperature T.
        chunk_size: test rows per similarity block ((chunk, N) memory).

    Returns:
        ``{"top1": float, "top5": float}`` as fractions.
    """
    _check_features(train_x, train_y, test_x, test_y, num_classes)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _check_positive("temperature", temperature)
    k = min(int(k), train_x.shape[0])
    train_n = nn.functional.normalize(train_x.float(), dim=1)
    test_n = nn.functional.normalize(test_x.float(), dim=1)
    votes = []
    for start in range(0, test_n.shape[0], chunk_size):
        sim, idx = (test_n[start : start + chunk_size] @ train_n.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes)
        votes.append(scores.scatter_add_(1, train_y[idx], weights))
    return topk_accuracy(torch.cat(votes), test_y)


def evaluate_encoder(
    encoder: nn.Module,
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
) -> dict[str, Any]:
    """Evaluate a frozen encoder: train on ``splits.train``, report on ``splits.test``.

    Args:
        encoder: (B, C, H, W) -> (B, F) feature extractor (a backbone, no projection head).
        splits: a :class:`kinfonce.data.DatasetSplits` (fields train, test, num_classes,
            mean, std).
        protocol: "linear", "knn" or "both".
        linear_epochs: epochs of the linear probe (Appendix B: 100).
        seed: seeds the linear probe.
        device: device for the encoder and the probe.
        batch_size: images per forward pass during feature extraction.
        augment: train the linear head with crop/flip augmentation and the encoder in
            the loop (slow) instead of on cached features (fast).
        linear_lr, linear_batch_size, linear_weight_decay: linear-probe SGD settings.
        knn_k, knn_temperature: kNN settings.
        transform: uint8 -> float input map; default ``EvalTransform(splits.mean, splits.std)``.
        dataset_name: named in the error raised when the images do not fit the encoder
            (default ``splits.name``).
        progress: show progress bars.
        return_features: also return the test features under ``"test_features"`` (M, F).

    Returns:
        Dict with ``linear_top1``, ``linear_top5`` (protocol linear/both) and ``knn_top1``,
        ``knn_top5`` (knn/both), fractions in [0, 1], plus ``feature_dim``.

    Raises:
        ValueError: on an unknown protocol or images that do not fit the encoder.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if transform is None:
        from kinfonce.data.augment import EvalTransform

        transform = EvalTransform(splits.mean, splits.std).to(device)
    name = dataset_name or getattr(splits, "name", "") or None
    check_encoder_fits(encoder, splits.test.images, transform, name, device)
    extract = dict(batch_size=batch_size, device=device, progress=progress)
    train_x = extract_features(encoder, splits.train.images, transform, **extract)
    test_x = extract_features(encoder, splits.test.images, transform, **extract)
    train_y, test_y, k = splits.train.labels, splits.test.labels, splits.num_classes
    metrics: dict[str, Any] = {"feature_dim": train_x.shape[1]}
    if protocol in ("linear", "both"):
        settings = dict(
            num_classes=k,
            epochs=linear_epochs,
            lr=linear_lr,
            batch_size=linear_batch_size,
            weight_decay=linear_weight_decay,
            seed=seed,
            device=device,
            progress=progress,
        )
        if augment:
            images = (splits.train.images, train_y, splits.test.images, test_y)
            result = linear_probe_augmented(encoder, *images, transform, **settings)
        else:
            result = linear_probe(train_x, train_y, test_x, test_y, **settings)
        metrics.update(linear_top1=result["top1"], linear_top5=result["top5"])
    if protocol in ("knn", "both"):
        result = knn_classify(
            train_x, train_y, test_x, test_y, num_classes=k, k=knn_k, temperature=knn_temperature
        )
        metrics.update(knn_top1=result["top1"], knn_top5=result["top5"])
    if return_features:
        metrics["test_features"] = test_x
    return metrics


def check_encoder_fits(
    encoder: nn.Module,
    images_uint8: Tensor,
    transform: Callable[[Tensor], Tensor],
    dataset_name: str | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Run one small batch through the encoder; raise a ValueError naming the data set if it fails."""
    try:
        extract_features(encoder, images_uint8[:2], transform, device=device)
    except ValueError as err:
        raise ValueError(
            f"{dataset_name or 'the data set'} does not fit the encoder: {err}"
        ) from err


def _check_data_fits_checkpoint(splits: Any, config: dict[str, Any], path: str) -> None:
    got = (splits.channels, splits.image_size)
    want = (config["data"]["channels"], config["data"]["image_size"])
    if got != want:
        raise ValueError(
            f"data set {splits.name!r} has {got[0]}x{got[1]}x{got[1]} images (C x H x W) but the "
            f"encoder in {path!r} was trained on {config['dataset']!r} with "
            f"{want[0]}x{want[1]}x{want[1]} images; choose a --dataset with that image shape"
        )


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
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
        download=bool(config["download"]) and own_data,
        val_fraction=config["val_fraction"],
        seed=config["seed"],
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
