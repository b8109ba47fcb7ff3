"""``dmu-ray evaluate``: embed the query set (and gallery) with each model, compute every pairing
(old/old, new/new, new/old, new/upgraded-old, new/mixed, independent/independent), write the report."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import Any

import numpy as np
import torch

from dmu_ray.evaluate.config import EvaluateConfig
from dmu_ray.evaluate.fingerprint import fingerprint
from dmu_ray.evaluate.galleries import (
    Embedded,
    check_output,
    check_quarantine,
    data_labels,
    gallery_vectors,
    keep_finite,
    labels_by_id,
)
from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing, headline
from dmu_ray.evaluate.report import render_report, write_report
from dmu_ray.evaluate.search import SearchConfig
from dmu_ray.gallery import LABEL, Gallery, GalleryError
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    UPGRADE_MODULE,
    Artifact,
    build_upgrade_module,
    load_artifact,
)
from dmu_ray.models.card import CardError, check_compatible
from dmu_ray.models.inference import embed_images
from dmu_ray.models.upgrade import CPU_COMPUTE_ROWS, in_row_slices, through_chain
from dmu_ray.storage import resolve
from dmu_ray.tracking import Tracker, flatten


def _load(uri: str, what: str, kind: str, cfg: EvaluateConfig) -> Artifact:
    try:
        return load_artifact(uri, cfg.storage, kind=kind)
    except (ValueError, OSError) as err:
        raise EvaluationError(f"{what}: {err}") from None


def _check_made_by(g: Gallery, what: str, art: Artifact, model_field: str) -> None:
    """An ``old``/``new`` gallery must hold vectors embedded by that model itself: no upgrade
    module in its ``dmu.model``, and the model's artefact (sha256-exact when the gallery records
    it, else by model id) is the one it is paired with."""
    m, what = g.model, f"{what} ({g.loc.uri})"
    model_id = art.card.id
    if m.upgrade_module is not None:
        raise EvaluationError(
            f"{what} holds vectors upgraded by {m.upgrade_module} (model {m.model_id!r}), not vectors "
            f"embedded by {model_field} {model_id!r}; is it the upgraded gallery?"
        )
    recorded = m.extra.get("artifact") if isinstance(m.extra, dict) else None
    if recorded is not None and recorded != art.ident:
        raise EvaluationError(f"{what} was embedded by {recorded}, but {model_field} is {art.ident}")
    if recorded is None and m.model_id != model_id:
        raise EvaluationError(
            f"{what} was embedded by model {m.model_id!r}, but {model_field} is {model_id!r} "
            "(import the gallery with --model-id matching the model card's id, or set "
            "check_gallery_models: false)"
        )


def _check_upgraded(g: Gallery, what: str, role: str, psi: Artifact | None, new: Artifact) -> None:
    """An ``upgraded``/``mixed`` gallery must come from an upgrade module (the configured one when
    given) that maps into the new model's space; a mixed one from a backfill with that new model."""
    m, what = g.model, f"{what} ({g.loc.uri})"
    if m.upgrade_module is None:
        raise EvaluationError(
            f"{what} holds vectors embedded by model {m.model_id!r}, not produced by an upgrade module "
            "(is it the old or new gallery?)"
        )
    if psi is not None and m.upgrade_module != psi.ident:
        raise EvaluationError(
            f"{what} was upgraded by {m.upgrade_module}, but the upgrade module is {psi.ident}"
        )
    if role == "mixed":
        bf = g.manifest.extra.get("backfill", {}) if g.manifest is not None else {}
        if not bf:
            raise EvaluationError(f"{what} is not a backfilled gallery (its manifest has no backfill record)")
        if bf.get("new_model_sha256") not in (None, new.sha256):
            raise EvaluationError(f"{what} was backfilled with another new model than {new.ident}")


def _field(cfg: EvaluateConfig, name: str, key: str) -> str:
    """The config field a new model's setting comes from, as a person wrote it."""
    if not cfg.several:
        return {
            "model": "new_model",
            "upgrade_module": "upgrade_module",
            "query_adapter": "query_adapter",
        }.get(key, f"galleries.{key}")
    own = ("model", "upgrade_module", "query_adapter")
    return f"new_models.{name}." + (key if key in own else f"galleries.{key}")


def _check_query_adapter(phi: Artifact, new: Artifact, old: Artifact, what: str) -> None:
    """A query adapter maps the new model's queries into the old model's space."""
    c = phi.card
    if c.direction != "query":
        raise EvaluationError(
            f"{what} is a gallery-side module (old vectors -> the new space); adapted/old needs a query-side "
            "adapter (dmu-ray adapter fit with direction: query); a gallery-side one goes in upgrade_module"
        )
    if c.in_dim != new.card.dim or c.out_dim != old.card.dim:
        raise EvaluationError(
            f"{what} maps {c.in_dim}-d -> {c.out_dim}-d vectors, but the new model embeds in {new.card.dim} "
            f"and the old model in {old.card.dim} dims"
        )


def check_inputs(cfg: EvaluateConfig) -> dict[str, Any]:
    """Every check that can fail before embedding: artefacts load and fit each other, every given
    gallery exists, is committed, non-empty, labelled, of the right dimension and made by the model
    it is paired with (``check_gallery_models``), and the output location can be written.
    Returns the artefacts (``arts``: ``old``, ``independent``, and per new model name ``model``
    and ``psi``), the opened galleries (``old`` and ``<name>.<role>``) and the labels of those
    without a label column (``labels``, taken from the data set's gallery images by id)."""
    from dmu_ray.evaluate.protocols import PROTOCOLS

    unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
    if unknown:
        raise EvaluationError(f"protocols: unknown {unknown}; registered: {', '.join(PROTOCOLS)}")
    ground_truth = _load_ground_truth(cfg)
    old = _load(cfg.old_model, "old_model", EMBEDDING_MODEL, cfg)
    arts: dict[str, Any] = {"old": old, "models": {}}
    if cfg.independent_model:
        arts["independent"] = _load(cfg.independent_model, "independent_model", EMBEDDING_MODEL, cfg)
    for name, spec in cfg.models().items():
        new = _load(spec.model, _field(cfg, name, "model"), EMBEDDING_MODEL, cfg)
        psi = None
        if spec.upgrade_module:
            psi = _load(spec.upgrade_module, _field(cfg, name, "upgrade_module"), UPGRADE_MODULE, cfg)
            try:
                check_compatible(
                    old=old.card,
                    new=new.card,
                    psi=psi.card,
                    names={
                        "old": "old_model",
                        "new": _field(cfg, name, "model"),
                        "psi": f"{_field(cfg, name, 'upgrade_module')} {spec.upgrade_module}",
                    },
                )
            except CardError as err:
                raise EvaluationError(str(err)) from None
        phi = None
        if spec.query_adapter:
            where = _field(cfg, name, "query_adapter")
            phi = _load(spec.query_adapter, where, UPGRADE_MODULE, cfg)
            _check_query_adapter(phi, new, old, f"{where} {phi.uri}")
        arts["models"][name] = {"model": new, "psi": psi, "phi": phi}
    wanted: list[tuple[str, str | None, str, str, str]] = []  # (key, new model name, role, uri, field)
    if "old" in cfg.galleries:
        wanted.append(("old", None, "old", cfg.galleries["old"], "galleries.old"))
    for name, spec in cfg.models().items():
        wanted += [(f"{name}.{r}", name, r, u, _field(cfg, name, r)) for r, u in spec.galleries.items()]
    galleries: dict[str, Gallery] = {}
    labels: dict[str, np.ndarray] = {}  # of galleries without a label column, from the data set
    by_id = None  # the data set's gallery labels, read once when a gallery has no label column
    for key, name, role, uri, what in wanted:
        try:
            g = Gallery.open(uri, cfg.storage, verify=cfg.verify_galleries)
        except GalleryError as err:
            raise EvaluationError(f"{what}: {err}") from None
        model = old if name is None else arts["models"][name]["model"]
        check_quarantine(g, what, cfg.max_quarantined_share)
        if g.num_rows == 0:
            raise EvaluationError(f"{what}: {g.loc.uri} is empty")
        if g.model.dim != model.card.dim:
            raise EvaluationError(
                f"{what}: {g.loc.uri} holds {g.model.dim}-d vectors, but the "
                f"{'old' if role == 'old' else 'new'} model's space is {model.card.dim}-d"
            )
        try:
            names = g.schema().names  # the first read of a file: verified against the manifest
        except GalleryError as err:
            raise EvaluationError(f"{what}: {err}") from None
        if LABEL not in names:
            if by_id is None:
                by_id = data_labels(cfg.data, cfg.storage)
            labels[key] = labels_by_id(g, by_id, what)  # every id has one
        if cfg.check_gallery_models:
            if role == "old":
                _check_made_by(g, what, old, "old_model")
            elif role == "new":
                _check_made_by(g, what, model, _field(cfg, name, "model"))
            else:
                _check_upgraded(g, what, role, arts["models"][name]["psi"], model)
        galleries[key] = g
    _check_ground_truth_ids(cfg, ground_truth, galleries)
    check_output(cfg.output, cfg.storage)
    cards = {"old_model": old.card} | {n: a["model"].card for n, a in arts["models"].items()}
    return {
        "arts": arts,
        "cards": cards,
        "galleries": galleries,
        "labels": labels,
        "ground_truth": ground_truth,
    }


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
    embedded_from_images = (
        "old" not in galleries
        or bool(cfg.independent_model)
        or any(f"{name}.new" not in galleries for name in cfg.models())
    )
    if embedded_from_images:
        sources["data set gallery part"] = ("g", lambda: _part_ids(cfg, "gallery"))
    for key, g in galleries.items():
        sources[f"gallery {key}"] = ("g", lambda g=g: g.read(columns=["id"]).column("id").to_numpy())
    for what, (side, read) in sources.items():
        ids = read()
        for section, gt in ground_truth.items():
            need = gt.needs()[0 if side == "q" else 1]
            try:
                rows_of(ids, need, f"{section} ({gt.uri}): images of the {what}")
            except GroundTruthError as err:
                raise EvaluationError(str(err)) from None


PLAN = (
    ("old/old", "old", "old"),
    ("new/new", "new", "new"),
    ("new/old", "new", "old"),
    ("new/upgraded", "new", "upgraded"),
    ("new/mixed", "new", "mixed"),
    ("adapted/old", "adapted", "old"),
    ("independent/independent", "independent", "independent"),
)
#: pairings that do not involve a new model: computed once however many new models are evaluated
SHARED = ("old/old", "independent/independent")


def _metrics_config(cfg: EvaluateConfig, ground_truth: dict[str, Any]) -> MetricsConfig:
    mcfg = MetricsConfig(
        ks=cfg.ks,
        map_at=cfg.map_at,
        tar_fars=cfg.tar_fars,
        protocols=list(cfg.protocols),
        ground_truth=ground_truth,
    )
    if cfg.revisited is not None:
        mcfg.revisited_ks = list(cfg.revisited.ks)
    if cfg.templates is not None:
        t = cfg.templates
        mcfg.template_fars, mcfg.fpirs, mcfg.identification_ranks = list(t.fars), list(t.fpirs), list(t.ranks)
    return mcfg


def run_evaluation(cfg: EvaluateConfig, *, progress: bool = True) -> dict[str, Any]:
    """Compute the compatibility matrix and write ``eval.json``/``eval.md``/``pairings.png``.

    Each query/gallery set is embedded once per distinct model artefact (by sha256), however many
    entries name it, and each pairing of distinct vector sets is searched once. With ``new_models``
    the result's ``pairings`` are named ``<name>:new/old`` etc. beside the shared ``old/old`` and
    ``independent/independent``; ``models`` holds each new model's own matrix and headline either
    way. Every pairing records the ``seconds`` its search and metrics took."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    checked = check_inputs(cfg)
    opened, labels, arts = checked["galleries"], checked["labels"], checked["arts"]
    tracker = Tracker.open(cfg.tracking, resolve(cfg.output, cfg.storage), say=say)  # before cluster work
    from dmu_ray.ray_session import ensure_ray, require_pool

    ensure_ray(cfg.ray_address)
    require_pool(cfg.pool, "an embedding actor")
    data = resolve(cfg.data, cfg.storage)
    parts = {"queries": data.join("query").uri, "gallery": data.join("gallery").uri}
    vectors: dict[str, Embedded] = {}  # by key: what the vectors are, so equal sets are made once
    dropped: dict[str, int] = {}  # rows left out of a set for non-finite vectors, by set key

    def embed(part: str, art: Artifact) -> str:
        key = f"{part}:{art.sha256}"
        if key not in vectors:
            say(f"embedding {part} with {art.uri}")
            got = embed_images(parts[part], art.uri, storage=cfg.storage, pool=cfg.pool, sha256=art.sha256)
            vectors[key], lost = keep_finite(got, f"{part} set", art.ident, cfg.max_quarantined_share)
            if lost:
                dropped[key] = lost
                say(f"  dropped {lost:,} {part} rows whose vectors are NaN/Inf (model {art.ident})")
        return key

    def stored(gkey: str) -> str:
        key = f"stored:{opened[gkey].loc.uri}"
        if key not in vectors:
            vectors[key] = gallery_vectors(opened[gkey], labels.get(gkey))
        return key

    def upgraded(old_key: str, psi: Artifact, what: str = "upgrading the old gallery") -> str:
        key = f"upgraded:{old_key}>{psi.sha256}"
        if key not in vectors:
            say(f"{what} with {psi.uri}")
            ids, lab, x = vectors[old_key]
            module = build_upgrade_module(psi)
            with torch.inference_mode():
                up = in_row_slices(
                    lambda rows: through_chain([module], rows), torch.from_numpy(x), CPU_COMPUTE_ROWS
                ).numpy()
            vectors[key] = (ids, lab, up)
        return key

    q: dict[str, str] = {"old": embed("queries", arts["old"])}
    g: dict[str, str] = {"old": stored("old") if "old" in opened else embed("gallery", arts["old"])}
    if "independent" in arts:
        q["independent"] = embed("queries", arts["independent"])
        g["independent"] = embed("gallery", arts["independent"])
    sets: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for name in cfg.models():
        new, psi = arts["models"][name]["model"], arts["models"][name]["psi"]
        mq, mg = dict(q, new=embed("queries", new)), dict(g)
        phi = arts["models"][name]["phi"]
        if phi is not None:
            mq["adapted"] = upgraded(mq["new"], phi, what="mapping the new model's queries")
        mg["new"] = stored(f"{name}.new") if f"{name}.new" in opened else embed("gallery", new)
        if f"{name}.upgraded" in opened:
            mg["upgraded"] = stored(f"{name}.upgraded")
        elif psi is not None:
            mg["upgraded"] = upgraded(g["old"], psi)
        if f"{name}.mixed" in opened:
            mg["mixed"] = stored(f"{name}.mixed")
        sets[name] = (mq, mg)

    mcfg = _metrics_config(cfg, checked["ground_truth"])
    scfg = SearchConfig(exact_max=cfg.exact_max, nprobe=cfg.nprobe, pq_m=cfg.pq_m)
    searched: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: dict[str, str] = {}  # pairings whose queries and gallery live in spaces of other dims
    models: dict[str, dict[str, Any]] = {}
    metric = f"mAP@{cfg.map_at}"
    for name, (mq, mg) in sets.items():
        mine: dict[str, Any] = {}
        for pname, qk, gk in PLAN:
            if qk not in mq or gk not in mg:
                continue
            pair = (mq[qk], mg[gk])
            label = pname if pname in SHARED or not cfg.several else f"{name}:{pname}"
            dq, dg = vectors[pair[0]][2].shape[1], vectors[pair[1]][2].shape[1]
            if dq != dg:  # e.g. new/old between frozen models of two dims: an adapter maps them
                skipped[label] = f"queries are {dq}-d, the gallery {dg}-d: the spaces differ"
                continue
            if pair not in searched:
                say(f"searching {label}")
                t0 = time.perf_counter()
                (qi, ql, qx), (gi, gl, gx) = vectors[pair[0]], vectors[pair[1]]
                searched[pair] = evaluate_pairing(label, qx, ql, gx, gl, mcfg, scfg, q_ids=qi, g_ids=gi)
                searched[pair]["seconds"] = round(time.perf_counter() - t0, 3)
            mine[pname] = searched[pair]
        models[name] = {"pairings": mine, "headline": headline(mine, metric)}
    if cfg.several:
        pairings = {p: r for p in SHARED for m in models.values() if (r := m["pairings"].get(p)) is not None}
        pairings |= {
            f"{name}:{p}": r
            for name, m in models.items()
            for p, r in m["pairings"].items()
            if p not in SHARED
        }
    else:
        pairings = models["new"]["pairings"]
    result = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "title": cfg.title,
        "inputs": {
            "data": cfg.data,
            "old_model": cfg.old_model,
            "new_models": {n: s.model_dump() for n, s in cfg.models().items()},
            "independent_model": cfg.independent_model,
            "galleries": dict(cfg.galleries),
        },
        # what was evaluated, exactly (a plan checks its evidence against its artefacts by these)
        "artifacts": {
            "old_model": _art_id(arts["old"]),
            "models": {
                n: {
                    role: _art_id(a[key])
                    for role, key in (("model", "model"), ("upgrade_module", "psi"), ("query_adapter", "phi"))
                }
                # a stored upgraded gallery: the module its manifest records (id@sha256[:12])
                | {
                    "upgraded_by": opened[f"{n}.upgraded"].model.upgrade_module
                    if f"{n}.upgraded" in opened
                    else None
                }
                for n, a in arts["models"].items()
            },
        },
        "fingerprint": fingerprint(cfg, checked),
        "embedded_sets": sum(k.split(":", 1)[0] in parts for k in vectors),  # embedded from images
        "dropped_rows": dropped,  # rows of an embedded set left out (NaN/Inf vectors), by set
        "skipped_pairings": skipped,
        "pairings": pairings,
        "models": models,
        "headline_metric": metric,
        "headline": {n: m["headline"] for n, m in models.items()}
        if cfg.several
        else models["new"]["headline"],
    }
    if not cfg.several:
        result["inputs"] |= {
            "new_model": cfg.new_model,
            "upgrade_module": cfg.upgrade_module,
            "query_adapter": cfg.query_adapter,
        }
    rendered = render_report(result)
    result["files"] = write_report(resolve(cfg.output, cfg.storage), result, rendered)
    if tracker is not None:
        _track(tracker, cfg, result, {name: data for name, data in rendered.values()})
    return result


def _art_id(art: Artifact | None) -> dict[str, str] | None:
    """An artefact as a report records it: where, its card id, its sha256."""
    return None if art is None else {"uri": art.uri, "id": str(art.card.id), "sha256": art.sha256}


def _track(tracker: Tracker, cfg: EvaluateConfig, result: dict[str, Any], files: dict[str, bytes]) -> None:
    """One MLflow run per evaluation: every pairing's figures as ``<pairing>/<metric>``, the
    headline figures, the inputs as parameters, and eval.json, eval.md and pairings.png."""
    run = tracker.start(cfg.title, tags={"dmu.kind": "evaluate", "dmu.output": cfg.output})
    run.params(flatten(result["inputs"]))
    figures = {f"{p}/{k}": v for p, r in result["pairings"].items() for k, v in r.items()}
    h = result["headline"]
    heads = {f"{m}/{k}": v for m, hm in h.items() for k, v in hm.items()} if cfg.several else h
    run.metrics(figures | {f"headline/{k}": v for k, v in heads.items()})
    run.files(files)
    run.finish(True)
