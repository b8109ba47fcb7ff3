"""Evaluation protocols: what is measured for one query/gallery pairing. A protocol is one
registered class (``@register_protocol``) that takes the pairing (vectors, labels and, when it
asks for one, the ranked search result) and returns its metrics; ``dmu-ray evaluate`` runs the
protocols its config names (``protocols``) for every pairing.

- ``retrieval``: mAP@K, full-ranking mAP (small galleries), Recall@K, from a faiss search;
- ``verification``: TAR@FAR over all query x gallery pairs (same label = genuine).

Adding a protocol (e.g. Revisited Oxford/Paris easy/hard/junk, IJB-C templates) is one class
here or in a module that registers itself, plus a test on hand-made features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dmu_ray.evaluate.metrics import average_precision, recall_at, relevance, tar_at_far

__all__ = ["PROTOCOLS", "Protocol", "Pairing", "register_protocol"]

PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    PROTOCOLS[cls.name] = cls
    return cls


@dataclass
class Pairing:
    """One pairing's inputs; ``ranked_ids`` (gallery rows in rank order per query, -1 padding)
    is filled by the caller when a protocol asked for a ranking depth."""

    name: str
    q: np.ndarray
    q_labels: np.ndarray
    g: np.ndarray
    g_labels: np.ndarray
    ranked_ids: np.ndarray | None = None
    full_ranking: bool = False


class Protocol:
    """Base of a protocol; ``mcfg`` is the evaluation's :class:`~dmu_ray.evaluate.matrix.MetricsConfig`."""

    name: ClassVar[str] = ""

    def __init__(self, mcfg: Any) -> None:
        self.mcfg = mcfg

    def depth(self, n_gallery: int) -> int:
        """How many ranked gallery items per query this protocol needs (0: no search)."""
        return 0

    def metrics(self, p: Pairing) -> dict[str, Any]:
        raise NotImplementedError


@register_protocol
class Retrieval(Protocol):
    """Ranked retrieval by label: mAP@K, mAP over the whole ranking (galleries up to
    ``full_map_max``), Recall@K."""

    name: ClassVar[str] = "retrieval"

    def depth(self, n_gallery: int) -> int:
        m = self.mcfg
        return n_gallery if n_gallery <= m.full_map_max else min(n_gallery, max(m.map_at, *m.ks))

    def metrics(self, p: Pairing) -> dict[str, Any]:
        m = self.mcfg
        ranked = np.where(p.ranked_ids >= 0, p.g_labels[np.clip(p.ranked_ids, 0, None)], -1)
        rel = relevance(ranked, p.q_labels)
        classes, counts = np.unique(p.g_labels, return_counts=True)
        pos = np.searchsorted(classes, p.q_labels).clip(max=len(classes) - 1)
        n_rel = np.where(classes[pos] == p.q_labels, counts[pos], 0)
        out: dict[str, Any] = {
            f"mAP@{m.map_at}": float(average_precision(rel, n_rel, m.map_at).mean()),
            **{f"R@{kk}": v for kk, v in recall_at(rel, m.ks).items()},
        }
        if p.full_ranking:
            out["mAP"] = float(average_precision(rel, n_rel).mean())
        return out


@register_protocol
class Verification(Protocol):
    """1:1 verification: TAR at each FAR over all query x gallery pairs (up to ``tar_max_pairs``)."""

    name: ClassVar[str] = "verification"

    def metrics(self, p: Pairing) -> dict[str, Any]:
        m = self.mcfg
        if not m.tar_fars or len(p.q) * len(p.g) > m.tar_max_pairs:
            return {}
        scores = p.q.astype(np.float32) @ p.g.astype(np.float32).T
        same = p.q_labels[:, None] == p.g_labels[None, :]
        return {
            f"TAR@FAR={far:g}": v for far, v in tar_at_far(scores.ravel(), same.ravel(), m.tar_fars).items()
        }
