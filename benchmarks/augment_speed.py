"""Views per second: batched SimCLR views (kinfonce.data.augment) against torchvision's PIL pipeline.

The same transforms both ways (random resized crop 0.08-1, flip, colour jitter 0.8/0.8/0.8/0.2
with p=0.8, grayscale p=0.2, normalisation) on CIFAR-10-sized images: the training images of
../shared/data/cifar10-jpg.zip when present (through the kinfonce cache), else random uint8 images.
The PIL pipeline runs per image in this process and in a 2-worker DataLoader (persistent workers,
the second epoch timed); the batched pipeline runs in this process on the same images, with
PyTorch's default thread count and with one thread. With the zip present, it also times loading
CIFAR-10 from it into a fresh cache (decoding) and again (from the cache).

    python benchmarks/augment_speed.py [--images 8192] [--batch-size 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
from cifar10_zip import CIFAR10_ZIP as ZIP
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from kinfonce.data import load_dataset
from kinfonce.data.augment import SimCLRViews


def pil_pipeline(size: int, mean, std) -> T.Compose:
    """torchvision's per-image SimCLR pipeline with the same settings as ``SimCLRViews``."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class PairDataset(Dataset):
    """Two PIL-pipeline views of each uint8 image (C, H, W), as a SimCLR data set gives."""

    def __init__(self, images: torch.Tensor, transform: T.Compose) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


def views_per_second(run, n_views: int) -> float:
    start = time.perf_counter()
    run()
    return n_views / (time.perf_counter() - start)


def load_images(count: int) -> tuple[torch.Tensor, tuple, tuple, str, dict[str, float]]:
    """Images for the runs, and (zip present) the load times into a fresh cache and from it."""
    if not ZIP.is_file():
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=gen)
        return images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "random uint8 (zip absent)", {}
    times = {}
    with tempfile.TemporaryDirectory() as cache:
        for run in ("first", "second"):
            start = time.perf_counter()
            data = load_dataset(f"imagefolder:{ZIP}", cache_dir=cache)
            times[f"cifar10_zip_load_{run}_s"] = time.perf_counter() - start
        images = data.train.images[:count].clone()
    return images, data.mean, data.std, "cifar10-jpg.zip train", times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    images, mean, std, source, load_times = load_images(args.images)
    n, size = images.shape[0], images.shape[-1]
    n_views = 2 * n
    dataset = PairDataset(images, pil_pipeline(size, mean, std))

    def pil_in_process() -> None:
        for start in range(0, n, args.batch_size):
            pairs = [dataset[i] for i in range(start, min(n, start + args.batch_size))]
            torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=2, persistent_workers=True)

    def pil_loader() -> None:
        for _ in loader:
            pass

    views = SimCLRViews(size, mean, std).to(args.device)
    device_images = images.to(args.device)

    def batched() -> None:
        for start in range(0, n, args.batch_size):
            batch = device_images[start : start + args.batch_size]
            views.pair(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    batched()  # warm-up (kernels, allocator)
    pil_loader()  # first epoch starts the workers; the second is timed
    default_threads = torch.get_num_threads()
    rates = {
        "pil_1proc": views_per_second(pil_in_process, n_views),
        "pil_loader2": views_per_second(pil_loader, n_views),
        "batched": views_per_second(batched, n_views),
    }
    torch.set_num_threads(1)
    rates["batched_1thread"] = views_per_second(batched, n_views)
    torch.set_num_threads(default_threads)
    print(
        f"images: {n} x {tuple(images.shape[1:])} from {source}; batch {args.batch_size}; "
        f"device {args.device}; "
        f"{os.cpu_count()} CPUs; {platform.machine()}; load average {os.getloadavg()[0]:.1f}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    print(f"{'pipeline':<42} {'views/s':>10} {'vs loader2':>11}")
    labels = {
        "pil_1proc": "torchvision PIL, per image, 1 process",
        "pil_loader2": "torchvision PIL, DataLoader 2 workers",
        "batched": f"SimCLRViews, {args.device}, {default_threads} threads",
        "batched_1thread": f"SimCLRViews, {args.device}, 1 thread",
    }
    for key, rate in rates.items():
        print(f"{labels[key]:<42} {rate:>10.0f} {rate / rates['pil_loader2']:>10.2f}x")
    for key, seconds in load_times.items():
        print(f"{key:<42} {seconds:>9.1f}s")
    figures = {f"{key}_views_per_s": f"{rate:.0f}" for key, rate in rates.items()}
    figures["batched_vs_loader2"] = f"{rates['batched'] / rates['pil_loader2']:.2f}"
    figures["batched_1thread_vs_loader2"] = f"{rates['batched_1thread'] / rates['pil_loader2']:.2f}"
    figures |= {key: f"{seconds:.1f}" for key, seconds in load_times.items()}
    print("RESULT " + " ".join(f"{key}={value}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
