"""Training from an image tree holds batches, not the data set: one epoch's peak resident
memory does not grow with the decoded size of the tree."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from kinfonce.data import load_dataset
from tests.helpers import write_image_tree

#: Side of the decoded images: 76,800 bytes each, so that 800 more images are 61 MB more.
SIDE = 160

#: One epoch on each tree in one process (the small tree first, twice, so that Lightning, the
#: model and the allocator are warm), each from a peak reset to the resident memory then.
EPOCHS = """
import json, os, sys, tempfile
from kinfonce.config import PretrainConfig
from kinfonce.train import run_pretrain

def kib(key):
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith(key + ":"))

growth = []
with tempfile.TemporaryDirectory() as out:
    for i, tree in enumerate(sys.argv[1:]):
        config = PretrainConfig(
            dataset=f"imagefolder:{{tree}}", image_size={side}, backbone="resnet-mini",
            proj_hidden_dim=32, batch_size=32, epochs=1, warmup_epochs=0, baselines=False,
            progress=False, output_dir=os.path.join(out, str(i)),
        )
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM, the peak, starts again from VmRSS
        before = kib("VmRSS")
        run_pretrain(config, evaluate=False)
        growth.append((kib("VmHWM") - before) * 1024)
print(json.dumps(growth))
"""


def _mixed_jpegs(root: Path, per_class: int) -> Path:
    """Two classes of ``per_class`` training and 8 test JPEGs, each of its own width and height
    (60 to 400 px) and blocky random content."""

    def image(name: str, i: int, rng: np.random.Generator) -> np.ndarray:
        height, width = rng.integers(60, 401, size=2)
        grid = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        return grid.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]

    return write_image_tree(root, image, ["a", "b"], {"train": per_class, "test": 8}, fmt="JPEG")


def test_an_epoch_peak_memory_does_not_grow_with_the_decoded_set(tmp_path, monkeypatch):
    # Catches a data set held in memory: splits copied out of the cache (the train/val split
    # of the earlier loader), a memory map whose touched pages stay resident through the
    # epoch, or a loader that keeps what it read. Each adds the decoded size of what an epoch
    # reads to the peak; reading rows per batch adds nothing.
    cache = tmp_path / "cache"
    monkeypatch.setenv("KINFONCE_CACHE", str(cache))
    trees = {
        "small": _mixed_jpegs(tmp_path / "small", 32),
        "large": _mixed_jpegs(tmp_path / "large", 432),
    }
    decoded = {}
    for name, tree in trees.items():  # decoded by 2 worker processes, before the epochs
        data = load_dataset(f"imagefolder:{tree}", image_size=SIDE, workers=2)
        decoded[name] = (len(data.train) + len(data.val) + len(data.test)) * 3 * SIDE * SIDE
    code = textwrap.dedent(EPOCHS).format(side=SIDE)
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "-c",
            code,
            *map(str, (trees["small"], trees["small"], trees["large"])),
        ],
        capture_output=True,
        text=True,
        check=False,
        # A fixed mmap threshold returns freed batch buffers to the system. With glibc's
        # sliding one they may stay in the heap, and the same epoch's peak then measured
        # from 27 to 250 MB above its start, by the allocation history alone.
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, small, large = json.loads(done.stdout.strip().splitlines()[-1])
    more_data = decoded["large"] - decoded["small"]  # 61 MB
    assert large - small < more_data / 2, (small, large, more_data)
