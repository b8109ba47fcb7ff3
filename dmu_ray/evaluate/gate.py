"""The label-free switch gate: what share of a full re-embedding's neighbours a strategy retrieves.

On held-out items embedded by both models, new/new (new-model queries against new-model vectors,
a full re-embedding) gives the reference top-k of every query; a strategy (old/old, new/old,
new/upgraded with a gallery-side adapter, adapted/old with a query-side one, a partial backfill)
is scored by the share of that top-k it retrieves (Recall@k against new/new's neighbours, the
figure Drift-Adapter reports). No labels are needed."""

from __future__ import annotations

import numpy as np

from dmu_ray.evaluate.search import SearchConfig, search
from dmu_ray.methods.prototypes import own_row_left_out

__all__ = ["share_of_reembedding", "shares_per_query", "labelled_metrics", "unit_rows"]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def share_of_reembedding(
    reference: tuple[np.ndarray, np.ndarray],
    strategies: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int = 10,
    cfg: SearchConfig | None = None,
    own: np.ndarray | None = None,
) -> dict[str, float]:
    """For each strategy ``(queries, gallery)`` (row i of every gallery is the same item), the mean
    over queries of ``|top_k(strategy) & top_k(reference)| / k``; vectors are compared by cosine.
    ``own``: as in :func:`shares_per_query`."""
    per = shares_per_query(reference, strategies, k, cfg, own)
    return {name: float(v.mean()) for name, v in per.items()}


def shares_per_query(
    reference: tuple[np.ndarray, np.ndarray],
    strategies: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int = 10,
    cfg: SearchConfig | None = None,
    own: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """:func:`share_of_reembedding` query by query: per strategy, each query's share of the
    reference's top-k (what a paired comparison of two strategies needs). ``own``: each query's
    own row in the galleries (queries drawn from the gallery's items), left out of its neighbours
    in every search."""
    rq, rg = reference
    k = min(k, len(rg) - (own is not None))
    if k < 1 or len(rq) == 0:
        raise ValueError(f"the gate needs queries and a gallery (got {len(rq)} queries, {len(rg)} items)")
    ref = _top(rq, rg, k, cfg, own)
    out = {}
    for name, (q, g) in strategies.items():
        if len(q) != len(rq) or len(g) != len(rg):
            raise ValueError(
                f"{name}: {len(q)} queries and {len(g)} items, the reference has {len(rq)} and {len(rg)}"
            )
        got = _top(q, g, k, cfg, own)
        out[name] = (got[:, :, None] == ref[:, None, :]).any(-1).sum(1) / k
    return out


def _top(
    q: np.ndarray, g: np.ndarray, k: int, cfg: SearchConfig | None, own: np.ndarray | None
) -> np.ndarray:
    """Top-``k`` rows of ``g`` for each query by cosine, each query's ``own`` row left out."""
    if own is None:
        return search(unit_rows(q), unit_rows(g), k, cfg).ids
    ids = search(unit_rows(q), unit_rows(g), k + 1, cfg).ids
    return ids[own_row_left_out(ids, own)].reshape(len(ids), k)


def labelled_metrics(
    strategies: dict[str, tuple[np.ndarray, np.ndarray]],
    q_labels: np.ndarray,
    g_labels: np.ndarray,
    map_at: int = 100,
    cfg: SearchConfig | None = None,
    own: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Where the items have labels: each strategy's R@1 and mAP@``map_at`` (a gallery item is
    relevant to a query of its label; cosine search), beside the label-free share. ``own``: each
    query's own row in the galleries, neither a result nor counted as relevant."""
    from dmu_ray.evaluate.metrics import average_precision, recall_at, relevance

    k = min(map_at, len(g_labels) - (own is not None))
    n_rel = (g_labels[None, :] == q_labels[:, None]).sum(1)
    if own is not None:
        n_rel = n_rel - (g_labels[own] == q_labels)
    out = {}
    for name, (q, g) in strategies.items():
        ranked = g_labels[_top(q, g, k, cfg, own)]
        rel = relevance(ranked, q_labels)
        out[name] = {
            "R@1": recall_at(rel, [1])[1],
            f"mAP@{map_at}": float(average_precision(rel, n_rel, k).mean()),
        }
    return out
