"""The refresh job: check everything up front, stream the pending files through a Ray Data actor
pool, then commit the new gallery's manifest.

Work is split by input file (``ray.data.from_items`` over the paths, one file per actor call), so
each output file is published atomically by exactly one successful call and a re-run only redoes
files without a valid commit record (see :mod:`dmu_ray.refresh.upgrade_files`). Inside a file,
batches stay in Arrow form and reach the module as zero-copy ``(n, d)`` arrays.

Before anything is written the job plans (:mod:`dmu_ray.refresh.plan`: source, modules, output),
checks the Ray cluster (reachable, with a node that can hold one actor, whose workers reach the
storage), and then claims the output atomically.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dmu_ray.gallery import (
    MANIFEST_NAME,
    Manifest,
    describe_columns,
    read_manifest,
    write_manifest,
)
from dmu_ray.models.artifact import UPGRADE_MODULE, build_upgrade_module, load_artifact
from dmu_ray.refresh.config import RefreshConfig
from dmu_ray.refresh.plan import (
    JOB_MARKER,
    RefreshError,
    RefreshPlan,
    RefreshResult,
    _check_committed_files,
    claim_output,
    plan_refresh,
    release_claim,
)
from dmu_ray.refresh.records import attribution, entry_from_record, read_record
from dmu_ray.refresh.upgrade_files import PROVENANCE, FileUpgrader, Overrides
from dmu_ray.storage import Location, resolve

__all__ = ["run_refresh", "plan_refresh", "RefreshResult", "RefreshError", "JOB_MARKER", "claim_output"]


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
        device = "cuda" if cfg.pool.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        files = cfg.pool.files_in_flight()
        # a CPU actor's files in flight are staggered: one runs psi at a time (all the actor's
        # CPUs), the others read, decode, encode and publish beside it; on a GPU they run at once
        stagger = device == "cpu" and files > 1
        threads = max(1, int(round(cfg.pool.num_cpus)) // (1 if stagger else files))
        torch.set_num_threads(threads)
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
            compute_slots=1 if stagger else None,
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
        require_pool(pool, "a refresh actor", fed_by_tasks=False)  # its input is file names
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
    from dmu_ray.ray_session import data_context

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
        # a backstop for a pool whose node went away after the check above: fail, do not hang
        wait_s = int(max(600, 2 * pool.resource_wait_s))
        with data_context(enable_progress_bars=progress, wait_for_min_actors_s=wait_s) as ctx:
            rows_now = _upgrade_files(plan, cfg, ctx, fail_after_files, overrides)
    seconds = time.perf_counter() - t0
    manifest = _commit(plan, seconds, rows_now, t0_wall)
    startup = manifest.extra["refresh"].get("last_run_pool_start_s")
    extra = {} if startup is None else {"pool_start_s": startup}
    if "last_run_attribution" in manifest.extra["refresh"]:
        extra["attribution"] = manifest.extra["refresh"]["last_run_attribution"]
    return RefreshResult(manifest, len(plan.pending), rows_now, seconds, skipped, extra)


def _upgrade_files(
    plan: RefreshPlan, cfg: RefreshConfig, ctx, fail_after_files: int | None, overrides: Overrides | None
) -> int:
    """Run the pending files through the refresh actors on Ray Data (in ``ctx``); the rows read."""
    import ray

    from dmu_ray.ray_session import collect_batches

    pool = cfg.pool
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
    return sum(sum(b.column("rows_in").to_pylist()) for b in collect_batches(ds))


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
        manifest.extra["refresh"]["last_run_attribution"] = attribution(ran_now, t0_wall, seconds)
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
