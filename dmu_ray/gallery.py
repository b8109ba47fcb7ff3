"""The gallery Parquet contract (DESIGN.md section 3).

A gallery is a folder (local or ``s3://``) of Parquet files plus ``_manifest.json``:

- columns ``id`` (int64 or string, unique), ``embedding`` (``fixed_size_list<float16|float32>[dim]``),
  optional ``label`` (int64); any other column passes through untouched;
- every file's schema metadata carries ``dmu.model`` (JSON of :class:`ModelInfo`);
- ``_manifest.json`` is written last and atomically: it lists every data file with its rows, bytes
  and sha256, the model, and the quarantine. It is the commit marker; readers refuse a prefix
  without it unless told otherwise;
- rows that break the contract (null id or embedding, wrong dimension, NaN/Inf, duplicate id) are
  never dropped: they go to ``_quarantine/*.parquet`` with a ``_dmu_reason`` column, and the manifest
  reconciles ``rows_in == rows + quarantined_rows``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dmu_ray import __version__
from dmu_ray.config import StorageConfig
from dmu_ray.lineage import LINEAGE_COLUMN, Chain, chain_key, embed_step, import_step, upgrade_step
from dmu_ray.storage import Location, StorageError, check_relative, read_bytes, resolve, write_bytes_atomic

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "MODEL_META_KEY",
    "QUARANTINE_DIR",
    "REASON_COLUMN",
    "SOURCE_ROW_COLUMN",
    "GalleryError",
    "UncommittedGalleryError",
    "ModelInfo",
    "FileEntry",
    "Manifest",
    "Gallery",
    "GalleryWriter",
    "embedding_type",
    "embedding_matrix",
    "embedding_array",
    "split_valid",
    "conform_batch",
    "write_parquet_atomic",
    "read_manifest",
    "write_manifest",
    "open_parquet",
    "conform_ids",
    "unstorable_rows",
    "refuse_overlap",
]

FORMAT = "dmu-ray.gallery/1"
MANIFEST_NAME = "_manifest.json"
MODEL_META_KEY = b"dmu.model"
QUARANTINE_DIR = "_quarantine"
REASON_COLUMN = "_dmu_reason"
SOURCE_ROW_COLUMN = "_dmu_source_row"
ID, EMB, LABEL = "id", "embedding", "label"
DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


class GalleryError(ValueError):
    """A gallery (or its input) breaks the contract; the message names the file and what is wrong."""


class UncommittedGalleryError(GalleryError):
    """The prefix has no ``_manifest.json``: it is not a committed gallery."""


@dataclass
class ModelInfo:
    """What produced the vectors; stored as ``dmu.model`` in every file and in the manifest."""

    model_id: str
    dim: int
    dtype: str = "float32"
    normalized: bool = False
    version: str = "1"
    upgrade_module: str | None = None
    source_gallery: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise GalleryError(f"model dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if int(self.dim) <= 0:
            raise GalleryError(f"model dim must be positive, got {self.dim}")
        self.dim = int(self.dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def with_chains(self, chains: Iterable[Chain]) -> ModelInfo:
        """This model info declaring ``chains`` (keyed by :func:`~dmu_ray.lineage.chain_key`)."""
        return dataclasses.replace(self, lineage={chain_key(c): list(c) for c in chains})

    def chains(self) -> dict[str, Chain]:
        """The chains of the gallery's vectors by key. A gallery written before lineage was recorded
        gets one chain from what it does record: the embedding artefact (or model id), then the
        upgrade module that produced it, if any."""
        if self.lineage:
            return self.lineage
        art = self.extra.get("artifact") if isinstance(self.extra, dict) else None
        if self.upgrade_module is None:
            first = embed_step(art, None) if art else import_step(self.model_id, self.version)
            return {chain_key([first]): [first]}
        chain = [upgrade_step(self.upgrade_module, None, None, self.model_id)]  # its input: unrecorded
        return {chain_key(chain): chain}


@dataclass
class FileEntry:
    """One committed file: path relative to the gallery prefix, rows, bytes, sha256."""

    path: str
    rows: int
    bytes: int
    sha256: str
    source: str | None = None
    quarantined: int = 0


@dataclass
class Manifest:
    """The commit marker of a gallery prefix (``_manifest.json``)."""

    model: ModelInfo
    files: list[FileEntry]
    quarantine: list[FileEntry] = field(default_factory=list)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    id_type: str = "int64"
    columns: list[dict[str, str]] = field(default_factory=list)
    rows_in: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    created_at: str = ""
    created_by: str = f"dmu-ray {__version__}"

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def quarantined_rows(self) -> int:
        return sum(f.rows for f in self.quarantine)

    def to_json(self) -> str:
        d = asdict(self)
        d["rows"] = self.rows
        d["quarantined_rows"] = self.quarantined_rows
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "_manifest.json") -> Manifest:
        """Parse and check a manifest: every path stays inside the prefix, no file is listed twice,
        and the totals add up (see :meth:`check`)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                fmt = d.get("format") if isinstance(d, dict) else None
                raise GalleryError(f"{where}: unknown manifest format {fmt!r} (expected {FORMAT})")
            m = cls(
                model=ModelInfo.from_dict(d["model"]),
                files=[FileEntry(**f) for f in d["files"]],
                quarantine=[FileEntry(**f) for f in d.get("quarantine", [])],
                quarantine_reasons=dict(d.get("quarantine_reasons", {})),
                id_type=d.get("id_type", "int64"),
                columns=list(d.get("columns", [])),
                rows_in=int(d.get("rows_in", 0)),
                extra=dict(d.get("extra", {})),
                format=d["format"],
                created_at=d.get("created_at", ""),
                created_by=d.get("created_by", ""),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
            raise GalleryError(f"{where}: malformed manifest ({err})") from None
        m.check(where, stated={k: d[k] for k in ("rows", "quarantined_rows") if k in d})
        return m

    def check(self, where: str = "_manifest.json", stated: dict[str, Any] | None = None) -> None:
        """Refuse a manifest that does not add up: a path outside the prefix, a file listed twice,
        negative counts, stated totals that differ from the file list, or
        ``rows + quarantined_rows != rows_in``."""
        seen: set[str] = set()
        for e in [*self.files, *self.quarantine]:
            try:
                check_relative(e.path)
            except StorageError as err:
                raise GalleryError(f"{where}: file entry {err}") from None
            norm = posixpath.normpath(e.path)
            if norm in seen:
                raise GalleryError(f"{where}: {e.path!r} is listed more than once")
            seen.add(norm)
            if not isinstance(e.rows, int) or not isinstance(e.bytes, int) or e.rows < 0 or e.bytes < 0:
                raise GalleryError(f"{where}: {e.path!r} has invalid rows/bytes ({e.rows!r}, {e.bytes!r})")
        for key, value in (stated or {}).items():
            if value != getattr(self, key):
                raise GalleryError(
                    f"{where}: states {key} = {value} but its file list adds up to {getattr(self, key)}"
                )
        if self.rows + self.quarantined_rows != self.rows_in:
            raise GalleryError(
                f"{where}: rows do not reconcile: rows_in {self.rows_in} != rows {self.rows} + "
                f"quarantined {self.quarantined_rows}"
            )


# ----------------------------------------------------------------------------------------- arrays


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """The Arrow type of the embedding column: ``fixed_size_list<dtype>[dim]``."""
    return pa.list_(DTYPES[dtype], dim)


def _single_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        # combine_chunks copies even a single chunk; a one-chunk column is the common case.
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def embedding_matrix(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An ``(n, d)`` numpy view of a null-free ``fixed_size_list`` column (zero-copy for one chunk)."""
    arr = _single_array(col)
    if not pa.types.is_fixed_size_list(arr.type):
        raise GalleryError(f"embedding column must be fixed_size_list, got {arr.type}")
    if arr.null_count:
        raise GalleryError("embedding column has null rows; validate (split_valid) before converting")
    d = arr.type.list_size
    flat = arr.flatten()  # honours slice offsets, zero-copy
    return flat.to_numpy(zero_copy_only=flat.null_count == 0).reshape(len(arr), d)


def embedding_array(mat: np.ndarray) -> pa.FixedSizeListArray:
    """The ``fixed_size_list`` array of an ``(n, d)`` float16/float32 matrix (zero-copy if contiguous)."""
    if mat.ndim != 2:
        raise GalleryError(f"expected an (n, d) matrix, got shape {mat.shape}")
    flat = np.ascontiguousarray(mat).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), mat.shape[1])


def l2_normalize(mat: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (computed in float32)."""
    m = mat.astype(np.float32, copy=False)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), eps)


# ------------------------------------------------------------------------------------- validation


def _is_float_list(t: pa.DataType) -> bool:
    return (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
    )


def check_columns(schema: pa.Schema, where: str, id_col: str = ID, emb_col: str = EMB) -> None:
    """File-level checks: the id and embedding columns exist and have usable types."""
    names = schema.names
    if emb_col not in names:
        raise GalleryError(f"{where}: missing column {emb_col!r} (columns: {names})")
    if id_col not in names:
        raise GalleryError(f"{where}: missing column {id_col!r} (columns: {names})")
    t = schema.field(emb_col).type
    if not _is_float_list(t):
        raise GalleryError(f"{where}: column {emb_col!r} must be a list of numbers, got {t}")
    it = schema.field(id_col).type
    if not (pa.types.is_integer(it) or pa.types.is_string(it) or pa.types.is_large_string(it)):
        raise GalleryError(f"{where}: column {id_col!r} must be an integer or string, got {it}")
    if LABEL in names and not pa.types.is_integer(schema.field(LABEL).type):
        raise GalleryError(f"{where}: column {LABEL!r} must be an integer, got {schema.field(LABEL).type}")


def row_problems(table: pa.Table, dim: int, *, where: str = "<input>") -> tuple[np.ndarray, list[str]]:
    """Rows of ``table`` that break the contract: a boolean mask and one reason per bad row.

    Bad rows: null id, null embedding, wrong dimension, null or non-finite values. Vectorised;
    Python loops only over the bad rows to word their reasons.
    """
    check_columns(table.schema, where)
    n = table.num_rows
    emb = _single_array(table.column(EMB))
    null_id = table.column(ID).is_null().to_numpy(zero_copy_only=False)
    null_emb = emb.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(emb.type):
        lengths = np.full(n, emb.type.list_size, dtype=np.int64)
    else:
        lengths = pc.list_value_length(emb).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    dim_ok = ~null_emb & (lengths == dim)
    bad_value = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(dim_ok)
    if len(idx):
        flat = (emb if len(idx) == n else emb.take(pa.array(idx))).flatten()
        if flat.null_count:
            bad_value[idx] |= flat.is_null().to_numpy(zero_copy_only=False).reshape(-1, dim).any(axis=1)
            flat = flat.fill_null(0)
        vals = flat.to_numpy(zero_copy_only=False).reshape(-1, dim)
        if vals.dtype.kind == "f":
            bad_value[idx] |= ~np.isfinite(vals).all(axis=1)
    bad = null_id | null_emb | ~dim_ok | bad_value
    reasons = []
    for i in np.flatnonzero(bad):
        if null_id[i]:
            reasons.append("null id")
        elif null_emb[i]:
            reasons.append("null embedding")
        elif not dim_ok[i]:
            reasons.append(f"wrong dimension {lengths[i]} (expected {dim})")
        else:
            reasons.append("NaN/Inf or null value in embedding")
    return bad, reasons


def split_valid(
    table: pa.Table, dim: int, *, row_offset: int = 0, where: str = "<input>"
) -> tuple[pa.Table, pa.Table | None]:
    """Split ``table`` into rows that meet the contract and quarantined rows with a reason.

    The bad table keeps every original column (the embedding as ``list<float32>``) plus
    ``_dmu_reason`` and ``_dmu_source_row`` (``row_offset`` + index in ``table``).
    """
    bad, reasons = row_problems(table, dim, where=where)
    if not bad.any():
        return table, None
    bad_idx = np.flatnonzero(bad)
    return table.filter(pa.array(~bad)), quarantine_table(
        table.take(pa.array(bad_idx)), reasons, bad_idx + row_offset
    )


class IdSet:
    """Ids seen so far, for duplicate checks over many batches: sorted numpy runs merged like a
    log-structured tree, so n inserts cost O(n log n) and a lookup O(log^2 n)."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(ids), dtype=bool)
        for run in self._runs:  # never empty (see add)
            pos = np.searchsorted(run, ids).clip(max=len(run) - 1)
            hit |= run[pos] == ids
        return hit

    def add(self, ids: np.ndarray) -> None:
        """Add ids (not already present, no repeats); adding none is a no-op (an empty run would
        break :meth:`contains`)."""
        if len(ids) == 0:
            return
        run = np.sort(ids)
        while self._runs and len(self._runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self._runs.pop(), run]), kind="mergesort")
        self._runs.append(run)


def first_occurrences(ids: np.ndarray, seen: IdSet) -> np.ndarray:
    """Mask of ``ids`` that are neither in ``seen`` nor repeats of an earlier entry of ``ids``."""
    keep = np.zeros(len(ids), dtype=bool)
    if len(ids):
        _, first = np.unique(ids, return_index=True)
        keep[first] = True
        keep &= ~seen.contains(ids)
    return keep


def quarantine_table(rows: pa.Table, reasons: list[str], source_rows: np.ndarray) -> pa.Table:
    """Bad ``rows`` with their embedding as ``list<float32>``, a reason and the source row index."""
    emb_i = rows.schema.get_field_index(EMB)
    if emb_i >= 0:
        rows = rows.set_column(emb_i, EMB, pc.cast(rows.column(EMB), pa.list_(pa.float32())))
    rows = rows.append_column(REASON_COLUMN, pa.array(reasons, pa.string()))
    return rows.append_column(SOURCE_ROW_COLUMN, pa.array(np.asarray(source_rows, dtype=np.int64)))


def conform_batch(table: pa.Table, model: ModelInfo, *, normalize: bool = False) -> pa.Table:
    """Valid rows -> the contract's schema: embedding cast to ``model.dtype`` (and L2-normalised when
    asked), ``label`` as int64, the ``dmu.model`` metadata attached. Other columns pass through."""
    emb = _single_array(table.column(EMB))
    target = embedding_type(model.dim, model.dtype)
    if normalize or not pa.types.is_fixed_size_list(emb.type) or emb.type.value_type != target.value_type:
        if pa.types.is_fixed_size_list(emb.type):
            mat = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, model.dim)
        else:
            mat = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, model.dim)
        if normalize:
            mat = l2_normalize(mat)
        with np.errstate(over="ignore", invalid="ignore"):  # overflowing rows are caught by the writer
            emb = embedding_array(mat.astype(np.dtype(model.dtype), copy=False))
    table = table.set_column(table.schema.get_field_index(EMB), pa.field(EMB, target, nullable=False), emb)
    if LABEL in table.column_names and table.schema.field(LABEL).type != pa.int64():
        table = table.set_column(
            table.schema.get_field_index(LABEL), LABEL, pc.cast(table.column(LABEL), pa.int64())
        )
    meta = dict(table.schema.metadata or {})
    meta[MODEL_META_KEY] = model.to_json().encode()
    return table.replace_schema_metadata(meta)


INT64_MAX = np.iinfo(np.int64).max


def conform_ids(table: pa.Table, where: str = "<input>") -> pa.Table:
    """The id column as the contract's types: any integer type -> int64 (unsigned values above
    int64's range are refused naming ``where``), ``large_string`` -> ``string``."""
    i = table.schema.get_field_index(ID)
    t = table.schema.field(ID).type
    if t == pa.int64() or t == pa.string():
        return table
    col = table.column(ID)
    if pa.types.is_unsigned_integer(t) and t.bit_width == 64:
        hi = pc.max(col).as_py()
        if hi is not None and hi > INT64_MAX:
            raise GalleryError(
                f"{where}: id {hi} does not fit in int64 (ids must be int64 or string); "
                "store such ids as strings"
            )
    if pa.types.is_integer(t):
        return table.set_column(i, pa.field(ID, pa.int64()), pc.cast(col, pa.int64()))
    if pa.types.is_large_string(t):
        return table.set_column(i, pa.field(ID, pa.string()), pc.cast(col, pa.string()))
    raise GalleryError(f"{where}: column {ID!r} must be an integer or string, got {t}")


def norm_tolerance(dtype: str) -> float:
    """How far from 1 a stored row's L2 norm may be in a gallery that declares normalised vectors."""
    return 2e-2 if dtype == "float16" else 1e-3


def _row_norms(mat: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of a float16/float32 matrix, accumulated in float32 (torch's kernel:
    about 2.5x numpy's cast-then-norm on float16)."""
    import torch

    with warnings.catch_warnings():  # a read-only Arrow buffer is only read here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(mat))
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).numpy()


def unstorable_rows(mat: np.ndarray, model: ModelInfo) -> tuple[np.ndarray, list[str]]:
    """Rows of an ``(n, d)`` matrix in its stored dtype that the gallery would reject: non-finite
    values (e.g. a float16 overflow) and, when ``model.normalized``, rows that are not unit-norm
    (a zero vector cannot be normalised). Returns a mask and one reason per masked row."""
    zero = np.zeros(len(mat), dtype=bool)
    off = np.zeros(len(mat), dtype=bool)
    if model.normalized:
        # a row with a non-finite value has a non-finite norm: only those rows are scanned again
        # (a finite row whose float32 sum of squares overflows is not unit-norm either way)
        norms = _row_norms(mat)
        finite = np.isfinite(norms)
        if not finite.all():
            finite[~finite] = np.isfinite(mat[~finite]).all(axis=1)
        zero = finite & (norms == 0)
        off = finite & ~zero & (np.abs(norms - 1) > norm_tolerance(model.dtype))
        lost = ~finite | zero | off
    else:
        finite = np.isfinite(mat).all(axis=1)
        lost = ~finite
    words = []
    for i in np.flatnonzero(lost):
        if not finite[i]:
            words.append(f"value out of {model.dtype} range (NaN/Inf once stored)")
        elif zero[i]:
            words.append("zero vector (cannot be L2-normalised)")
        else:
            words.append("not unit-norm but the gallery is declared normalized")
    return lost, words


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
            pending, self._pending = self._pending, None
            pending.result()

    def _encode(self, table: pa.Table) -> None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
        if self._writer is None:
            opts = parquet_write_options(table.schema, self.compression)
            self._writer = pq.ParquetWriter(self._sink, table.schema, **opts)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += table.num_rows

    def commit(self, empty_schema: pa.Schema) -> FileEntry:
        """Finish the file (``empty_schema`` when no chunk came) and publish it; its entry."""
        self._wait()
        if self._writer is None:
            self._encode(empty_schema.empty_table())
        self._writer.close()
        return _publish_parquet(self.loc, self._sink.getvalue(), self.rows, self.source)


def open_parquet(loc: Location, missing: str = "") -> pq.ParquetFile:
    """Open one Parquet file; any failure (missing, not Parquet, truncated) names the file
    (``missing`` words the case of an absent file; default "no such file")."""
    try:
        return pq.ParquetFile(loc.fs.open_input_file(loc.path))
    except FileNotFoundError:
        raise GalleryError(f"{loc.uri}: {missing or 'no such file'}") from None
    except (pa.ArrowException, OSError) as err:
        raise GalleryError(f"{loc.uri}: not a readable Parquet file ({err})") from None


def read_manifest(loc: Location) -> Manifest | None:
    """The manifest under ``loc``, or None when there is none."""
    m = loc.join(MANIFEST_NAME)
    if not m.is_file():
        return None
    return Manifest.from_json(read_bytes(m).decode(), where=m.uri)


def write_manifest(loc: Location, manifest: Manifest) -> None:
    """Write ``_manifest.json`` last and atomically: the gallery is committed once it lands."""
    manifest.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_bytes_atomic(loc.join(MANIFEST_NAME), manifest.to_json().encode())


def describe_columns(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


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


# ---------------------------------------------------------------------------------------- reading


class Gallery:
    """A gallery prefix opened for reading. ``Gallery.open`` refuses prefixes without a manifest
    unless ``allow_uncommitted=True`` (then every ``*.parquet`` file below the prefix is read, but for
    hidden or ``_``-prefixed names, as pyarrow's dataset discovery skips them: partial uploads)."""

    def __init__(
        self, loc: Location, manifest: Manifest | None, files: list[str], verify: bool = False
    ) -> None:
        self.loc, self.manifest, self.files, self.verify = loc, manifest, files, verify

    @classmethod
    def open(
        cls,
        uri: str | Location,
        storage: StorageConfig | None = None,
        *,
        allow_uncommitted: bool = False,
        verify: bool = False,
    ) -> Gallery:
        """With ``verify``, every file read is checked against its manifest entry first (bytes,
        sha256, rows): readers that compute figures from a gallery never use a file that changed
        after the commit."""
        loc = uri if isinstance(uri, Location) else resolve(uri, storage)
        manifest = read_manifest(loc)
        if manifest is not None:
            return cls(loc, manifest, [f.path for f in manifest.files], verify)
        if not loc.exists():
            raise UncommittedGalleryError(f"{loc.describe_missing()}: it is not a gallery")
        if not allow_uncommitted:
            raise UncommittedGalleryError(
                f"{loc.uri} has no {MANIFEST_NAME}: it is not a committed gallery (a writer may still "
                "be running or may have died)"
            )
        files = loc.list_files(suffix=".parquet", recursive=True, data_only=True)
        if not files:
            raise GalleryError(f"{loc.uri}: no Parquet files found")
        return cls(loc, None, files)

    @property
    def model(self) -> ModelInfo:
        """The producing model: from the manifest, else from the first file's ``dmu.model``."""
        if self.manifest is not None:
            return self.manifest.model
        meta = self.schema().metadata or {}
        if MODEL_META_KEY not in meta:
            raise GalleryError(f"{self.file_uri(self.files[0])}: no {MODEL_META_KEY.decode()} metadata")
        return ModelInfo.from_dict(json.loads(meta[MODEL_META_KEY]))

    def missing_lineage_column(self) -> str | None:
        """Why the rows' chains cannot be told apart (None when they can): ``dmu.model`` declares
        several lineage chains but the files have no per-row ``_dmu_lineage`` column."""
        chains = self.model.chains()
        names = (
            [c["name"] for c in self.manifest.columns] if self.manifest is not None else self.schema().names
        )
        if len(chains) > 1 and LINEAGE_COLUMN not in names:
            return (
                f"{self.loc.uri}: its dmu.model declares {len(chains)} lineage chains but the files have no "
                f"{LINEAGE_COLUMN!r} column saying which row has which"
            )
        return None

    @property
    def num_rows(self) -> int:
        if self.manifest is not None:
            return self.manifest.rows
        return sum(self.parquet_file(f).metadata.num_rows for f in self.files)

    def file_uri(self, rel: str) -> str:
        return self.loc.join(rel).uri

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        if self.verify and self.manifest is not None:
            return self._verified_file(rel)
        return open_parquet(
            self.loc.join(rel), missing="listed in the manifest but missing" if self.manifest else ""
        )

    def _verified_file(self, rel: str) -> pq.ParquetFile:
        """The file ``rel`` read whole and checked against its manifest entry, parsed from those bytes."""
        entry = next(e for e in self.manifest.files if e.path == rel)
        loc = self.loc.join(rel)
        try:
            data = read_bytes(loc)
        except FileNotFoundError:
            raise GalleryError(f"{loc.uri}: listed in the manifest but missing") from None
        found = hashlib.sha256(data).hexdigest() if len(data) == entry.bytes else None
        how = (
            f"{len(data)} bytes, the manifest says {entry.bytes}"
            if found is None
            else "its sha256 differs from the manifest's"
            if found != entry.sha256
            else None
        )
        if how is None:
            pf = pq.ParquetFile(pa.BufferReader(data))
            if pf.metadata.num_rows != entry.rows:
                how = f"{pf.metadata.num_rows} rows, the manifest says {entry.rows}"
            else:
                return pf
        raise GalleryError(
            f"{loc.uri}: {how}: the file changed after its gallery was committed, so figures computed "
            f"from it would be wrong. Run `dmu-ray gallery validate {self.loc.uri}`; to read it anyway, "
            "turn verification off (verify_galleries: false)"
        )

    def schema(self) -> pa.Schema:
        return self.parquet_file(self.files[0]).schema_arrow

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = 65536
    ) -> Iterator[pa.RecordBatch]:
        """Arrow record batches over every file, in manifest order."""
        for rel in self.files:
            yield from self.parquet_file(rel).iter_batches(batch_size=batch_size, columns=columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole gallery as one table (for evaluation-sized galleries)."""
        tables = [self.parquet_file(rel).read(columns=columns) for rel in self.files]
        return pa.concat_tables(tables) if tables else pa.table({})


def iter_npy_batches(data: bytes | str, batch_rows: int) -> Iterable[np.ndarray]:
    """Row blocks of a 2-D ``.npy`` (a local path is memory-mapped; bytes are parsed in memory)."""
    arr = np.load(data, mmap_mode="r") if isinstance(data, str) else np.load(io.BytesIO(data))
    if arr.ndim != 2:
        raise GalleryError(f"expected a 2-D array of vectors, got shape {arr.shape}")
    for start in range(0, arr.shape[0], batch_rows):
        yield np.asarray(arr[start : start + batch_rows])
