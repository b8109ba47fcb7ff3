"""Metrics of one query/gallery pairing, and the headline figures across pairings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmu_ray.evaluate.metrics import average_precision, recall_at, relevance, tar_at_far
from dmu_ray.evaluate.search import SearchConfig, search


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together; the message names them."""


@dataclass
class MetricsConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    map_at: int = 100
    full_map_max: int = 20_000  # full-ranking mAP for galleries up to this size
    tar_fars: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    tar_max_pairs: int = 25_000_000  # TAR@FAR from all query x gallery pairs up to this many


def evaluate_pairing(
    name: str,
    q: np.ndarray,
    q_labels: np.ndarray,
    g: np.ndarray,
    g_labels: np.ndarray,
    mcfg: MetricsConfig | None = None,
    scfg: SearchConfig | None = None,
) -> dict[str, Any]:
    """mAP@K, full mAP (small galleries), Recall@K and TAR@FAR of queries ``q`` against gallery ``g``."""
    mcfg = mcfg or MetricsConfig()
    if len(g) == 0:
        raise EvaluationError(f"{name}: the gallery is empty")
    if len(q) == 0:
        raise EvaluationError(f"{name}: there are no queries")
    if q.shape[1] != g.shape[1]:
        raise EvaluationError(
            f"{name}: queries are {q.shape[1]}-d but the gallery is {g.shape[1]}-d; "
            "these models cannot be compared directly"
        )
    full = len(g) <= mcfg.full_map_max
    k = len(g) if full else min(len(g), max(mcfg.map_at, *mcfg.ks))
    res = search(q, g, k, scfg)
    ranked = np.where(res.ids >= 0, g_labels[np.clip(res.ids, 0, None)], -1)
    rel = relevance(ranked, q_labels)
    classes, counts = np.unique(g_labels, return_counts=True)
    pos = np.searchsorted(classes, q_labels).clip(max=len(classes) - 1)
    n_rel = np.where(classes[pos] == q_labels, counts[pos], 0)
    out: dict[str, Any] = {
        f"mAP@{mcfg.map_at}": float(average_precision(rel, n_rel, mcfg.map_at).mean()),
        **{f"R@{kk}": v for kk, v in recall_at(rel, mcfg.ks).items()},
        "queries": int(len(q)),
        "gallery": int(len(g)),
        "index": res.index,
    }
    if full:
        out["mAP"] = float(average_precision(rel, n_rel).mean())
    if res.recall_vs_exact is not None:
        out["search_recall_vs_exact"] = res.recall_vs_exact
    if mcfg.tar_fars and len(q) * len(g) <= mcfg.tar_max_pairs:
        scores = q.astype(np.float32) @ g.astype(np.float32).T
        same = q_labels[:, None] == g_labels[None, :]
        out.update(
            {
                f"TAR@FAR={far:g}": v
                for far, v in tar_at_far(scores.ravel(), same.ravel(), mcfg.tar_fars).items()
            }
        )
    return out


def headline(pairings: dict[str, dict[str, Any]], metric: str) -> dict[str, float]:
    """The figures people compare: gain without backfill (new/upgraded - old/old), compatibility
    (new/old - old/old), degradation (new/new - independent new/new, negative = worse)."""

    def get(p: str) -> float | None:
        return pairings.get(p, {}).get(metric)

    out = {}
    for label, a, b in (
        ("gain_without_backfill", "new/upgraded", "old/old"),
        ("compatibility", "new/old", "old/old"),
        ("new_vs_independent", "new/new", "independent/independent"),
        ("gain_with_full_backfill", "new/new", "old/old"),
    ):
        if get(a) is not None and get(b) is not None:
            out[label] = get(a) - get(b)
    return out
