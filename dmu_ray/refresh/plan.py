"""The refresh's plan: everything checked before anything is written.

The source (its manifest adds up, every file has the committed size and columns), the modules and
the lineage route of every row, the output prefix (not overlapping the source, free or holding
this same job, its commit records verified on resume), and the claim of the output
(``_refresh.json``, create-if-absent): of two different jobs started into one output, exactly one
runs and the other fails naming the difference.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmu_ray.gallery import (
    Gallery,
    GalleryError,
    Manifest,
    ModelInfo,
    check_columns,
    read_manifest,
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
from dmu_ray.models.card import CardError, check_compatible, refuse_query_adapter
from dmu_ray.refresh.config import RefreshConfig
from dmu_ray.refresh.records import read_record, verify_record
from dmu_ray.refresh.upgrade_files import PROVENANCE, Routing
from dmu_ray.storage import Location, create_exclusive, read_bytes, release_if_alone, resolve

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
    for a in arts:
        try:
            refuse_query_adapter(a.card, f"module {a.uri}")
        except CardError as err:
            raise RefreshError(str(err)) from None
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
    return release_if_alone(plan.out, JOB_MARKER)  # commit records (_parts/) and data count too


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
