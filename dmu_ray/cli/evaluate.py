"""``dmu-ray embed`` and ``dmu-ray evaluate``: galleries from images, every pairing measured."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import (
    _job_args,
    _job_config,
    _storage_args,
)
from dmu_ray.schema import ConfigError


def _cmd_embed(ns: argparse.Namespace) -> int:
    from dmu_ray.evaluate.config import EmbedConfig
    from dmu_ray.evaluate.embed import run_embed
    from dmu_ray.settings import parse_config, read_config_data

    data = read_config_data(ns.config) if ns.config else {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {ns.config}: expected a mapping of fields")
    for key in ("images", "model", "query_adapter", "output", "dtype", "ray_address", "rows_per_file"):
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
    from dmu_ray.evaluate.config import MatrixConfig, load_evaluate_config
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


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
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
    emb.add_argument(
        "--query-adapter",
        help="query-side adapter (adapter fit, direction: query): map the vectors into the old model's space",
    )
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
