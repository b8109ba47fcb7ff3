"""Metrics of one query/gallery pairing, and the headline figures across pairings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmu_ray.evaluate.ground_truth import GroundTruthError
from dmu_ray.evaluate.protocols import PROTOCOLS, Pairing
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
    protocols: list[str] = field(default_factory=lambda: ["retrieval", "verification"])
    #: loaded ground truth by protocol section (``revisited``, ``templates``)
    ground_truth: dict[str, Any] = field(default_factory=dict)
    revisited_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    template_fars: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    fpirs: list[float] = field(default_factory=lambda: [1e-2, 1e-1])
    identification_ranks: list[int] = field(default_factory=lambda: [1, 5, 10])


def evaluate_pairing(
    name: str,
    q: np.ndarray,
    q_labels: np.ndarray,
    g: np.ndarray,
    g_labels: np.ndarray,
    mcfg: MetricsConfig | None = None,
    scfg: SearchConfig | None = None,
    q_ids: np.ndarray | None = None,
    g_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """The metrics of every protocol in ``mcfg.protocols`` (default: retrieval and verification)
    for queries ``q`` against gallery ``g`` (row ids ``q_ids``/``g_ids`` for protocols with
    ground truth by image); one faiss search serves every protocol that ranks."""
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
    unknown = [p for p in mcfg.protocols if p not in PROTOCOLS]
    if unknown:
        raise EvaluationError(f"unknown protocol(s) {unknown}: choose from {', '.join(PROTOCOLS)}")
    protocols = [PROTOCOLS[p](mcfg) for p in mcfg.protocols]
    pairing = Pairing(name, q, q_labels, g, g_labels, q_ids=q_ids, g_ids=g_ids)
    out: dict[str, Any] = {}
    depth = max((p.depth(len(g)) for p in protocols), default=0)
    if depth:
        res = search(q, g, depth, scfg)
        pairing.ranked_ids, pairing.full_ranking = res.ids, depth == len(g) and len(g) <= mcfg.full_map_max
    for p in protocols:
        try:
            out.update(p.metrics(pairing))
        except GroundTruthError as err:
            raise EvaluationError(str(err)) from None
    out.update(queries=int(len(q)), gallery=int(len(g)))
    if depth:
        out["index"] = res.index
        if res.recall_vs_exact is not None:
            out["search_recall_vs_exact"] = res.recall_vs_exact
    return out


#: the headline figures, one vocabulary everywhere (eval.json, eval.md, MLflow, the demo): name,
#: the two pairings and the sign (+1: a - b; -1: b - a)
HEADLINES = (
    ("gain_without_backfill", "new/upgraded", "old/old", 1),
    ("new_old_vs_old_old", "new/old", "old/old", 1),
    ("compatibility_cost", "independent/independent", "new/new", 1),
    ("gain_with_full_backfill", "new/new", "old/old", 1),
)


def headline(pairings: dict[str, dict[str, Any]], metric: str) -> dict[str, float]:
    """The figures people compare, differences of ``metric``: the gain without re-embedding
    (new/upgraded - old/old), new queries on the untouched old gallery against the old model
    (new/old - old/old), what compatibility cost the new model (independent/independent -
    new/new; positive = a cost) and the gain of re-embedding everything (new/new - old/old)."""

    def get(p: str) -> float | None:
        return pairings.get(p, {}).get(metric)

    out = {}
    for label, a, b, _ in HEADLINES:
        if get(a) is not None and get(b) is not None:
            out[label] = get(a) - get(b)
    return out
