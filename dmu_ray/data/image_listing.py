"""What an image import will read: a folder in ImageFolder layout or a table of
``uri,label[,id,part]`` listed as one row per file (uri, id, label, part, and the reason it will be
quarantined whatever its bytes), with the class names. See :mod:`dmu_ray.data.image_import`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmu_ray.data.images import PARTS
from dmu_ray.gallery import GalleryError
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import CSV_SUFFIXES, Location, parse_table, read_existing, resolve

__all__ = ["MAX_CLASSES", "is_table", "list_folder", "read_table"]


@dataclass
class _Listing:
    """What an import will read: one row per file found (``uri``, ``id``, ``label`` or null,
    ``part`` or null, ``reason`` set when it cannot be imported whatever its bytes)."""

    table: pa.Table
    class_names: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def list_folder(root: str, storage: StorageConfig | None = None) -> _Listing:
    """Every file under ``root`` (ImageFolder layout, optionally under part folders), sorted by
    path; ids are positions in that order. Files outside a class folder or without an image
    extension are listed too, with the reason they will be quarantined."""
    import pyarrow.fs as pafs

    loc = resolve(root, storage)
    unnamed: list[str] = []  # local file names that are not UTF-8, escaped
    if loc.is_s3:  # S3 keys are UTF-8 by definition
        try:
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        except FileNotFoundError:
            raise GalleryError(f"{loc.uri}: no such folder") from None
        base = loc.path.rstrip("/") + "/"
        files = sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File)
    else:
        files, unnamed = _local_files(loc)
    if not files and not unnamed:
        raise GalleryError(f"{loc.uri}: no files found")
    tops = {f.split("/")[0] for f in files if "/" in f}
    by_part = bool(tops) and tops <= set(PARTS)
    exts = _image_extensions()
    rows: dict[str, list] = {"uri": [], "label": [], "part": [], "reason": []}
    for f in files:
        parts = f.split("/")
        part = parts[0] if by_part else None
        inner = parts[1:] if by_part else parts
        label = inner[0] if len(inner) == 2 else None
        reason = None
        if label is None:
            reason = "not in a class folder (ROOT/<class>/<image>" + (
                " under a part folder)" if by_part else ")"
            )
        elif not f.lower().endswith(exts):
            reason = f"not an image file name (extensions: {', '.join(exts)})"
        rows["uri"].append(loc.join(f).uri)
        rows["label"].append(label)
        rows["part"].append(part)
        rows["reason"].append(reason)
    for name in unnamed:  # never read: quarantined with the name's bytes escaped
        rows["uri"].append(f"{loc.uri}/{name}")
        rows["label"].append(None)
        rows["part"].append(None)
        rows["reason"].append(f"file name is not UTF-8 (bytes escaped: {name}); rename it to import it")
    names = sorted(
        {lb for lb, r in zip(rows["label"], rows["reason"], strict=True) if lb is not None and r is None}
    )
    index = {n: i for i, n in enumerate(names)}
    table = pa.table(
        {
            "uri": pa.array(rows["uri"], pa.string()),
            "id": pa.array(np.arange(len(files) + len(unnamed)), pa.int64()),
            "label": pa.array([index.get(lb) for lb in rows["label"]], pa.int64()),
            "part": pa.array(rows["part"], pa.string()),
            "reason": pa.array(rows["reason"], pa.string()),
        }
    )
    return _Listing(table, names, loc.uri, {"layout": "parts/classes" if by_part else "classes"})


def _local_files(loc: Location) -> tuple[list[str], list[str]]:
    """``(names, unnamed)`` of the files below a local folder, relative and sorted: ``unnamed``
    are the paths that are not valid UTF-8, their bytes escaped (``\\xff``), which no Arrow
    string column, URI or listing can carry as they are."""
    import os

    top = os.fsencode(loc.path)
    if not os.path.isdir(top):
        raise GalleryError(f"{loc.uri}: no such folder")
    files, unnamed = [], []
    for folder, _dirs, names in os.walk(top):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), top)
            try:
                files.append(rel.decode("utf-8"))
            except UnicodeDecodeError:
                unnamed.append(rel.decode("utf-8", "backslashreplace"))
    return sorted(files), sorted(unnamed)


def is_table(uri: str) -> bool:
    """Whether a URI names an image table (a ``.csv``/``.tsv``/``.parquet`` file) rather than a
    data set folder."""
    return uri.lower().endswith((*CSV_SUFFIXES, ".parquet", ".pq"))


#: default bound on integer class labels of an image table (``--max-classes`` raises it): an
#: integer label is a class id, so one mistyped value would otherwise make millions of classes
MAX_CLASSES = 100_000


def read_table(
    uri: str,
    storage: StorageConfig | None = None,
    *,
    need_label: bool = True,
    need_id: bool = False,
    max_classes: int = MAX_CLASSES,
) -> _Listing:
    """A Parquet or CSV table of ``uri,label[,id,part]`` (see the module docstring); clear errors
    for a missing column, duplicate ids, a part other than train/query/gallery. Without
    ``need_label`` the label column may be absent (labels null: images to embed, not to train on);
    with ``need_id`` the id column must be there (rows are joined to a gallery by it).
    Labels are names (any non-integer column: sorted, mapped to dense class ids) or integer class
    ids below ``max_classes``; an empty or blank label is a missing one (the row is quarantined
    with "no label" when labels are needed)."""
    loc = resolve(uri, storage)
    data = read_existing(loc, GalleryError, "table")
    try:
        t = parse_table(data, loc.path, {"uri": pa.string(), "part": pa.string()})
    except (pa.ArrowInvalid, OSError) as err:
        raise GalleryError(f"{loc.uri}: not a readable Parquet/CSV table ({err})") from None
    need = ["uri"] + (["label"] if need_label else []) + (["id"] if need_id else [])
    missing = [c for c in need if c not in t.column_names]
    if missing:
        want = "uri,label[,id,part]" if need_label else "id,uri[,label]"
        raise GalleryError(f"{loc.uri}: missing column(s) {missing} (need {want}; has {t.column_names})")
    if "label" not in t.column_names:
        t = t.append_column("label", pa.nulls(t.num_rows, pa.int64()))
    n = t.num_rows
    if n == 0:
        raise GalleryError(f"{loc.uri}: the table has no rows")
    if "id" in t.column_names:
        ids = t.column("id")
        if not pa.types.is_integer(ids.type) or ids.null_count:
            raise GalleryError(f"{loc.uri}: column id must be integers without nulls (got {ids.type})")
        ids = ids.cast(pa.int64())
        uniq, counts = np.unique(ids.to_numpy(), return_counts=True)
        if (counts > 1).any():
            raise GalleryError(f"{loc.uri}: duplicate id(s) {uniq[counts > 1][:5].tolist()} in column id")
    else:
        ids = pa.array(np.arange(n), pa.int64())
    labels = t.column("label")
    if pa.types.is_integer(labels.type):
        lab = labels.cast(pa.int64())
        if pc.any(pc.less(lab, 0)).as_py():
            raise GalleryError(f"{loc.uri}: column label has negative values")
        top = pc.max(lab).as_py()
        if top is not None and top >= max_classes:
            n_over = pc.sum(pc.greater_equal(lab, max_classes)).as_py()
            raise GalleryError(
                f"{loc.uri}: column label has {n_over} value(s) >= {max_classes:,} (largest {top:,}); integer "
                f"labels are class ids, so this would make {top + 1:,} classes. Correct the value(s), give "
                "labels as names (text, mapped to dense ids), or raise the bound (--max-classes)"
            )
        names = [str(i) for i in range((top if top is not None else -1) + 1)]
    else:
        text = labels.cast(pa.string())
        text = pc.if_else(pc.equal(pc.utf8_trim_whitespace(text), ""), pa.scalar(None, pa.string()), text)
        names = sorted(set(text.drop_null().to_pylist()))
        index = {v: i for i, v in enumerate(names)}
        lab = pa.array([index.get(v) for v in text.to_pylist()], pa.int64())
    part = t.column("part").cast(pa.string()) if "part" in t.column_names else pa.nulls(n, pa.string())
    bad = set(part.drop_null().to_pylist()) - set(PARTS)
    if bad:
        raise GalleryError(
            f"{loc.uri}: column part has {sorted(bad)}; use {', '.join(PARTS)} (or leave it empty)"
        )
    folder = loc.uri.rsplit("/", 1)[0]
    uris, reasons = [], []
    for u in t.column("uri").cast(pa.string()).to_pylist():
        if u is None or not u.strip():
            uris.append(u or "")
            reasons.append("empty uri")
            continue
        uris.append(u if "://" in u or u.startswith("/") else f"{folder}/{u}")
        reasons.append(None)
    reasons = [
        r if r is not None or lb is not None or not need_label else "no label"
        for r, lb in zip(reasons, lab.to_pylist(), strict=True)
    ]
    table = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "id": ids,
            "label": lab,
            "part": part,
            "reason": pa.array(reasons, pa.string()),
        }
    )
    return _Listing(table, names, loc.uri, {"layout": "table"})
