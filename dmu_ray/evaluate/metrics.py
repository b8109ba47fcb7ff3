"""Retrieval metrics from ranked gallery labels: Recall@K, mAP@K, full-ranking mAP, TAR@FAR.

``ranked`` is an (n_query, k) array of the gallery labels in rank order (-1 pads missing ranks);
``n_relevant`` is, per query, how many gallery items share its label.
"""

from __future__ import annotations

from typing import Any

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


def revisited_ap_mp(
    ranked: np.ndarray, positives: np.ndarray, junk: np.ndarray, ks: list[int]
) -> tuple[float, dict[int, float]] | None:
    """AP and mP@k of one query as the Revisited Oxford/Paris evaluation defines them: junk items
    are removed from the ranking (``ranked``: gallery ids in rank order, the whole gallery), AP is
    the trapezoid rule over recall, mP@k = positives in the first k' / k' with k' = min(k, rank of
    the last positive). None when the query has no positive (it does not count)."""
    if len(positives) == 0:
        return None
    kept = ranked[~np.isin(ranked, junk)]
    ranks = np.sort(np.flatnonzero(np.isin(kept, positives)))  # 0-based ranks of the positives found
    n = len(positives)
    j = np.arange(len(ranks))
    before = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))  # precision just before each hit
    at = (j + 1) / (ranks + 1)  # precision at each hit
    ap = float(((before + at) / 2).sum() / n)
    mp = {}
    last = int(ranks.max()) + 1 if len(ranks) else 0
    for k in ks:
        kk = min(k, last) if last else k
        mp[k] = float((ranks < kk).sum() / kk) if kk else 0.0
    return ap, mp


def tpir_at_fpir(
    scores: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_subjects: np.ndarray,
    fpirs: list[float],
    ranks: list[int],
) -> dict[str, Any]:
    """Open-set 1:N identification from probe x gallery-template scores: a probe is mated when its
    subject has a template in the gallery. TPIR at FPIR f: share of mated probes whose top template
    is of their subject with a score above the threshold at which a share f of non-mated probes'
    top scores lie above it (nan without non-mated probes). Rank-k: share of mated probes with a
    template of their subject among the first k."""
    mated = np.isin(probe_subjects, gallery_subjects)
    order = np.argsort(-scores, axis=1)
    top = scores[np.arange(len(scores)), order[:, 0]]
    hit = gallery_subjects[order] == probe_subjects[:, None]  # (probes, gallery) in rank order
    out: dict[str, Any] = {"mated_probes": int(mated.sum()), "non_mated_probes": int((~mated).sum())}
    nm = np.sort(top[~mated])[::-1]
    for f in fpirs:
        if not mated.any() or len(nm) == 0:
            out[f"TPIR@FPIR={f:g}"] = float("nan")
            continue
        n_fa = int(np.floor(f * len(nm)))
        thr = nm[n_fa] if n_fa < len(nm) else -np.inf
        out[f"TPIR@FPIR={f:g}"] = float((hit[mated, 0] & (top[mated] > thr)).mean())
    for k in ranks:
        out[f"rank{k}"] = float(hit[mated, :k].any(axis=1).mean()) if mated.any() else float("nan")
    return out
