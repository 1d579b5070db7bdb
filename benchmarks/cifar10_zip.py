"""Where the CIFAR-10 benchmark scripts find CIFAR-10 (../shared/data/cifar10-jpg.zip beside the
checkout, a JPEG re-encoding; see ../shared/data/README.md; never committed) and where they
write their runs by default."""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ZIP = REPO.parent / "shared" / "data" / "cifar10-jpg.zip"


def cifar10_missing(what: str = "") -> bool:
    """True, after printing a SKIPPED line naming ``what``, when the zip is absent."""
    if CIFAR10_ZIP.is_file():
        return False
    print(
        f"SKIPPED{' ' + what if what else ''}: {CIFAR10_ZIP} is absent (see ../shared/data/README.md)"
    )
    return True


def stamped_run_dir(name: str) -> str:
    """``runs/bench/<name>-<YYYYmmdd-HHMMSS>`` in the checkout: a benchmark's default output."""
    return str(REPO / "runs" / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
