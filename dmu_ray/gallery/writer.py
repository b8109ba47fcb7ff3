"""Writing galleries: Parquet files published atomically, the chunked writer of the refresh,
and :class:`GalleryWriter` (validate, quarantine, shard, commit with a manifest)."""

from __future__ import annotations

import dataclasses
import posixpath
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmu_ray.gallery.contract import (
    EMB,
    ID,
    MANIFEST_NAME,
    QUARANTINE_DIR,
    GalleryError,
    IdSet,
    ModelInfo,
    _single_array,
    check_columns,
    conform_batch,
    conform_ids,
    embedding_matrix,
    first_occurrences,
    quarantine_table,
    row_problems,
    unstorable_rows,
)
from dmu_ray.gallery.manifest import FileEntry, Manifest, describe_columns, write_manifest
from dmu_ray.storage import Location, write_bytes_atomic

# ------------------------------------------------------------------------------------------ files


def parquet_write_options(schema: pa.Schema, compression: str = "zstd") -> dict[str, Any]:
    """``pyarrow.parquet.write_table`` options for gallery files.

    The embedding column gets no dictionary and no statistics (both cost more than the data is
    worth for dense floats: measured ~3x slower writes and ~3x slower reads), and byte-stream-split
    before compression (about 10% smaller files). Other columns keep pyarrow's defaults.
    """
    others = [f.name for f in schema if f.name != EMB]
    opts: dict[str, Any] = {"compression": compression, "use_dictionary": others, "write_statistics": others}
    if EMB in schema.names and compression != "none":
        opts["use_byte_stream_split"] = [f"{EMB}.list.element"]
    return opts


def write_parquet_atomic(
    loc: Location,
    table: pa.Table,
    *,
    row_group_rows: int = 65536,
    source: str | None = None,
    compression: str = "zstd",
) -> FileEntry:
    """Write ``table`` as one Parquet file at ``loc`` atomically; return its manifest entry.

    The file is encoded in memory (bounded by the file size), hashed, and published with
    :func:`~dmu_ray.storage.write_bytes_atomic`, so a crash never leaves a half-file under its name.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, row_group_size=row_group_rows, **parquet_write_options(table.schema, compression)
    )
    return _publish_parquet(loc, sink.getvalue(), table.num_rows, source)


def _publish_parquet(loc: Location, buf: pa.Buffer, rows: int, source: str | None) -> FileEntry:
    """Publish an encoded Parquet file at ``loc`` atomically; its manifest entry."""
    digest = write_bytes_atomic(loc, buf)
    return FileEntry(
        path=posixpath.basename(loc.path), rows=rows, bytes=buf.size, sha256=digest, source=source
    )


class ChunkedParquetWriter:
    """One Parquet file written chunk by chunk, published atomically on :meth:`commit`, like
    :func:`write_parquet_atomic` (same options, in memory, one PUT or rename).

    Each chunk is encoded on a background thread (pyarrow releases the GIL), so the caller can
    compute the next chunk meanwhile; at most one chunk waits to be encoded. ``metadata`` goes into
    the file's schema. Use as a context manager: leaving it without :meth:`commit` publishes nothing.
    """

    def __init__(
        self,
        loc: Location,
        *,
        row_group_rows: int = 65536,
        source: str | None = None,
        compression: str = "zstd",
        metadata: dict[bytes, bytes] | None = None,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.loc, self.source, self.compression = loc, source, compression
        self.row_group_rows, self.metadata = row_group_rows, metadata or {}
        self.rows = 0
        self._sink = pa.BufferOutputStream()
        self._writer: pq.ParquetWriter | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="parquet-encode")
        self._pending = None
        #: seconds spent encoding (on the encoder thread), waiting for it (the caller), publishing
        self.seconds = {"encode": 0.0, "encode_wait": 0.0, "publish": 0.0}
        #: CPU seconds of the encoder thread while encoding, of the caller's while publishing
        self.cpu_seconds = {"encode": 0.0, "publish": 0.0}

    def __enter__(self) -> ChunkedParquetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def write(self, table: pa.Table) -> None:
        """Queue ``table`` (all chunks share one schema) for encoding; returns once the chunk
        before it is encoded (an encoding error surfaces here or at commit)."""
        self._wait()
        self._pending = self._pool.submit(self._encode, table)

    def _wait(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()
            self.seconds["encode_wait"] += time.perf_counter() - t0

    def _encode(self, table: pa.Table) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
        if self._writer is None:
            opts = parquet_write_options(table.schema, self.compression)
            self._writer = pq.ParquetWriter(self._sink, table.schema, **opts)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += table.num_rows
        self.seconds["encode"] += time.perf_counter() - t0
        self.cpu_seconds["encode"] += time.thread_time() - c0

    def commit(self, empty_schema: pa.Schema) -> FileEntry:
        """Finish the file (``empty_schema`` when no chunk came) and publish it; its entry."""
        self._wait()
        if self._writer is None:
            self._encode(empty_schema.empty_table())
        t0, c0 = time.perf_counter(), time.thread_time()
        self._writer.close()
        entry = _publish_parquet(self.loc, self._sink.getvalue(), self.rows, self.source)
        self.seconds["publish"] += time.perf_counter() - t0
        self.cpu_seconds["publish"] += time.thread_time() - c0
        return entry


def open_parquet(loc: Location, missing: str = "") -> pq.ParquetFile:
    """Open one Parquet file; any failure (missing, not Parquet, truncated) names the file
    (``missing`` words the case of an absent file; default "no such file")."""
    try:
        return pq.ParquetFile(loc.fs.open_input_file(loc.path))
    except FileNotFoundError:
        raise GalleryError(f"{loc.uri}: {missing or 'no such file'}") from None
    except (pa.ArrowException, OSError) as err:
        raise GalleryError(f"{loc.uri}: not a readable Parquet file ({err})") from None


def refuse_overlap(dest: Location, inputs: Iterable[Location]) -> None:
    """Raise :class:`GalleryError` when ``dest`` holds one of ``inputs`` or lies inside one: a
    gallery is never written (or ``--overwrite``-deleted) where its own input lives."""
    for src in inputs:
        if dest.overlaps(src):
            raise GalleryError(
                f"input {src.uri} and destination {dest.uri} overlap: a gallery is never written where its "
                "own input lives (nothing was deleted); choose another destination"
            )


class GalleryWriter:
    """Write a new gallery prefix: validate, quarantine, shard into files, commit with a manifest.

    Use as a context manager: the manifest is written only when the block exits without error, so
    an interrupted import leaves an uncommitted prefix that readers refuse. ``inputs`` are the
    locations the rows are read from: a destination that holds one of them, or lies inside one,
    is refused before anything is deleted or written.
    Duplicate ids within one writer are quarantined (the writer keeps the ids it has seen: 8 bytes a
    row for int64 ids).
    """

    def __init__(
        self,
        loc: Location,
        model: ModelInfo,
        *,
        rows_per_file: int = 1_000_000,
        row_group_rows: int = 65536,
        normalize: bool = False,
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
        inputs: Iterable[Location] = (),
    ) -> None:
        if rows_per_file < 1:
            raise GalleryError(f"rows_per_file must be >= 1, got {rows_per_file}")
        if normalize and not model.normalized:
            model = dataclasses.replace(model, normalized=True)
        self.loc, self.model = loc, model
        self.rows_per_file, self.row_group_rows = rows_per_file, row_group_rows
        self.normalize = normalize
        self.extra = dict(extra or {})
        self._prepare_prefix(overwrite, list(inputs))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._bad: list[pa.Table] = []
        self._files: list[FileEntry] = []
        self._quarantine: list[FileEntry] = []
        self._reasons: Counter[str] = Counter()
        self._seen = IdSet()
        self._id_type: pa.DataType | None = None
        self._rows_in = 0
        self._schema: pa.Schema | None = None
        self._closed = False

    def _prepare_prefix(self, overwrite: bool, inputs: list[Location]) -> None:
        refuse_overlap(self.loc, inputs)
        if self.loc.missing_bucket():
            raise GalleryError(self.loc.describe_missing())
        existing = self.loc.list_files(recursive=True)
        if not existing:
            return
        if not overwrite:
            what = "a committed gallery" if MANIFEST_NAME in existing else f"{len(existing)} file(s)"
            raise GalleryError(
                f"{self.loc.uri} already holds {what}; choose a new prefix or pass overwrite "
                "(--overwrite) to replace it"
            )
        self.loc.fs.delete_dir_contents(self.loc.path)

    def write(self, table: pa.Table | pa.RecordBatch, source: str = "<input>") -> None:
        """Validate and buffer rows; full files are written as they fill up.

        A row is quarantined (with its reason) when it breaks the contract, when its stored form
        would (a value that overflows the gallery's dtype, a vector that cannot be unit-normalised
        in a normalised gallery), or when its id was already written: whatever this writer
        commits passes :func:`~dmu_ray.gallery_ops.validate_gallery`."""
        if self._closed:
            raise GalleryError("writer is closed")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        check_columns(table.schema, source)
        table = conform_ids(table, source)
        id_type = table.schema.field(ID).type
        if self._id_type is None:
            self._id_type = id_type
        elif id_type != self._id_type:
            raise GalleryError(
                f"{source}: ids are {id_type} here but {self._id_type} in earlier input; "
                "a gallery holds one id type (int64 or string)"
            )
        n = table.num_rows
        bad, reasons = row_problems(table, self.model.dim, where=source)
        reason = np.full(n, None, dtype=object)
        reason[bad] = reasons
        ok = np.flatnonzero(~bad)
        good = None
        if len(ok):
            good = conform_batch(
                table if len(ok) == n else table.take(pa.array(ok)), self.model, normalize=self.normalize
            )
            lost, words = unstorable_rows(embedding_matrix(good.column(EMB)), self.model)
            if lost.any():
                bad[ok[lost]] = True
                reason[ok[lost]] = words
                ok, good = ok[~lost], good.filter(pa.array(~lost))
            ids = _single_array(good.column(ID)).to_numpy(zero_copy_only=False)
            first = first_occurrences(ids, self._seen)
            self._seen.add(ids[first])
            if not first.all():
                bad[ok[~first]] = True
                reason[ok[~first]] = "duplicate id"
                good = good.filter(pa.array(first))
        if bad.any():
            bad_idx = np.flatnonzero(bad)
            words = reason[bad_idx].tolist()
            self._bad.append(quarantine_table(table.take(pa.array(bad_idx)), words, bad_idx + self._rows_in))
            self._reasons.update(words)
        self._rows_in += n
        if good is not None and good.num_rows:
            if self._schema is None:
                self._schema = good.schema
            elif good.schema.remove_metadata() != self._schema.remove_metadata():
                raise GalleryError(
                    f"{source}: schema differs from earlier input:\n{good.schema}\nvs\n{self._schema}"
                )
            self._pending.append(good)
            self._pending_rows += good.num_rows
            while self._pending_rows >= self.rows_per_file:
                self._flush(self.rows_per_file)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending)
        head, rest = table.slice(0, n), table.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        name = f"part-{len(self._files):05d}.parquet"
        self._files.append(
            write_parquet_atomic(
                self.loc.join(name), head.combine_chunks(), row_group_rows=self.row_group_rows
            )
        )

    def close(self) -> Manifest:
        """Flush, write the quarantine, and commit the manifest (last). Returns the manifest."""
        if self._closed:
            raise GalleryError("writer is already closed")
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._bad:
            bad = pa.concat_tables(self._bad, promote_options="permissive")
            entry = write_parquet_atomic(self.loc.join(QUARANTINE_DIR, "quarantine-00000.parquet"), bad)
            entry.path = f"{QUARANTINE_DIR}/{entry.path}"
            self._quarantine.append(entry)
        manifest = Manifest(
            model=self.model,
            files=self._files,
            quarantine=self._quarantine,
            quarantine_reasons=dict(self._reasons),
            id_type=str(self._schema.field(ID).type) if self._schema else "int64",
            columns=describe_columns(self._schema) if self._schema else [],
            rows_in=self._rows_in,
            extra=self.extra,
        )
        if manifest.rows + manifest.quarantined_rows != manifest.rows_in:  # pragma: no cover - invariant
            raise GalleryError(
                f"row count mismatch: in={manifest.rows_in} out={manifest.rows} quarantined={manifest.quarantined_rows}"
            )
        write_manifest(self.loc, manifest)
        self._closed = True
        return manifest

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()
