"""What the id-based text side costs for many distinct captions: indexing, tokenising, the
small text encoder's memory and its training step, for 1,000 to 100,000 captions.

The text side of ``kinfonce clip`` maps caption ids to embeddings: a run's distinct captions
are indexed once (:func:`kinfonce.captions.shared_captions`), tokenised once into a (V, L)
buffer (:class:`kinfonce.text.WordTokenizer`, L at most ``MAX_TOKENS``), and a step encodes
only its batch's rows. This measures each part for V distinct generated captions of 8 to 20
words over a vocabulary of 20,000 words (a Zipf draw, as in real text), and the peak memory
that Python and torch allocate for it (``tracemalloc`` for Python objects, the tensors'
sizes for torch).

Usage:
    python benchmarks/caption_scale.py [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np
import torch

from kinfonce.captions import shared_captions
from kinfonce.text import SmallTextEncoder, WordTokenizer

VOCABULARY = 20_000


def captions(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct captions of 8-20 Zipf-drawn words."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        words = rng.zipf(1.3, int(rng.integers(8, 21))) % VOCABULARY
        out[" ".join(f"w{w}" for w in words)] = None
    return list(out)


def timed(function, *args):
    """(result, seconds, peak MiB of Python allocations) of one call."""
    tracemalloc.start()
    started = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def measure(count: int, batch: int = 256) -> dict[str, float]:
    texts = captions(count)
    rows = [(t,) for t in texts]
    (paired,), index_s, index_mib = timed(shared_captions, [rows])
    tokenizer, vocab_s, vocab_mib = timed(WordTokenizer, paired.texts)
    tokens, token_s, token_mib = timed(tokenizer, paired.texts)
    encoder, build_s, _ = timed(SmallTextEncoder, paired.texts)
    parameters = sum(p.numel() for p in encoder.parameters())
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01)
    ids = torch.randint(count, (batch,), generator=torch.Generator().manual_seed(0))
    step_times = []
    for _ in range(6):
        started = time.perf_counter()
        encoder(ids).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - started)
    return {
        "captions": count,
        "vocabulary": len(tokenizer.vocab),
        "index_s": index_s,
        "index_mib": index_mib,
        "tokenize_s": vocab_s + token_s,
        "tokenize_mib": max(vocab_mib, token_mib),
        "tokens_mib": tokens.numel() * tokens.element_size() / 2**20,
        "encoder_build_s": build_s,
        "parameters_m": parameters / 1e6,
        "step_ms": 1000 * float(np.median(step_times[1:])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    args = parser.parse_args()
    print(
        "| distinct captions | vocabulary | index (s / peak MiB) | tokenise (s / peak MiB) "
        "| token buffer (MiB) | encoder build (s) | parameters (M) | step of 256 (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in args.sizes:
        m = measure(count)
        print(
            f"| {m['captions']:,} | {m['vocabulary']:,} | {m['index_s']:.2f} / "
            f"{m['index_mib']:.0f} | {m['tokenize_s']:.2f} / {m['tokenize_mib']:.0f} | "
            f"{m['tokens_mib']:.1f} | {m['encoder_build_s']:.2f} | {m['parameters_m']:.2f} | "
            f"{m['step_ms']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
