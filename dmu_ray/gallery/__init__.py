"""The gallery Parquet contract (DESIGN.md section 3), as a package: ``contract`` (names, model
info, arrays, row checks), ``manifest`` (the commit marker), ``writer`` (atomic files,
:class:`GalleryWriter`), ``reader`` (:class:`Gallery`); every public name importable from here.

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

from dmu_ray.gallery.contract import (
    DTYPES,
    EMB,
    FORMAT,
    ID,
    LABEL,
    MANIFEST_NAME,
    MODEL_META_KEY,
    QUARANTINE_DIR,
    REASON_COLUMN,
    SOURCE_ROW_COLUMN,
    GalleryError,
    IdSet,
    ModelInfo,
    UncommittedGalleryError,
    check_columns,
    conform_batch,
    embedding_array,
    embedding_matrix,
    embedding_type,
    finite_rows,
    first_occurrences,
    l2_normalize,
    norm_tolerance,
    quarantine_table,
    row_problems,
    split_valid,
    unstorable_rows,
)
from dmu_ray.gallery.manifest import (
    FileEntry,
    Manifest,
    describe_columns,
    read_manifest,
    write_manifest,
)
from dmu_ray.gallery.reader import (
    Gallery,
    iter_npy_batches,
)
from dmu_ray.gallery.writer import (
    ChunkedParquetWriter,
    GalleryWriter,
    open_parquet,
    parquet_write_options,
    refuse_overlap,
    write_parquet_atomic,
)

__all__ = [
    "ChunkedParquetWriter",
    "DTYPES",
    "EMB",
    "FORMAT",
    "FileEntry",
    "Gallery",
    "GalleryError",
    "GalleryWriter",
    "ID",
    "IdSet",
    "LABEL",
    "MANIFEST_NAME",
    "MODEL_META_KEY",
    "Manifest",
    "ModelInfo",
    "QUARANTINE_DIR",
    "REASON_COLUMN",
    "SOURCE_ROW_COLUMN",
    "UncommittedGalleryError",
    "check_columns",
    "conform_batch",
    "describe_columns",
    "embedding_array",
    "embedding_matrix",
    "embedding_type",
    "finite_rows",
    "first_occurrences",
    "iter_npy_batches",
    "l2_normalize",
    "norm_tolerance",
    "open_parquet",
    "parquet_write_options",
    "quarantine_table",
    "read_manifest",
    "refuse_overlap",
    "row_problems",
    "split_valid",
    "unstorable_rows",
    "write_manifest",
    "write_parquet_atomic",
]
