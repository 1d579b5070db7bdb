"""What TF32 would do to the loss on a GPU, measured on a CPU by emulating its rounding.

Training sets float32 matmul precision "high" on CUDA, which lets cuBLAS run float32 matrix
products in TF32 (10-bit mantissa) on Ampere and later GPUs. The loss takes its distances from
one product, ``|a|^2 + |c|^2 - 2 a.c``, so TF32 there costs absolute accuracy in ``d^2`` that
small distances (aligned positives, tight clusters late in training) cannot afford. This
script measures it: the TF32 rounding is emulated on the CPU (``tests/losses/tf32.py``:
mantissas of the products' inputs truncated to 10 bits, float32 accumulation), against a
float64 reference, for

* the distances themselves (median relative error, share that come out exactly 0), and
* the loss value and its gradients (relative error, norms over the whole gradient), for
  ``KernelInfoNCE`` as it is (its products at "highest" whatever the caller set) and with
  the products left to TF32 (the code before issue 22),

over embeddings from random (start of training) to tightly clustered (late), 2N = 1024,
D = 128. The float64 reference is the same loss on float64 inputs (``tests/losses`` checks it
against a brute-force reference written from the paper). The decision it informs is written
in docs/architecture.md ("TF32 and the loss").

    python benchmarks/tf32_error.py

The last line is ``RESULT key=value ...``.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.losses.tf32
# beside it, gpu_speed.py (this directory is on the path of a script run from it)

from gpu_speed import loss_precision

from kinfonce import KernelInfoNCE
from tests.losses.tf32 import EmulatedTF32

TWO_N, DIM, CLUSTERS = 1024, 128, 16
#: (name, spread of a cluster, distance of a positive from its anchor), before normalisation
#: of unit-scale centres: "random" has no clusters.
SCENARIOS = [
    ("random", None, 0.5),
    ("clusters 0.3, positives 0.1", 0.3, 0.1),
    ("clusters 0.1, positives 0.03", 0.1, 0.03),
    ("clusters 0.03, positives 0.01", 0.03, 0.01),
]
GAMMAS = (0.5, 1.0, 2.0)
TAUS = (0.1, 0.5)


def embeddings(spread: float | None, positive: float, seed: int = 0):
    """(N, D) twice: the two views' embeddings of one scenario."""
    g = torch.Generator().manual_seed(seed)
    n = TWO_N // 2

    def noise(scale: float) -> torch.Tensor:  # rows of norm ~scale
        return scale * torch.randn(n, DIM, generator=g) / DIM**0.5

    if spread is None:
        z0 = torch.randn(n, DIM, generator=g) / DIM**0.5
    else:
        centres = F.normalize(torch.randn(CLUSTERS, DIM, generator=g), dim=1)
        z0 = centres[torch.arange(n) % CLUSTERS] + noise(spread)
    return z0, z0 + noise(positive)


@contextlib.contextmanager
def tf32(in_the_loss: bool, nearest: bool = False):
    """Precision "high" with TF32 emulated (truncated, or rounded to the nearest); with
    ``in_the_loss`` the loss's own scope to "highest" is removed (the code before issue 22)."""
    with loss_precision(in_the_loss), EmulatedTF32(nearest):
        yield


#: The arithmetics compared: each a context manager factory.
ARITHMETICS = {
    "float32": contextlib.nullcontext,
    "TF32 outside the loss (this code)": functools.partial(tf32, False),
    "TF32 in the loss, truncated": functools.partial(tf32, True),
    "TF32 in the loss, to nearest": functools.partial(tf32, True, True),
}


def distance_errors(z0, z1, arithmetic) -> tuple[float, float]:
    """(median relative error, share exactly 0) of the positive pairs' distances taken from the
    product as the loss takes every other pair's: norms elementwise, ``a.c`` in ``arithmetic``."""
    a, c = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    want = (a.double() - c.double()).norm(dim=1)
    with arithmetic():
        dots = (a @ c.T).diagonal()
    got = (a.pow(2).sum(1) + c.pow(2).sum(1) - 2 * dots).clamp_min(0).sqrt().double()
    return float(((got - want).abs() / want).median()), float((got == 0).double().mean())


def value_and_grads(loss, z0, z1, dtype=torch.float32):
    a = z0.detach().to(dtype).clone().requires_grad_(True)
    b = z1.detach().to(dtype).clone().requires_grad_(True)
    value = loss(a, b)
    value.backward()
    return value.detach().double(), torch.cat([a.grad, b.grad]).double()


def loss_errors(z0, z1, gamma, tau, arithmetic) -> tuple[float, float]:
    """Errors of the loss value (relative to max(1, its value), as tests/losses bound it) and
    of its gradient (relative, whole-gradient norms), the
    larger of the fused and the blocked path's."""
    loss = KernelInfoNCE(gamma, tau, path="blocked")
    want_value, want_grad = value_and_grads(loss, z0, z1, torch.float64)
    value_error = grad_error = 0.0
    for path in ("fused", "blocked"):
        with arithmetic():
            value, grad = value_and_grads(KernelInfoNCE(gamma, tau, path=path), z0, z1)
        value_error = max(
            value_error, float((value - want_value).abs() / want_value.abs().clamp_min(1))
        )
        grad_error = max(grad_error, float((grad - want_grad).norm() / want_grad.norm()))
    return value_error, grad_error


def main() -> None:
    started = time.perf_counter()
    print(f"# tf32_error: {platform.machine()}, torch {torch.__version__}, 2N = {TWO_N}, D = {DIM}")
    arithmetics = ARITHMETICS
    truncated, nearest = (
        arithmetics["TF32 in the loss, truncated"],
        arithmetics["TF32 in the loss, to nearest"],
    )
    print("\n| scenario | median positive distance | relative error of d, float32 | TF32, "
          "truncated | TF32, to nearest | share of d = 0, TF32 truncated |\n"
          "|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for name, spread, positive in SCENARIOS:
        z0, z1 = embeddings(spread, positive)
        d = float((F.normalize(z0, dim=1) - F.normalize(z1, dim=1)).norm(dim=1).median())
        f32, _ = distance_errors(z0, z1, contextlib.nullcontext)
        cut, zeros = distance_errors(z0, z1, truncated)
        near, _ = distance_errors(z0, z1, nearest)
        print(f"| {name} | {d:.3g} | {f32:.1e} | {cut:.1e} | {near:.1e} | {zeros:.1%} |")
    worst = dict.fromkeys(arithmetics, (0.0, 0.0))
    print(
        "\nerror of the loss value (relative to max(1, value)) / of its gradient (relative), "
        "against float64\n"
    )
    print("| scenario | gamma | tau | " + " | ".join(arithmetics) + " |")
    print("|---|---:|---:|" + "---:|" * len(arithmetics))
    for name, spread, positive in SCENARIOS:
        z0, z1 = embeddings(spread, positive)
        for gamma in GAMMAS:
            for tau in TAUS:
                cells = []
                for key, arithmetic in arithmetics.items():
                    value_error, grad_error = loss_errors(z0, z1, gamma, tau, arithmetic)
                    worst[key] = (max(worst[key][0], value_error), max(worst[key][1], grad_error))
                    cells.append(f"{value_error:.1e} / {grad_error:.1e}")
                print(f"| {name} | {gamma:g} | {tau:g} | " + " | ".join(cells) + " |")
    keys = ("float32", "exact_in_loss", "tf32_truncated", "tf32_nearest")
    result = {}
    for key, (value_error, grad_error) in zip(keys, worst.values(), strict=True):
        result[f"{key}_worst_value_error"] = f"{value_error:.1e}"
        result[f"{key}_worst_grad_error"] = f"{grad_error:.1e}"
    result["seconds"] = round(time.perf_counter() - started)
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
