"""Retrieval metrics from ranked gallery labels: Recall@K, mAP@K, full-ranking mAP, TAR@FAR.

``ranked`` is an (n_query, k) array of the gallery labels in rank order (-1 pads missing ranks);
``n_relevant`` is, per query, how many gallery items share its label.
"""

from __future__ import annotations

import numpy as np


def relevance(ranked_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Boolean (n_query, k): is the item at each rank of the query's class."""
    return ranked_labels == query_labels[:, None]


def recall_at(rel: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Recall@K (a.k.a. top-K accuracy): share of queries with a correct item in the first K."""
    return {k: float(rel[:, :k].any(axis=1).mean()) if len(rel) else 0.0 for k in ks}


def average_precision(rel: np.ndarray, n_relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """AP per query over the first ``k`` ranks (all given ranks when None). The denominator is
    min(n_relevant, k): a perfect top-k scores 1 even when the class has more than k items."""
    r = rel if k is None else rel[:, :k]
    depth = r.shape[1]
    hits = np.cumsum(r, axis=1)
    prec = hits / np.arange(1, depth + 1)
    denom = np.minimum(n_relevant, depth).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (prec * r).sum(axis=1) / denom
    return np.where(denom > 0, ap, 0.0)


def tar_at_far(scores: np.ndarray, same: np.ndarray, fars: list[float]) -> dict[float, float]:
    """True-accept rate at each false-accept rate, from pair scores and same-class flags."""
    genuine, impostor = scores[same], np.sort(scores[~same])[::-1]
    out = {}
    for far in fars:
        if len(impostor) == 0 or len(genuine) == 0:
            out[far] = float("nan")
            continue
        n_fa = int(np.floor(far * len(impostor)))
        thr = impostor[n_fa] if n_fa < len(impostor) else -np.inf
        out[far] = float((genuine > thr).mean())
    return out
