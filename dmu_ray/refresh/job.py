"""The refresh job: check everything up front, stream the pending files through a Ray Data actor
pool, then commit the new gallery's manifest.

Work is split by input file (``ray.data.from_items`` over the paths, one file per actor call), so
each output file is published atomically by exactly one successful call and a re-run only redoes
files without a valid commit record (see :mod:`dmu_ray.refresh.upgrade_files`). Inside a file,
batches stay in Arrow form and reach the module as zero-copy ``(n, d)`` arrays.

Before anything is written the job checks the source (its manifest adds up, every file has the
committed size and columns), the module, the output prefix (not overlapping the source, free or
holding this same job), the Ray cluster (reachable, with a node that can hold one actor), and
then claims the output atomically (``_refresh.json``, create-if-absent): of two different jobs
started into one output, exactly one runs and the other fails naming the difference.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmu_ray.config import RefreshConfig
from dmu_ray.gallery import (
    MANIFEST_NAME,
    Gallery,
    GalleryError,
    Manifest,
    ModelInfo,
    check_columns,
    describe_columns,
    read_manifest,
    write_manifest,
)
from dmu_ray.lineage import (
    LINEAGE_COLUMN,
    Chain,
    Hop,
    LineageError,
    chain_key,
    chain_space,
    embed_step,
    plan_routes,
    upgrade_step,
)
from dmu_ray.models.artifact import UPGRADE_MODULE, Artifact, build_upgrade_module, load_artifact
from dmu_ray.models.card import CardError, check_compatible
from dmu_ray.refresh.upgrade_files import (
    PROVENANCE,
    FileUpgrader,
    Overrides,
    Routing,
    entry_from_record,
    read_record,
    verify_record,
)
from dmu_ray.storage import Location, create_exclusive, read_bytes, resolve

JOB_MARKER = "_refresh.json"


class RefreshError(GalleryError):
    """A refresh that must not start (or continue); the message says what and where."""


@dataclass
class RefreshPlan:
    cfg: RefreshConfig
    source: Gallery
    out: Location
    artifact: Artifact
    model: ModelInfo
    job: dict[str, Any]
    pending: list[str]
    done: bool = False
    redo: dict[str, str] = field(default_factory=dict)  # commit records that did not count, and why
    artifacts: list[Artifact] = field(default_factory=list)  # every module, in the config's order
    routing: Routing | None = None  # which modules each lineage chain goes through


@dataclass
class RefreshResult:
    manifest: Manifest
    files_done_now: int
    rows_done_now: int
    seconds: float
    skipped_files: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_done_now / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        m = self.manifest
        start = self.extra.get("pool_start_s")
        pool = f" ({start:.1f} s of {self.seconds:.1f} s starting the pool)" if start is not None else ""
        return (
            f"refresh committed: {m.rows:,} rows in {len(m.files)} files "
            f"({self.files_done_now} upgraded now, {self.skipped_files} already committed), "
            f"{self.rows_per_s:,.0f} rows/s{pool}, {m.quarantined_rows:,} quarantined"
        )


def _check_source_files(src: Gallery) -> None:
    """Every source file is there with the size its manifest committed and the contract's columns."""
    entries = {f.path: f for f in src.manifest.files}

    def check(rel: str) -> str | None:
        loc = src.loc.join(rel)
        try:
            size = loc.fs.get_file_info(loc.path).size
            if size is None:
                return f"{loc.uri}: listed in the manifest but missing"
            if size != entries[rel].bytes:
                return (
                    f"{loc.uri}: {size} bytes, the manifest says {entries[rel].bytes} (the file changed "
                    "after its gallery was committed)"
                )
            check_columns(pq.ParquetFile(loc.fs.open_input_file(loc.path)).schema_arrow, loc.uri)
        except (GalleryError, OSError, pa.ArrowException) as err:
            return str(err) if loc.uri in str(err) else f"{loc.uri}: {err}"
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        errors = [e for e in pool.map(check, src.files) if e]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise RefreshError(
            f"{len(errors)} source file(s) cannot be refreshed:\n  " + "\n  ".join(errors[:10]) + more
        )


def upgrade_hop(art: Artifact) -> Hop:
    """An upgrade-module artefact as a lineage routing edge: from its old model's space (None when
    its card does not record it) to its new model's (the ident when recorded, else the id, else
    the module's own ident)."""
    card = art.card
    source = (card.old_model or {}).get("id")
    target = (card.new_model or {}).get("id") or card.new_model_id or art.ident
    return Hop(art.ident, source, str(target))


def _plan_lineage(src: Gallery, arts: list[Artifact], modules: list, backfill: dict[str, Any] | None):
    """The route of every source chain through ``arts`` to the last one's target space, the
    output chains and the routing the upgraders follow; refuses (before any work) a gallery whose
    rows cannot all reach the target, or whose module dims do not compose."""
    chains = src.model.chains()
    has_column = any(c["name"] == LINEAGE_COLUMN for c in src.manifest.columns)
    if (why := src.missing_lineage_column()) is not None:
        raise RefreshError(why)
    hops = [upgrade_hop(a) for a in arts]
    target = hops[-1].target
    try:
        routes = plan_routes(chains, hops, target)
    except LineageError as err:
        hint = ""
        if any(s.get("op") == "import" for c in chains.values() for s in c):
            hint = (
                " (an imported gallery's space is the --model-id it was imported with: import it with the "
                "old model card's id)"
            )
        raise RefreshError(f"{src.loc.uri}: {err}{hint}") from None
    out_dim = modules[-1].out_dim
    out_chains: dict[str, Chain] = {}
    routing: dict[str, tuple[list[int], str]] = {}
    for key, route in routes.items():
        dim = src.model.dim
        chain = list(chains[key])
        for i in route:
            if modules[i].in_dim != dim:
                raise RefreshError(
                    f"{arts[i].uri} takes {modules[i].in_dim}-d input but the rows of chain {key} are "
                    f"{dim}-d at that point"
                )
            chain.append(upgrade_step(arts[i].ident, arts[i].sha256, chain_space(chain), hops[i].target))
            dim = modules[i].out_dim
        if dim != out_dim:
            raise RefreshError(
                f"rows of chain {key} end {dim}-d but the target space of {arts[-1].uri} is {out_dim}-d"
            )
        out_key = chain_key(chain)
        out_chains[out_key] = chain
        routing[key] = (route, out_key)
    override_key = None
    if backfill is not None and backfill.get("new_model"):
        first = embed_step(backfill["new_model"], backfill.get("new_model_sha256"))
        override_key = chain_key([first])
        out_chains[override_key] = [first]
    plan = Routing(
        routing,
        default=next(iter(chains)) if len(chains) == 1 and not has_column else None,
        column_out=len(out_chains) > 1,
        override_key=override_key,
    )
    return out_chains, plan


def plan_refresh(cfg: RefreshConfig, *, backfill: dict[str, Any] | None = None) -> RefreshPlan:
    """Every check that can fail before cluster work: source committed and readable, modules load,
    every row's lineage has a path through them to the target space and the dims fit, output
    prefix free or holding this same job. Then the pending files. ``backfill`` (a partial
    backfill's policy and selection) becomes part of the job's identity."""
    src = Gallery.open(cfg.source, cfg.storage)
    out = resolve(cfg.output, cfg.storage)
    if out.overlaps(src.loc):
        raise RefreshError(
            f"output {out.uri} must not be the source prefix {src.loc.uri}, inside it or hold it "
            "(refresh never writes in place)"
        )
    arts = [load_artifact(u, cfg.storage, kind=UPGRADE_MODULE) for u in cfg.modules]
    modules = [build_upgrade_module(a) for a in arts]
    art = arts[-1]
    if len(arts) == 1:
        try:
            check_compatible(
                psi=art.card, gallery_dim=src.model.dim, names={"psi": f"upgrade module {art.uri}"}
            )
        except CardError as err:
            raise RefreshError(f"{err} (gallery {src.loc.uri}, model {src.model.model_id!r})") from None
    if not src.files:
        raise RefreshError(f"{src.loc.uri}: the gallery has no files")
    out_chains, routing = _plan_lineage(src, arts, modules, backfill)
    _check_source_files(src)
    if backfill is not None and any(c["name"] == PROVENANCE for c in src.manifest.columns):
        raise RefreshError(
            f"{src.loc.uri} already has a {PROVENANCE!r} column; a backfill writes its own there"
        )
    new_model = art.card.new_model_id or f"{src.model.model_id}+{art.card.id}"
    model = ModelInfo(
        model_id=str(new_model),
        dim=modules[-1].out_dim,
        dtype=cfg.dtype,
        normalized=cfg.normalize,
        version=art.card.new_model_version or "1",
        upgrade_module=art.ident,
        source_gallery=src.loc.uri,
        lineage=out_chains,
    )
    job = {
        "source": src.loc.uri,
        "source_created_at": src.manifest.created_at,
        "source_rows": src.manifest.rows,
        "module": art.uri if len(arts) == 1 else [a.uri for a in arts],
        "module_sha256": art.sha256 if len(arts) == 1 else [a.sha256 for a in arts],
        "dtype": cfg.dtype,
        "normalize": cfg.normalize,
    }
    if backfill is not None:
        job["backfill"] = backfill
    existing = read_manifest(out)
    if existing is not None:
        if existing.extra.get("refresh", {}).get("job") == job:
            return RefreshPlan(cfg, src, out, art, model, job, [], done=True, artifacts=arts, routing=routing)
        raise RefreshError(
            f"output {out.uri} already holds a different gallery (model {existing.model.model_id!r}, "
            f"from {existing.extra.get('refresh', {}).get('job', {}).get('source', 'elsewhere')}); "
            "choose another output prefix"
        )
    marker = out.join(JOB_MARKER)
    if marker.is_file():
        diff = _job_diff(marker, job)
        if diff is not None:
            raise RefreshError(
                f"output {out.uri} holds a partial refresh of a different job (differs in {diff}); "
                "choose another output prefix or delete it"
            )
    else:
        stray = [f for f in out.list_files(recursive=True)]
        if stray:
            raise RefreshError(
                f"output {out.uri} already holds {len(stray)} file(s) that are not from this refresh "
                f"(e.g. {stray[0]}); choose another output prefix"
            )
    if marker.is_file():  # a partial run of this job: redo every file whose commit does not hold
        todo = _verify_commits(out, src)
        pending = [f for f in src.files if f in todo]
        redo = {k: v for k, v in todo.items() if v}
    else:
        pending, redo = list(src.files), {}
    return RefreshPlan(cfg, src, out, art, model, job, pending, redo=redo, artifacts=arts, routing=routing)


def _verify_commits(out: Location, src: Gallery) -> dict[str, str | None]:
    """For each source file that is not committed in ``out``, why (None: never started). A commit
    record counts only when the files it names are there with the recorded size and sha256."""
    rows = {f.path: f.rows for f in src.manifest.files}

    def check(rel: str) -> tuple[str, str | None, bool]:
        rec = read_record(out, rel)
        return rel, verify_record(out, rel, rec, rows[rel]), rec is not None

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(check, src.files))
    return {rel: (why if had else None) for rel, why, had in results if why is not None}


def _job_diff(marker: Location, job: dict[str, Any]) -> list[str] | None:
    """None when the job marker at ``marker`` is ``job``; else the keys that differ (all of them
    when the marker cannot be read)."""
    try:
        theirs = json.loads(read_bytes(marker))
    except (ValueError, FileNotFoundError):
        theirs = None
    if theirs == job:
        return None
    return sorted(k for k in job if not isinstance(theirs, dict) or theirs.get(k) != job[k])


def claim_output(plan: RefreshPlan) -> bool:
    """Claim the output prefix for this job atomically (create ``_refresh.json`` if absent; a
    conditional put on S3). If another job got there first, fail unless it is this same job.
    Returns True when this call created the claim."""
    marker = plan.out.join(JOB_MARKER)
    if create_exclusive(marker, json.dumps(plan.job, sort_keys=True).encode()):
        return True
    diff = _job_diff(marker, plan.job)
    if diff is not None:
        raise RefreshError(
            f"output {plan.out.uri} was claimed by another refresh job (differs in {diff}); nothing was "
            "written by this one. Choose another output prefix"
        )
    return False


def release_claim(plan: RefreshPlan) -> bool:
    """Remove this job's claim when nothing of it was committed (no commit record, no manifest), so
    that a job that failed before its first file frees its output; True when it was removed."""
    sel = pafs.FileSelector(plan.out.path, recursive=True, allow_not_found=True)
    held = [i for i in plan.out.fs.get_file_info(sel) if i.type == pafs.FileType.File]
    if [i.base_name for i in held] != [JOB_MARKER]:  # commit records (_parts/) and data count too
        return False
    with contextlib.suppress(OSError):
        plan.out.fs.delete_file(plan.out.join(JOB_MARKER).path)
        return True
    return False


def _check_committed_files(plan: RefreshPlan) -> None:
    """A committed output that is asked again: its files must still be there with the sizes its
    manifest records (a cheap check; ``dmu-ray gallery validate`` reads every byte)."""
    manifest = read_manifest(plan.out)
    for entry in [*manifest.files, *manifest.quarantine]:
        loc = plan.out.join(entry.path)
        info = loc.fs.get_file_info(loc.path)
        if info.type != pafs.FileType.File or info.size != entry.bytes:
            found = "missing" if info.type != pafs.FileType.File else f"{info.size} bytes"
            raise RefreshError(
                f"output {plan.out.uri} holds this refresh, but its committed file {entry.path} is {found} "
                f"(the manifest says {entry.bytes} bytes): it changed after the commit. Run `dmu-ray "
                "gallery validate` on it; to redo the refresh, delete the output prefix and run it again"
            )


class _RefreshActor:
    """Ray Data actor: loads the module once, then upgrades one file per call."""

    def __init__(self, plan_args: dict[str, Any]) -> None:
        import ray
        import torch

        cfg: RefreshConfig = plan_args["cfg"]
        # the modules at the absolute locations the driver checked, with the bytes it checked
        arts = [
            load_artifact(u, cfg.storage, kind=UPGRADE_MODULE, sha256=sha)
            for u, sha in zip(plan_args["module_uris"], plan_args["module_sha256"], strict=True)
        ]
        # the actor's CPUs shared by the files it works on at once
        threads = max(1, int(round(cfg.pool.num_cpus)) // cfg.pool.files_in_flight())
        torch.set_num_threads(threads)
        device = "cuda" if cfg.pool.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.upgrader = FileUpgrader(
            [build_upgrade_module(a) for a in arts],
            plan_args["src"],
            plan_args["out"],
            plan_args["model"],
            normalize=cfg.normalize,
            batch_size=cfg.pool.batch_size,
            device=device,
            fail_after_files=plan_args.get("fail_after_files"),
            worker=ray.get_runtime_context().get_node_id(),
            actor=ray.get_runtime_context().get_actor_id(),
            overrides=ray.get(plan_args["overrides"]) if plan_args.get("overrides") is not None else None,
            expected=plan_args.get("expected"),
            routing=plan_args["routing"],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        recs = [self.upgrader.upgrade_file(p) for p in batch.column("path").to_pylist()]
        return pa.table(
            {
                "path": [r["source"] for r in recs],
                "rows_in": [r["rows_in"] for r in recs],
                "rows_out": [r["file"]["rows"] for r in recs],
                "quarantined": [r["quarantine"]["rows"] if r["quarantine"] else 0 for r in recs],
            }
        )


def run_refresh(
    cfg: RefreshConfig,
    *,
    progress: bool = True,
    fail_after_files: int | None = None,
    backfill: dict[str, Any] | None = None,
    overrides: Overrides | None = None,
) -> RefreshResult:
    """Plan, run the pending files on Ray Data, commit the manifest. Idempotent: a re-run of the
    same job resumes; a re-run after commit does nothing. A partial backfill passes its identity
    (``backfill``) and the re-embedded rows (``overrides``)."""
    from dmu_ray.ray_session import check_storage_from_a_worker, ensure_ray, require_pool

    plan = plan_refresh(cfg, backfill=backfill)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    if plan.done:
        _check_committed_files(plan)
        say(f"{plan.out.uri} already holds this refresh (its files' sizes checked); nothing to do")
        return RefreshResult(read_manifest(plan.out), 0, 0, 0.0, len(plan.source.files))
    pool = cfg.pool
    if plan.pending:  # the cluster can run the pool and its workers reach the data, before any claim
        ensure_ray(cfg.ray_address)
        require_pool(pool, "a refresh actor")
        reads = [plan.source.loc.join(MANIFEST_NAME), *_artifact_locations(plan)]
        check_storage_from_a_worker(reads, plan.out, what=f"refresh into {plan.out.uri}")
    claimed = claim_output(plan)
    try:
        return _run_claimed(plan, cfg, say, progress, fail_after_files, overrides)
    except BaseException:
        if claimed and release_claim(plan):
            say(f"released the claim on {plan.out.uri}: the job failed before committing anything")
        raise


def _artifact_locations(plan: RefreshPlan) -> list[Location]:
    return [resolve(a.uri, plan.cfg.storage) for a in plan.artifacts]


def _run_claimed(
    plan: RefreshPlan,
    cfg: RefreshConfig,
    say,
    progress: bool,
    fail_after_files: int | None,
    overrides: Overrides | None,
) -> RefreshResult:
    import ray

    pool = cfg.pool
    for rel, why in plan.redo.items():
        say(f"redoing {rel}: its commit record does not count ({why})")
    skipped = len(plan.source.files) - len(plan.pending)
    say(
        f"refresh {plan.source.loc.uri} -> {plan.out.uri}: {len(plan.pending)} file(s) to upgrade, {skipped} already committed"
    )
    t0, t0_wall = time.perf_counter(), time.time()
    rows_now = 0
    if plan.pending:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # a backstop for a pool whose node went away after the check above: fail, do not hang
        ctx.wait_for_min_actors_s = int(max(600, 2 * pool.resource_wait_s))
        # One file in flight per actor (below) caps a pool's utilisation at 100%; Ray Data grows a
        # pool only above its threshold (175% by default), so min_actors < max_actors would never
        # scale. At 100% every actor is busy: files waiting then start another actor.
        auto = ctx.autoscaling_config
        auto.actor_pool_util_upscaling_threshold = min(auto.actor_pool_util_upscaling_threshold, 1.0)
        expected = {f.path: f for f in plan.source.manifest.files if f.path in set(plan.pending)}
        files_at_once = pool.files_in_flight()
        ds = ray.data.from_items([{"path": p} for p in plan.pending], override_num_blocks=len(plan.pending))
        ds = ds.map_batches(
            _RefreshActor,
            fn_constructor_kwargs={
                "plan_args": {
                    "cfg": cfg,
                    "src": plan.source.loc,
                    "out": plan.out,
                    "model": plan.model,
                    "module_uris": [a.uri for a in plan.artifacts],
                    "module_sha256": [a.sha256 for a in plan.artifacts],
                    "routing": plan.routing,
                    "expected": expected,
                    "fail_after_files": fail_after_files,
                    "overrides": ray.put(overrides) if overrides is not None else None,
                }
            },
            batch_size=1,
            batch_format="pyarrow",
            # One file per call is a large unit and its input is only a path: no prefetch beyond
            # the files an actor works on at once (one on a CPU actor), so the first actor up does
            # not queue files that idle actors could take. Several at once run concurrently in the
            # actor (threads), so one file's Parquet work overlaps another's psi on the GPU.
            compute=ray.data.ActorPoolStrategy(
                min_size=pool.min_actors,
                max_size=pool.max_actors,
                max_tasks_in_flight_per_actor=files_at_once,
                max_concurrent_calls_per_actor=files_at_once,
                enable_true_multi_threading=files_at_once > 1,
            ),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows_now += sum(batch.column("rows_in").to_pylist())
    seconds = time.perf_counter() - t0
    manifest = _commit(plan, seconds, rows_now, t0_wall)
    startup = manifest.extra["refresh"].get("last_run_pool_start_s")
    extra = {} if startup is None else {"pool_start_s": startup}
    return RefreshResult(manifest, len(plan.pending), rows_now, seconds, skipped, extra)


def _commit(plan: RefreshPlan, seconds: float, rows_now: int, t0_wall: float) -> Manifest:
    """Collect every file's commit record and write the manifest last."""

    def load(rel: str) -> dict[str, Any]:
        rec = read_record(plan.out, rel)
        if rec is None:
            raise RefreshError(
                f"{plan.out.uri}: {rel} has no commit record after the run; re-run the refresh"
            )
        for d in (rec["file"], rec["quarantine"]):
            if d is None:
                continue
            loc = plan.out.join(d["path"])
            if loc.fs.get_file_info(loc.path).size != d["bytes"]:
                raise RefreshError(
                    f"{loc.uri} is missing or changed since it was committed; re-run the refresh to redo it"
                )
        return rec

    with ThreadPoolExecutor(max_workers=16) as pool:
        records = list(pool.map(load, plan.source.files))
    pending = set(plan.pending)
    ran_now = [r for r in records if r["source"] in pending]
    starts = [r["started_at"] for r in ran_now if isinstance(r.get("started_at"), (int, float))]
    reasons: Counter[str] = Counter()
    for r in records:
        reasons.update(r["reasons"])
    first = plan.out.join(records[0]["file"]["path"])
    schema = pq.ParquetFile(first.fs.open_input_file(first.path)).schema_arrow
    manifest = Manifest(
        model=plan.model,
        files=[entry_from_record(r["file"]) for r in records],
        quarantine=[q for q in (entry_from_record(r["quarantine"]) for r in records) if q],
        quarantine_reasons=dict(reasons),
        id_type=str(schema.field("id").type),
        columns=describe_columns(schema),
        rows_in=sum(r["rows_in"] for r in records),
        extra={
            "refresh": {
                "job": plan.job,
                "last_run_seconds": round(seconds, 3),
                "last_run_rows": rows_now,
                # distinct pool actors that upgraded this run's files: how far the pool grew
                "last_run_actors": len({r.get("actor") for r in ran_now if r.get("actor")}),
            }
        },
    )
    if starts:  # from the job's start to its first file's: the pool's start-up (fixed cost)
        manifest.extra["refresh"]["last_run_pool_start_s"] = round(max(0.0, min(starts) - t0_wall), 3)
    if "backfill" in plan.job:
        rows_new = sum(r.get("rows_new", 0) for r in records)
        if rows_new != plan.job["backfill"]["rows_selected"]:
            raise RefreshError(
                f"the backfill selected {plan.job['backfill']['rows_selected']} rows but {rows_new} were "
                "written with the new model's vector"
            )
        manifest.extra["backfill"] = {
            **plan.job["backfill"],
            "rows_new": rows_new,
            "rows_transformed": manifest.rows - rows_new,
            "provenance_column": PROVENANCE,
        }
    if manifest.rows + manifest.quarantined_rows != manifest.rows_in:
        raise RefreshError(
            f"rows do not reconcile: {manifest.rows_in} in, {manifest.rows} out, {manifest.quarantined_rows} quarantined"
        )
    if manifest.rows_in != plan.source.manifest.rows:
        raise RefreshError(
            f"read {manifest.rows_in} rows but the source manifest lists {plan.source.manifest.rows}"
        )
    write_manifest(plan.out, manifest)
    return manifest
