"""Where the benchmark scripts find CIFAR-10: ../shared/data/cifar10-jpg.zip beside the checkout
(a JPEG re-encoding of CIFAR-10; see ../shared/data/README.md). Never committed."""

from __future__ import annotations

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
