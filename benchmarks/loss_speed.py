"""Speed, memory and stability of KernelInfoNCE against the literal Algorithm 2 and lightly.

Times forward + backward on CPU at 2N in {512, 2048, 8192}, d = 128, gamma in {0.5, 1, 2}:

* literal: Algorithm 2 as printed (cdist -> pow -> exp -> row sum minus diagonal -> log of ratio);
* kinfonce: ``KernelInfoNCE(gamma, tau)`` (``path="auto"``), and beside it the blocked path
  (``path="blocked"``, the only path before the fused one existed) to show the choice;
* lightly: ``lightly.loss.NTXentLoss(temperature=tau / 2)`` (equal to the Gaussian kernel, gamma = 2).

The three are timed interleaved, repeat by repeat, and the table gives medians and ratios from the
same run. Then a 2N = 65,536 chunked loss runs in a child process whose peak resident memory is
read from the kernel (``ru_maxrss``), ``--memory 2N ...`` compares that peak with lightly's
NT-Xent's at the same sizes, and the float32 error of the literal formula and of kinfonce
against a float64 reference is printed for small temperatures. The last line is ``RESULT ...``.

    python benchmarks/loss_speed.py            # full run, a few minutes on 2 cores
    python benchmarks/loss_speed.py --quick    # sizes 512 and 2048 only, no 65,536 case
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kinfonce import KernelInfoNCE


def literal_algorithm_2(z0: torch.Tensor, z1: torch.Tensor, gamma: float, tau: float):
    """Algorithm 2 in the paper, written literally (with the kernel's minus sign of Eq. 7)."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    s = torch.cdist(z, z).pow(gamma)
    k = torch.exp(-s / tau)
    denominator = k.sum(1) - k.diagonal()
    idx = torch.arange(2 * n)
    numerator = k[idx, (idx + n) % (2 * n)]
    return -torch.log(numerator / denominator).mean()


def reference_float64(z0: torch.Tensor, z1: torch.Tensor, gamma: float, tau: float) -> float:
    """The same loss in float64 and in the log domain (row shift), the ground truth."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]).double(), dim=1)
    logits = -torch.cdist(z, z).pow(gamma) / tau
    logits.fill_diagonal_(-torch.inf)
    idx = torch.arange(2 * n)
    return float((torch.logsumexp(logits, 1) - logits[idx, (idx + n) % (2 * n)]).mean())


def time_once(fn, z0: torch.Tensor, z1: torch.Tensor) -> float:
    a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    start = time.perf_counter()
    fn(a, b).backward()
    return time.perf_counter() - start


def timed(candidates: dict, z0, z1, repeats: int) -> dict[str, float]:
    """Median seconds per forward + backward, the candidates interleaved to share the noise."""
    for fn in candidates.values():
        time_once(fn, z0, z1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(time_once(fn, z0, z1))
    return {name: statistics.median(ts) for name, ts in times.items()}


def speed_table(sizes, gammas, dim, tau, repeats, chunk_size, path="auto"):
    from lightly.loss import NTXentLoss

    rows = []
    for two_n in sizes:
        g = torch.Generator().manual_seed(two_n)
        z0 = torch.randn(two_n // 2, dim, generator=g)
        z1 = z0 + 0.5 * torch.randn(two_n // 2, dim, generator=g)
        reps = max(3, repeats // (two_n // 2048 + 1))
        for gamma in gammas:
            candidates = {
                "literal": lambda a, b, gamma=gamma: literal_algorithm_2(a, b, gamma, tau),
                "kinfonce": KernelInfoNCE(
                    gamma=gamma, temperature=tau, chunk_size=chunk_size, path=path
                ),
                "blocked": KernelInfoNCE(
                    gamma=gamma, temperature=tau, chunk_size=chunk_size, path="blocked"
                ),
            }
            if gamma == 2.0:
                candidates["lightly"] = NTXentLoss(temperature=tau / 2)
            t = timed(candidates, z0, z1, reps)
            rows.append(
                {
                    "2N": two_n,
                    "gamma": gamma,
                    "literal_ms": 1e3 * t["literal"],
                    "kinfonce_ms": 1e3 * t["kinfonce"],
                    "blocked_ms": 1e3 * t["blocked"],
                    "speedup": t["literal"] / t["kinfonce"],
                    "lightly_ms": 1e3 * t["lightly"] if "lightly" in t else None,
                    "ratio_to_lightly": t["kinfonce"] / t["lightly"] if "lightly" in t else None,
                }
            )
            print(_row_text(rows[-1]), flush=True)
    return rows


def _row_text(r: dict) -> str:
    lightly = "-" if r["lightly_ms"] is None else f"{r['lightly_ms']:.1f}"
    ratio = "-" if r["ratio_to_lightly"] is None else f"{r['ratio_to_lightly']:.2f}"
    return (
        f"| {r['2N']:>5} | {r['gamma']:>4} | {r['literal_ms']:>9.1f} | {r['kinfonce_ms']:>9.1f} "
        f"| {r['blocked_ms']:>9.1f} | {r['speedup']:>5.2f}x | {lightly:>8} | {ratio:>6} |"
    )


def stability_table(taus, gammas, dim, two_n=512):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(two_n // 2, dim, generator=g)
    z1 = z0 + 3.0 * torch.randn(two_n // 2, dim, generator=g)  # far views: the loss is O(1)
    rows = []
    for tau in taus:
        for gamma in gammas:
            ref = reference_float64(z0, z1, gamma, tau)
            lit = float(literal_algorithm_2(z0, z1, gamma, tau))
            ours = float(KernelInfoNCE(gamma=gamma, temperature=tau)(z0, z1))
            bound = 1e-5 * max(1.0, abs(ref))
            rows.append(
                {
                    "tau": tau,
                    "gamma": gamma,
                    "reference": ref,
                    "literal": lit,
                    "kinfonce": ours,
                    "literal_ok": abs(lit - ref) <= bound,
                    "kinfonce_ok": abs(ours - ref) <= bound,
                }
            )
    return rows


def memory_child(two_n: int, dim: int, chunk: int, loss_name: str) -> None:
    """Runs in a child process: one forward + backward of ``loss_name`` (``kinfonce``, gamma 1,
    ``chunk_size`` ``chunk`` or the default for 0; or ``nt-xent``, lightly's); prints its time
    and peak RSS as JSON."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(two_n // 2, dim, generator=g, requires_grad=True)
    z1 = (z0.detach() + 0.5 * torch.randn(two_n // 2, dim, generator=g)).requires_grad_(True)
    if loss_name == "nt-xent":
        from lightly.loss import NTXentLoss

        loss_fn = NTXentLoss(temperature=0.25)
    else:
        loss_fn = KernelInfoNCE(gamma=1.0, temperature=0.5, chunk_size=chunk or None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = loss_fn(z0, z1)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finite = bool(torch.isfinite(loss) and torch.isfinite(z0.grad).all())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mib": peak_kib / 1024,
                "before_mib": base / 1024,
                "loss": float(loss.detach()),
                "finite": finite,
            }
        )
    )


def run_child(two_n: int, dim: int, chunk: int, loss_name: str) -> dict:
    """:func:`memory_child` in a fresh process (its own peak RSS); returns its JSON."""
    cmd = [sys.executable, __file__, "--child", loss_name, "--big", str(two_n), "--dim", str(dim)]
    cmd += ["--big-chunk", str(chunk)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 2048, 8192], help="values of 2N"
    )
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension d")
    parser.add_argument("--tau", type=float, default=0.5, help="temperature for the speed table")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats at 2N <= 2048")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="kinfonce chunk_size in the speed table"
    )
    parser.add_argument(
        "--path", default="auto", help="KernelInfoNCE path of the 'kinfonce' column"
    )
    parser.add_argument(
        "--big", type=int, default=65536, help="2N of the chunked memory case (0: skip)"
    )
    parser.add_argument("--big-chunk", type=int, default=512, help="chunk_size of the memory case")
    parser.add_argument(
        "--memory",
        type=int,
        nargs="*",
        default=[],
        help="2N values at which kinfonce's (default chunk) and NT-Xent's peak memory are compared",
    )
    parser.add_argument("--quick", action="store_true", help="sizes 512 and 2048, no memory case")
    parser.add_argument("--child", choices=("kinfonce", "nt-xent"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.big, args.dim, args.big_chunk, args.child)
        return
    if args.quick:
        args.sizes, args.big = [512, 2048], 0

    print(
        f"# KernelInfoNCE speed: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, tau = {args.tau}, d = {args.dim}, "
        f"kinfonce path {args.path!r}"
    )
    print(
        "|    2N | gamma | literal ms | kinfonce ms | blocked ms | speedup | lightly ms "
        "| ours/lightly |"
    )
    print(
        "|------:|------:|-----------:|------------:|-----------:|--------:|-----------:|-------------:|"
    )
    rows = speed_table(
        args.sizes, args.gammas, args.dim, args.tau, args.repeats, args.chunk_size, args.path
    )

    print("\n# float32 error against float64 (2N = 512, d = 128); ok = within 1e-5 * max(1, |ref|)")
    print("|  tau | gamma | float64 ref | literal f32 | ok | kinfonce f32 | ok |")
    print("|-----:|------:|------------:|------------:|----|-------------:|----|")
    stab = stability_table([0.05, 0.01], args.gammas, args.dim)
    for r in stab:
        print(
            f"| {r['tau']} | {r['gamma']} | {r['reference']:.6f} | {r['literal']:.6f} | "
            f"{'yes' if r['literal_ok'] else 'NO'} | {r['kinfonce']:.6f} | "
            f"{'yes' if r['kinfonce_ok'] else 'NO'} |"
        )

    result = {}
    for r in rows:
        if r["2N"] in (2048, 8192):
            result[f"speedup_g{r['gamma']:g}_2n{r['2N']}"] = round(r["speedup"], 2)
            result[f"auto_over_blocked_g{r['gamma']:g}_2n{r['2N']}"] = round(
                r["kinfonce_ms"] / r["blocked_ms"], 2
            )
            if r["ratio_to_lightly"] is not None:
                result[f"ratio_to_lightly_2n{r['2N']}"] = round(r["ratio_to_lightly"], 2)
    result["stable_all"] = all(r["kinfonce_ok"] for r in stab)
    result["literal_stable_all"] = all(r["literal_ok"] for r in stab)

    if args.big:
        out = run_child(args.big, args.dim, args.big_chunk, "kinfonce")
        print(
            f"\n# chunked 2N = {args.big}, d = {args.dim}, chunk_size = {args.big_chunk}, gamma = 1: "
            f"forward + backward {out['seconds']:.1f} s, peak RSS {out['peak_mib']:.0f} MiB "
            f"(of which {out['before_mib']:.0f} MiB before the loss), finite = {out['finite']}"
        )
        result[f"chunked_{args.big}_peak_mib"] = round(out["peak_mib"])
        result[f"chunked_{args.big}_seconds"] = round(out["seconds"], 1)
    if args.memory:
        print(
            "\n# peak RSS above the inputs, one forward + backward in a fresh process, d = "
            f"{args.dim}: kinfonce (gamma 1, default chunk) against lightly's NT-Xent"
        )
        print("|    2N | kinfonce MiB | kinfonce s | NT-Xent MiB | NT-Xent s | memory ratio |")
        print("|------:|-------------:|-----------:|------------:|----------:|-------------:|")
    for two_n in args.memory:
        ours, theirs = (run_child(two_n, args.dim, 0, name) for name in ("kinfonce", "nt-xent"))
        mib = {k: v["peak_mib"] - v["before_mib"] for k, v in (("ours", ours), ("theirs", theirs))}
        print(
            f"| {two_n:>5} | {mib['ours']:>12.0f} | {ours['seconds']:>10.2f} "
            f"| {mib['theirs']:>11.0f} | {theirs['seconds']:>9.2f} "
            f"| {mib['ours'] / mib['theirs']:>12.2f} |"
        )
        result[f"memory_over_ntxent_2n{two_n}"] = round(mib["ours"] / mib["theirs"], 2)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
