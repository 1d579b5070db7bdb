"""Image-text retrieval recall at K, as CLIP papers report it, from a score matrix.

A query (an image, or a caption) is a hit at K when one of its true matches ranks among the
K best-scored candidates. Ties count against the query: the rank of its best true match is
one plus the number of other candidates scoring at least as high, so a model that scores
everything alike gets no hits (not all of them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kinfonce.errors import KinfonceError

#: The K of ``recall@K`` reported by ``kinfonce clip``.
RECALL_KS = (1, 5, 10)


def match_ranks(scores: Tensor, matches: Tensor) -> Tensor:
    """The rank of each query's best-scored true match, ties counted against it.

    Args:
        scores: (Q, C) scores of C candidates for Q queries, higher is nearer.
        matches: (Q, C) bool, the true matches; every query has at least one.

    Returns:
        (Q,) int64 ranks >= 1.

    Raises:
        KinfonceError: shapes differ, a query without a true match, or a non-finite score.
    """
    if scores.shape != matches.shape or scores.ndim != 2:
        raise KinfonceError(
            f"scores and matches must be (Q, C) alike, got {tuple(scores.shape)} and "
            f"{tuple(matches.shape)}"
        )
    if not matches.any(dim=1).all():
        raise KinfonceError("every query needs at least one true match")
    if not torch.isfinite(scores).all():
        raise KinfonceError("retrieval scores hold non-finite values")
    best = scores.masked_fill(~matches, -torch.inf).max(dim=1, keepdim=True).values
    ahead = (scores >= best) & ~matches
    return 1 + ahead.sum(dim=1)


def recall_at(ranks: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Fraction of queries whose rank is at most K, for each K."""
    return {k: float((ranks <= k).float().mean()) for k in ks}


def retrieval_recall(
    scores: Tensor, matches: Tensor, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Image-to-text and text-to-image recall at each K.

    Args:
        scores: (N, T) scores of N images against T captions.
        matches: (N, T) bool, caption t describes image n; every image and caption has one.

    Returns:
        ``image_to_text_r{K}`` and ``text_to_image_r{K}`` for each K.
    """
    out = {}
    for name, s, m in (("image_to_text", scores, matches), ("text_to_image", scores.T, matches.T)):
        for k, value in recall_at(match_ranks(s, m), ks).items():
            out[f"{name}_r{k}"] = value
    return out
