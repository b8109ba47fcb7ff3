"""UniBCT's compatibility target (Zhang et al., IJCAI 2022, arXiv 2203.01583): old class prototypes
computed from the old model's features of the *new* training set.

:func:`graph_prototypes` is the published structural refinement: within each class, a graph over
the *new* model's current features weights each old feature by how central its image is, through
the closed-form propagation ``(I - lambda P)^-1`` with a row-normalised affinity ``P`` (a
column-normalised one would give every feature the same weight: the plain mean). UniBCT rebuilds
the prototypes this way during training (``dmu_ray/methods/catalog/unibct.py``).

:func:`refine_prototypes` is the earlier neighbour-vote heuristic over the *old* feature space,
kept as ``refinement: vote``:

Plain class means of old features are poor targets when the old model embeds some images badly
(new classes it never saw, new data it does not cover): those features sit among other classes and
drag the mean. The refinement builds a k-nearest-neighbour graph over the old features and

1. smooths each feature towards its same-class neighbours (``alpha``, ``iters`` steps), and
2. weights each feature's vote for its class prototype by its structural consistency: the share of
   its k neighbours that carry its label (features lost among other classes count little).

This is our reading of "structural prototype refinement"; docs/methods.md says where it may differ
from the paper's. The refined prototypes replace the old classifier in BCT's influence loss, which
makes the loss defined for classes the old classifier never had (open-class upgrades).
"""

from __future__ import annotations

import faiss
import numpy as np


def own_row_left_out(ids: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Mask of a top-``(k + 1)`` search result ``ids`` that keeps ``k`` per row: each row's
    ``own`` id left out wherever it ranked (duplicates may displace it), the last one where it is
    absent."""
    keep = ids != np.asarray(own)[:, None]
    keep[keep.all(1), -1] = False
    return keep


def knn_graph(feats: np.ndarray, k: int, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``(neighbour ids (n, k), cosine similarities (n, k))`` of each unit-norm row among the
    others (itself excluded), exact inner-product search with faiss."""
    x = np.ascontiguousarray(feats, dtype=np.float32)
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("a neighbour graph needs at least 2 features")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, batch):
        d, i = index.search(x[lo : lo + batch], k + 1)
        keep = own_row_left_out(i, np.arange(lo, min(lo + batch, n)))
        ids[lo : lo + batch] = i[keep].reshape(-1, k)
        sims[lo : lo + batch] = d[keep].reshape(-1, k)
    return ids, sims


def refine_prototypes(
    feats: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    k: int = 10,
    alpha: float = 0.5,
    iters: int = 2,
    min_weight: float = 0.05,
    refine: bool = True,
    chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """``(prototypes (num_classes, d) unit-norm float32, present (num_classes,) bool)`` from old
    features of labelled images (see the module docstring). Classes without features are absent
    (their prototype rows are zero). ``refine=False`` gives plain class means (no neighbour graph is
    built); so do ``alpha=0, min_weight=1``, the long way."""
    if feats.ndim != 2 or len(feats) != len(labels):
        raise ValueError(f"features {feats.shape} and labels {labels.shape} do not match")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    x = feats.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    if refine:
        refined, vote = _refined_votes(x, labels, k, alpha, iters, min_weight, chunk)
    else:
        refined, vote = x, np.ones(len(x), dtype=np.float32)
    protos = np.zeros((num_classes, x.shape[1]), dtype=np.float64)
    np.add.at(protos, labels, refined * vote[:, None])
    present = np.bincount(labels, minlength=num_classes) > 0
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    protos = np.where(norms > 0, protos / np.clip(norms, 1e-12, None), 0.0)
    return protos.astype(np.float32), present


def _refined_votes(
    x: np.ndarray, labels: np.ndarray, k: int, alpha: float, iters: int, min_weight: float, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1 and 2 of the module docstring: the smoothed unit-norm features and their votes."""
    nbr, sims = knn_graph(x, k)
    same = labels[nbr] == labels[:, None]
    w = np.where(same, np.clip(sims, 0.0, None), 0.0)
    row_sum = w.sum(1, keepdims=True)
    has = row_sum[:, 0] > 0
    refined = x.copy()
    denom = np.where(has, row_sum[:, 0], 1.0)[:, None]
    for _ in range(iters):
        smooth = np.empty_like(x)
        for lo in range(0, len(x), chunk):  # n x k x d floats at a time would not fit for big sets
            sl = slice(lo, lo + chunk)
            smooth[sl] = np.einsum("nk,nkd->nd", w[sl], refined[nbr[sl]]) / denom[sl]
        refined = np.where(has[:, None], (1.0 - alpha) * x + alpha * smooth, x)
        refined /= np.linalg.norm(refined, axis=1, keepdims=True).clip(1e-12)
    return refined, np.maximum(same.mean(1), min_weight)


def graph_prototypes(
    old_feats: np.ndarray,
    new_feats: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    lam: float = 0.5,
    k: int | None = None,
    max_class: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """``(prototypes (num_classes, d_old) unit-norm float32, present (num_classes,) bool)``: for
    each class, the old features weighted by the column sums of ``(I - lam P)^-1``, where ``P`` is
    the row-normalised affinity (cosine, negatives cut, no self-loops, the ``k`` strongest per row
    when given) of the same images' *new* features. Images central in the new model's view of the
    class weigh most; an isolated one keeps weight 1 (its own row of the identity). Classes of more
    than ``max_class`` images use an evenly spaced subset of that many (the solve is cubic)."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1), got {lam}")
    if not (len(old_feats) == len(new_feats) == len(labels)):
        raise ValueError(
            f"old {old_feats.shape}, new {new_feats.shape} and labels {labels.shape} differ in length"
        )
    labels = np.asarray(labels, dtype=np.int64)
    xo = old_feats.astype(np.float64)
    xo /= np.linalg.norm(xo, axis=1, keepdims=True).clip(1e-12)
    xn = new_feats.astype(np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True).clip(1e-12)
    protos = np.zeros((num_classes, xo.shape[1]), dtype=np.float64)
    present = np.zeros(num_classes, dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for idx in np.split(order, bounds):
        if len(idx) == 0:
            continue
        c = labels[idx[0]]
        if len(idx) > max_class:
            idx = idx[np.linspace(0, len(idx) - 1, max_class).astype(np.int64)]
        weights = _central_weights(xn[idx], lam, k)
        v = weights @ xo[idx]
        protos[c] = v / max(np.linalg.norm(v), 1e-12)
        present[c] = True
    return protos.astype(np.float32), present


def _central_weights(new: np.ndarray, lam: float, k: int | None) -> np.ndarray:
    """Column sums of ``(I - lam P)^-1`` (one solve of the transposed system)."""
    n = len(new)
    if n == 1:
        return np.ones(1)
    a = np.clip(new @ new.T, 0.0, None)
    np.fill_diagonal(a, 0.0)
    if k is not None and k < n - 1:
        cut = np.partition(a, n - 1 - k, axis=1)[:, n - 1 - k][:, None]
        a = np.where(a >= cut, a, 0.0)
    rows = a.sum(1, keepdims=True)
    p = np.divide(a, rows, out=np.zeros_like(a), where=rows > 0)
    return np.linalg.solve((np.eye(n) - lam * p).T, np.ones(n))
