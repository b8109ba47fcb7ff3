"""Reading galleries: :class:`Gallery` (committed prefixes, verified reads) and ``.npy`` row blocks."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmu_ray.gallery.contract import (
    MANIFEST_NAME,
    MODEL_META_KEY,
    GalleryError,
    ModelInfo,
    UncommittedGalleryError,
)
from dmu_ray.gallery.manifest import Manifest, read_manifest
from dmu_ray.gallery.writer import open_parquet
from dmu_ray.lineage import LINEAGE_COLUMN
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import Location, read_bytes, resolve

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
