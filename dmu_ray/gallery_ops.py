"""Whole-gallery operations behind ``dmu-ray gallery``: import, inspect, validate."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmu_ray.gallery import (
    EMB,
    ID,
    LABEL,
    MODEL_META_KEY,
    Gallery,
    GalleryError,
    GalleryWriter,
    IdSet,
    Manifest,
    ModelInfo,
    embedding_matrix,
    embedding_type,
    first_occurrences,
    iter_npy_batches,
    norm_tolerance,
    open_parquet,
    refuse_overlap,
    row_problems,
)
from dmu_ray.lineage import LINEAGE_COLUMN, chain_space, describe_chain, import_step
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import TMP_DIR, Location, read_bytes, resolve

__all__ = ["import_vectors", "inspect_gallery", "validate_gallery", "ValidationReport"]

Progress = Callable[[str], None]


def _npy_source(loc: Location, batch_rows: int) -> Iterator[np.ndarray]:
    data: bytes | str = loc.path if not loc.is_s3 else read_bytes(loc)
    try:
        yield from iter_npy_batches(data, batch_rows)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, GalleryError):
            raise GalleryError(f"{loc.uri}: {err}") from None
        raise GalleryError(f"{loc.uri}: not a readable .npy array ({err})") from None


def _load_1d(uri: str, storage: StorageConfig | None, what: str, n: int) -> np.ndarray:
    loc = resolve(uri, storage)
    try:
        arr = np.load(loc.path) if not loc.is_s3 else np.load(pa.BufferReader(read_bytes(loc)))
    except (ValueError, OSError, EOFError) as err:
        raise GalleryError(f"{uri}: not a readable .npy array of {what} ({err})") from None
    if arr.ndim != 1 or len(arr) != n:
        raise GalleryError(f"{uri}: {what} must be a 1-D array of {n} entries, got shape {arr.shape}")
    return arr


def _parquet_sources(loc: Location) -> list[Location]:
    """The file itself, or the data files below a folder (hidden/``_`` names skipped, as pyarrow's
    dataset discovery does: a partial upload or a sidecar is not read as vectors)."""
    if loc.is_file():
        return [loc]
    files = loc.list_files(suffix=".parquet", recursive=True, data_only=True)
    if not files:
        raise GalleryError(f"{loc.uri}: no .parquet files found")
    return [loc.join(f) for f in files]


def import_vectors(
    src: str,
    dest: str,
    *,
    model_id: str,
    version: str = "1",
    dtype: str = "float32",
    normalize: bool = False,
    ids: str | None = None,
    labels: str | None = None,
    id_column: str = ID,
    embedding_column: str = EMB,
    label_column: str = LABEL,
    rows_per_file: int = 1_000_000,
    batch_rows: int = 65536,
    overwrite: bool = False,
    dim: int | None = None,
    infer_dim: bool = False,
    storage: StorageConfig | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Import vectors from a ``.npy`` matrix or Parquet (file or folder) into a new gallery prefix.

    ``.npy``: rows are vectors; ids from ``ids`` (a 1-D ``.npy``) or ``0..n-1``; labels from ``labels``.
    Parquet: ``id_column``/``embedding_column``/``label_column`` are renamed to the contract's names
    (the embedding may be any list of numbers); other columns pass through. The dimension is the
    fixed-size list's (from the schema), else ``dim``, else, with ``infer_dim``, the most common
    length over the files. Bad rows (wrong dimension included) are quarantined; ids become int64
    or string. The destination must not hold or lie inside any input (nothing is ever deleted
    that the import reads).
    """
    src_loc = resolve(src, storage)
    if not src_loc.exists():
        missing = src_loc.describe_missing() if src_loc.missing_bucket() else f"{src}: no such file or folder"
        raise GalleryError(missing)
    dest_loc = resolve(dest, storage)
    inputs = [src_loc] + [resolve(u, storage) for u in (ids, labels) if u]
    refuse_overlap(dest_loc, inputs)  # before anything is read or deleted
    if dim is not None and dim < 1:
        raise GalleryError(f"dim must be positive, got {dim}")
    say = progress or (lambda _msg: None)

    if src_loc.path.endswith(".npy"):
        first = next(iter(_npy_source(src_loc, 1)), None)
        if first is None:
            raise GalleryError(f"{src}: the array has no rows")
        if dim is not None and dim != first.shape[1]:
            raise GalleryError(f"{src}: the array holds {first.shape[1]}-d vectors, not {dim}-d (--dim)")
        dim = first.shape[1]
        n = _npy_rows(src_loc)
        id_arr = _load_1d(ids, storage, "ids", n) if ids else np.arange(n, dtype=np.int64)
        label_arr = _load_1d(labels, storage, "labels", n).astype(np.int64) if labels else None

        def tables() -> Iterator[tuple[pa.Table, str]]:
            start = 0
            for block in _npy_source(src_loc, batch_rows):
                stop = start + len(block)
                flat = pa.array(np.ascontiguousarray(block, dtype=np.float32).reshape(-1))
                cols = {ID: pa.array(id_arr[start:stop]), EMB: pa.FixedSizeListArray.from_arrays(flat, dim)}
                if label_arr is not None:
                    cols[LABEL] = pa.array(label_arr[start:stop])
                yield pa.table(cols), src_loc.uri
                start = stop
    else:
        if ids or labels:
            raise GalleryError(
                "--ids/--labels apply to .npy sources; Parquet sources carry their own columns"
            )
        files = _parquet_sources(src_loc)
        rename = {id_column: ID, embedding_column: EMB, label_column: LABEL}
        schemas = {f.uri: open_parquet(f).schema_arrow for f in files}  # all readable before any write
        for f in files:
            names = schemas[f.uri].names
            missing = [c for c in (id_column, embedding_column) if c not in names]
            if missing:
                raise GalleryError(f"{f.uri}: missing column(s) {missing} (columns: {names})")
            if LINEAGE_COLUMN in names:
                raise GalleryError(
                    f"{f.uri}: has a {LINEAGE_COLUMN!r} column, which dmu-ray keeps for its own lineage "
                    "records; an imported gallery's history is not known here: rename or drop it first"
                )
        dim = _parquet_dim(files, schemas, embedding_column, dim, infer_dim)

        def tables() -> Iterator[tuple[pa.Table, str]]:
            for f in files:
                try:
                    for batch in open_parquet(f).iter_batches(batch_size=batch_rows):
                        t = pa.Table.from_batches([batch])
                        yield t.rename_columns([rename.get(c, c) for c in t.column_names]), f.uri
                except (pa.ArrowException, OSError) as err:
                    raise GalleryError(f"{f.uri}: not a readable Parquet file ({err})") from None

    model = ModelInfo(model_id=model_id, version=version, dim=dim, dtype=dtype, normalized=normalize)
    model = model.with_chains([[import_step(model_id, version)]])
    writer = GalleryWriter(
        dest_loc,
        model,
        rows_per_file=rows_per_file,
        normalize=normalize,
        overwrite=overwrite,
        extra={"imported_from": src_loc.uri},
        inputs=inputs,
    )
    rows = 0
    for table, where in tables():
        writer.write(table, source=where)
        rows += table.num_rows
        say(f"imported {rows:,} rows")
    return writer.close()


def _npy_rows(loc: Location) -> int:
    if loc.is_s3:
        return sum(len(b) for b in iter_npy_batches(read_bytes(loc), 1 << 30))
    return int(np.load(loc.path, mmap_mode="r").shape[0])


def _parquet_dim(
    files: list[Location], schemas: dict[str, pa.Schema], column: str, dim: int | None, infer: bool
) -> int:
    """The gallery's dimension: the fixed-size list's (every file that has one must agree), else
    ``dim``, else (``infer``) the most common list length over up to 4,096 rows of each file."""
    fixed = {}
    for f in files:
        t = schemas[f.uri].field(column).type
        if pa.types.is_fixed_size_list(t):
            fixed[f.uri] = t.list_size
    if dim is not None:
        return dim
    sizes = set(fixed.values())
    if len(sizes) > 1:
        listing = ", ".join(f"{u}: {d}" for u, d in list(fixed.items())[:4])
        raise GalleryError(
            f"the files' {column!r} columns have different fixed sizes ({listing}); pass --dim to choose "
            "one (rows of another size are quarantined)"
        )
    if sizes and len(fixed) == len(files):
        return sizes.pop()
    if not infer:
        variable = next(f.uri for f in files if f.uri not in fixed)
        raise GalleryError(
            f"{variable}: column {column!r} is a variable-length list, so the dimension is not in the "
            "schema; pass --dim D (or --infer-dim to take the most common length)"
        )
    counts: Counter[int] = Counter()
    for f in files:
        seen = 0
        for batch in open_parquet(f).iter_batches(batch_size=1024, columns=[column]):
            lengths = pc.list_value_length(batch.column(0)).drop_null().to_numpy(zero_copy_only=False)
            counts.update(lengths[lengths > 0].tolist())
            seen += batch.num_rows
            if seen >= 4096:
                break
    if not counts:
        raise GalleryError(
            f"cannot infer the embedding dimension: no non-empty {column!r} in {files[0].uri} ..."
        )
    return counts.most_common(1)[0][0]


def lineage_rows(g: Gallery) -> Counter[str]:
    """Rows per lineage chain key: read from the per-row column when the gallery has one (a
    dictionary-encoded string column: cheap), else every row has the gallery's one chain."""
    chains = g.model.chains()
    if LINEAGE_COLUMN not in g.schema().names:
        return Counter({key: g.num_rows for key in chains}) if len(chains) == 1 else Counter()
    counts: Counter[str] = Counter()
    for rel in g.files:
        counts += _chain_counts(g.parquet_file(rel))
    return counts


def _chain_counts(pf: pq.ParquetFile) -> Counter[str]:
    """Rows per lineage chain key in one file that has the per-row column."""
    col = pf.read(columns=[LINEAGE_COLUMN]).column(LINEAGE_COLUMN)
    return Counter({item["values"]: item["counts"] for item in pc.value_counts(col).to_pylist()})


def inspect_gallery(g: Gallery) -> dict[str, Any]:
    """A summary of a gallery: rows, dim, dtype, model, the lineage chains with their row counts,
    files, quarantine."""
    m = g.manifest
    model = g.model
    chains = model.chains()
    counts = lineage_rows(g)
    out: dict[str, Any] = {
        "uri": g.loc.uri,
        "committed": m is not None,
        "rows": g.num_rows,
        "dim": model.dim,
        "dtype": model.dtype,
        "model": {k: v for k, v in model.__dict__.items() if v not in (None, {}, []) and k != "lineage"},
        "lineage": [
            {
                "chain": key,
                "space": chain_space(chain),
                "rows": counts.get(key, 0),
                "steps": describe_chain(chain),
            }
            for key, chain in chains.items()
        ]
        + [
            {"chain": key, "space": None, "rows": n, "steps": "NOT DECLARED in dmu.model"}
            for key, n in counts.items()
            if key not in chains
        ],
        "files": len(g.files),
    }
    if m is not None:
        out.update(
            {
                "bytes": sum(f.bytes for f in m.files),
                "id_type": m.id_type,
                "columns": [c["name"] for c in m.columns],
                "rows_in": m.rows_in,
                "quarantined_rows": m.quarantined_rows,
                "quarantine_reasons": m.quarantine_reasons,
                "created_at": m.created_at,
                "file_list": [{"path": f.path, "rows": f.rows, "bytes": f.bytes} for f in m.files],
            }
        )
    else:
        out["file_list"] = [{"path": f} for f in g.files]
        out["columns"] = g.schema().names
    return out


@dataclass
class ValidationReport:
    """What :func:`validate_gallery` found. ``ok`` is False when any problem was found."""

    uri: str
    files_checked: int = 0
    rows_checked: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_gallery(
    g: Gallery,
    *,
    checksums: bool = True,
    duplicates: bool = True,
    batch_size: int = 65536,
    progress: Progress | None = None,
) -> ValidationReport:
    """Check a gallery end to end: manifest vs files (existence, size, sha256, rows), schema and
    ``dmu.model`` metadata, every row (nulls, dimension, NaN/Inf, unit norm when declared), unique
    ids, quarantine reconciliation, and stray files that the manifest does not list."""
    rep = ValidationReport(uri=g.loc.uri)
    say = progress or (lambda _msg: None)
    m = g.manifest
    model = g.model
    want_type = embedding_type(model.dim, model.dtype)
    entries = {f.path: f for f in m.files} if m else {}
    seen = IdSet()
    chain_rows: Counter[str] = Counter()
    if m is None:
        rep.warnings.append("no _manifest.json: the prefix is not committed; checking its files anyway")
    for i, rel in enumerate(g.files):
        uri = g.file_uri(rel)
        loc = g.loc.join(rel)
        if not loc.is_file():
            rep.problems.append(f"{uri}: listed in the manifest but missing")
            continue
        data = read_bytes(loc)
        entry = entries.get(rel)
        if entry is not None:
            if len(data) != entry.bytes:
                rep.problems.append(f"{uri}: {len(data)} bytes, manifest says {entry.bytes}")
            elif checksums and hashlib.sha256(data).hexdigest() != entry.sha256:
                rep.problems.append(f"{uri}: sha256 differs from the manifest (file changed or corrupt)")
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as err:
            rep.problems.append(f"{uri}: not a readable Parquet file ({err})")
            continue
        _check_schema(pf.schema_arrow, want_type, model, uri, rep)
        if entry is not None and pf.metadata.num_rows != entry.rows:
            rep.problems.append(f"{uri}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
        if EMB not in pf.schema_arrow.names or ID not in pf.schema_arrow.names:
            continue
        try:
            _check_rows(pf, model, uri, batch_size, seen if duplicates else None, rep)
            if LINEAGE_COLUMN in pf.schema_arrow.names:  # the file is in memory: count its chains here
                chain_rows += _chain_counts(pf)
        except (pa.ArrowException, OSError, GalleryError) as err:
            rep.problems.append(f"{uri}: unreadable rows ({err})")
            continue
        rep.files_checked += 1
        say(f"checked {i + 1}/{len(g.files)} files, {rep.rows_checked:,} rows")
    if m is not None:
        _check_manifest_totals(g, m, rep)
    _check_lineage(g, rep, chain_rows)
    return rep


def _check_lineage(g: Gallery, rep: ValidationReport, chain_rows: Counter[str]) -> None:
    """Every row's chain (``chain_rows``, counted from the per-row column while the files were
    checked) is declared in ``dmu.model``; a gallery of several chains says per row."""
    chains = g.model.chains()
    if (why := g.missing_lineage_column()) is not None:
        rep.problems.append(why)
    undeclared = {k: n for k, n in chain_rows.items() if k not in chains}
    if undeclared:
        rep.problems.append(
            f"{g.loc.uri}: {sum(undeclared.values())} row(s) name lineage chains that dmu.model does "
            f"not declare: {sorted(map(str, undeclared))[:5]}"
        )


def _check_schema(
    schema: pa.Schema, want_type: pa.DataType, model: ModelInfo, uri: str, rep: ValidationReport
) -> None:
    for col in (ID, EMB):
        if col not in schema.names:
            rep.problems.append(f"{uri}: missing column {col!r}")
    if EMB in schema.names and schema.field(EMB).type != want_type:
        rep.problems.append(f"{uri}: embedding type {schema.field(EMB).type}, expected {want_type}")
    meta = (schema.metadata or {}).get(MODEL_META_KEY)
    if meta is None:
        rep.problems.append(f"{uri}: no {MODEL_META_KEY.decode()} metadata")
    else:
        try:
            file_model = ModelInfo.from_dict(json.loads(meta))
        except (ValueError, TypeError) as err:
            rep.problems.append(f"{uri}: unreadable {MODEL_META_KEY.decode()} metadata ({err})")
            return
        if file_model != model:
            rep.problems.append(
                f"{uri}: {MODEL_META_KEY.decode()} metadata differs from the manifest's model"
            )


def _check_rows(
    pf: pq.ParquetFile, model: ModelInfo, uri: str, batch_size: int, seen: IdSet | None, rep: ValidationReport
) -> None:
    bad_rows, reasons_seen, dup_rows, off_norm = 0, set(), 0, 0
    tol = norm_tolerance(model.dtype)
    for batch in pf.iter_batches(batch_size=batch_size, columns=[ID, EMB]):
        t = pa.Table.from_batches([batch])
        bad, reasons = row_problems(t, model.dim, where=uri)
        bad_rows += int(bad.sum())
        reasons_seen.update(reasons)
        good = t.filter(pa.array(~bad)) if bad.any() else t
        if seen is not None:
            ids = good.column(ID).to_numpy()
            first = first_occurrences(ids, seen)
            dup_rows += int((~first).sum())
            seen.add(ids[first])
        if model.normalized and good.num_rows:
            norms = np.linalg.norm(embedding_matrix(good.column(EMB)).astype(np.float32), axis=1)
            off_norm += int((np.abs(norms - 1) > tol).sum())
        rep.rows_checked += t.num_rows
    if bad_rows:
        rep.problems.append(f"{uri}: {bad_rows} bad row(s): {', '.join(sorted(reasons_seen))}")
    if dup_rows:
        rep.problems.append(f"{uri}: {dup_rows} id(s) already seen in this gallery (ids must be unique)")
    if off_norm:
        rep.problems.append(f"{uri}: {off_norm} row(s) not unit-norm but the model says normalized")


def _check_manifest_totals(g: Gallery, m: Manifest, rep: ValidationReport) -> None:
    q_rows = 0
    for q in m.quarantine:
        loc = g.loc.join(q.path)
        if not loc.is_file():
            rep.problems.append(f"{loc.uri}: quarantine file listed in the manifest but missing")
            continue
        try:
            q_rows += open_parquet(loc).metadata.num_rows
        except GalleryError as err:
            rep.problems.append(str(err))
    if q_rows != m.quarantined_rows:
        rep.problems.append(f"quarantine holds {q_rows} rows, manifest says {m.quarantined_rows}")
    if m.rows + m.quarantined_rows != m.rows_in:
        rep.problems.append(
            f"rows do not reconcile: rows_in {m.rows_in} != rows {m.rows} + quarantined {m.quarantined_rows}"
        )
    listed = set(g.files) | {q.path for q in m.quarantine}
    for rel in g.loc.list_files(suffix=".parquet", recursive=True):
        if rel not in listed:
            rep.warnings.append(f"{g.file_uri(rel)}: not listed in the manifest (not part of the gallery)")
    tmp = g.loc.join(TMP_DIR)
    if tmp.exists() and g.loc.fs.get_file_info(pafs.FileSelector(tmp.path, recursive=True)):
        rep.warnings.append(f"{tmp.uri}: leftover in-flight files from an interrupted writer")
