"""The GPU figures of issue 11 in one run: loss, training step, views, peer pipeline, evaluation.

Parts (each guarded: one that fails is reported and the others still run):

* ``loss``: forward + backward of ``KernelInfoNCE`` (paths auto, fused, blocked) at gamma 2 and
  1 against plain NT-Xent (``cross_entropy`` on the masked logit matrix, temperature tau / 2,
  the same loss as gamma 2) and the literal exp/sum formula, D = 128, float32; median time and
  peak memory above the inputs. Then both choices of docs/architecture.md "TF32 and the loss"
  at float32 matmul precision "high" (training's on CUDA): the loss's products at "highest" (as
  it is) and in TF32 (its scope removed), beside NT-Xent at "high". On a GPU one size more,
  past the 2N where "auto" leaves the fused path for the blocked one on this device's free
  memory (``auto_switch_2n``).
* ``step``: kinfonce's SimCLR step (uint8 batch on the device, both views made there, ResNet-18
  with the CIFAR stem, projection head 2048 -> 128, Simple Sum loss, online probe, SGD, bf16
  autocast) in images/s, as is and with channels-last; the share of the step spent on the
  views; host synchronisations per step (CUDA's sync debug mode).
* ``peer``: the usual pipeline with the same model, batch, precision and optimiser:
  torchvision ``ImageFolder`` + ``transforms.v2`` per image in a ``DataLoader`` (14 workers on
  16 cores), plain NT-Xent; images/s of the step and of the loader alone.
* ``eval``: the end-of-run evaluation (``evaluate_baselines``: linear probe 100 epochs and kNN
  for the encoder, a random encoder and raw pixels) on CIFAR-10-sized data (45,000 training
  and 10,000 test images of random pixels), ResNet-18; and the probe's CUDA-graph replay
  against its eager steps.
* ``pretrain``: ``kinfonce pretrain`` on a CIFAR-10 subset with both baselines; fit and
  evaluation times and accuracies from its ``metrics.json``.
* ``clip``: ``kinfonce clip`` in bf16-mixed, one epoch, to its zero-shot evaluation, which
  must find the whole module on the device; times and accuracies from its ``metrics.json``.
* ``compile`` (GPU only, last because slowest): the step compiled (``--compile``), with and
  without channels-last, and ``torch.compile`` of a plain-autograd Kernel-InfoNCE at one size;
  compile times included.

Results are written to the ``--json`` file after every measurement, so a part stopped by a
time limit keeps what it measured.

On a CPU every part runs at tiny sizes by default, to test the script itself; ``--scale cpu``
gives figures a machine without a GPU can measure (resnet-mini, batch 256, 2N up to 8,192).

    python3 benchmarks/gpu_speed.py                      # all parts, tables, RESULT line
    python3 benchmarks/gpu_speed.py --part loss --json OUT/loss.json
    python3 benchmarks/gpu_speed.py --summary OUT        # tables and RESULT from OUT/*.json

The last line is ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import kinfonce.kernel_lse as kernel_lse
from kinfonce import KernelInfoNCE
from kinfonce.kernels import safe_pow

PARTS = ("loss", "step", "eval", "peer", "pretrain", "clip", "compile")
_JSON: Path | None = None  # where the part being run keeps its results (--json)


def keep(result: dict) -> dict:
    """Write the running part's results so far to the ``--json`` file; returns them."""
    if _JSON is not None:
        _JSON.parent.mkdir(parents=True, exist_ok=True)
        _JSON.write_text(json.dumps(result, indent=1))
    return result


REPO = Path(__file__).resolve().parents[1]
SUBSET_ZIP = REPO / ".device" / "data" / "cifar10-subset.zip"
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


#: Every size the parts use: the issue's on a GPU; a CPU-sized run (resnet-mini, 2N up to
#: 8,192) whose figures a machine without a GPU can give; and tiny sizes that test the script.
SCALES = {
    "tiny": dict(
        loss_sizes=[64, 256], compile_size=0, loss_reps=2, backbone="resnet-mini",
        proj_hidden=32, batch=8, steps=3, workers=1, peer_images=32, eval_train=256,
        eval_test=64, eval_epochs=2,
        pretrain=["--dataset", "digits", "--train-subset", "128", "--batch-size", "32",
                  "--epochs", "1", "--eval-linear-epochs", "2", "--eval-knn-k", "10",
                  "--proj-hidden-dim", "32"],
        clip=["--dataset", "digits", "--train-subset", "128", "--batch-size", "32",
              "--epochs", "1", "--eval-linear-epochs", "2", "--eval-knn-k", "10",
              "--proj-hidden-dim", "32", "--text-width", "8", "--text-layers", "1",
              "--no-baselines", "--precision", "bf16-mixed"],
    ),
    "cpu": dict(
        loss_sizes=[1024, 8192], compile_size=0, loss_reps=3, backbone="resnet-mini",
        proj_hidden=2048, batch=256, steps=5, workers=min(2, os.cpu_count() or 1),
        peer_images=2048, eval_train=5000, eval_test=1000, eval_epochs=10,
        pretrain=["--dataset", "digits"],
        clip=["--dataset", "digits", "--no-baselines", "--precision", "bf16-mixed"],
    ),
    "gpu": dict(
        loss_sizes=[1024, 8192, 32768], compile_size=8192, loss_reps=0, backbone="resnet18",
        proj_hidden=2048, batch=512, steps=30, workers=min(14, max(1, (os.cpu_count() or 2) - 2)),
        peer_images=0, eval_train=45000, eval_test=10000, eval_epochs=100,
        pretrain=["--dataset", f"imagefolder:{SUBSET_ZIP}", "--backbone", "resnet18",
                  "--batch-size", "512", "--epochs", "3", "--precision", "bf16-mixed"],
        clip=["--dataset", f"imagefolder:{SUBSET_ZIP}", "--backbone", "resnet18",
              "--batch-size", "512", "--epochs", "1", "--precision", "bf16-mixed",
              "--no-baselines", "--eval-linear-epochs", "10"],
    ),
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` (after one warm-up call), synchronised around each call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory in MiB that one call of ``fn`` allocates above what is allocated before."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------------------------- loss


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float, mask: torch.Tensor):
    """Plain NT-Xent: cross_entropy on the masked cosine-similarity logit matrix."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    logits = (z @ z.T / temperature).masked_fill(mask, float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def literal(z0: torch.Tensor, z1: torch.Tensor, gamma: float, tau: float):
    """The exp/sum formula as printed (Algorithm 2): cdist, power, exp, row sums."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    k = torch.exp(-torch.cdist(z, z).pow(gamma) / tau)
    idx = torch.arange(2 * n, device=z.device)
    return -torch.log(k[idx, (idx + n) % (2 * n)] / (k.sum(1) - k.diagonal())).mean()


def autograd_kernel_nll(z0: torch.Tensor, z1: torch.Tensor, gamma: float, tau: float):
    """Kernel-InfoNCE as plain autograd over logsumexp of the masked log-kernel matrix."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    sq = (z.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1) - 2 * z @ z.T).clamp_min(0)
    logit = -safe_pow(sq, gamma / 2) / tau
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logit = logit.masked_fill(eye, float("-inf"))
    idx = torch.arange(2 * n, device=z.device)
    pos = -(z - z.roll(n, 0)).pow(2).sum(1).clamp_min(0).pow(gamma / 2) / tau
    return (torch.logsumexp(logit, 1) - pos[idx]).mean()


@contextlib.contextmanager
def loss_precision(tf32_in_loss: bool) -> Iterator[None]:
    """Float32 matmul precision "high", as training sets it on CUDA, for the block; with
    ``tf32_in_loss`` the loss's own scope to "highest" is removed, so that its products run in
    TF32 as they did before issue 22 (the other choice of docs/architecture.md)."""
    scope = kernel_lse.matmul_precision
    if tf32_in_loss:
        kernel_lse.matmul_precision = lambda precision: contextlib.nullcontext()
    try:
        with scope("high"):
            yield
    finally:
        kernel_lse.matmul_precision = scope


def auto_switch_2n(device: torch.device) -> int | None:
    """The largest 2N the two-view loss's "auto" path still fuses on ``device`` now."""
    if device.type != "cuda":
        return None
    share = kernel_lse.FUSED_MEMORY_SHARE * kernel_lse.available_memory(device)
    return int((share / (4 * kernel_lse.FUSED_MATRICES)) ** 0.5)


def loss_part(device: torch.device, scale: str) -> dict:
    cfg, tau, rows = SCALES[scale], 0.5, []
    switch = auto_switch_2n(device)
    result = {"rows": rows, "device": str(device), "auto_switch_2n": switch}
    sizes = list(cfg["loss_sizes"])
    if switch:  # one size past the switch, a multiple of 1024
        sizes.append(-(-5 * switch // 4 // 1024) * 1024)
    for two_n in sizes:
        gen = torch.Generator().manual_seed(two_n)
        z0 = torch.randn(two_n // 2, 128, generator=gen).to(device)
        z1 = (z0 + 0.5 * torch.randn(two_n // 2, 128, generator=gen).to(device)).contiguous()
        mask = torch.eye(two_n, dtype=torch.bool, device=device)
        reps = cfg["loss_reps"] or max(5, min(50, 2**16 // two_n))
        past_switch = switch is not None and two_n > switch
        for gamma in (2.0, 1.0):
            candidates = {
                f"kinfonce {path}": KernelInfoNCE(gamma, tau, path=path, check_finite=False)
                for path in ("auto", "fused", "blocked")
            }
            if not past_switch:  # there it takes more memory than the device has
                candidates["literal exp/sum"] = lambda a, b, g=gamma: literal(a, b, g, tau)
            if gamma == 2.0:
                candidates["nt-xent"] = lambda a, b, m=mask: nt_xent(a, b, tau / 2, m)
            auto = candidates["kinfonce auto"]
            high = {"kinfonce auto, high": auto}
            if gamma == 2.0:
                high["nt-xent, high"] = candidates["nt-xent"]
            tf32 = {"kinfonce auto, high, TF32 in loss": auto}
            for tf32_in_loss, named in ((None, candidates), (False, high), (True, tf32)):
                precision = (
                    contextlib.nullcontext()
                    if tf32_in_loss is None
                    else loss_precision(tf32_in_loss)
                )
                with precision:
                    for name, loss in named.items():
                        rows.append(_loss_row(name, loss, z0, z1, two_n, gamma, device, reps))
                        print(_loss_text(rows[-1]), flush=True)
                        keep(result)
        del z0, z1, mask
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _loss_row(name, loss, z0, z1, two_n, gamma, device, reps) -> dict:
    def once():
        a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
        loss(a, b).backward()

    row = {"loss": name, "2N": two_n, "gamma": gamma}
    try:
        row["ms"] = 1e3 * median_time(once, device, reps)
        row["peak_mib"] = peak_mib(once, device)
    except Exception as err:  # out of memory, for one: the other rows still run
        row["error"] = _short(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _compiled_rows(two_n: int, tau: float, device: torch.device, result: dict) -> None:
    rows = result.setdefault("loss_rows", [])
    gen = torch.Generator().manual_seed(two_n)
    z0 = torch.randn(two_n // 2, 128, generator=gen).to(device)
    z1 = z0 + 0.5 * torch.randn(two_n // 2, 128, generator=gen).to(device)
    for gamma in (2.0, 1.0):
        compiled = torch.compile(lambda a, b, g=gamma: autograd_kernel_nll(a, b, g, tau))
        name = "autograd, torch.compile"
        try:
            started = time.perf_counter()
            a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
            compiled(a, b).backward()
            sync(device)
            compile_s = time.perf_counter() - started
            row = _loss_row(name, compiled, z0, z1, two_n, gamma, device, 20)
            row["compile_s"] = compile_s
        except Exception as err:  # a missing compiler on the machine, for example
            row = {"loss": name, "2N": two_n, "gamma": gamma, "error": _short(err)}
        rows.append(row)
        print(_loss_text(rows[-1]), flush=True)
        keep(result)


def _loss_text(r: dict) -> str:
    if "error" in r:
        return f"| {r['2N']:>6} | {r['gamma']:g} | {r['loss']:<34} | {r['error']} |"
    peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:,.0f}"
    extra = f" (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
    return f"| {r['2N']:>6} | {r['gamma']:g} | {r['loss']:<34} | {r['ms']:9.2f}{extra} | {peak} |"


# ---------------------------------------------------------------------------------------- step


def _simclr(device: torch.device, scale: str, **options):
    from kinfonce.config import PretrainConfig
    from kinfonce.methods import SimCLR
    from kinfonce.resolve import resolve

    cfg = SCALES[scale]
    config = PretrainConfig(
        dataset="cifar10", backbone=cfg["backbone"], loss="simple-sum", optimizer="sgd",
        proj_hidden_dim=cfg["proj_hidden"], **options,
    )  # fmt: skip
    config = resolve(config)
    data = dict(image_size=32, channels=3, num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)
    module = SimCLR(config, data).to(device).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    return module, optimizer


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def kinfonce_step(module, optimizer, images, labels, device) -> None:
    """What a training step does (``PretrainMethod.training_step``: the views in float32
    outside autocast, the rest inside) plus backward and SGD."""
    with torch.no_grad():
        view0, view1 = module.views.pair(images)
    with _autocast(device):
        loss, features = module.contrastive_step(view0, view1)
        probe_loss = F.cross_entropy(module.probe(features.detach()), labels)
    module._record_nonfinite(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    (loss + probe_loss).backward()
    optimizer.step()


def throughput(fn: Callable[[], object], steps: int, batch: int, device) -> float:
    """Images/s of ``steps`` calls queued back to back (synchronised at the ends only)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronisations CUDA's sync debug mode reports during one call of ``fn``."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def step_part(device: torch.device, scale: str) -> dict:
    variants = {"eager": {"channels_last": False}, "channels-last": {"channels_last": True}}
    return _step_rows(variants, device, scale, {})


def compile_part(device: torch.device, scale: str) -> dict:
    """The compiled step and the compiled plain-autograd loss (GPU only)."""
    if device.type != "cuda":
        return {"skipped": "compilation is measured on a GPU only"}
    result: dict = {}
    first = {"compile + channels-last": {"channels_last": True, "compile": True}}
    _step_rows(first, device, scale, result)
    _compiled_rows(SCALES[scale]["compile_size"], 0.5, device, result)
    _step_rows({"compile": {"compile": True, "channels_last": False}}, device, scale, result)
    return result


def _step_rows(variants: dict, device: torch.device, scale: str, result: dict) -> dict:
    cfg = SCALES[scale]
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg["batch"], 3, 32, 32), generator=gen, dtype=torch.uint8)
    images, labels = images.to(device), torch.randint(0, 10, (cfg["batch"],)).to(device)
    rows = result.setdefault("rows", [])
    result.update(batch=cfg["batch"], backbone=cfg["backbone"])
    for name, options in variants.items():
        row = {"variant": name}
        try:
            module, optimizer = _simclr(device, scale, **options)
            step = lambda m=module, o=optimizer: kinfonce_step(m, o, images, labels, device)  # noqa: E731
            started = time.perf_counter()
            for _ in range(3):  # warm-up (and compilation)
                step()
            sync(device)
            row["warmup_s"] = time.perf_counter() - started
            row["images_per_s"] = throughput(step, cfg["steps"], cfg["batch"], device)
            views = lambda m=module: m.views.pair(images)  # noqa: E731
            views_per_s = throughput(views, cfg["steps"], cfg["batch"], device)
            row["views_share"] = row["images_per_s"] / views_per_s
            row["syncs_per_step"] = host_syncs(step, device)
            del module, optimizer
        except Exception as err:
            row["error"] = _short(err)
        rows.append(row)
        print(_step_text(row), flush=True)
        keep(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _step_text(r: dict) -> str:
    if "error" in r:
        return f"| {r['variant']:<24} | {r['error']} |"
    syncs = "-" if r["syncs_per_step"] is None else r["syncs_per_step"]
    return (
        f"| {r['variant']:<24} | {r['images_per_s']:>10,.0f} | {r['views_share']:>6.1%} "
        f"| {syncs} | {r['warmup_s']:.1f} |"
    )


# ---------------------------------------------------------------------------------------- peer


class TwoViews:
    """Two independent draws of a torchvision transform: the positive pair."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def peer_transform():
    import torchvision.transforms.v2 as T

    return T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def image_folder(scale: str, scratch: Path) -> Path:
    """A directory of class folders of JPEG images: the CIFAR-10 subset's training split (at the
    GPU scale, where it was packed), or the scale's number of random images."""
    root = scratch / "peer"
    if scale == "gpu" and SUBSET_ZIP.is_file():
        with zipfile.ZipFile(SUBSET_ZIP) as archive:
            archive.extractall(root)
        return next(p for p in root.rglob("train") if p.is_dir())
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for index in range(SCALES[scale]["peer_images"] or 1024):
        folder = root / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.jpg")
    return root / "train"


def peer_part(device: torch.device, scale: str) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from kinfonce.models import ProjectionHead, build_backbone

    cfg = SCALES[scale]
    with tempfile.TemporaryDirectory() as scratch:
        dataset = ImageFolder(
            image_folder(scale, Path(scratch)), transform=TwoViews(peer_transform())
        )
        loader = DataLoader(
            dataset, batch_size=cfg["batch"], shuffle=True, num_workers=cfg["workers"],
            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=True,
            prefetch_factor=4,
        )  # fmt: skip
        backbone = build_backbone(cfg["backbone"], in_channels=3, image_size=32)
        head = ProjectionHead(backbone.feature_dim, cfg["proj_hidden"], 128)
        model = torch.nn.Sequential(backbone, head).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
        n = cfg["batch"]
        mask = torch.eye(2 * n, dtype=torch.bool, device=device)
        batches = len(loader)
        steps = min(cfg["steps"], batches)

        def run(train: bool) -> float:
            iterator, done = iter(loader), 0
            next(iterator)  # workers started and warm
            sync(device)
            started = time.perf_counter()
            for (view0, view1), _ in iterator:
                if train:
                    view0 = view0.to(device, non_blocking=True)
                    view1 = view1.to(device, non_blocking=True)
                    with _autocast(device):
                        z = model(torch.cat([view0, view1])).float()
                        loss = nt_xent(z[:n], z[n:], 0.25, mask)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                done += 1
                if done == steps - 1:
                    break
            sync(device)
            return done * n / (time.perf_counter() - started)

        loader_only = run(train=False)
        step = run(train=True)
    return {
        "images_per_s": step,
        "loader_images_per_s": loader_only,
        "workers": cfg["workers"],
        "images": len(dataset),
    }


# ---------------------------------------------------------------------------------------- eval


def eval_part(device: torch.device, scale: str) -> dict:
    from kinfonce.config import PretrainConfig
    from kinfonce.data.splits import DatasetSplits, LabeledImages
    from kinfonce.evaluate import evaluate_baselines
    from kinfonce.models import build_backbone
    from kinfonce.resolve import resolve

    cfg = SCALES[scale]
    gen = torch.Generator().manual_seed(0)

    def part(n: int) -> LabeledImages:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        return LabeledImages(images, torch.randint(0, 10, (n,), generator=gen))

    splits = DatasetSplits(
        part(cfg["eval_train"]), part(64), part(cfg["eval_test"]),
        [str(c) for c in range(10)], 10, 32, 3, CIFAR_MEAN, CIFAR_STD, "cifar10-sized",
    )  # fmt: skip
    config = PretrainConfig(
        dataset="cifar10", backbone=cfg["backbone"], eval_linear_epochs=cfg["eval_epochs"],
        progress=False,
    )  # fmt: skip
    config = resolve(config)
    torch.manual_seed(1)
    backbone = build_backbone(cfg["backbone"], in_channels=3, image_size=32)
    sync(device)
    started = time.perf_counter()
    metrics = evaluate_baselines(backbone, splits, config, str(device))
    sync(device)
    result = {
        "eval_s": time.perf_counter() - started,
        "train_images": cfg["eval_train"],
        "test_images": cfg["eval_test"],
        "epochs": cfg["eval_epochs"],
        "linear_top1": metrics["linear_top1"],
    }
    if device.type == "cuda":
        result.update(graph_against_eager(device))
    return result


def graph_against_eager(device: torch.device) -> dict:
    """Largest relative difference between the probe's weights after CUDA-graph replay and
    after the same steps run eagerly, and whether the capture worked."""
    from kinfonce.linear_heads import LinearHeads, train_on_features

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 512, generator=gen).to(device)
    y = torch.randint(0, 10, (5000,), generator=gen).to(device)
    params = []
    for graphs in (False, True):
        heads = LinearHeads([512], 10, seed=0, momentum=0.9, weight_decay=1e-6, device=device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_on_features(heads, [x], y, epochs=3, batch_size=64, lr=0.3, seed=0, graphs=graphs)
        params.append(heads.params)
    failed = [str(w.message) for w in caught if "capture failed" in str(w.message)]
    diff = max(float((g - e).norm() / e.norm()) for e, g in zip(*params, strict=True))
    return {"graph_vs_eager_max_rel": diff, "graph_capture": failed[0] if failed else "ok"}


# ------------------------------------------------------------------------------------ pretrain


def _cli_run(command: str, device: torch.device, scale: str) -> tuple[list[str], float, dict]:
    """``kinfonce COMMAND`` with the scale's flags on ``device``: (its arguments, wall seconds,
    its metrics.json)."""
    from kinfonce.cli import main as cli

    cfg = SCALES[scale]
    if scale == "gpu" and not SUBSET_ZIP.is_file():
        raise FileNotFoundError(f"{SUBSET_ZIP} is missing: run ../shared/device/pack.sh 2000")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        args = [command, *cfg[command], "--accelerator", accelerator, "--no-progress"]
        started = time.perf_counter()
        code = cli([*args, "--output-dir", str(out)])
        wall = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"kinfonce {command} exited with {code}")
        return args, wall, json.loads((out / "metrics.json").read_text())


def pretrain_part(device: torch.device, scale: str) -> dict:
    args, wall, metrics = _cli_run("pretrain", device, scale)
    keys = ("pretrain_time_s", "evaluation_time_s", "train_images", "epochs", "linear_top1",
            "knn_top1", "random_encoder_linear_top1", "raw_pixels_linear_top1")  # fmt: skip
    return {"command": " ".join(args), "wall_s": wall, **{k: metrics.get(k) for k in keys}}


def clip_part(device: torch.device, scale: str) -> dict:
    """``kinfonce clip`` in bf16-mixed through its final evaluation: on a GPU the zero-shot
    evaluation must find the whole module on the device (issue 22, point 1)."""
    args, wall, metrics = _cli_run("clip", device, scale)
    keys = ("pretrain_time_s", "evaluation_time_s", "train_images", "linear_top1",
            "zero_shot_top1", "zero_shot_ensemble_top1", "final_train_loss")  # fmt: skip
    return {"command": " ".join(args), "wall_s": wall, **{k: metrics.get(k) for k in keys}}


# ------------------------------------------------------------------------------------- summary

RUNNERS = {
    "loss": loss_part,
    "step": step_part,
    "peer": peer_part,
    "eval": eval_part,
    "pretrain": pretrain_part,
    "clip": clip_part,
    "compile": compile_part,
}


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def run_part(name: str, device: torch.device, scale: str) -> dict:
    print(f"\n## {name} ({device}, {scale} sizes)", flush=True)
    started = time.perf_counter()
    if _JSON is not None:
        _JSON.unlink(missing_ok=True)  # an earlier run's results are not this one's
    try:
        result = RUNNERS[name](device, scale)
    except Exception as err:
        traceback.print_exc()
        kept = json.loads(_JSON.read_text()) if _JSON is not None and _JSON.is_file() else {}
        result = {**kept, "error": _short(err)}  # with what the part measured before failing
    result["part_s"] = time.perf_counter() - started
    return result


def _run_text(run: dict) -> str:
    """The command of a ``kinfonce`` run part and its fit and evaluation times."""
    return (
        f"`kinfonce {run['command']}`: fit {run['pretrain_time_s']:.1f} s, evaluation "
        f"{run['evaluation_time_s']:.1f} s"
    )


def _figure(value: float) -> float:
    """``value`` to 3 significant digits for the RESULT line: a short time or share stays
    above 0, as a fixed number of decimals would not keep it."""
    return float(f"{value:.3g}")


def summary(results: dict[str, dict]) -> str:
    """The tables and the RESULT line, from the parts' results."""
    lines, result = [], {}
    compiled = results.get("compile", {})
    loss_rows = results.get("loss", {}).get("rows", []) + compiled.get("loss_rows", [])
    if loss_rows:
        lines += ["", "| 2N | gamma | loss | ms | peak MiB |", "|---:|---:|---|---:|---:|"]
        lines += [_loss_text(r) for r in loss_rows]
        by = {(r["loss"], r["2N"], r["gamma"]): r for r in loss_rows if "ms" in r}
        for (name, two_n, gamma), r in by.items():
            key = f"g{gamma:g}_2n{two_n}"
            reference = by.get(("nt-xent", two_n, 2.0))
            if name == "kinfonce auto" and reference:
                result[f"loss_time_over_ntxent_{key}"] = _figure(r["ms"] / reference["ms"])
                if r.get("peak_mib") and reference.get("peak_mib"):
                    ratio = r["peak_mib"] / reference["peak_mib"]
                    result[f"loss_memory_over_ntxent_{key}"] = _figure(ratio)
            tf32 = by.get(("kinfonce auto, high, TF32 in loss", two_n, gamma))
            if name == "kinfonce auto, high" and tf32:
                result[f"loss_exact_over_tf32_{key}"] = _figure(r["ms"] / tf32["ms"])
        switch = results["loss"].get("auto_switch_2n") if "loss" in results else None
        if switch:
            lines.append(f"auto leaves the fused path above 2N = {switch:,} on this device now")
            result["loss_auto_switch_2n"] = switch
    step_rows = results.get("step", {}).get("rows", []) + compiled.get("rows", [])
    best = None
    if step_rows:
        lines += ["", "| step variant | images/s | views share | host syncs/step | warm-up s |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [_step_text(r) for r in step_rows]
        done = [r for r in step_rows if "images_per_s" in r]
        if done:
            best = max(done, key=lambda r: r["images_per_s"])
            eager = next((r for r in done if r["variant"] == "eager"), best)
            result.update(
                step_images_per_s=round(best["images_per_s"]),
                step_best_variant=best["variant"].replace(" ", ""),
                eager_step_images_per_s=round(eager["images_per_s"]),
                views_share=_figure(best["views_share"]),
                syncs_per_step=best["syncs_per_step"],
            )
    peer = results.get("peer", {})
    if "images_per_s" in peer:
        lines += ["", f"peer pipeline ({peer['workers']} workers, {peer['images']} images): "
                  f"{peer['images_per_s']:,.0f} images/s; loader alone "
                  f"{peer['loader_images_per_s']:,.0f} images/s"]  # fmt: skip
        result["peer_images_per_s"] = round(peer["images_per_s"])
        if best:
            result["step_over_peer"] = _figure(best["images_per_s"] / peer["images_per_s"])
    evaluation = results.get("eval", {})
    if "eval_s" in evaluation:
        lines += ["", f"end-of-run evaluation with both baselines, {evaluation['train_images']:,}"
                  f" / {evaluation['test_images']:,} images, {evaluation['epochs']} epochs: "
                  f"{evaluation['eval_s']:.1f} s"]  # fmt: skip
        result["eval_s"] = _figure(evaluation["eval_s"])
        if "graph_vs_eager_max_rel" in evaluation:
            result["probe_graph_vs_eager"] = f"{evaluation['graph_vs_eager_max_rel']:.1e}"
            result["probe_graph_capture"] = evaluation["graph_capture"] == "ok"
    pretrain = results.get("pretrain", {})
    if "pretrain_time_s" in pretrain:
        lines += ["", _run_text(pretrain) + f", linear top-1 {pretrain['linear_top1']:.3f} "
                  f"(random encoder {pretrain['random_encoder_linear_top1']:.3f}, raw pixels "
                  f"{pretrain['raw_pixels_linear_top1']:.3f})"]  # fmt: skip
        result["pretrain_fit_s"] = _figure(pretrain["pretrain_time_s"])
        result["pretrain_eval_s"] = _figure(pretrain["evaluation_time_s"])
    clip = results.get("clip", {})
    if "zero_shot_top1" in clip:
        lines += ["", _run_text(clip) + f", zero-shot top-1 {clip['zero_shot_top1']:.3f}, "
                  f"linear top-1 {clip['linear_top1']:.3f}"]  # fmt: skip
        result["clip_eval_s"] = _figure(clip["evaluation_time_s"])
        result["clip_zero_shot_top1"] = round(clip["zero_shot_top1"], 3)
    failed = [name for name, r in results.items() if "error" in r]
    for name in failed:
        lines.append(f"part {name} failed: {results[name]['error']}")
    result["failed_parts"] = ",".join(failed) or "none"
    lines.append("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=PARTS, action="append", help="parts to run (all)")
    parser.add_argument(
        "--scale", choices=tuple(SCALES), help="sizes (default: gpu on a GPU, tiny on a CPU)"
    )
    parser.add_argument("--json", type=Path, help="write the results of the parts run here")
    parser.add_argument("--summary", type=Path, help="print tables and RESULT from DIR/*.json")
    args = parser.parse_args()
    if args.summary:
        results = {
            path.stem: json.loads(path.read_text()) for path in sorted(args.summary.glob("*.json"))
        }
        print(summary({name: results[name] for name in PARTS if name in results}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale or ("gpu" if device.type == "cuda" else "tiny")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_speed: {name}, torch {torch.__version__}, python {sys.version.split()[0]}")
    parts = args.part or PARTS
    if args.json and len(parts) > 1:
        parser.error("--json takes one --part")
    global _JSON
    _JSON = args.json
    results = {part: keep(run_part(part, device, scale)) for part in parts}
    print(summary(results))


if __name__ == "__main__":
    main()
