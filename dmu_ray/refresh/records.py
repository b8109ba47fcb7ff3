"""A refreshed file's commit record (``_parts/<rel>.json``): its name, reading it, and the check
that the files it names are there as recorded (sizes, sha256), which decides whether a file counts
as done (module docstring of :mod:`dmu_ray.refresh.upgrade_files`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow.fs as pafs

from dmu_ray.gallery import QUARANTINE_DIR, FileEntry
from dmu_ray.storage import Location, StorageError, read_bytes

__all__ = ["PARTS_DIR", "record_name", "read_record", "sha256_of", "verify_record", "entry_from_record"]

PARTS_DIR = "_parts"


def record_name(rel: str) -> str:
    return f"{PARTS_DIR}/{rel}.json"


def read_record(out: Location, rel: str) -> dict[str, Any] | None:
    """The commit record of input file ``rel``, or None if there is none (or it is unreadable)."""
    loc = out.join(record_name(rel))
    if not loc.is_file():
        return None
    try:
        rec = json.loads(read_bytes(loc))
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def sha256_of(loc: Location, chunk: int = 8 << 20) -> str:
    """The sha256 hex digest of a file, streamed."""
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_entry(out: Location, d: Any, want_path: str) -> str | None:
    if not isinstance(d, dict) or d.get("path") != want_path:
        return f"names {d.get('path') if isinstance(d, dict) else d!r}, not {want_path!r}"
    try:
        loc = out.join(want_path)
    except StorageError as err:
        return str(err)
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.File:
        return f"{loc.uri} is missing"
    if info.size != d.get("bytes"):
        return f"{loc.uri} has {info.size} bytes, the record says {d.get('bytes')}"
    if sha256_of(loc) != d.get("sha256"):
        return f"{loc.uri}: sha256 differs from the record"
    return None


def verify_record(out: Location, rel: str, rec: dict[str, Any] | None, rows_in: int) -> str | None:
    """Why the commit record of ``rel`` does not count (None when it does): it must exist, name
    ``rel`` and its quarantine file, account for the source's ``rows_in`` rows, and every file it
    names must be there with the recorded size and sha256."""
    if rec is None:
        return "no commit record"
    try:
        if rec.get("source") != rel:
            return f"the record is for {rec.get('source')!r}"
        if rec.get("rows_in") != rows_in:
            return f"the record counts {rec.get('rows_in')} rows in, the source file has {rows_in}"
        q = rec.get("quarantine")
        rows_out = rec["file"]["rows"] + (q["rows"] if q else 0)
        if rows_out != rows_in:
            return f"the record's rows do not reconcile ({rows_in} in, {rows_out} out + quarantined)"
        why = _check_entry(out, rec["file"], rel)
        if why is None and q:
            why = _check_entry(out, q, f"{QUARANTINE_DIR}/{rel}")
        return why
    except (KeyError, TypeError, AttributeError) as err:
        return f"malformed record ({err})"


def entry_from_record(d: dict[str, Any] | None) -> FileEntry | None:
    return FileEntry(**d) if d else None


def _process_cpu(records: list[dict[str, Any]]) -> float:
    """CPU seconds an actor's process used while any of its files was in progress: the union of
    the files' spans on the process's CPU clock (``cpu_clock``, one clock per ``pid``), so files
    in progress together count once; a record without a span adds its ``cpu_s``."""
    spans: dict[Any, list[tuple[float, float]]] = {}
    total = 0.0
    for r in records:
        c = r.get("cpu_clock")
        if isinstance(c, list) and len(c) == 2:
            spans.setdefault(r.get("pid"), []).append((float(c[0]), float(c[1])))
        else:
            total += r.get("cpu_s") or 0.0
    for intervals in spans.values():
        end = float("-inf")
        for lo, hi in sorted(intervals):
            if hi > end:
                total += hi - max(lo, end)
                end = hi
    return total


def attribution(records: list[dict[str, Any]], t0_wall: float, seconds: float) -> dict[str, Any]:
    """Where a run's wall time went, from its commit records (``started_at``, ``seconds``,
    ``phases``, ``phases_cpu``, ``cpu_s``): the pool's start (job start to first file), per actor
    its files' busy seconds, the CPU seconds its process used in them, the gaps between them and
    its idle tail, and the phases summed over every file (busy seconds, and CPU seconds of each
    phase's thread). ``seconds`` is the run's wall time from ``t0_wall`` (epoch seconds)."""
    timed = [r for r in records if isinstance(r.get("started_at"), (int, float))]
    if not timed:
        return {}
    actors: dict[str, list[dict[str, Any]]] = {}
    for r in timed:
        actors.setdefault(str(r.get("actor") or r.get("worker") or "?"), []).append(r)
    per_actor = {}
    for name, rs in sorted(actors.items()):
        rs.sort(key=lambda r: r["started_at"])
        first, busy = rs[0]["started_at"] - t0_wall, sum(r["seconds"] for r in rs)
        end = max(r["started_at"] + r["seconds"] for r in rs) - t0_wall
        per_actor[name[:12]] = {
            "files": len(rs),
            "rows": sum(r["rows_in"] for r in rs),
            "start_s": round(first, 3),  # from the job's start to its first file
            "busy_s": round(busy, 3),
            "cpu_s": round(_process_cpu(rs), 3),  # its process's, while any of its files ran
            "gaps_s": round(end - first - busy, 3),  # between its files (negative: files overlapped)
            "tail_s": round(seconds - end, 3),  # from its last file's end to the job's
        }
    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for r in timed:
        for k, v in (r.get("phases") or {}).items():
            phases[k] = round(phases.get(k, 0.0) + v, 4)
        for k, v in (r.get("phases_cpu") or {}).items():
            cpu[k] = round(cpu.get(k, 0.0) + v, 4)
    busy = sum(a["busy_s"] for a in per_actor.values())
    return {
        "wall_s": round(seconds, 3),
        "pool_start_s": round(min(r["started_at"] for r in timed) - t0_wall, 3),
        "actors": per_actor,
        "busy_share": round(busy / (len(per_actor) * seconds), 4) if seconds > 0 else None,
        "phases_s": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
        "phases_cpu_s": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
    }
