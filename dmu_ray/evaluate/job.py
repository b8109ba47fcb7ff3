"""``dmu-ray evaluate``: embed the query set (and gallery) with each model, compute every pairing
(old/old, new/new, new/old, new/upgraded-old, new/mixed, independent/independent), write the report."""

from __future__ import annotations

import datetime as _dt
import sys
from typing import Any

import numpy as np
import torch

from dmu_ray.config import EvaluateConfig
from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing, headline
from dmu_ray.evaluate.report import write_report
from dmu_ray.evaluate.search import SearchConfig
from dmu_ray.gallery import EMB, LABEL, Gallery, embedding_matrix
from dmu_ray.models.artifact import EMBEDDING_MODEL, UPGRADE_MODULE, build_upgrade_module, load_artifact
from dmu_ray.models.inference import embed_images
from dmu_ray.storage import resolve

Embedded = tuple[np.ndarray, np.ndarray]  # (labels, vectors)


def check_inputs(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load every artefact's card and check dims before any embedding work; returns the cards."""
    cards = {}
    for role in ("old_model", "new_model", "independent_model"):
        uri = getattr(cfg, role)
        if uri:
            try:
                cards[role] = load_artifact(uri, cfg.storage, kind=EMBEDDING_MODEL).card
            except ValueError as err:
                raise EvaluationError(f"{role}: {err}") from None
    old_dim, new_dim = int(cards["old_model"]["dim"]), int(cards["new_model"]["dim"])
    if cfg.upgrade_module:
        try:
            psi = load_artifact(cfg.upgrade_module, cfg.storage, kind=UPGRADE_MODULE).card
        except ValueError as err:
            raise EvaluationError(f"upgrade_module: {err}") from None
        if int(psi["in_dim"]) != old_dim or int(psi["out_dim"]) != new_dim:
            raise EvaluationError(
                f"upgrade_module {cfg.upgrade_module} maps {psi['in_dim']}-d to {psi['out_dim']}-d, but the old model "
                f"is {old_dim}-d and the new model {new_dim}-d"
            )
    if "mixed" in cfg.galleries and "new" not in cfg.galleries and not cfg.new_model:
        raise EvaluationError("galleries.mixed needs the new model for its queries")
    return cards


def _gallery_vectors(uri: str, cfg: EvaluateConfig, what: str) -> Embedded:
    g = Gallery.open(uri, cfg.storage)
    if g.num_rows == 0:
        raise EvaluationError(f"galleries.{what}: {uri} is empty")
    if LABEL not in g.schema().names:
        raise EvaluationError(
            f"galleries.{what}: {uri} has no 'label' column; evaluation needs labelled galleries"
        )
    t = g.read(columns=[LABEL, EMB])
    return t.column(LABEL).to_numpy(), embedding_matrix(t.column(EMB)).astype(np.float32)


def run_evaluation(cfg: EvaluateConfig, *, progress: bool = True) -> dict[str, Any]:
    """Compute the compatibility matrix and write ``eval.json``/``eval.md``/``pairings.png``."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    check_inputs(cfg)
    from dmu_ray.ray_session import ensure_ray

    ensure_ray(cfg.ray_address)
    data = resolve(cfg.data, cfg.storage)
    query, gallery = data.join("query").uri, data.join("gallery").uri

    def embed(part: str, model: str, what: str) -> Embedded:
        say(f"embedding {what} with {model}")
        _, labels, x = embed_images(part, model, storage=cfg.storage, pool=cfg.pool)
        return labels, x

    q = {"old": embed(query, cfg.old_model, "queries"), "new": embed(query, cfg.new_model, "queries")}
    g: dict[str, Embedded] = {}
    for role, model in (("old", cfg.old_model), ("new", cfg.new_model)):
        g[role] = (
            _gallery_vectors(cfg.galleries[role], cfg, role)
            if role in cfg.galleries
            else embed(gallery, model, "gallery")
        )
    if "upgraded" in cfg.galleries:
        g["upgraded"] = _gallery_vectors(cfg.galleries["upgraded"], cfg, "upgraded")
    elif cfg.upgrade_module:
        psi = build_upgrade_module(load_artifact(cfg.upgrade_module, cfg.storage, kind=UPGRADE_MODULE))
        with torch.inference_mode():
            up = torch.nn.functional.normalize(psi(torch.from_numpy(g["old"][1])), dim=1).numpy()
        g["upgraded"] = (g["old"][0], up)
    if "mixed" in cfg.galleries:
        g["mixed"] = _gallery_vectors(cfg.galleries["mixed"], cfg, "mixed")
    if cfg.independent_model:
        q["independent"] = embed(query, cfg.independent_model, "queries")
        g["independent"] = embed(gallery, cfg.independent_model, "gallery")

    mcfg = MetricsConfig(ks=cfg.ks, map_at=cfg.map_at, tar_fars=cfg.tar_fars)
    scfg = SearchConfig(exact_max=cfg.exact_max, nprobe=cfg.nprobe, pq_m=cfg.pq_m)
    plan = [
        ("old/old", "old", "old"),
        ("new/new", "new", "new"),
        ("new/old", "new", "old"),
        ("new/upgraded", "new", "upgraded"),
        ("new/mixed", "new", "mixed"),
        ("independent/independent", "independent", "independent"),
    ]
    pairings = {}
    for name, qk, gk in plan:
        if qk in q and gk in g:
            say(f"searching {name}")
            pairings[name] = evaluate_pairing(name, q[qk][1], q[qk][0], g[gk][1], g[gk][0], mcfg, scfg)
    metric = f"mAP@{cfg.map_at}"
    result = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "title": cfg.title,
        "inputs": {
            "data": cfg.data,
            "old_model": cfg.old_model,
            "new_model": cfg.new_model,
            "upgrade_module": cfg.upgrade_module,
            "independent_model": cfg.independent_model,
            "galleries": dict(cfg.galleries),
        },
        "pairings": pairings,
        "headline_metric": metric,
        "headline": headline(pairings, metric),
    }
    result["files"] = write_report(resolve(cfg.output, cfg.storage), result)
    return result
