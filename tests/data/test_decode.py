"""Decoding without simplejpeg: everything but JPEG decoding runs (the GPU machine lacks it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

#: Run in a child process where ``import simplejpeg`` fails, as on a machine without it.
CHILD = """
import io, sys
sys.modules["simplejpeg"] = None  # import simplejpeg -> ImportError
import numpy as np
from PIL import Image
import kinfonce.cli, kinfonce.methods, kinfonce.evaluate, kinfonce.train
from kinfonce.data.decode import decode_one
from kinfonce.errors import KinfonceError

def encoded(fmt):
    out = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), 200, dtype=np.uint8)).save(out, fmt)
    return out.getvalue()

assert decode_one(encoded("PNG")).shape == (3, 4, 6)
try:
    decode_one(encoded("JPEG"))
except KinfonceError as err:
    print("JPEG:", err)
"""


def test_everything_but_jpeg_decoding_runs_without_simplejpeg():
    """Catches a module-level ``import simplejpeg`` reachable from ``kinfonce.methods`` (which
    left the GPU run script two of its parts on a machine without it), and a missing
    simplejpeg that is reported per file instead of as one clear error."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "JPEG: decoding JPEG files needs simplejpeg" in done.stdout
    assert "pip install simplejpeg" in done.stdout
