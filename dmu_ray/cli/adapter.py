"""``dmu-ray adapter fit``: an adapter between two frozen models, from paired vectors, gated
without labels."""

from __future__ import annotations

import argparse

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
    return 1 if gate["passed"] is False else 0


def _cmd_adapter_export(ns: argparse.Namespace) -> int:
    from dmu_ray.adapters.export import export_torchscript

    out = export_torchscript(ns.adapter, ns.output, _storage(ns))
    side = (
        "new-model queries -> the old space"
        if out["direction"] == "query"
        else "old vectors -> the new space"
    )
    print(
        f"wrote {ns.output}: TorchScript of {out['of']} ({side}), {out['in_dim']}-d -> {out['out_dim']}-d; "
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
        "their ids on Ray Data, fit a closed-form adapter (orthogonal Procrustes or affine least squares) "
        "from the pairs' sufficient statistics, write OUTPUT/adapter.pt (refresh and backfill apply a "
        "gallery-side one), and gate it on the held-out pairs without labels: the share of a full "
        "re-embedding's top-k each strategy retrieves (OUTPUT/gate.json, gate.md). Exit 1 when "
        "gate.min_share is set and not reached.",
    )
    _job_args(fit, "adapter config (YAML); see configs/adapter_local.yaml")
    fit.set_defaults(func=_cmd_adapter_fit)
    exp = asub.add_parser(
        "export",
        help="write a fitted adapter as a TorchScript file (to put behind a serving encoder)",
        description="Script the adapter of ADAPTER (an artefact from adapter fit, or any upgrade module), "
        "check the script gives the artefact's outputs, and write it to OUTPUT (local or s3://).",
    )
    exp.add_argument("adapter", help="adapter artefact (OUTPUT/adapter.pt of adapter fit)")
    exp.add_argument("output", help="TorchScript file to write (e.g. query_adapter.ts)")
    _storage_args(exp)
    exp.set_defaults(func=_cmd_adapter_export)
