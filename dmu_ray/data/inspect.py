"""``dmu-ray data inspect|validate``: what an image data set holds, and whether it keeps the format
(:mod:`dmu_ray.data.images`) that training and evaluation rely on."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmu_ray.data.images import PARTS, read_dataset_info
from dmu_ray.gallery import GalleryError
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import resolve

__all__ = ["inspect_dataset", "validate_dataset"]

_SCHEMA = {"id": pa.int64(), "image": pa.binary(), "label": pa.int64()}


def _part_files(uri: str, part: str, storage: StorageConfig | None) -> list[str]:
    import pyarrow.fs as pafs

    loc = resolve(uri, storage).join(part)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _ids_labels(
    uri: str, part: str, storage: StorageConfig | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Ids and labels of a part (image bytes are not read) and any schema problem per file."""
    loc = resolve(uri, storage)
    problems, ids, labels = [], [], []
    for path in _part_files(uri, part, storage):
        name = f"{part}/{path.rsplit('/', 1)[-1]}"
        try:
            f = pq.ParquetFile(path, filesystem=loc.fs)
            schema = f.schema_arrow
            bad = [
                f"{c} ({schema.field(c).type if c in schema.names else 'missing'}, want {t})"
                for c, t in _SCHEMA.items()
                if c not in schema.names or schema.field(c).type != t
            ]
            if bad:
                problems.append(f"{name}: column(s) {', '.join(bad)}")
                continue
            t = f.read(columns=["id", "label"])
        except (OSError, pa.ArrowInvalid) as err:
            problems.append(f"{name}: unreadable ({err})")
            continue
        ids.append(t.column("id").to_numpy(zero_copy_only=False))
        labels.append(t.column("label").to_numpy(zero_copy_only=False))
    cat = lambda xs: np.concatenate(xs) if xs else np.empty(0, np.int64)  # noqa: E731
    return cat(ids), cat(labels), problems


def inspect_dataset(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """A summary: the ``_dataset.json`` facts, per part the files, rows, classes present and
    images per class (min / median / max), and the import's quarantine reasons."""
    info = read_dataset_info(uri, storage)
    out: dict[str, Any] = {
        "name": info.name,
        "classes": info.num_classes,
        "image_size": info.image_size,
        "channels": info.channels,
        "source": info.source,
        "parts": {},
    }
    for part in PARTS:
        files = _part_files(uri, part, storage)
        if not files:
            continue
        _, labels, _ = _ids_labels(uri, part, storage)
        per = np.bincount(labels[labels >= 0], minlength=info.num_classes) if len(labels) else np.zeros(1)
        present = per[per > 0]
        out["parts"][part] = {
            "files": len(files),
            "rows": int(len(labels)),
            "classes_present": int(len(present)),
            "images_per_class": [int(present.min()), float(np.median(present)), int(present.max())]
            if len(present)
            else [0, 0, 0],
        }
    imp = info.extra.get("import")
    if imp:
        out["import"] = {k: imp[k] for k in ("found", "imported", "quarantined") if k in imp}
        if imp.get("quarantined"):
            from dmu_ray.data.image_import import read_quarantine

            reasons = read_quarantine(uri, storage).column("reason").to_pylist()
            out["import"]["reasons"] = dict(Counter(r.split(" (")[0] for r in reasons).most_common())
    return out


def validate_dataset(
    uri: str, storage: StorageConfig | None = None, *, decode: bool = False, progress: bool = False
) -> list[str]:
    """Every problem found (empty: valid): the schema of every file, rows per part as
    ``_dataset.json`` states them, labels within the classes, ids unique across parts, an
    import's counts reconciling with its quarantine list; with ``decode``, every image decodes
    (a Ray Data pass over all parts)."""
    try:
        info = read_dataset_info(uri, storage)
    except (GalleryError, TypeError, ValueError) as err:
        return [str(err)]
    problems: list[str] = []
    all_ids = []
    for part in PARTS:
        ids, labels, bad = _ids_labels(uri, part, storage)
        problems += bad
        want = info.rows.get(part, 0)
        if not bad and len(ids) != want:
            problems.append(f"{part}: {len(ids)} rows, _dataset.json says {want}")
        out = (labels < 0) | (labels >= info.num_classes)
        if out.any():
            problems.append(
                f"{part}: {int(out.sum())} label(s) outside [0, {info.num_classes}) (e.g. {labels[out][:3].tolist()})"
            )
        all_ids.append(ids)
    ids = np.concatenate(all_ids)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        problems.append(
            f"{int((counts > 1).sum())} id(s) appear more than once (e.g. {uniq[counts > 1][:5].tolist()})"
        )
    imp = info.extra.get("import")
    if imp:
        from dmu_ray.data.image_import import read_quarantine

        try:
            q = read_quarantine(uri, storage).num_rows
        except (OSError, FileNotFoundError, pa.ArrowInvalid) as err:
            problems.append(f"_quarantine.parquet: unreadable ({err})")
            q = None
        if q is not None and q != imp.get("quarantined"):
            problems.append(f"_quarantine.parquet has {q} rows, the import recorded {imp.get('quarantined')}")
        if imp.get("found") != imp.get("imported", -1) + imp.get("quarantined", -1):
            problems.append(f"import counts do not reconcile: {imp}")
        if imp.get("imported") != sum(info.rows.values()):
            problems.append(
                f"import recorded {imp.get('imported')} images, the parts hold {sum(info.rows.values())}"
            )
    if decode and not problems:
        problems += _undecodable(uri, info, storage, progress)
    return problems


def _check_batch(batch: pa.Table, size: int, channels: int) -> pa.Table:
    from dmu_ray.data.image_import import check_image

    ids, reasons = [], []
    for id_, data in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(), strict=True):
        _, reason = check_image(data, size, channels, reencode=False)
        if reason is not None:
            ids.append(id_)
            reasons.append(reason)
    return pa.table({"id": pa.array(ids, pa.int64()), "reason": pa.array(reasons, pa.string())})


def _undecodable(uri: str, info, storage: StorageConfig | None, progress: bool) -> list[str]:
    import ray.data

    from dmu_ray.ray_session import collect_batches, data_context, ensure_ray

    ensure_ray()
    loc = resolve(uri, storage)
    problems = []
    for part in PARTS:
        if not info.rows.get(part):
            continue
        p = loc.join(part)
        with data_context(enable_progress_bars=progress):
            ds = ray.data.read_parquet(p.path, filesystem=p.fs, file_extensions=["parquet"])
            ds = ds.select_columns(["id", "image"]).map_batches(
                _check_batch,
                fn_kwargs={"size": info.image_size, "channels": info.channels},
                batch_format="pyarrow",
            )
            bad = [b for b in collect_batches(ds) if b.num_rows]
        if bad:
            t = pa.concat_tables(bad)
            problems.append(
                f"{part}: {t.num_rows} image(s) do not decode (e.g. id {t.column('id')[0].as_py()}: "
                f"{t.column('reason')[0].as_py()})"
            )
    return problems
