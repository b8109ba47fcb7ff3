"""FastFill's partial backfill (``dmu-ray backfill``): a refresh in which some rows are re-embedded.

1. **Plan**: the old gallery, the transformation (an upgrade-module artefact), the new model, the
   images and, for one policy, the old model are loaded and checked against each other.
2. **Score** (Ray Data actor pool over the gallery's files): every valid row gets the policy's
   score (:class:`~dmu_ray.methods.fastfill.BackfillScorer`); ids and scores come back to the
   driver (12 bytes a row) and the top ``fraction`` is selected, ties broken by a hash of the id.
3. **Re-embed** (Ray Data actor pool over the images): the selected rows' images go through the
   new model; every selected id must have an image, or nothing is written.
4. **Write**: a refresh of the old gallery with the transformation in which the selected rows take
   the new model's vector; each row's ``provenance`` column says which (``new`` / ``transformed``).
   It is the refresh job itself, so files commit exactly once, a re-run resumes, bad rows are
   quarantined, and the manifest (last) records the policy, the fraction and the counts.

The selection and the re-embedded vectors travel through the driver and the object store, which
bounds a backfill by driver memory (ids and scores of all rows; vectors of the selected rows);
docs/decisions.md says why and what a bigger backfill would change.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dmu_ray.gallery import EMB, Gallery, GalleryError, embedding_matrix, read_manifest, row_problems
from dmu_ray.methods.fastfill import BackfillScorer, select_top
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    UPGRADE_MODULE,
    Artifact,
    ArtifactError,
    build_embedding_model,
    build_upgrade_module,
    load_artifact,
)
from dmu_ray.models.card import CardError, check_compatible, refuse_query_adapter
from dmu_ray.models.inference import image_source
from dmu_ray.refresh.config import BackfillConfig, RefreshConfig
from dmu_ray.refresh.job import RefreshResult, run_refresh
from dmu_ray.refresh.upgrade_files import Overrides
from dmu_ray.storage import resolve


class BackfillError(GalleryError):
    """A backfill that must not start or cannot finish; the message says what and where."""


@dataclass
class BackfillPlan:
    cfg: BackfillConfig
    source: Gallery
    module: Artifact
    new: Artifact
    old: Artifact | None


def _load(uri: str, cfg: BackfillConfig, kind: str, field: str) -> Artifact:
    try:
        return load_artifact(uri, cfg.storage, kind=kind)
    except ArtifactError as err:
        raise BackfillError(f"{field}: {err}") from None


def plan_backfill(cfg: BackfillConfig, policies: list[str] | None = None) -> BackfillPlan:
    """Every check that can fail before cluster work (see the module docstring)."""
    src = Gallery.open(cfg.source, cfg.storage)
    if resolve(cfg.output, cfg.storage).uri == src.loc.uri:
        raise BackfillError(f"output {cfg.output} must not be the source gallery")
    if not src.manifest.id_type.startswith("int"):
        raise BackfillError(
            f"{src.loc.uri} has {src.manifest.id_type} ids; a backfill joins gallery rows to their images "
            "by integer id (the image data sets' ids)"
        )
    module = _load(cfg.module, cfg, UPGRADE_MODULE, "module")
    try:
        refuse_query_adapter(module.card, f"module {module.uri}")
    except CardError as err:
        raise BackfillError(str(err)) from None
    psi = build_upgrade_module(module)
    new = _load(cfg.new_model, cfg, EMBEDDING_MODEL, "new_model")
    try:
        _, channels, _ = image_source(cfg.images, new.card, cfg.storage)
    except (GalleryError, ValueError) as err:
        raise BackfillError(f"images: {err}") from None
    try:
        check_compatible(
            new=new.card,
            psi=module.card,
            gallery_dim=src.model.dim,
            channels=channels,
            names={"new": f"new_model {new.uri}", "psi": f"module {module.uri}"},
        )
    except CardError as err:
        raise BackfillError(f"{err} (gallery {src.loc.uri})") from None
    wanted = policies or [cfg.policy]
    if "uncertainty" in wanted and not psi.uncertainty:
        raise BackfillError(
            f"policy 'uncertainty' needs a transformation with an uncertainty branch; {module.uri} has none "
            "(train one with method.name: fastfill)"
        )
    old = None
    if "old-discriminativeness" in wanted:
        old = _load(cfg.old_model, cfg, EMBEDDING_MODEL, "old_model")
        try:
            check_compatible(old=old.card, gallery_dim=src.model.dim, names={"old": f"old_model {old.uri}"})
        except CardError as err:
            raise BackfillError(f"{err} (gallery {src.loc.uri})") from None
    return BackfillPlan(cfg, src, module, new, old)


class _ScoreActor:
    """Ray Data actor: transformation (+ old classifier) loaded once; scores batches of rows."""

    def __init__(
        self, cfg: BackfillConfig, policies: list[str], keep_vectors: bool, pins: dict[str, tuple[str, str]]
    ) -> None:
        import torch

        torch.set_num_threads(max(1, int(round(cfg.pool.num_cpus))))
        device = "cuda" if cfg.pool.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # ``pins``: (absolute uri, sha256) of each artefact the driver checked, by field
        uri, sha = pins["module"]
        psi = build_upgrade_module(load_artifact(uri, cfg.storage, kind=UPGRADE_MODULE, sha256=sha))
        old_head = None
        if "old-discriminativeness" in policies:
            uri, sha = pins["old_model"]
            old_head = build_embedding_model(
                load_artifact(uri, cfg.storage, kind=EMBEDDING_MODEL, sha256=sha)
            )[1]
        self.scorer = BackfillScorer(policies, psi, old_head, seed=cfg.seed, device=device)
        self.dim, self.keep = psi.in_dim, keep_vectors

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        bad, _ = row_problems(batch, self.dim, where="backfill scoring")
        if bad.any():  # the write stage quarantines them with reasons; they are never selected
            batch = batch.filter(pa.array(~bad))
        ids = batch.column("id").to_numpy()
        y, scores = self.scorer(ids, embedding_matrix(batch.column(EMB)))
        out = {"id": ids, **{f"score:{p}": s for p, s in scores.items()}}
        if self.keep:
            out["transformed"] = y
        return out


def score_gallery(
    plan: BackfillPlan, policies: list[str], *, keep_vectors: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """``(ids, {policy: scores}, transformed vectors or None)`` of every valid gallery row, sorted by
    id (a Ray Data pass over the gallery's files)."""
    import ray

    from dmu_ray.ray_session import collect_batches, ensure_ray, map_on_pool

    cfg, src = plan.cfg, plan.source
    ensure_ray(cfg.ray_address)
    paths = [src.loc.join(f).path for f in src.files]
    ds = ray.data.read_parquet(paths, filesystem=src.loc.fs).select_columns(["id", EMB])
    ds = map_on_pool(
        ds,
        _ScoreActor,
        cfg.pool,
        {
            "cfg": cfg,
            "policies": policies,
            "keep_vectors": keep_vectors,
            "pins": {
                f: (a.uri, a.sha256) for f, a in (("module", plan.module), ("old_model", plan.old)) if a
            },
        },
    )
    parts = [b for b in collect_batches(ds, "numpy") if len(b["id"])]
    if not parts:
        raise BackfillError(f"{src.loc.uri}: no valid rows to score")
    ids = np.concatenate([b["id"] for b in parts])
    order = np.argsort(ids, kind="stable")
    scores = {p: np.concatenate([b[f"score:{p}"] for b in parts])[order] for p in policies}
    vecs = np.concatenate([b["transformed"] for b in parts])[order] if keep_vectors else None
    return ids[order], scores, vecs


def reembed(plan: BackfillPlan, ids: np.ndarray) -> np.ndarray:
    """The new model's vectors of the images with these ids (sorted ids in, same order out);
    raises if any id has no image."""
    from dmu_ray.models.inference import embed_images

    cfg = plan.cfg
    got_ids, _, emb = embed_images(
        cfg.images,
        plan.new.uri,
        storage=cfg.storage,
        pool=cfg.embed_pool,
        pool_field="embed_pool",
        only_ids=ids,
        sha256=plan.new.sha256,
    )
    if len(got_ids) != len(ids) or not np.array_equal(got_ids, ids):
        missing = np.setdiff1d(ids, got_ids)
        dup = len(got_ids) - len(np.unique(got_ids))
        raise BackfillError(
            f"images {cfg.images}: {len(missing)} of the {len(ids)} selected gallery ids have no image "
            f"(e.g. {missing[:5].tolist()})"
            + (f" and {dup} ids have several images" if dup else "")
            + "; the images must be the gallery's own"
        )
    return emb


def run_backfill(cfg: BackfillConfig, *, progress: bool = True) -> RefreshResult:
    """Score, select, re-embed, write (see the module docstring). Re-running the same backfill
    resumes its write stage; a committed one returns at once."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    plan = plan_backfill(cfg)
    from dmu_ray.ray_session import ensure_ray, require_pool

    ensure_ray(cfg.ray_address)  # the cluster can run both pools, before any work
    require_pool(cfg.pool, "a scoring/refresh actor")
    require_pool(cfg.embed_pool, "an embedding actor", field="embed_pool")
    request = {
        "policy": cfg.policy,
        "fraction": cfg.fraction,
        "seed": cfg.seed if cfg.policy == "random" else None,
        "new_model_sha256": plan.new.sha256,
        "images": resolve(cfg.images, cfg.storage).uri,
    }
    existing = read_manifest(resolve(cfg.output, cfg.storage))
    if existing is not None:
        done = existing.extra.get("backfill", {})
        job = existing.extra.get("refresh", {}).get("job", {})
        if (
            {k: done.get(k) for k in request} == request
            and job.get("source") == plan.source.loc.uri
            and job.get("module_sha256") == plan.module.sha256
        ):
            say(f"{cfg.output} already holds this backfill; nothing to do")
            return RefreshResult(existing, 0, 0, 0.0, len(existing.files))
    say(f"backfill: scoring {plan.source.manifest.rows:,} rows of {plan.source.loc.uri} by {cfg.policy}")
    ids, scores, _ = score_gallery(plan, [cfg.policy])
    chosen = ids[select_top(ids, scores[cfg.policy], cfg.fraction)]
    say(f"backfill: re-embedding {len(chosen):,} rows ({cfg.fraction:.0%}) with {plan.new.ident}")
    vectors = reembed(plan, chosen) if len(chosen) else np.empty((0, plan.new.card.dim), np.float32)
    if not np.isfinite(vectors).all():
        raise BackfillError(f"new_model {plan.new.uri} produced NaN/Inf vectors for some selected images")
    backfill = {
        **request,
        "rows_scored": int(len(ids)),
        "rows_selected": int(len(chosen)),
        "new_model": plan.new.ident,  # the re-embedded rows' lineage
        "selection_sha256": hashlib.sha256(np.ascontiguousarray(chosen).tobytes()).hexdigest(),
    }
    refresh = RefreshConfig(
        source=cfg.source,
        output=cfg.output,
        module=cfg.module,
        dtype=cfg.dtype,
        pool=cfg.pool,
        storage=cfg.storage,
        ray_address=cfg.ray_address,
    )
    return run_refresh(
        refresh,
        progress=progress,
        backfill=backfill,
        overrides=Overrides(chosen, vectors.astype(cfg.dtype)),
    )
