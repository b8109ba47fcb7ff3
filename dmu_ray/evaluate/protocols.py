"""Evaluation protocols: what is measured for one query/gallery pairing. A protocol is one
registered class (``@register_protocol``) that takes the pairing (vectors, labels and, when it
asks for one, the ranked search result) and returns its metrics; ``dmu-ray evaluate`` runs the
protocols its config names (``protocols``) for every pairing.

- ``retrieval``: mAP@K, full-ranking mAP (small galleries), Recall@K, from a faiss search;
- ``verification``: TAR@FAR over all query x gallery pairs (same label = genuine);
- ``revisited``: Revisited Oxford/Paris mAP and mP@k in the Easy, Medium and Hard settings, from
  the protocol's ground-truth file (``EvaluateConfig.revisited``);
- ``templates``: IJB-C style templates pooled from image vectors, TAR@FAR on template pairs and
  open-set 1:N identification, TPIR@FPIR and rank-k (``EvaluateConfig.templates``).

Protocols that need ground truth read it through :mod:`dmu_ray.evaluate.ground_truth` before any
embedding (``section`` names the config section; ``MetricsConfig.ground_truth`` holds it loaded).
Adding a protocol is one class here or in a module that registers itself, plus a test on
hand-made features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dmu_ray.evaluate.ground_truth import GroundTruthError, rows_of
from dmu_ray.evaluate.metrics import (
    average_precision,
    recall_at,
    relevance,
    revisited_ap_mp,
    tar_at_far,
    tpir_at_fpir,
)

__all__ = ["PROTOCOLS", "Protocol", "Pairing", "register_protocol"]

PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    PROTOCOLS[cls.name] = cls
    return cls


@dataclass
class Pairing:
    """One pairing's inputs; ``ranked_ids`` (gallery rows in rank order per query, -1 padding)
    is filled by the caller when a protocol asked for a ranking depth. ``q_ids``/``g_ids`` are
    the rows' ids (needed by protocols with ground truth by image)."""

    name: str
    q: np.ndarray
    q_labels: np.ndarray
    g: np.ndarray
    g_labels: np.ndarray
    ranked_ids: np.ndarray | None = None
    full_ranking: bool = False
    q_ids: np.ndarray | None = None
    g_ids: np.ndarray | None = None


class Protocol:
    """Base of a protocol; ``mcfg`` is the evaluation's :class:`~dmu_ray.evaluate.matrix.MetricsConfig`."""

    name: ClassVar[str] = ""
    #: the EvaluateConfig section holding this protocol's options and ground truth (None: none)
    section: ClassVar[str | None] = None

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


def _ids(p: Pairing) -> tuple[np.ndarray, np.ndarray]:
    if p.q_ids is None or p.g_ids is None:
        raise GroundTruthError(f"{p.name}: this protocol needs the ids of the query and gallery rows")
    return p.q_ids, p.g_ids


@register_protocol
class Revisited(Protocol):
    """Revisited Oxford/Paris (Radenovic et al. 2018): for each setting, Easy (easy positives,
    hard ignored), Medium (easy + hard) and Hard (hard positives, easy ignored), mAP over the whole
    ranking with junk removed and mP@k, averaged over the queries with a positive in the setting."""

    name: ClassVar[str] = "revisited"
    section: ClassVar[str | None] = "revisited"

    def depth(self, n_gallery: int) -> int:
        return n_gallery

    def metrics(self, p: Pairing) -> dict[str, Any]:
        gt, ks = self.mcfg.ground_truth["revisited"], self.mcfg.revisited_ks
        q_ids, g_ids = _ids(p)
        rows = rows_of(q_ids, gt.query_ids, f"{p.name}: revisited queries ({gt.uri})")
        rows_of(g_ids, gt.gallery_ids, f"{p.name}: revisited gallery images ({gt.uri})")
        ranked = g_ids[p.ranked_ids[rows]]
        out: dict[str, Any] = {}
        for setting, (positives, junk) in gt.settings().items():
            got = [revisited_ap_mp(ranked[i], positives[i], junk[i], ks) for i in range(len(rows))]
            got = [g for g in got if g is not None]
            out[f"mAP({setting})"] = float(np.mean([g[0] for g in got])) if got else float("nan")
            for k in ks:
                out[f"mP@{k}({setting})"] = float(np.mean([g[1][k] for g in got])) if got else float("nan")
        out["distractors"] = int((~np.isin(g_ids, gt.gallery_ids)).sum())
        return out


@register_protocol
class Templates(Protocol):
    """IJB-C style template evaluation: probe templates pooled from the query vectors, reference
    and gallery-set templates from the gallery vectors; TAR@FAR on the template pairs (1:1) and,
    for each gallery set, TPIR@FPIR and rank-k of the probes (open-set 1:N)."""

    name: ClassVar[str] = "templates"
    section: ClassVar[str | None] = "templates"

    def metrics(self, p: Pairing) -> dict[str, Any]:
        ts, m = self.mcfg.ground_truth["templates"], self.mcfg
        q_ids, g_ids = _ids(p)
        where = f"{p.name}: templates ({ts.uri})"
        out: dict[str, Any] = {}
        if ts.pairs is not None:
            a, b, genuine = ts.pairs
            ua, ia = np.unique(a, return_inverse=True)
            ub, ib = np.unique(b, return_inverse=True)
            qa = ts.pool(list(ua), q_ids, p.q, f"{where}, probe side")
            gb = ts.pool(list(ub), g_ids, p.g, f"{where}, reference side")
            scores = (qa[ia.reshape(-1)] * gb[ib.reshape(-1)]).sum(1)
            if genuine is None:
                sa = ts.subject_of(list(ua), q_ids, p.q_labels, where)[ia.reshape(-1)]
                sb = ts.subject_of(list(ub), g_ids, p.g_labels, where)[ib.reshape(-1)]
                genuine = sa == sb
            out.update(
                {
                    f"template TAR@FAR={f:g}": v
                    for f, v in tar_at_far(scores, genuine, m.template_fars).items()
                }
            )
            out["template_pairs"] = int(len(scores))
        probes = ts.probe_templates()
        if probes:
            pv = ts.pool(probes, q_ids, p.q, f"{where}, probes")
            ps = ts.subject_of(probes, q_ids, p.q_labels, where)
            for name, templates in sorted(ts.gallery_sets().items()):
                gv = ts.pool(templates, g_ids, p.g, f"{where}, gallery set {name}")
                gs = ts.subject_of(templates, g_ids, p.g_labels, where)
                got = tpir_at_fpir(pv @ gv.T, ps, gs, m.fpirs, m.identification_ranks)
                out.update({f"{k}[{name}]": v for k, v in got.items()})
        return out
