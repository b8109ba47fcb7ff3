"""The gallery contract: its names and errors, the model a gallery declares (``dmu.model``),
embedding arrays, and the row checks every writer applies (what is quarantined, and why)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmu_ray.lineage import Chain, chain_key, embed_step, import_step, upgrade_step

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
            bad_value[idx] |= ~finite_rows(vals)
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


#: rows per step of the row scans below: a slice's rows stay in the core's cache between the cast
#: and the sum (whole 65k-row batches measured ~5x slower for the same norms)
SCAN_ROWS = 4096

#: per IEEE float width: the unsigned view and the exponent bits (all set: Inf or NaN)
_EXPONENT_BITS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def finite_rows(mat: np.ndarray) -> np.ndarray:
    """Mask of the rows of an ``(n, d)`` float matrix whose values are all finite.

    Exact, like ``np.isfinite(mat).all(axis=1)``, read from the bits: a value is Inf or NaN
    exactly when its exponent bits are all set, so a row is finite when the largest of its values'
    exponent fields is not all ones (one integer pass; ~5x numpy's float16 isfinite here)."""
    if mat.dtype.kind != "f" or mat.dtype.itemsize not in _EXPONENT_BITS or mat.ndim != 2:
        return np.isfinite(mat).all(axis=-1)
    if mat.shape[1] == 0:
        return np.ones(len(mat), dtype=bool)
    uint, exponent = _EXPONENT_BITS[mat.dtype.itemsize]
    bits = mat.view(uint) if mat.dtype.isnative else mat.astype(mat.dtype.newbyteorder("=")).view(uint)
    out = np.empty(len(mat), dtype=bool)
    for start in range(0, len(mat), SCAN_ROWS):
        part = bits[start : start + SCAN_ROWS]
        out[start : start + len(part)] = (part & uint(exponent)).max(axis=1) != exponent
    return out


def _row_norms(mat: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of a float16/float32 matrix, accumulated in float32 (torch's kernel:
    about 2.5x numpy's cast-then-norm on float16), :data:`SCAN_ROWS` rows at a time."""
    import torch

    with warnings.catch_warnings():  # a read-only Arrow buffer is only read here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(mat))
    out = torch.empty(len(t), dtype=torch.float32)
    for start in range(0, len(t), SCAN_ROWS):
        part = t[start : start + SCAN_ROWS]
        torch.linalg.vector_norm(part, dim=1, dtype=torch.float32, out=out[start : start + len(part)])
    return out.numpy()


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
            finite[~finite] = finite_rows(mat[~finite])
        zero = finite & (norms == 0)
        off = finite & ~zero & (np.abs(norms - 1) > norm_tolerance(model.dtype))
        lost = ~finite | zero | off
    else:
        finite = finite_rows(mat)
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
