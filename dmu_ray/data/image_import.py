"""Import a user's own images into an image data set (the format of :mod:`dmu_ray.data.images`).

Two sources, both on local disk or ``s3://``:

- a **folder** in torchvision's ImageFolder layout, one sub-folder per class
  (``ROOT/<class>/<image>``), or one level more for the parts
  (``ROOT/{train,query,gallery}/<class>/<image>``);
- a **table** (Parquet or CSV) with columns ``uri,label[,id,part]``; a relative ``uri`` is read
  relative to the table's folder.

The images are read, checked and written by Ray Data tasks in parallel, a Parquet file per block
and part, so an import scales with the cluster. Every image is decoded in full: an unreadable,
truncated or non-image file goes to ``_quarantine.parquet`` with its reason, and the counts must
reconcile (found = imported + quarantined) before ``_dataset.json`` commits the data set. Images
keep their original encoded bytes, or are re-encoded (``reencode``) to ``size`` x ``size`` PNG
(shorter side resized, centre crop: what training and evaluation do to them anyway).

Parts come from the folder layout or the table's ``part`` column, else from a seeded split by id
(``query_fraction``, ``gallery_fraction``). Class ids follow the sorted class names (ImageFolder's
rule) unless the table's labels are integers already.
"""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmu_ray.data.image_listing import _Listing, is_table, list_folder, read_table
from dmu_ray.data.images import PARTS, DatasetInfo, claimed_folder, fit_square, write_dataset_info
from dmu_ray.data.splits import unit_hash
from dmu_ray.gallery import GalleryError, refuse_overlap, write_parquet_atomic
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import Location, read_bytes, resolve

__all__ = [
    "ImportOptions",
    "is_table",
    "list_folder",
    "read_table",
    "import_images",
    "read_quarantine",
    "QUARANTINE",
]

QUARANTINE = "_quarantine.parquet"


@dataclass
class ImportOptions:
    """How images become a data set (see the module docstring)."""

    size: int = 224
    channels: int = 3
    reencode: bool = False
    query_fraction: float = 0.1
    gallery_fraction: float = 0.2
    seed: int = 0
    rows_per_file: int = 2048
    num_cpus: float = 1.0
    name: str = ""

    def check(self) -> None:
        if self.size < 8:
            raise GalleryError(f"--size must be at least 8 pixels (got {self.size})")
        if self.channels not in (1, 3):
            raise GalleryError(f"--channels must be 1 or 3 (got {self.channels})")
        fr = (self.query_fraction, self.gallery_fraction)
        if any(not 0.0 <= f < 1.0 for f in fr) or sum(fr) >= 1.0:
            raise GalleryError(
                f"--query-fraction and --gallery-fraction must be in [0, 1) and leave room for training (got {fr})"
            )


def _assign_parts(table: pa.Table, opts: ImportOptions) -> pa.Table:
    """Rows without a part get one from a seeded split by id: query, gallery, else train."""
    part = table.column("part")
    if part.null_count == 0:
        return table
    h = unit_hash(table.column("id").to_numpy(), opts.seed)
    split = np.where(
        h < opts.query_fraction,
        "query",
        np.where(h < opts.query_fraction + opts.gallery_fraction, "gallery", "train"),
    )
    filled = pc.if_else(pc.is_null(part), pa.array(split, pa.string()), part)
    return table.set_column(table.column_names.index("part"), "part", filled)


class UriReader:
    """Bytes of a URI, one filesystem per bucket (creating an S3 filesystem per file is slow)."""

    def __init__(self, storage: StorageConfig | None) -> None:
        self.storage, self.fs = storage, {}

    def __call__(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            bucket = uri[5:].split("/", 1)[0]
            if bucket not in self.fs:
                self.fs[bucket] = resolve(f"s3://{bucket}", self.storage).fs
            with self.fs[bucket].open_input_stream(uri[5:]) as f:
                return f.read()
        return read_bytes(resolve(uri, self.storage))


def check_image(data: bytes, size: int, channels: int, reencode: bool) -> tuple[bytes | None, str | None]:
    """``(bytes to store, None)`` for an image that decodes in full, else ``(None, reason)``.
    With ``reencode`` the stored bytes are a ``size`` x ``size`` PNG (:func:`fit_square`)."""
    from PIL import Image, UnidentifiedImageError

    from dmu_ray.data.images import encode_png

    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: a truncated file fails here
            img = img.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        return None, "not an image (no image format recognises the bytes)"
    except Image.DecompressionBombError as err:
        return None, f"too large to decode safely ({err})"
    except (OSError, SyntaxError, ValueError) as err:
        return None, f"truncated or corrupt image ({err})"
    if reencode:
        return encode_png(np.asarray(fit_square(img, size))), None
    return data, None


def import_block(
    batch: pa.Table, *, dest: str, storage: StorageConfig | None, size: int, channels: int, reencode: bool
) -> pa.Table:
    """Ray Data UDF: read and check one block's images, write one Parquet file per part under
    ``dest`` (named by a hash of its ids, so a retried task rewrites the same file), and return
    one row per file written and per image quarantined."""
    read = UriReader(storage)
    root = resolve(dest, storage)
    kept: dict[str, tuple[list, list, list]] = {}
    q_uri, q_id, q_reason = [], [], []
    for uri, id_, label, part, reason in zip(
        *(batch.column(c).to_pylist() for c in ("uri", "id", "label", "part", "reason")), strict=True
    ):
        data = None
        if reason is None:
            try:
                data = read(uri)
            except (OSError, ValueError) as err:  # missing, unreadable, a bad URI
                reason = f"unreadable ({type(err).__name__}: {str(err)[:200]})"
        if reason is None:
            data, reason = check_image(data, size, channels, reencode)
        if reason is not None:
            q_uri.append(uri)
            q_id.append(id_)
            q_reason.append(reason)
            continue
        ids, images, labels = kept.setdefault(part, ([], [], []))
        ids.append(id_)
        images.append(data)
        labels.append(label)
    files, parts, rows = [], [], []
    for part, (ids, images, labels) in sorted(kept.items()):
        name = f"part-{hashlib.sha1(np.asarray(ids, np.int64).tobytes()).hexdigest()[:20]}.parquet"
        t = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "image": pa.array(images, pa.binary()),
                "label": pa.array(labels, pa.int64()),
            }
        )
        write_parquet_atomic(root.join(part, name), t, row_group_rows=1024)
        files.append(f"{part}/{name}")
        parts.append(part)
        rows.append(len(ids))
    n_q = len(q_uri)
    return pa.table(
        {
            "file": pa.array(files + [None] * n_q, pa.string()),
            "part": pa.array(parts + [None] * n_q, pa.string()),
            "rows": pa.array(rows + [0] * n_q, pa.int64()),
            "uri": pa.array([None] * len(files) + q_uri, pa.string()),
            "id": pa.array([None] * len(files) + q_id, pa.int64()),
            "reason": pa.array([None] * len(files) + q_reason, pa.string()),
        }
    )


def import_images(
    listing: _Listing,
    dest: str,
    opts: ImportOptions,
    storage: StorageConfig | None = None,
    *,
    progress: bool = True,
    ray_address: str | None = None,
) -> DatasetInfo:
    """Read, check and write every listed image on Ray Data (see the module docstring); returns
    the committed data set's info. Nothing is committed unless the counts reconcile."""

    opts.check()
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    root = resolve(dest, storage)
    refuse_overlap(root, [resolve(listing.source, storage)])
    with claimed_folder(root, listing.source):  # one import a folder: a second fails untouched
        return _import_claimed(listing, root, opts, storage, say, progress, ray_address)


def _import_claimed(
    listing: _Listing,
    root: Location,
    opts: ImportOptions,
    storage: StorageConfig | None,
    say,
    progress: bool,
    ray_address: str | None,
) -> DatasetInfo:
    import ray.data

    from dmu_ray.ray_session import collect_batches, data_context, ensure_ray

    table = _assign_parts(listing.table, opts)
    found = table.num_rows
    say(f"import {listing.source}: {found:,} files, {len(listing.class_names)} classes -> {root.uri}")
    ensure_ray(ray_address)
    with data_context(enable_progress_bars=progress):
        blocks = max(1, -(-found // opts.rows_per_file))
        ds = (
            ray.data.from_arrow(table)
            .repartition(blocks)
            .map_batches(
                import_block,
                fn_kwargs=dict(
                    dest=root.uri,
                    storage=storage,
                    size=opts.size,
                    channels=opts.channels,
                    reencode=opts.reencode,
                ),
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=opts.num_cpus,
            )
        )
        parts_out = collect_batches(ds)
    out = (
        pa.concat_tables(parts_out)
        if parts_out
        else import_block(
            table.slice(0, 0),
            dest=root.uri,
            storage=storage,
            size=opts.size,
            channels=opts.channels,
            reencode=False,
        )
    )
    written = out.filter(pc.is_valid(out.column("file")))
    quarantined = out.filter(pc.is_valid(out.column("reason")))
    imported = int(pc.sum(written.column("rows")).as_py() or 0)
    if imported + quarantined.num_rows != found:
        raise GalleryError(
            f"{root.uri}: counts do not reconcile (found {found}, imported {imported}, quarantined "
            f"{quarantined.num_rows}); the data set was not committed"
        )
    _drop_unreported(root, set(written.column("file").to_pylist()), say)
    q = (
        table.select(["uri", "id", "label", "part"])
        .join(quarantined.select(["id", "reason"]), "id", join_type="inner")
        .sort_by("id")
    )
    write_parquet_atomic(root.join(QUARANTINE), q)
    rows = {p: 0 for p in PARTS}
    for part, n in zip(written.column("part").to_pylist(), written.column("rows").to_pylist(), strict=True):
        rows[part] += n
    name = opts.name or listing.source.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stats = {"found": found, "imported": imported, "quarantined": quarantined.num_rows}
    info = DatasetInfo(
        name=name,
        num_classes=len(listing.class_names),
        image_size=opts.size,
        channels=opts.channels,
        rows=rows,
        class_names=listing.class_names,
        source=listing.source,
        extra={
            "import": {
                **stats,
                **listing.extra,
                "reencoded": opts.reencode,
                "split": {"seed": opts.seed, "query": opts.query_fraction, "gallery": opts.gallery_fraction},
            }
        },
    )
    write_dataset_info(root, info)  # the commit: readers refuse a folder without it
    say(
        f"  imported {imported:,} ({', '.join(f'{p} {n:,}' for p, n in rows.items())}), "
        + (
            f"quarantined {quarantined.num_rows:,} (reasons in {root.join(QUARANTINE).uri})"
            if quarantined.num_rows
            else "nothing quarantined"
        )
    )
    return info


def _drop_unreported(root: Location, reported: set[str], say) -> None:
    """Remove part files no task reported (left by a task that failed and was retried with other
    block boundaries), so every row is stored exactly once."""
    import pyarrow.fs as pafs

    for part in PARTS:
        loc = root.join(part)
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
        for i in infos:
            rel = f"{part}/{i.base_name}"
            if i.type == pafs.FileType.File and rel not in reported:
                loc.fs.delete_file(i.path)
                say(f"  removed {rel}: written by a failed attempt, not part of the import")


def read_quarantine(uri: str, storage: StorageConfig | None = None) -> pa.Table:
    """The ``_quarantine.parquet`` of an imported data set (uri, id, label, part, reason)."""
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(resolve(uri, storage).join(QUARANTINE))))
