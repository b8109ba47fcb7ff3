"""``_manifest.json``, the commit marker of a gallery prefix: its entries, its checks, reading
and writing it (last and atomically)."""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from dmu_ray import __version__
from dmu_ray.gallery.contract import FORMAT, MANIFEST_NAME, GalleryError, ModelInfo
from dmu_ray.storage import Location, StorageError, check_relative, read_bytes, write_bytes_atomic


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
