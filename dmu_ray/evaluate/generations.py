"""The cross-generation matrix: every query model against every gallery state.

A gallery lives through v1 -> v2 -> v3; at any moment it may hold v1 vectors never refreshed,
v1 vectors upgraded once or twice, vectors embedded by v2... :func:`run_matrix` embeds the query
set once per query model and builds each gallery state once (the data set's gallery images
embedded by a model, then upgraded in memory by a list of modules; or a stored gallery prefix,
whose lineage chains it reports), then evaluates every cell with faiss. Cells whose query and
gallery dimensions differ are reported as such (no number). Output: ``matrix.json``, ``matrix.md``
(the metric per cell, each state's lineage) and ``matrix.png`` (a heat map).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from dmu_ray.evaluate.config import MatrixConfig
from dmu_ray.evaluate.galleries import (
    Embedded,
    check_output,
    check_quarantine,
    data_labels,
    gallery_vectors,
    keep_finite,
    labels_by_id,
)
from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing
from dmu_ray.evaluate.report import figure_png
from dmu_ray.evaluate.search import SearchConfig
from dmu_ray.gallery import LABEL, Gallery, GalleryError
from dmu_ray.gallery_ops import lineage_rows
from dmu_ray.lineage import describe_chain
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    UPGRADE_MODULE,
    Artifact,
    build_upgrade_module,
    load_artifact,
)
from dmu_ray.models.inference import embed_images
from dmu_ray.models.upgrade import CPU_COMPUTE_ROWS, in_row_slices, through_chain
from dmu_ray.storage import resolve, write_bytes_atomic
from dmu_ray.tracking import Tracker, flatten

FORMAT = "dmu-ray.matrix/1"


def _load(uri: str, what: str, kind: str, cfg: MatrixConfig) -> Artifact:
    try:
        return load_artifact(uri, cfg.storage, kind=kind)
    except (ValueError, OSError) as err:
        raise EvaluationError(f"{what}: {err}") from None


def check_matrix(cfg: MatrixConfig) -> dict[str, Any]:
    """Every check before embedding: models and modules load, each state's modules compose from
    its model's dim, stored galleries are committed, non-empty and labelled (by column or by id
    from the data set), the output can be written. Returns the artefacts and galleries."""
    queries = {n: _load(u, f"query_models.{n}", EMBEDDING_MODEL, cfg) for n, u in cfg.query_models.items()}
    states: dict[str, dict[str, Any]] = {}
    by_id = None  # the data set's gallery labels, read once when a gallery has no label column
    for name, spec in cfg.gallery_states.items():
        what = f"gallery_states.{name}"
        if spec.gallery is not None:
            try:
                g = Gallery.open(spec.gallery, cfg.storage, verify=cfg.verify_galleries)
            except GalleryError as err:
                raise EvaluationError(f"{what}.gallery: {err}") from None
            check_quarantine(g, f"{what}.gallery", cfg.max_quarantined_share)
            if g.num_rows == 0:
                raise EvaluationError(f"{what}.gallery: {g.loc.uri} is empty")
            labels = None
            try:
                names = g.schema().names  # the first read of a file: verified against the manifest
            except GalleryError as err:
                raise EvaluationError(f"{what}.gallery: {err}") from None
            if LABEL not in names:
                by_id = by_id if by_id is not None else data_labels(cfg.data, cfg.storage)
                labels = labels_by_id(g, by_id, f"{what}.gallery")
            states[name] = {"gallery": g, "labels": labels}
            continue
        model = queries.get(spec.model) or _load(spec.model, f"{what}.model", EMBEDDING_MODEL, cfg)
        mods = [_load(u, f"{what}.upgrade[{i}]", UPGRADE_MODULE, cfg) for i, u in enumerate(spec.upgrade)]
        dim = model.card.dim
        for i, m in enumerate(mods):
            if m.card.in_dim != dim:
                raise EvaluationError(
                    f"{what}.upgrade[{i}]: {m.uri} takes {m.card.in_dim}-d vectors but gets {dim}-d ones"
                )
            dim = m.card.out_dim
        states[name] = {"model": model, "upgrade": mods}
    check_output(cfg.output, cfg.storage)
    return {"queries": queries, "states": states}


def _lineage_of(state: dict[str, Any]) -> list[dict[str, Any]]:
    """What a state's vectors are: a stored gallery's chains with their row counts, or the
    model and modules a computed state applies."""
    if "gallery" in state:
        g: Gallery = state["gallery"]
        counts = lineage_rows(g)
        return [
            {"chain": k, "rows": counts.get(k, 0), "steps": describe_chain(c)}
            for k, c in g.model.chains().items()
        ]
    steps = [("embed", state["model"].ident)] + [("upgrade", m.ident) for m in state["upgrade"]]
    return [
        {
            "chain": ">".join(ident for _, ident in steps),
            "rows": None,
            "steps": " -> ".join(f"{op} {ident}" for op, ident in steps),
        }
    ]


def run_matrix(cfg: MatrixConfig, *, progress: bool = True) -> dict[str, Any]:
    """Embed, upgrade, search every cell, write ``matrix.json``/``matrix.md``/``matrix.png``."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    checked = check_matrix(cfg)
    queries, states = checked["queries"], checked["states"]
    tracker = Tracker.open(cfg.tracking, resolve(cfg.output, cfg.storage), say=say)
    from dmu_ray.ray_session import ensure_ray, require_pool

    ensure_ray(cfg.ray_address)
    require_pool(cfg.pool, "an embedding actor")
    data = resolve(cfg.data, cfg.storage)
    embedded: dict[tuple[str, str], Embedded] = {}

    def embed(part: str, art: Artifact) -> Embedded:
        key = (part, art.sha256)
        if key not in embedded:
            say(f"embedding {part} with {art.uri}")
            got = embed_images(
                data.join(part).uri, art.uri, storage=cfg.storage, pool=cfg.pool, sha256=art.sha256
            )
            embedded[key], lost = keep_finite(got, f"{part} set", art.ident, cfg.max_quarantined_share)
            if lost:
                say(f"  dropped {lost:,} {part} rows whose vectors are NaN/Inf (model {art.ident})")
        return embedded[key]

    q_vecs = {n: embed("query", a) for n, a in queries.items()}
    g_vecs: dict[str, Embedded] = {}
    for name, st in states.items():
        if "gallery" in st:
            g_vecs[name] = gallery_vectors(st["gallery"], st["labels"])
            continue
        ids, labels, x = embed("gallery", st["model"])
        y = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        for m in st["upgrade"]:
            say(f"upgrading {name}'s vectors with {m.uri}")
        if st["upgrade"]:  # the whole chain on each slice of rows
            chain = [build_upgrade_module(m) for m in st["upgrade"]]
            with torch.inference_mode():
                y = in_row_slices(lambda rows, chain=chain: through_chain(chain, rows), y, CPU_COMPUTE_ROWS)
        g_vecs[name] = (ids, labels, y.numpy())

    mcfg = MetricsConfig(ks=cfg.ks, map_at=cfg.map_at, protocols=["retrieval"])
    scfg = SearchConfig(exact_max=cfg.exact_max, nprobe=cfg.nprobe, pq_m=cfg.pq_m)
    cells: dict[str, dict[str, Any]] = {}
    for qn, (qi, ql, qx) in q_vecs.items():
        cells[qn] = {}
        for gn, (gi, gl, gx) in g_vecs.items():
            if qx.shape[1] != gx.shape[1]:
                cells[qn][gn] = {"skipped": f"queries {qx.shape[1]}-d, gallery {gx.shape[1]}-d"}
                continue
            say(f"searching {qn} queries in {gn}")
            t0 = time.perf_counter()
            r = evaluate_pairing(f"{qn}/{gn}", qx, ql, gx, gl, mcfg, scfg, q_ids=qi, g_ids=gi)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            cells[qn][gn] = r
    result = {
        "format": FORMAT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "title": cfg.title,
        "metric": cfg.metric,
        "queries": list(cfg.query_models),
        "galleries": list(cfg.gallery_states),
        "inputs": {
            "data": cfg.data,
            "query_models": {n: a.ident for n, a in queries.items()},
            "gallery_states": {n: s.model_dump(exclude_defaults=True) for n, s in cfg.gallery_states.items()},
        },
        "lineage": {n: _lineage_of(st) for n, st in states.items()},
        "cells": cells,
    }
    files = {
        "matrix.json": json.dumps(result, indent=2).encode(),
        "matrix.md": matrix_markdown(result).encode(),
        "matrix.png": heat_map(result),
    }
    out = resolve(cfg.output, cfg.storage)
    for fname, blob in files.items():
        write_bytes_atomic(out.join(fname), blob)
    result["files"] = {f: out.join(f).uri for f in files}
    if tracker is not None:
        run = tracker.start(cfg.title, tags={"dmu.kind": "evaluate-matrix", "dmu.output": cfg.output})
        run.params(flatten(result["inputs"]))
        run.metrics(
            {
                f"{q}/{g}/{k}": v
                for q, row in cells.items()
                for g, r in row.items()
                for k, v in r.items()
                if isinstance(v, float)
            }
        )
        run.files(files)
        run.finish(True)
    return result


def _grid(result: dict[str, Any]) -> np.ndarray:
    m = result["metric"]
    return np.array(
        [[result["cells"][q][g].get(m, np.nan) for g in result["galleries"]] for q in result["queries"]],
        dtype=np.float64,
    )


def matrix_markdown(result: dict[str, Any]) -> str:
    """The metric per cell (rows: query models, columns: gallery states), then each state's lineage."""
    grid = _grid(result)
    lines = [
        f"# {result['title']}",
        "",
        f"{result['metric']} (%), rows: query model, columns: gallery state; '-': dimensions differ.",
        "",
        "| query \\ gallery | " + " | ".join(result["galleries"]) + " |",
        "| --- |" + " ---: |" * len(result["galleries"]),
    ]
    for i, q in enumerate(result["queries"]):
        vals = ["-" if np.isnan(v) else f"{100 * v:.2f}" for v in grid[i]]
        lines.append(f"| {q} | " + " | ".join(vals) + " |")
    lines += ["", "Gallery states:", ""]
    for g, chains in result["lineage"].items():
        for c in chains:
            rows = "" if c["rows"] is None else f" ({c['rows']:,} rows)"
            lines.append(f"- {g}: {c['steps']}{rows}")
    return "\n".join(lines) + "\n"


def heat_map(result: dict[str, Any]) -> bytes:
    """The metric per cell as an annotated heat map (PNG bytes); cells of unequal dims are blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = 100 * _grid(result)
    nq, ng = grid.shape
    fig, ax = plt.subplots(figsize=(1.3 * ng + 2.5, 0.7 * nq + 1.8))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    for i in range(nq):
        for j in range(ng):
            if not np.isnan(grid[i, j]):
                dark = grid[i, j] < np.nanmean(grid)
                ax.text(
                    j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white" if dark else "black"
                )
    ax.set_xticks(range(ng), result["galleries"], rotation=25, ha="right")
    ax.set_yticks(range(nq), result["queries"])
    ax.set_xlabel("gallery state")
    ax.set_ylabel("query model")
    ax.set_title(f"{result['title']}: {result['metric']} (%)")
    fig.colorbar(im, ax=ax)
    return figure_png(fig)
