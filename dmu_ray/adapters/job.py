"""``dmu-ray adapter fit``: pairs of two committed galleries joined on Ray Data, a closed-form
adapter fitted from their sufficient statistics, written as an upgrade artefact, and gated on the
held-out pairs without labels.

Everything that can fail is checked first (both galleries committed and verified, dims, two
different models, an empty output folder claimed with ``_adapter.json``); the matched share is
checked after the join, with the gate's size, before anything is fitted; a job refused there
removes the held-out pairs and its claim, so the same config can run again once fixed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from typing import Any

import numpy as np

from dmu_ray.adapters.config import TRAINED, AdapterFitConfig
from dmu_ray.adapters.pairs import join_pairs, read_holdout_labelled
from dmu_ray.adapters.ridge import choose_ridge, tune_share
from dmu_ray.adapters.stats import PairStats, affine, procrustes, residual
from dmu_ray.evaluate.gate import labelled_metrics, share_of_reembedding
from dmu_ray.gallery import Gallery, GalleryError
from dmu_ray.models.artifact import load_artifact, save_upgrade_module
from dmu_ray.models.linear_map import LinearMap
from dmu_ray.storage import Location, create_exclusive, release_if_alone, resolve, write_bytes_atomic

__all__ = ["AdapterError", "run_adapter_fit", "ADAPTER_FILE", "CLAIM"]

ADAPTER_FILE, CLAIM = "adapter.pt", "_adapter.json"


class AdapterError(GalleryError):
    """An adapter job that cannot run as configured; the message names the field or file."""


def _open(uri: str, what: str, cfg: AdapterFitConfig) -> Gallery:
    try:
        g = Gallery.open(uri, cfg.storage, verify=True)
    except GalleryError as err:
        raise AdapterError(f"{what}: {err}") from None
    if g.num_rows == 0:
        raise AdapterError(f"{what}: {g.loc.uri} is empty")
    return g


def _space(g: Gallery) -> str | None:
    """The space every row of ``g`` is in (the end of its lineage chains), None when they differ."""
    from dmu_ray.lineage import chain_space

    spaces = {chain_space(c) for c in g.model.chains().values()}
    return spaces.pop() if len(spaces) == 1 else None


def check_inputs(cfg: AdapterFitConfig) -> tuple[Gallery, Gallery, Location]:
    """Both galleries open and are of two models; the output folder can be claimed."""
    old, new = _open(cfg.old_gallery, "old_gallery", cfg), _open(cfg.new_gallery, "new_gallery", cfg)
    if old.loc.uri == new.loc.uri:
        raise AdapterError(f"old_gallery and new_gallery are one gallery ({old.loc.uri})")
    mo, mn = old.model, new.model
    if (mo.model_id, mo.extra.get("artifact")) == (mn.model_id, mn.extra.get("artifact")):
        raise AdapterError(
            f"old_gallery ({old.loc.uri}) and new_gallery ({new.loc.uri}) were both embedded by model "
            f"{mo.model_id!r}: an adapter maps one model's space to another's"
        )
    if old.manifest.id_type != new.manifest.id_type:
        raise AdapterError(
            f"old_gallery has {old.manifest.id_type} ids, new_gallery {new.manifest.id_type}: pairs are "
            "joined on the id"
        )
    out = resolve(cfg.output, cfg.storage)
    for g in (old, new):
        if out.overlaps(g.loc):
            raise AdapterError(f"output {out.uri} overlaps {g.loc.uri}; choose another folder")
    held = out.list_files(recursive=True)
    if held:
        names = {p.rsplit("/", 1)[-1] for p in held}
        unfinished = (
            f" (an adapter job that did not finish: {CLAIM} without {ADAPTER_FILE} or gate.json; delete "
            "the folder to run it again)"
            if CLAIM in names and not {ADAPTER_FILE, "gate.json"} <= names
            else ""
        )
        raise AdapterError(
            f"output {out.uri} already holds files{unfinished}; an adapter job writes to a new folder"
        )
    return old, new, out


#: the job's scratch folders: the MLP's pairs, Ray Train's run, the tune pairs
SCRATCH = ("_fit", "_train", "_tune")


def _drop(out: Location, folders: tuple[str, ...]) -> None:
    """Delete these folders under ``out`` (those that exist), on disk or S3 alike."""
    for name in folders:
        with contextlib.suppress(OSError):
            out.fs.delete_dir(out.join(name).path)


def _check_pairs(cfg: AdapterFitConfig, counts: Any, smaller: int) -> None:
    """What the join found can be fitted and gated: enough of the ids matched, and more pairs held
    out than the gate's ``k`` (each query's neighbours are among the other held-out pairs);
    checked before anything is fitted."""
    share = counts.matched / smaller
    if share < cfg.min_matched_share:
        raise AdapterError(
            f"only {counts.matched:,} of the smaller gallery's {smaller:,} ids ({share:.1%}) have a pair, "
            f"below min_matched_share {cfg.min_matched_share}: are these galleries of the same items? "
            "(old_gallery and new_gallery must share ids)"
        )
    if counts.held_out <= cfg.gate.k:
        raise AdapterError(
            f"gate: {counts.held_out:,} held-out pairs (holdout {cfg.holdout} of {counts.matched:,} "
            f"matched), but each query's top-{cfg.gate.k} (gate.k) is searched among the other "
            "held-out pairs; raise holdout"
        )


def _closed_form(
    kind: str, cfg: AdapterFitConfig, stats: PairStats, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    if kind == "procrustes":
        return procrustes(stats, center=cfg.center)
    return affine(stats, ridge=ridge, rank=cfg.rank)


def _ridge(
    cfg: AdapterFitConfig, stats: PairStats, out: Location, say
) -> tuple[float, dict[str, Any] | None]:
    """The affine fit's ridge: the configured one, or (``auto``) the one chosen on the tune pairs."""
    choice = cfg.ridge_choice
    if choice is None:
        return 0.0, None
    if choice != "auto":
        return float(choice), {"by": "config", "chosen": float(choice)}
    ridge, record = choose_ridge(stats, out.join("_tune"), cfg.direction, cfg.gate.k)
    if record["candidates"]:
        tried = ", ".join(f"{c['ridge']:.3g}: {c['share']:.3f}" for c in record["candidates"])
        say(
            f"  ridge auto: {ridge:.4g}, of (ridge: share of new/new's top-{cfg.gate.k} on "
            f"{record['tune_pairs']:,} tune pairs) {tried}"
        )
    else:
        say(f"  ridge auto: {record['note']} ({record['tune_pairs']} tune pair(s))")
    return ridge, record


def _fit(
    cfg: AdapterFitConfig, stats: PairStats, out: Location, say, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """The fitted module and what the fit record adds: a closed form from the statistics, or the
    MLP trained on Ray Train from the closed form ``mlp.init`` (its residual and history)."""
    ridge, chosen = _ridge(cfg, stats, out, say)
    fitted = {} if chosen is None else {"ridge": chosen}
    if cfg.adapter not in TRAINED:
        w, b = _closed_form(cfg.adapter, cfg, stats, ridge)
        mse = residual(stats, w, b)
        rank = cfg.rank if cfg.adapter == "affine" else None  # a reduced-rank map is stored factored
        return LinearMap.from_arrays(w, b, rank=rank), {"mse": mse, **fitted}
    from dmu_ray.adapters.mlp import build_mlp, train_mlp

    sec = cfg.mlp
    init = None if sec.init == "zero" else _closed_form(sec.init, cfg, stats, ridge)
    dims = stats.xy.shape
    module = build_mlp(*dims, sec, uncertainty=cfg.adapter == "mlp-uncertainty", init=init)
    say(
        f"  training the {cfg.adapter} adapter on Ray Train: {stats.n:,} pairs, {sec.num_workers} "
        f"{'GPU' if sec.use_gpu else 'CPU'} worker(s), {sec.epochs} epochs, skip path from {sec.init}"
    )
    module, history = train_mlp(
        module, sec, out.join("_fit"), stats.n, out.join("_train"), name="adapter", progress=progress
    )
    first, last = history[0], history[-1]
    fell = 1 - last["loss"] / first["loss"] if first["loss"] else 0.0
    note = (
        f"  the training loss went {first['loss']:.4f} -> {last['loss']:.4f} in {len(history)} epochs "
        f"(mean cosine to the target {first['cos']:.3f} -> {last['cos']:.3f})"
    )
    if len(history) > 1 and fell < 0.01:
        note += (
            f"; it fell {fell:.1%}: the MLP adds little over its {sec.init} start here; raise mlp.lr or "
            "mlp.epochs, or keep the closed form"
        )
    say(note)
    keep = ("epoch", "loss", "cos", "seconds")
    return module, {
        "mse": None,  # the MLP fits directions (cosine), not the target's raw vectors
        "cos": last["cos"],
        "init": sec.init,
        "init_mse": None if init is None else residual(stats, *init),
        "history": [{k: h[k] for k in keep} for h in history],
        "options": sec.model_dump(mode="json"),
        **fitted,
    }


def _backfills(cfg: AdapterFitConfig, module, ids: np.ndarray, old_part: np.ndarray, new_part: np.ndarray):
    """Gallery side: the partial backfills of the gate's gallery, ``{name: vectors}`` (the top
    ``f`` of the rows by each policy take their new-model vectors, the rest the adapted ones)."""
    from dmu_ray.adapters.pairs import id_keys
    from dmu_ray.methods.fastfill import BackfillScorer, select_top

    policies = ["random"] + (["uncertainty"] if getattr(module, "uncertainty", False) else [])
    mapped, scores = BackfillScorer(policies, module, seed=cfg.seed)(id_keys(ids), old_part)
    out = {}
    for f in sorted(set(cfg.gate.backfill)):
        for policy in policies:
            mask = select_top(id_keys(ids), scores[policy], f)
            out[f"backfill {f:.0%} ({policy})"] = np.where(mask[:, None], new_part, mapped)
    return out


def _gate(cfg: AdapterFitConfig, out: Location, module) -> dict[str, Any]:
    """Each strategy's share of new/new's top-k on the held-out pairs: up to ``gate.max_gallery``
    items in a seeded order, the first ``gate.queries`` of them queries, each searched among all
    the others (its own row left out)."""
    import torch

    g = cfg.gate
    # more than k items: the join's checks (held-out pairs) and the config's (max_gallery)
    ids, old, new, labels = read_holdout_labelled(out.join("holdout"), limit=g.max_gallery, seed=cfg.seed)
    nq = min(g.queries, len(ids))
    q, own = slice(0, nq), np.arange(nq)
    with torch.inference_mode():
        mapped = module(torch.from_numpy(old if cfg.direction == "gallery" else new)).numpy()
    strategies = {"old/old": (old[q], old)}
    if old.shape[1] == new.shape[1]:
        strategies["new/old"] = (new[q], old)
    name = "new/upgraded" if cfg.direction == "gallery" else "adapted/old"
    strategies[name] = (new[q], mapped) if cfg.direction == "gallery" else (mapped[q], old)
    if cfg.direction == "gallery":
        for label, vectors in _backfills(cfg, module, ids, old, new).items():
            strategies[label] = (new[q], vectors)
    shares = share_of_reembedding((new[q], new), strategies, k=g.k, own=own)
    passed = None if g.min_share is None else shares[name] >= g.min_share
    gallery = len(ids) - 1  # what each query is searched among
    labelled = None
    if labels is not None and (labels >= 0).all():  # every gate item labelled: the labelled figures too
        both = {**strategies, "new/new": (new[q], new)}
        labelled = labelled_metrics(both, labels[q], labels, map_at=100, own=own)
    return {
        "labelled": labelled,
        "k": g.k,
        "queries": nq,
        "items": len(ids),
        "gallery": gallery,
        "caution": coarse_gate(gallery, g.k),
        "strategy": name,
        "share": shares,
        "min_share": g.min_share,
        "passed": passed,
    }


#: the fewest gallery items per neighbour for a gate whose share says something of a larger
#: gallery: below it (a top-k over more than 1% of the items) neighbourhoods are coarse, most maps
#: keep them, and the share over-states a larger gallery's (fonts set, docs/results.md: 0.39-0.53
#: among 93 items and 0.18-0.36 among 979 against 0.06-0.20 among 14,960; within 0.045 among 5,586)
COARSE_ITEMS_PER_K = 100


def coarse_gate(gallery: int, k: int) -> str | None:
    """The gate's caution when its gallery is too small for its ``k`` (None when it is not)."""
    if gallery >= COARSE_ITEMS_PER_K * k:
        return None
    return (
        f"the gate's gallery holds {gallery:,} items: a top-{k} among them is a coarse neighbourhood "
        "that most maps keep, so these shares over-state those of a larger gallery (raise holdout or "
        f"gate.max_gallery to at least {COARSE_ITEMS_PER_K * k:,} items)"
    )


def _ridge_line(record: dict[str, Any] | None) -> str:
    """The affine fit's ridge for gate.md: how it was set and, for auto, what it was chosen on."""
    if record is None:
        return ""
    if record["by"] == "config":
        return f" Ridge {record['chosen']:.4g} (from the config)."
    if not record["candidates"]:
        return f" Ridge auto: 0 ({record['note']})."
    share = next(c["share"] for c in record["candidates"] if c["ridge"] == record["chosen"])
    return (
        f" Ridge auto: {record['chosen']:.4g}, its share of new/new's top-{record['k']} on "
        f"{record['tune_pairs']:,} tune pairs {share:.3f} "
        f"(the smallest of {len(record['candidates'])} within one standard error of the best)."
    )


def _report(result: dict[str, Any]) -> str:
    gate = result["gate"]
    lines = [
        f"# Adapter {result['adapter']['id']}: {result['adapter']['kind']}, {result['direction']} side",
        "",
        f"Pairs: {result['pairs']['matched']:,} matched ({result['pairs']['fitted']:,} fitted, "
        f"{result['pairs']['held_out']:,} held out), {result['pairs']['old_only']:,} old-only and "
        f"{result['pairs']['new_only']:,} new-only rows.{_ridge_line(result['fit'].get('ridge'))}",
        "",
        f"Share of a full re-embedding's top-{gate['k']} retrieved ({gate['queries']:,} held-out items as "
        f"queries, each searched among the other {gate['gallery']:,} held-out items; new/new = 1):",
        "",
        "| strategy | share |",
        "| --- | --- |",
    ]
    if gate.get("labelled"):
        lab = gate["labelled"]
        lines[-2:] = ["| strategy | share | R@1 | mAP@100 |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {s} | {v:.4f} | {lab[s]['R@1']:.4f} | {lab[s]['mAP@100']:.4f} |"
            for s, v in gate["share"].items()
        ]
        nn = lab["new/new"]
        lines += [
            f"| new/new | 1 | {nn['R@1']:.4f} | {nn['mAP@100']:.4f} |",
            "",
            "(labelled figures: the items' labels)",
        ]
    else:
        lines += [f"| {s} | {v:.4f} |" for s, v in gate["share"].items()]
    if gate.get("caution"):
        lines += ["", f"Caution: {gate['caution']}."]
    if gate["min_share"] is not None:
        verdict = "passes" if gate["passed"] else "does NOT pass"
        lines += ["", f"{gate['strategy']} {verdict} the gate (min_share {gate['min_share']})."]
        others = [s for s, v in gate["share"].items() if s != gate["strategy"] and v >= gate["min_share"]]
        if others:
            lines.append(f"Also reaching it: {', '.join(others)}.")
    return "\n".join(lines) + "\n"


def plot_gate(result: dict[str, Any]) -> bytes:
    """Horizontal bars of each strategy's share of new/new's top-k (PNG bytes), the gate's
    min_share as a line and the strategies reaching it in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmu_ray.evaluate.report import figure_png

    gate = result["gate"]
    names = list(gate["share"])
    vals = [gate["share"][n] for n in names]
    floor = gate["min_share"]
    colours = ["tab:green" if floor is not None and v >= floor else "tab:blue" for v in vals]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    bars = ax.barh(names, vals, color=colours)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if floor is not None:
        ax.axvline(floor, color="tab:red", linestyle="--", label=f"min_share {floor}")
        ax.legend(loc="lower right")
    ax.set_xlim(0, 1.05)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of a full re-embedding's top-{gate['k']} (new/new = 1)")
    ax.set_title(f"adapter {result['adapter']['id']} ({result['direction']} side): the gate")
    return figure_png(fig)


def _join_and_check(
    cfg: AdapterFitConfig, old: Gallery, new: Gallery, out: Location, say
) -> tuple[Any, PairStats]:
    """The join's counts and statistics (its held-out pairs written), checked by :func:`_check_pairs`."""
    work = out.join("_pairs")
    try:
        counts, stats = join_pairs(
            old,
            new,
            work,
            out.join("holdout"),
            direction=cfg.direction,
            holdout=cfg.holdout,
            seed=cfg.seed,
            bucket_rows=cfg.bucket_rows,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            fit_loc=out.join("_fit") if cfg.adapter in TRAINED else None,
            tune_loc=out.join("_tune") if cfg.ridge_choice == "auto" else None,
            tune=tune_share(cfg.tune, int(min(old.num_rows, new.num_rows) * (1 - cfg.holdout))),
            progress=say,
        )
    finally:
        _drop(out, ("_pairs",))  # the join's bucket files
    smaller = min(old.num_rows, new.num_rows)
    say(
        f"  pairs: {counts.matched:,} matched ({counts.matched / smaller:.1%} of the smaller gallery's "
        f"{smaller:,} rows): {counts.fitted:,} to fit, {counts.held_out:,} held out; "
        f"{counts.old_only:,} old-only, {counts.new_only:,} new-only"
    )
    _check_pairs(cfg, counts, smaller)
    return counts, stats


def run_adapter_fit(cfg: AdapterFitConfig, *, progress: bool = True) -> dict[str, Any]:
    """Join, fit, write ``adapter.pt``, gate; returns the result (also in ``gate.json``;
    ``gate.md`` and ``gate.png`` say which strategy passed)."""
    from dmu_ray.ray_session import ensure_ray, require_resources

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    old, new, out = check_inputs(cfg)
    ensure_ray(cfg.ray_address)
    require_resources(  # a task no node can hold would wait for ever
        {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus},
        f"the pair join's tasks (num_cpus {cfg.num_cpus:g}, num_gpus {cfg.num_gpus:g})",
        wait_s=cfg.resource_wait_s,
    )
    if cfg.mlp is not None:  # what the MLP's training needs, before anything is claimed or read
        from dmu_ray.adapters.mlp import check_training

        most = int(min(old.num_rows, new.num_rows) * (1 - cfg.holdout))
        try:
            check_training(cfg.mlp, "the smaller gallery less the held-out share leaves at most", most)
        except ValueError as err:
            raise AdapterError(str(err)) from None
    if not create_exclusive(out.join(CLAIM), cfg.model_dump_json(exclude={"storage"}).encode()):
        raise AdapterError(f"output {out.uri} was claimed by another adapter job; choose another folder")
    src, dst = (old, new) if cfg.direction == "gallery" else (new, old)
    say(
        f"adapter {cfg.adapter} ({cfg.direction} side): {src.model.model_id} ({src.model.dim}-d) -> "
        f"{dst.model.model_id} ({dst.model.dim}-d), pairs of {old.loc.uri} and {new.loc.uri}"
    )
    try:
        counts, stats = _join_and_check(cfg, old, new, out, say)
    except BaseException:  # nothing fitted yet: the output is left as it was found, free to reuse
        _drop(out, SCRATCH + ("holdout",))
        release_if_alone(out, CLAIM)
        raise
    try:
        module, fitted = _fit(cfg, stats, out, say, progress)
    finally:
        _drop(out, SCRATCH)
    mse = fitted.pop("mse")
    spread = stats.yy / stats.n - float((stats.sy / stats.n) @ (stats.sy / stats.n))
    ident = cfg.id or f"{src.model.model_id}->{dst.model.model_id}"
    fit = {
        "kind": cfg.adapter,
        "pairs": asdict(counts),
        "mse": mse,
        "unexplained": mse / spread if mse is not None and spread > 0 else None,
        "options": {"center": cfg.center, "ridge": cfg.ridge, "rank": cfg.rank, "seed": cfg.seed},
        "source_gallery": src.loc.uri,
        "target_gallery": dst.loc.uri,
        **fitted,
    }
    card = {
        "id": ident,
        "direction": cfg.direction,
        "fit": fit,
        "method": f"adapter-{cfg.adapter}",
        # the spaces it maps between: refresh routes (and refuses) galleries by their lineage
        "old_model": {"id": space} if (space := _space(src)) else None,
        "new_model": {"id": space} if (space := _space(dst)) else None,
        "new_model_id": new.model.model_id if cfg.direction == "gallery" else old.model.model_id,
        "new_model_version": (new if cfg.direction == "gallery" else old).model.version,
    }
    uri = out.join(ADAPTER_FILE).uri
    save_upgrade_module(uri, module, card, cfg.storage)
    art = load_artifact(uri, cfg.storage)
    if mse is not None:
        say(
            f"  fitted: mean squared residual {mse:.4g} ({fit['unexplained'] or 0:.1%} of the target's spread) -> {uri}"
        )
    else:
        say(f"  fitted: mean cosine to the target {fit['cos']:.4f} on the fitted pairs -> {uri}")
    gate = _gate(cfg, out, module)
    result = {
        "adapter": {"id": ident, "kind": cfg.adapter, "uri": uri, "ident": art.ident, "sha256": art.sha256},
        "direction": cfg.direction,
        "pairs": asdict(counts),
        "fit": {k: fit[k] for k in ("mse", "unexplained", "cos", "history", "ridge") if k in fit},
        "gate": gate,
    }
    write_bytes_atomic(out.join("gate.json"), json.dumps(result, indent=2).encode())
    write_bytes_atomic(out.join("gate.md"), _report(result).encode())
    write_bytes_atomic(out.join("gate.png"), plot_gate(result))
    shares = ", ".join(f"{s} {v:.3f}" for s, v in gate["share"].items())
    say(f"  gate (share of new/new's top-{gate['k']}): {shares}")
    return result
