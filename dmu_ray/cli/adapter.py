"""``dmu-ray adapter fit``: an adapter between two frozen models, from paired vectors, gated
without labels."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import _job_args, _job_config


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
