"""``dmu-ray gallery import|inspect|validate``: gallery prefixes."""

from __future__ import annotations

import argparse
import json

from dmu_ray.cli.common import (
    _progress,
    _progress_done,
    _storage,
    _storage_args,
)


def _cmd_gallery_import(ns: argparse.Namespace) -> int:
    from dmu_ray.gallery_ops import import_vectors

    m = import_vectors(
        ns.source,
        ns.dest,
        model_id=ns.model_id,
        version=ns.model_version,
        dtype=ns.dtype,
        normalize=ns.normalize,
        ids=ns.ids,
        labels=ns.labels,
        id_column=ns.id_column,
        embedding_column=ns.embedding_column,
        label_column=ns.label_column,
        rows_per_file=ns.rows_per_file,
        overwrite=ns.overwrite,
        dim=ns.dim,
        infer_dim=ns.infer_dim,
        storage=_storage(ns),
        progress=_progress,
    )
    _progress_done()
    print(
        f"committed {ns.dest}: {m.rows:,} rows in {len(m.files)} file(s), dim {m.model.dim} {m.model.dtype}, "
        f"{m.quarantined_rows:,} quarantined" + (f" ({m.quarantine_reasons})" if m.quarantined_rows else "")
    )
    return 0


def _open_gallery(ns: argparse.Namespace):
    """``ns.uri`` opened for inspect/validate; an uncommitted prefix's error says which option reads it."""
    from dmu_ray.gallery import Gallery, UncommittedGalleryError

    try:
        return Gallery.open(ns.uri, _storage(ns), allow_uncommitted=ns.allow_uncommitted)
    except UncommittedGalleryError as err:
        if "has no _manifest.json" in str(err):
            raise UncommittedGalleryError(
                f"{err}; pass --allow-uncommitted to read its files anyway"
            ) from None
        raise


def _cmd_gallery_inspect(ns: argparse.Namespace) -> int:
    from dmu_ray.gallery_ops import inspect_gallery

    info = inspect_gallery(_open_gallery(ns))
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    files = info.pop("file_list")
    model = info.pop("model")
    lineage = info.pop("lineage")
    for k, v in info.items():
        print(f"{k:>18}: {v}")
    print(f"{'model':>18}: " + ", ".join(f"{k}={v}" for k, v in model.items()))
    for i, c in enumerate(lineage):
        head = "lineage" if i == 0 else ""
        print(f"{head:>18}: {c['rows']:,} rows in {c['space']}: {c['steps']}")
    shown = files if ns.files else files[:5]
    for f in shown:
        print(f"{'':>18}  {f['path']}" + (f"  {f['rows']:,} rows  {f['bytes']:,} B" if "rows" in f else ""))
    if len(shown) < len(files):
        print(f"{'':>18}  ... {len(files) - len(shown)} more (--files lists all)")
    return 0


def _cmd_gallery_validate(ns: argparse.Namespace) -> int:
    from dmu_ray.gallery_ops import validate_gallery

    g = _open_gallery(ns)
    rep = validate_gallery(
        g, checksums=not ns.no_checksums, duplicates=not ns.no_duplicate_check, progress=_progress
    )
    _progress_done()
    for w in rep.warnings:
        print(f"warning: {w}")
    for p in rep.problems:
        print(f"problem: {p}")
    verdict = "OK" if rep.ok else f"{len(rep.problems)} problem(s)"
    print(f"{rep.uri}: {rep.files_checked} file(s), {rep.rows_checked:,} rows checked: {verdict}")
    return 0 if rep.ok else 1


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    gal = sub.add_parser("gallery", help="import, inspect and validate gallery prefixes")
    gsub = gal.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")

    imp = gsub.add_parser("import", help="import vectors (.npy or Parquet) into a new gallery prefix")
    imp.add_argument("source", help=".npy file (rows are vectors) or Parquet file/folder; local or s3://")
    imp.add_argument("dest", help="new gallery prefix; local or s3://bucket/prefix")
    imp.add_argument("--model-id", required=True, help="id of the model that produced the vectors")
    imp.add_argument("--model-version", default="1")
    imp.add_argument(
        "--dtype", choices=["float16", "float32"], default="float32", help="stored dtype (default float32)"
    )
    imp.add_argument(
        "--normalize", action="store_true", help="L2-normalise the vectors (recorded in dmu.model)"
    )
    imp.add_argument("--ids", help=".npy of ids for a .npy source (default 0..n-1)")
    imp.add_argument("--labels", help=".npy of int labels for a .npy source")
    imp.add_argument("--id-column", default="id", help="Parquet source: column holding ids")
    imp.add_argument("--embedding-column", default="embedding", help="Parquet source: column holding vectors")
    imp.add_argument("--label-column", default="label", help="Parquet source: column holding labels")
    imp.add_argument(
        "--rows-per-file", type=int, default=1_000_000, help="rows per output file (default 1,000,000)"
    )
    imp.add_argument(
        "--dim",
        type=int,
        help="vector dimension when the Parquet embedding column is a variable-length list "
        "(rows of another length are quarantined)",
    )
    imp.add_argument(
        "--infer-dim",
        action="store_true",
        help="variable-length lists without --dim: take the most common length (others are quarantined)",
    )
    imp.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what the destination prefix holds first (refused if it holds the input)",
    )
    _storage_args(imp)
    imp.set_defaults(func=_cmd_gallery_import)

    ins = gsub.add_parser("inspect", help="print rows, dim, dtype, model info and files of a gallery")
    ins.add_argument("uri")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--files", action="store_true", help="list every file")
    ins.add_argument("--allow-uncommitted", action="store_true", help="read a prefix without _manifest.json")
    _storage_args(ins)
    ins.set_defaults(func=_cmd_gallery_inspect)

    val = gsub.add_parser("validate", help="check a gallery end to end (exit 1 on problems)")
    val.add_argument("uri")
    val.add_argument("--no-checksums", action="store_true", help="skip sha256 checks")
    val.add_argument(
        "--no-duplicate-check", action="store_true", help="skip the unique-id check (holds all ids in memory)"
    )
    val.add_argument("--allow-uncommitted", action="store_true", help="check a prefix without _manifest.json")
    _storage_args(val)
    val.set_defaults(func=_cmd_gallery_validate)
