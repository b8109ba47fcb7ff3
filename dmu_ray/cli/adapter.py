"""``dmu-ray adapter fit``: an adapter between two frozen models, from paired vectors, gated
without labels."""

from __future__ import annotations

import argparse
import sys

from dmu_ray.cli.common import _job_args, _job_config, _storage, _storage_args


def _cmd_adapter_fit(ns: argparse.Namespace) -> int:
    from dmu_ray.adapters.config import AdapterFitConfig
    from dmu_ray.adapters.job import run_adapter_fit

    cfg = _job_config(AdapterFitConfig, ns)
    out = run_adapter_fit(cfg, progress=not ns.quiet)
    gate = out["gate"]
    share = gate["share"][gate["strategy"]]
    print(
        f"adapter {out['adapter']['ident']} ({out['direction']} side) -> {out['adapter']['uri']}: "
        f"{gate['strategy']} retrieves {share:.1%} of a full re-embedding's top-{gate['k']}"
        + (
            ""
            if gate["passed"] is None
            else f"; gate {'passed' if gate['passed'] else 'FAILED'} (min {gate['min_share']})"
        )
    )
    if gate.get("caution"):
        print(f"caution: {gate['caution']}", file=sys.stderr)
    return 1 if gate["passed"] is False else 0


def _cmd_adapter_pairs(ns: argparse.Namespace) -> int:
    from dmu_ray.adapters.sample import make_pairs
    from dmu_ray.ray_session import ensure_ray
    from dmu_ray.settings import ActorPoolConfig

    pool = ActorPoolConfig(batch_size=ns.batch_size, max_actors=ns.max_actors, num_cpus=ns.num_cpus)
    ensure_ray(ns.ray_address)
    made = make_pairs(
        ns.images,
        ns.old_model,
        ns.new_model,
        ns.output,
        sample=ns.sample,
        seed=ns.seed,
        storage=_storage(ns),
        pool=pool,
        progress=not ns.quiet,
    )
    o, n = made["old"], made["new"]
    print(
        f"committed {ns.output}/old ({o.rows:,} rows, {o.model.dim}-d, {o.model.model_id}) and {ns.output}/new "
        f"({n.rows:,} rows, {n.model.dim}-d, {n.model.model_id}): old_gallery and new_gallery of adapter fit"
    )
    return 0


def _cmd_adapter_export(ns: argparse.Namespace) -> int:
    from dmu_ray.adapters.export import export_arrays, export_torchscript

    if ns.format == "npz":
        out, what = export_arrays(ns.adapter, ns.output, _storage(ns)), "the arrays (npz)"
    else:
        out, what = export_torchscript(ns.adapter, ns.output, _storage(ns)), "TorchScript"
    side = (
        "new-model queries -> the old space"
        if out["direction"] == "query"
        else "old vectors -> the new space"
    )
    print(
        f"wrote {ns.output}: {what} of {out['of']} ({side}), {out['in_dim']}-d -> {out['out_dim']}-d; "
        "normalise its output to unit length before the search"
    )
    return 0


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    ad = sub.add_parser(
        "adapter",
        help="adapters between two frozen models, fitted on paired vectors (no retraining, no labels)",
    )
    asub = ad.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")
    fit = asub.add_parser(
        "fit",
        help="fit an old->new (gallery) or new->old (query) adapter from two galleries sharing ids",
        description="Join two committed galleries of the same items (old-model and new-model vectors) on "
        "their ids on Ray Data, fit an adapter (closed forms from the pairs' sufficient statistics: orthogonal "
        "Procrustes, affine least squares; or a residual MLP trained on Ray Train, optionally with FastFill's "
        "uncertainty head for backfill --policy uncertainty), write OUTPUT/adapter.pt (refresh and backfill apply a "
        "gallery-side one), and gate it on the held-out pairs without labels: the share of a full "
        "re-embedding's top-k each strategy retrieves, partial backfills included (OUTPUT/gate.json, gate.md, gate.png). Exit 1 when "
        "gate.min_share is set and not reached.",
    )
    _job_args(fit, "adapter config (YAML); see configs/adapter_local.yaml")
    fit.set_defaults(func=_cmd_adapter_fit)
    pairs = asub.add_parser(
        "pairs",
        help="embed a seeded sample of an image set with both models: the two galleries adapter fit joins",
        description="Draw SAMPLE ids of an image data set part or an id,uri[,label] table (seeded by id, the "
        "same items whatever the order of the rows), embed those images with the old and with the new model "
        "on Ray Data, and commit OUTPUT/old and OUTPUT/new (galleries sharing ids, float32).",
    )
    pairs.add_argument(
        "--images", required=True, help="image part folder (out/data/glyphs/gallery) or id,uri table"
    )
    pairs.add_argument("--old-model", required=True, help="old model artefact (model import or train)")
    pairs.add_argument("--new-model", required=True, help="new model artefact")
    pairs.add_argument("--output", required=True, help="new folder: OUTPUT/old and OUTPUT/new")
    pairs.add_argument("--sample", type=int, help="images to pair (default: all)")
    pairs.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    pairs.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    pairs.add_argument("--max-actors", type=int, default=2, help="embedding actors at most (default 2)")
    pairs.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    pairs.add_argument(
        "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)"
    )
    pairs.add_argument("--quiet", action="store_true", help="no progress output")
    _storage_args(pairs)
    pairs.set_defaults(func=_cmd_adapter_pairs)
    exp = asub.add_parser(
        "export",
        help="write a fitted adapter as a TorchScript file or its arrays (to put behind a serving encoder)",
        description="Script the adapter of ADAPTER (an artefact from adapter fit, or any upgrade module), "
        "check the script gives the artefact's outputs, and write it to OUTPUT (local or s3://). With "
        "--format npz, a linear adapter's arrays instead (weight and bias, or a reduced-rank map's left, "
        "right and bias; x @ weight + bias), for any BLAS: at batch 1 they skip torch's per-call cost.",
    )
    exp.add_argument("adapter", help="adapter artefact (OUTPUT/adapter.pt of adapter fit)")
    exp.add_argument("output", help="file to write (e.g. query_adapter.ts, or query_adapter.npz)")
    exp.add_argument(
        "--format",
        choices=["torchscript", "npz"],
        default="torchscript",
        help="torchscript (default; any adapter) or npz (a linear adapter's float32 arrays)",
    )
    _storage_args(exp)
    exp.set_defaults(func=_cmd_adapter_export)
