"""Upgrade one gallery file: read it, run the upgrade module, write its output and commit record.

This is the unit of exactly-once work in a refresh. For an input file ``rel`` under the source
prefix, it publishes (each atomically, in this order):

1. ``_quarantine/<rel>`` when some rows break the contract (with reasons);
2. ``<rel>`` under the output prefix: the upgraded rows, same ids and passthrough columns;
3. ``_parts/<rel>.json``: the commit record (rows in/out/quarantined, sizes, sha256s).

In a partial backfill (:mod:`dmu_ray.refresh.backfill`) the rows whose ids are in the
:class:`Overrides` take the new model's vector instead of psi's, and a ``provenance`` column says
which model produced each row (``new`` or ``transformed``).

A file counts as done once its commit record exists *and* the files it names are there with the
recorded size and sha256 (:func:`verify_record`); a crash anywhere before that, or a committed
output deleted or changed since, makes a re-run redo the file and overwrite whatever it left, so
no row is lost or duplicated.

The source file is checked against its gallery's manifest (bytes, sha256, row count) before its
output is committed: a file that changed after its gallery was committed fails the job, naming
the file, and nothing is written for it.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dmu_ray.gallery import (
    EMB,
    MODEL_META_KEY,
    QUARANTINE_DIR,
    REASON_COLUMN,
    SOURCE_ROW_COLUMN,
    ChunkedParquetWriter,
    FileEntry,
    GalleryError,
    ModelInfo,
    embedding_array,
    embedding_matrix,
    embedding_type,
    quarantine_table,
    split_valid,
    unstorable_rows,
    write_parquet_atomic,
)
from dmu_ray.lineage import LINEAGE_COLUMN
from dmu_ray.models.upgrade import UpgradeModule, compute_rows_for, in_row_slices, through_chain
from dmu_ray.refresh.file_threads import Phases, in_line, mark, prefetched, sha256_of_buffer
from dmu_ray.refresh.records import read_record, record_name, verify_record
from dmu_ray.storage import Location, read_bytes, write_bytes_atomic

PROVENANCE = "provenance"


class Overrides:
    """New-model vectors for some ids (a partial backfill's re-embedded rows), looked up by id."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids, self.vectors = np.asarray(ids)[order], np.asarray(vectors)[order]
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("override ids must be unique")

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(hit mask, row of each hit in vectors)`` for ``ids``."""
        if not len(self.ids):
            return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(max=len(self.ids) - 1)
        return self.ids[pos] == ids, pos


class SourceIntegrityError(GalleryError):
    """A source file differs from what its gallery's manifest committed (bytes, sha256 or rows)."""


@dataclass
class Routing:
    """Which upgrade modules each lineage chain of the source goes through (indices into the
    upgrader's modules, in order; empty: already in the target space) and its key afterwards.
    ``default`` is the chain of every row of a source without a per-row lineage column;
    ``column_out`` says whether the output records a chain per row; ``override_key`` is the chain
    of a backfill's re-embedded rows."""

    routes: dict[str, tuple[list[int], str]]
    default: str | None = None
    column_out: bool = False
    override_key: str | None = None


class FileUpgrader:
    """Holds the modules on their device and upgrades whole files (see the module docstring)."""

    def __init__(
        self,
        module: UpgradeModule | list[UpgradeModule],
        src: Location,
        out: Location,
        model: ModelInfo,
        *,
        normalize: bool = True,
        batch_size: int = 65536,
        device: str = "cpu",
        fail_after_files: int | None = None,
        worker: str | None = None,
        actor: str | None = None,
        overrides: Overrides | None = None,
        expected: dict[str, FileEntry] | None = None,
        routing: Routing | None = None,
        compute_rows: int | None = None,
        finish_aside: bool | None = None,
        compute_slots: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        modules = module if isinstance(module, list) else [module]
        # BatchNorm folded into the Linear before it: one matmul per block (the same function)
        self.modules = [m.fused_for_inference().to(self.device).eval() for m in modules]
        self.src, self.out, self.model = src, out, model
        self.normalize, self.batch_size = normalize, batch_size
        # rows per call of psi (models.upgrade.CPU_COMPUTE_ROWS on a CPU; a GPU takes the batch)
        self.compute_rows = compute_rows or compute_rows_for(self.device)
        # each batch's output checked and assembled on its own thread while psi runs the next:
        # on an accelerator (default), whose thread would otherwise leave it idle meanwhile; not
        # on a CPU, whose cores the module already uses (another thread only adds hand-offs)
        self.finish_aside = self.device.type != "cpu" if finish_aside is None else finish_aside
        self.in_dim = modules[0].in_dim
        self.routing = routing or Routing({"": ([0], "")}, default="")  # one module, no lineage
        self.out_type = embedding_type(model.dim, model.dtype)
        self.np_dtype = np.dtype(model.dtype)
        self.meta = {MODEL_META_KEY: model.to_json().encode()}
        # test hook: raise after this many files in this process (simulates a crash mid-job)
        self._fail_after = fail_after_files
        self._done = 0
        self._done_lock = threading.Lock()  # an actor may upgrade several files at once (threads)
        self.worker = worker  # provenance in the commit record (the Ray node id in a refresh job)
        self.actor = actor  # and the pool actor that did it (how far the pool grew)
        self.overrides = overrides
        self.expected = expected  # the source manifest's entries: each file is verified before use
        # files whose module loop may run at once (None: every file in flight). With 1, a second
        # file in flight reads, hashes and decodes its first batch while the first runs psi, and
        # runs psi while the first encodes and publishes its tail: the cores stay on psi, with
        # no second psi thread competing for them (a CPU actor's staggered files)
        self._compute = threading.Semaphore(compute_slots) if compute_slots else None

    def committed_record(self, rel: str) -> dict[str, Any] | None:
        """The commit record of ``rel`` when the output already holds one that counts, else None.
        The driver plans only files without one, so a record here was written by this run: Ray
        ran the same call again (a retried task, or a task re-executed to rebuild outputs lost
        with a node's object store). The committed file stands; it is not redone."""
        want = self.expected.get(rel) if self.expected is not None else None
        if want is None:
            return None
        rec = read_record(self.out, rel)
        if rec is None or verify_record(self.out, rel, rec, want.rows) is not None:
            return None
        return rec

    def open_source(
        self, rel: str, pool: ThreadPoolExecutor | None = None, phases: Phases | None = None
    ) -> tuple[pq.ParquetFile, Callable[[], None]]:
        """The source file ``rel`` and a check that raises :class:`SourceIntegrityError` unless it
        is what its manifest entry says (bytes, sha256, rows; when one was given). The whole file is
        read into memory once; size and rows are checked here, the sha256 is computed on ``pool``
        (beside the decoding) when one is given. Call the check before publishing anything."""
        loc = self.src.join(rel)
        want = self.expected.get(rel) if self.expected is not None else None
        if self.expected is not None and want is None:
            raise SourceIntegrityError(f"{loc.uri}: not listed in the source gallery's manifest")
        try:
            if want is None:
                return pq.ParquetFile(loc.fs.open_input_file(loc.path)), lambda: None
            t0 = mark()
            data = read_bytes(loc)
            if phases is not None:
                phases.add("read", t0)
        except FileNotFoundError:
            raise SourceIntegrityError(f"{loc.uri}: listed in the source manifest but missing") from None
        changed = f"{loc.uri} changed after its gallery was committed"
        if len(data) != want.bytes:
            raise SourceIntegrityError(f"{changed}: {len(data)} bytes, the manifest says {want.bytes}")
        digest = pool.submit(sha256_of_buffer, data, phases) if pool is not None else None

        def check() -> None:
            got = digest.result() if digest is not None else sha256_of_buffer(data)
            if got != want.sha256:
                raise SourceIntegrityError(f"{changed}: its sha256 differs from the manifest's")

        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as err:
            check()  # a file that changed says so rather than "not Parquet"
            raise SourceIntegrityError(f"{loc.uri}: not a readable Parquet file ({err})") from None
        if pf.metadata.num_rows != want.rows:
            raise SourceIntegrityError(
                f"{changed}: {pf.metadata.num_rows} rows, the manifest says {want.rows}"
            )
        return pf, check

    @torch.inference_mode()
    def upgrade_matrix(self, mat: np.ndarray, route: list[int] | None = None) -> np.ndarray:
        """The route's modules (default: the first module) over an (n, in_dim) matrix, each
        output re-normalised if asked, cast to the output dtype. An empty route only normalises
        and casts (rows already in the target space)."""
        with warnings.catch_warnings():  # a read-only Arrow buffer; psi never writes into its input
            warnings.simplefilter("ignore", UserWarning)
            y = torch.from_numpy(mat)
        steps = [0] if route is None else route
        out_dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        return in_row_slices(lambda x: self._run_route(x, steps).to(out_dtype), y, self.compute_rows).numpy()

    def _run_route(self, x: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """The modules ``steps`` over rows ``x`` on the upgrader's device (float32)."""
        y = x.to(self.device, dtype=torch.float32, non_blocking=True)
        return through_chain([self.modules[i] for i in steps], y, self.normalize)

    def _route_batch(self, t: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Each row of ``t`` through its chain's route: the output matrix and each row's chain key
        afterwards. A row whose chain the refresh did not plan for fails the file, naming it."""
        mat = embedding_matrix(t.column(EMB))
        r = self.routing
        if LINEAGE_COLUMN not in t.column_names:
            if r.default is None:
                raise SourceIntegrityError(
                    f"{where}: no {LINEAGE_COLUMN!r} column, but the gallery has several chains"
                )
            route, key = r.routes[r.default]
            return self.upgrade_matrix(mat, route), np.full(t.num_rows, key, dtype=object)
        keys = pc.cast(t.column(LINEAGE_COLUMN), pa.string()).to_numpy(zero_copy_only=False)
        y = np.empty((t.num_rows, self.model.dim), dtype=self.np_dtype)
        out_keys = np.empty(t.num_rows, dtype=object)
        for k in np.unique(keys.astype(str)):  # a null key reads "None": undeclared
            if k not in r.routes:
                raise SourceIntegrityError(
                    f"{where}: rows of lineage chain {k!r}, which the gallery's dmu.model does not declare"
                )
            rows = np.flatnonzero(keys == k)
            route, out_key = r.routes[k]
            y[rows] = self.upgrade_matrix(np.ascontiguousarray(mat[rows]), route)
            out_keys[rows] = out_key
        return y, out_keys

    def upgrade_file(self, rel: str) -> dict[str, Any]:
        """Upgrade input file ``rel`` and commit it; returns its commit record. Safe to call from
        several threads at once on different files (the modules are only read).

        Four stages overlap: a reader thread hashes the source, decodes its next batch and checks
        its rows; the module runs on this thread (on the actor's device); a finisher thread checks
        the previous batch's output and assembles its table (``finish_aside``, the default on an
        accelerator; in line on a CPU); a writer thread encodes the one before. So a GPU waits
        neither on Parquet nor on the contract's row checks."""
        if self._fail_after is not None and self._done >= self._fail_after:
            raise RuntimeError(f"injected failure before {rel} (fail_after_files={self._fail_after})")
        committed = self.committed_record(rel)
        if committed is not None:
            return committed
        t0, started_at, cpu0 = time.perf_counter(), time.time(), time.process_time()
        src_loc = self.src.join(rel)
        phases = Phases()
        # two threads: the source's sha256 beside the decoding of its first batches
        with ThreadPoolExecutor(2, thread_name_prefix="parquet-read") as reader:
            pf, check_source = self.open_source(rel, reader, phases)
            with ChunkedParquetWriter(self.out.join(rel), source=rel, metadata=self.meta) as writer:
                try:
                    batches = self._checked(pf.iter_batches(batch_size=self.batch_size), src_loc.uri, phases)
                    rows_in, rows_new, bad_parts, reasons = self._upgrade_batches(
                        prefetched(batches, reader, phases), src_loc.uri, writer, phases
                    )
                except (SourceIntegrityError, RuntimeError, ValueError, pa.ArrowException, OSError):
                    check_source()  # a source that changed is named as such
                    raise
                t_wait = mark()
                check_source()  # nothing is published for a source that changed
                phases.add("sha256_wait", t_wait)
                q_entry = None
                if bad_parts:
                    q = pa.concat_tables(bad_parts, promote_options="permissive")
                    q_entry = write_parquet_atomic(self.out.join(QUARANTINE_DIR, rel), q, source=rel)
                    q_entry.path = f"{QUARANTINE_DIR}/{rel}"
                entry = writer.commit(self._empty_output(pf.schema_arrow).schema)
        for k, v in writer.seconds.items():
            phases.seconds[k] += v
        for k, v in writer.cpu_seconds.items():
            phases.cpu[k] += v
        entry.path = rel
        cpu1 = time.process_time()
        record = {
            "source": rel,
            "rows_in": rows_in,
            "file": asdict(entry),
            "quarantine": asdict(q_entry) if q_entry else None,
            "reasons": dict(reasons),
            "rows_new": rows_new,
            "seconds": round(time.perf_counter() - t0, 4),
            # the actor process's CPU seconds meanwhile, every thread (Arrow's and Ray's included);
            # files in progress together in one actor each count all of it: the attribution
            # merges their spans on the process's CPU clock (``cpu_clock``, per ``pid``)
            "cpu_s": round(cpu1 - cpu0, 4),
            "cpu_clock": [round(cpu0, 4), round(cpu1, 4)],
            "pid": os.getpid(),
            "started_at": round(started_at, 3),  # wall clock (epoch s): the job times its pool's start by it
            # busy seconds per phase, each on its thread (read, sha256, decode, checks on the reader;
            # psi, finish on the module's; encode on the encoder; the *_wait are hand-offs)
            "phases": phases.rounded(),
            "phases_cpu": phases.rounded_cpu(),  # CPU seconds of each phase's own thread
            "worker": self.worker,
            "actor": self.actor,
        }
        if entry.rows + (q_entry.rows if q_entry else 0) != rows_in:  # pragma: no cover - invariant
            raise RuntimeError(f"{rel}: rows do not reconcile: {rows_in} in, {entry.rows} out, {q_entry}")
        t_rec = time.perf_counter()
        write_bytes_atomic(self.out.join(record_name(rel)), json.dumps(record).encode())
        # the record's own write (returned to the caller; a record cannot hold its own write time)
        record["seconds_record_write"] = round(time.perf_counter() - t_rec, 4)
        with self._done_lock:
            self._done += 1
        return record

    def _upgrade_batches(
        self,
        batches: Iterator[pa.RecordBatch],
        where: str,
        writer: ChunkedParquetWriter,
        phases: Phases | None = None,
    ) -> tuple[int, int, list[pa.Table], Counter[str]]:
        """Check, route and upgrade each batch, handing good rows to ``writer``; returns rows in,
        rows taken from the overrides, the quarantined rows and their reasons.

        ``batches`` come already checked (:meth:`_checked`, run where they are decoded); with
        ``finish_aside`` each batch's output is checked, assembled and queued for encoding on a
        finisher thread while psi works on the next, so only psi runs on this thread and a device
        waits on neither check. The quarantined rows keep the source's batch order (input rows,
        then output rows) either way."""
        bad_parts: list[pa.Table] = []
        reasons: Counter[str] = Counter()
        rows_in = rows_new = 0
        pending: Future[tuple[pa.Table | None, int]] | None = None

        def quarantine(part: pa.Table | None) -> None:
            if part is not None:
                bad_parts.append(part)
                reasons.update(part.column(REASON_COLUMN).to_pylist())

        def collect() -> None:  # the finisher's verdict on the batch before
            nonlocal pending, rows_new
            if pending is not None:
                part, hits = pending.result()
                pending = None
                quarantine(part)
                rows_new += hits

        clock = phases or Phases()

        def finish(b: _Checked, y: np.ndarray, keys: np.ndarray) -> tuple[pa.Table | None, int]:
            t0, waited = mark(), writer.seconds["encode_wait"]
            out = self._finish(b, y, keys, writer)
            # less the wait for the encoder (a wait, not CPU)
            clock.add("finish", t0._replace(wall=t0.wall + writer.seconds["encode_wait"] - waited))
            return out

        slot = self._compute
        held = False
        with ThreadPoolExecutor(1, thread_name_prefix="output-check") as finisher:
            submit = finisher.submit if self.finish_aside else in_line  # the thread starts on first use
            try:
                for b in batches:
                    if slot is not None and not held:  # the first batch is here: wait for the module
                        t0 = mark()
                        held = slot.acquire()
                        clock.add("slot_wait", t0)
                    rows_in += b.rows_in
                    t0 = mark()
                    y, keys = self._route_batch(b.table, where) if b.table.num_rows else (None, None)
                    t0 = clock.add("psi", t0)
                    collect()
                    clock.add("finish_wait" if self.finish_aside else "finish", t0)
                    quarantine(b.bad)
                    if y is not None:
                        pending = submit(finish, b, y, keys)
            finally:
                if held:
                    slot.release()  # the file's tail (last batch's finish, encode, publish) runs beside the next's psi
            t0 = mark()
            collect()
            clock.add("finish_wait" if self.finish_aside else "finish", t0)
        return rows_in, rows_new, bad_parts, reasons

    def _checked(
        self, batches: Iterator[pa.RecordBatch], where: str, phases: Phases | None = None
    ) -> Iterator[_Checked]:
        """Each source batch split by the contract's row checks into good rows and quarantined
        ones (rows numbered from the file's first row); decode and check seconds into ``phases``."""
        offset, clock = 0, phases or Phases()
        t0 = mark()
        for rb in batches:
            t0 = clock.add("decode", t0)
            good, bad = split_valid(pa.Table.from_batches([rb]), self.in_dim, row_offset=offset, where=where)
            clock.add("checks", t0)
            yield _Checked(good, bad, offset, rb.num_rows)
            offset += rb.num_rows
            t0 = mark()

    def _finish(
        self, b: _Checked, y: np.ndarray, keys: np.ndarray, writer: ChunkedParquetWriter
    ) -> tuple[pa.Table | None, int]:
        """Check psi's output ``y`` for batch ``b``, put the storable rows into the output table
        and queue it for encoding; returns the rows quarantined here and the rows taken from the
        overrides."""
        t, part = b.table, None
        lost, words = unstorable_rows(y, self.model)
        if lost.any():
            why = [f"upgrade output: {w}" for w in words]
            part = quarantine_table(t.filter(pa.array(lost)), why, b.good_rows()[lost])
            t, y, keys = t.filter(pa.array(~lost)), y[~lost], keys[~lost]
        col = t.schema.get_field_index(EMB)
        t = t.set_column(col, pa.field(EMB, self.out_type, nullable=False), embedding_array(y))
        hits = 0
        if self.overrides is not None:
            t, hits, keys = self._override(t, y, keys)
        if t.num_rows:
            writer.write(self._with_lineage(t, keys))
        return part, hits

    def _empty_output(self, schema: pa.Schema) -> pa.Table:
        """An output table with no rows: the schema of a file whose every row was quarantined."""
        i = schema.get_field_index(EMB)
        table = schema.set(i, pa.field(EMB, self.out_type, nullable=False)).empty_table()
        if self.overrides is not None:
            table = table.append_column(
                pa.field(PROVENANCE, pa.string(), nullable=False), pa.array([], pa.string())
            )
        return self._with_lineage(table, np.empty(0, dtype=object))

    def _override(self, t: pa.Table, y: np.ndarray, keys: np.ndarray) -> tuple[pa.Table, int, np.ndarray]:
        """Put the new model's vector into the rows the backfill re-embedded; add provenance and
        give those rows the re-embedding's lineage chain."""
        hit, pos = self.overrides.lookup(t.column("id").to_numpy())
        n = int(hit.sum())
        if n:
            y = y.copy()
            y[hit] = self.overrides.vectors[pos[hit]].astype(y.dtype, copy=False)
            col = t.schema.get_field_index(EMB)
            t = t.set_column(col, pa.field(EMB, self.out_type, nullable=False), embedding_array(y))
            if self.routing.override_key is not None:
                keys = keys.copy()
                keys[hit] = self.routing.override_key
        prov = pa.array(np.where(hit, "new", "transformed"), pa.string())
        return t.append_column(pa.field(PROVENANCE, pa.string(), nullable=False), prov), n, keys

    def _with_lineage(self, t: pa.Table, keys: np.ndarray) -> pa.Table:
        """``t`` with its per-row chain column (dictionary-encoded) when the output records one,
        else without any (the file's ``dmu.model`` then names the one chain of every row)."""
        i = t.schema.get_field_index(LINEAGE_COLUMN)
        if i >= 0:
            t = t.remove_column(i)
        if not self.routing.column_out:
            return t
        col = pa.array(keys.tolist(), pa.string()).dictionary_encode()
        return t.append_column(pa.field(LINEAGE_COLUMN, col.type, nullable=False), col)


@dataclass
class _Checked:
    """A source batch after the row checks (:func:`~dmu_ray.gallery.split_valid`): its good rows,
    the quarantined ones (None when none), the file's row number of its first row, its rows."""

    table: pa.Table
    bad: pa.Table | None
    first_row: int
    rows_in: int

    def good_rows(self) -> np.ndarray:
        """The file's row number of each good row."""
        rows = np.arange(self.first_row, self.first_row + self.rows_in)
        if self.bad is None:
            return rows
        return np.setdiff1d(rows, self.bad.column(SOURCE_ROW_COLUMN).to_numpy(), assume_unique=True)
