"""``dmu-ray evaluate``: embed the query set (and gallery) with each model, compute every pairing
(old/old, new/new, new/old, new/upgraded-old, new/mixed, independent/independent), write the report."""

from __future__ import annotations

import datetime as _dt
import os
import sys
from typing import Any

import numpy as np
import torch

from dmu_ray.config import EvaluateConfig
from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing, headline
from dmu_ray.evaluate.report import write_report
from dmu_ray.evaluate.search import SearchConfig
from dmu_ray.gallery import EMB, LABEL, Gallery, GalleryError, embedding_matrix
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    UPGRADE_MODULE,
    Artifact,
    build_upgrade_module,
    load_artifact,
)
from dmu_ray.models.card import CardError, check_compatible
from dmu_ray.models.inference import embed_images
from dmu_ray.storage import resolve

Embedded = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ids, labels, vectors)


def _load_card(cfg: EvaluateConfig, role: str, kind: str) -> Artifact:
    try:
        return load_artifact(getattr(cfg, role), cfg.storage, kind=kind)
    except (ValueError, OSError) as err:
        raise EvaluationError(f"{role}: {err}") from None


def _check_made_by(g: Gallery, role: str, art: Artifact) -> None:
    """An ``old``/``new`` gallery must hold vectors embedded by that model itself: no upgrade
    module in its ``dmu.model``, and the model's artefact (sha256-exact when the gallery records
    it, else by model id) is the one it is paired with."""
    m, what = g.model, f"galleries.{role} ({g.loc.uri})"
    model_id = art.card.id
    if m.upgrade_module is not None:
        raise EvaluationError(
            f"{what} holds vectors upgraded by {m.upgrade_module} (model {m.model_id!r}), not vectors "
            f"embedded by {role}_model {model_id!r}; is it the upgraded gallery?"
        )
    recorded = m.extra.get("artifact") if isinstance(m.extra, dict) else None
    if recorded is not None and recorded != art.ident:
        raise EvaluationError(f"{what} was embedded by {recorded}, but {role}_model is {art.ident}")
    if recorded is None and m.model_id != model_id:
        raise EvaluationError(
            f"{what} was embedded by model {m.model_id!r}, but {role}_model is {model_id!r} "
            "(import the gallery with --model-id matching the model card's id, or set "
            "check_gallery_models: false)"
        )


def _check_upgraded(g: Gallery, role: str, psi: Artifact | None, new: Artifact) -> None:
    """An ``upgraded``/``mixed`` gallery must come from an upgrade module (the configured one when
    given) that maps into the new model's space; a mixed one from a backfill with that new model."""
    m, what = g.model, f"galleries.{role} ({g.loc.uri})"
    if m.upgrade_module is None:
        raise EvaluationError(
            f"{what} holds vectors embedded by model {m.model_id!r}, not produced by an upgrade module "
            "(is it the old or new gallery?)"
        )
    if psi is not None and m.upgrade_module != psi.ident:
        raise EvaluationError(f"{what} was upgraded by {m.upgrade_module}, but upgrade_module is {psi.ident}")
    if role == "mixed":
        bf = g.manifest.extra.get("backfill", {}) if g.manifest is not None else {}
        if not bf:
            raise EvaluationError(f"{what} is not a backfilled gallery (its manifest has no backfill record)")
        if bf.get("new_model_sha256") not in (None, new.sha256):
            raise EvaluationError(f"{what} was backfilled with another new model than new_model {new.ident}")


def check_inputs(cfg: EvaluateConfig) -> dict[str, Any]:
    """Every check that can fail before embedding: artefacts load and fit each other, every given
    gallery exists, is committed, non-empty, labelled, of the right dimension and made by the model
    it is paired with (``check_gallery_models``), and the output location can be written.
    Returns the artefacts (``cards``), the opened galleries and the labels of those without a
    label column (``labels``, taken from the data set's gallery images by id)."""
    from dmu_ray.evaluate.protocols import PROTOCOLS

    unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
    if unknown:
        raise EvaluationError(f"protocols: unknown {unknown}; registered: {', '.join(PROTOCOLS)}")
    ground_truth = _load_ground_truth(cfg)
    arts = {
        role: _load_card(cfg, role, EMBEDDING_MODEL)
        for role in ("old_model", "new_model", "independent_model")
        if getattr(cfg, role)
    }
    cards = {role: a.card for role, a in arts.items()}
    old_dim, new_dim = cards["old_model"].dim, cards["new_model"].dim
    psi = None
    if cfg.upgrade_module:
        psi = _load_card(cfg, "upgrade_module", UPGRADE_MODULE)
        try:
            check_compatible(
                old=cards["old_model"],
                new=cards["new_model"],
                psi=psi.card,
                names={"old": "old_model", "new": "new_model", "psi": f"upgrade_module {cfg.upgrade_module}"},
            )
        except CardError as err:
            raise EvaluationError(str(err)) from None
    if "mixed" in cfg.galleries and "new" not in cfg.galleries and not cfg.new_model:
        raise EvaluationError("galleries.mixed needs the new model for its queries")
    galleries: dict[str, Gallery] = {}
    labels: dict[str, np.ndarray] = {}  # of galleries without a label column, from the data set
    data_labels = None
    for role, uri in cfg.galleries.items():
        try:
            g = Gallery.open(uri, cfg.storage)
        except GalleryError as err:
            raise EvaluationError(f"galleries.{role}: {err}") from None
        want = old_dim if role == "old" else new_dim
        if g.num_rows == 0:
            raise EvaluationError(f"galleries.{role}: {g.loc.uri} is empty")
        if g.model.dim != want:
            raise EvaluationError(
                f"galleries.{role}: {g.loc.uri} holds {g.model.dim}-d vectors, but the "
                f"{'old' if role == 'old' else 'new'} model's space is {want}-d"
            )
        if LABEL not in g.schema().names:
            if data_labels is None:
                data_labels = _data_labels(cfg)
            labels[role] = _labels_by_id(g, data_labels, f"galleries.{role}")  # every id has one
        if cfg.check_gallery_models:
            if role in ("old", "new"):
                _check_made_by(g, role, arts[f"{role}_model"])
            else:
                _check_upgraded(g, role, psi, arts["new_model"])
        galleries[role] = g
    _check_ground_truth_ids(cfg, ground_truth, galleries)
    _check_output(cfg)
    return {"cards": cards, "galleries": galleries, "labels": labels, "ground_truth": ground_truth}


def _load_ground_truth(cfg: EvaluateConfig) -> dict[str, Any]:
    """The ground truth of every configured protocol that needs one, read and checked."""
    from dmu_ray.evaluate.ground_truth import GroundTruthError, load_revisited, load_templates
    from dmu_ray.evaluate.protocols import PROTOCOLS

    out: dict[str, Any] = {}
    for name in cfg.protocols:
        section = PROTOCOLS[name].section
        if section is None:
            continue
        opts = getattr(cfg, section, None)
        if opts is None:
            raise EvaluationError(f"{section}: protocol {name!r} needs this section (see docs/evaluation.md)")
        try:
            if section == "revisited":
                out[section] = load_revisited(opts.ground_truth, cfg.storage)
            elif section == "templates":
                out[section] = load_templates(opts.table, opts.pairs, cfg.storage)
        except GroundTruthError as err:
            raise EvaluationError(str(err)) from None
    return out


def _part_ids(cfg: EvaluateConfig, part: str) -> np.ndarray:
    import pyarrow.parquet as pq

    loc = resolve(cfg.data, cfg.storage).join(part)
    try:
        return pq.read_table(loc.path, filesystem=loc.fs, columns=["id"]).column("id").to_numpy()
    except (OSError, ValueError) as err:
        raise EvaluationError(f"data: cannot read the ids of {loc.uri} ({err})") from None


def _check_ground_truth_ids(
    cfg: EvaluateConfig, ground_truth: dict[str, Any], galleries: dict[str, Gallery]
) -> None:
    """Every image the ground truth names is among the rows it will be looked up in: query-side
    ids in the data set's query part, gallery-side ids in each gallery evaluated (the given
    galleries, and the data set's gallery part where one is embedded from images)."""
    from dmu_ray.evaluate.ground_truth import GroundTruthError, rows_of

    if not ground_truth:
        return
    sources = {"data set query part": ("q", lambda: _part_ids(cfg, "query"))}
    if not {"old", "new"} <= set(galleries) or cfg.independent_model:
        sources["data set gallery part"] = ("g", lambda: _part_ids(cfg, "gallery"))
    for role, g in galleries.items():
        sources[f"galleries.{role}"] = ("g", lambda g=g: g.read(columns=["id"]).column("id").to_numpy())
    for what, (side, read) in sources.items():
        ids = read()
        for section, gt in ground_truth.items():
            need = gt.needs()[0 if side == "q" else 1]
            try:
                rows_of(ids, need, f"{section} ({gt.uri}): images of the {what}")
            except GroundTruthError as err:
                raise EvaluationError(str(err)) from None


def _check_output(cfg: EvaluateConfig) -> None:
    """The output folder can be written (checked, nothing created): not a file, its bucket exists,
    and on local disk its nearest existing ancestor is a folder this process may write into."""
    try:
        out = resolve(cfg.output, cfg.storage)
    except ValueError as err:
        raise EvaluationError(f"output: {err}") from None
    if out.missing_bucket():
        raise EvaluationError(f"output: {out.describe_missing()}")
    if out.is_file():
        raise EvaluationError(f"output: {out.uri} is a file; give a folder for the report")
    if not out.is_s3:
        path = out.path
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
            raise EvaluationError(f"output: cannot create {out.uri} ({path} is not a writable folder)")


def _data_labels(cfg: EvaluateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and their labels of the data set's gallery part (no image bytes read)."""
    import pyarrow.parquet as pq

    loc = resolve(cfg.data, cfg.storage).join("gallery")
    try:
        t = pq.read_table(loc.path, filesystem=loc.fs, columns=["id", LABEL])
    except (OSError, ValueError) as err:
        raise EvaluationError(f"data: cannot read the labels of {loc.uri} ({err})") from None
    ids, labels = t.column("id").to_numpy(), t.column(LABEL).to_numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order], labels[order]


def _labels_by_id(g: Gallery, data: tuple[np.ndarray, np.ndarray], what: str) -> np.ndarray:
    """Labels of a gallery without a label column: those of the data set's gallery images with the
    same ids (a production gallery keyed by its images' ids); every id must have one."""
    ids = g.read(columns=["id"]).column("id").to_numpy(zero_copy_only=False)
    data_ids, data_labels = data
    if ids.dtype.kind not in "iu":
        raise EvaluationError(
            f"{what}: {g.loc.uri} has no 'label' column and {ids.dtype} ids; its labels come from the data set's "
            "gallery images by id, which are integers"
        )
    pos = np.clip(np.searchsorted(data_ids, ids), 0, max(0, len(data_ids) - 1))
    found = (pos < len(data_ids)) & (data_ids[pos] == ids) if len(data_ids) else np.zeros(len(ids), bool)
    if not found.all():
        raise EvaluationError(
            f"{what}: {g.loc.uri} has no 'label' column and {int((~found).sum())} of its {len(ids)} ids have no "
            f"image in the data set's gallery part (e.g. {ids[~found][:5].tolist()}), so they cannot be labelled"
        )
    return data_labels[pos]


def _gallery_vectors(g: Gallery, labels: np.ndarray | None = None) -> Embedded:
    """Ids, labels and vectors of a gallery: its label column, or ``labels`` (row order) when it
    has none."""
    if labels is None:
        t = g.read(columns=["id", LABEL, EMB])
        labels = t.column(LABEL).to_numpy()
    else:
        t = g.read(columns=["id", EMB])
    ids = t.column("id").to_numpy(zero_copy_only=False)
    return ids, labels, embedding_matrix(t.column(EMB)).astype(np.float32)


def run_evaluation(cfg: EvaluateConfig, *, progress: bool = True) -> dict[str, Any]:
    """Compute the compatibility matrix and write ``eval.json``/``eval.md``/``pairings.png``."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    checked = check_inputs(cfg)
    opened, labels = checked["galleries"], checked["labels"]
    from dmu_ray.ray_session import ensure_ray, require_pool

    ensure_ray(cfg.ray_address)
    require_pool(cfg.pool, "an embedding actor")
    data = resolve(cfg.data, cfg.storage)
    query, gallery = data.join("query").uri, data.join("gallery").uri

    def embed(part: str, model: str, what: str) -> Embedded:
        say(f"embedding {what} with {model}")
        return embed_images(part, model, storage=cfg.storage, pool=cfg.pool)

    q = {"old": embed(query, cfg.old_model, "queries"), "new": embed(query, cfg.new_model, "queries")}
    g: dict[str, Embedded] = {}
    for role, model in (("old", cfg.old_model), ("new", cfg.new_model)):
        g[role] = (
            _gallery_vectors(opened[role], labels.get(role))
            if role in opened
            else embed(gallery, model, "gallery")
        )
    if "upgraded" in opened:
        g["upgraded"] = _gallery_vectors(opened["upgraded"], labels.get("upgraded"))
    elif cfg.upgrade_module:
        psi = build_upgrade_module(load_artifact(cfg.upgrade_module, cfg.storage, kind=UPGRADE_MODULE))
        with torch.inference_mode():
            up = torch.nn.functional.normalize(psi(torch.from_numpy(g["old"][2])), dim=1).numpy()
        g["upgraded"] = (g["old"][0], g["old"][1], up)
    if "mixed" in opened:
        g["mixed"] = _gallery_vectors(opened["mixed"], labels.get("mixed"))
    if cfg.independent_model:
        q["independent"] = embed(query, cfg.independent_model, "queries")
        g["independent"] = embed(gallery, cfg.independent_model, "gallery")

    mcfg = MetricsConfig(
        ks=cfg.ks,
        map_at=cfg.map_at,
        tar_fars=cfg.tar_fars,
        protocols=list(cfg.protocols),
        ground_truth=checked["ground_truth"],
    )
    if cfg.revisited is not None:
        mcfg.revisited_ks = list(cfg.revisited.ks)
    if cfg.templates is not None:
        t = cfg.templates
        mcfg.template_fars, mcfg.fpirs, mcfg.identification_ranks = list(t.fars), list(t.fpirs), list(t.ranks)
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
            (qi, ql, qx), (gi, gl, gx) = q[qk], g[gk]
            pairings[name] = evaluate_pairing(name, qx, ql, gx, gl, mcfg, scfg, q_ids=qi, g_ids=gi)
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
