"""timm backbones at 32 px: what the small stem changes (size of the last feature map or the
token grid, forward FLOPs, training-step time), against the model's own stem and kinfonce's
resnet-mini measured in the same run.

Each backbone is built as ``kinfonce pretrain --backbone NAME --stem STEM`` builds it for
CIFAR-10 (3 channels, 32 px); a training step is a forward and backward pass of the backbone
on a batch of random 32 px images (the loss's share is the same for every backbone), timed
as the median of ``--repeats`` after one warm-up.

    python benchmarks/library_backbones.py [--batch-size 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from kinfonce.models import build_backbone

#: (backbone, stem) pairs; the first is the baseline of the time ratios.
BACKBONES = (
    ("resnet-mini", "auto"),
    ("timm:resnet18", "cifar"),
    ("timm:resnet18", "imagenet"),
    ("timm:vit_tiny_patch16_224", "cifar"),
    ("timm:vit_tiny_patch16_224", "imagenet"),
)


def last_grid(backbone: torch.nn.Module, images: torch.Tensor) -> str:
    """The spatial size of the last stage's output, or the transformer's patch grid."""
    if hasattr(backbone, "patch_embed"):
        rows, cols = backbone.patch_embed.grid_size
        return f"{rows}x{cols} patches"
    shapes = []
    hook = backbone.layer4.register_forward_hook(lambda m, i, out: shapes.append(out.shape))
    with torch.no_grad():
        backbone.eval()(images[:1])
    hook.remove()
    backbone.train()
    return f"{shapes[0][-2]}x{shapes[0][-1]} map"


def step_seconds(backbone: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    """Median time of a forward and backward pass of the backbone."""
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        backbone(images).square().mean().backward()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32)
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, ", end="")
    print(f"batch {args.batch_size} of 3x32x32, median of {args.repeats}")
    print(
        "| backbone | stem | parameters | last stage | forward GFLOPs / image | step s | time vs resnet-mini |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    baseline = None
    for name, stem in BACKBONES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = build_backbone(name, in_channels=3, image_size=32, stem=stem).train()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone.eval()(images[:1])
        backbone.train()
        seconds = step_seconds(backbone, images, args.repeats)
        baseline = baseline or seconds
        parameters = sum(p.numel() for p in backbone.parameters()) / 1e6
        print(
            f"| {name} | {stem} | {parameters:.2f} M | {last_grid(backbone, images)} | "
            f"{counter.get_total_flops() / 1e9:.3f} | {seconds:.2f} | {seconds / baseline:.1f} |"
        )


if __name__ == "__main__":
    main()
