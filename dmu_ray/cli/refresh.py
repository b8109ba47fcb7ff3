"""``dmu-ray refresh``, ``backfill`` and ``backfill-curve``: the gallery upgraded on Ray Data."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import (
    _job_args,
    _job_config,
)


def _cmd_refresh(ns: argparse.Namespace) -> int:
    from dmu_ray.refresh import run_refresh
    from dmu_ray.refresh.config import RefreshConfig

    cfg = _job_config(RefreshConfig, ns)
    result = run_refresh(cfg, progress=not ns.quiet)
    print(result.summary())
    return 0


def _cmd_backfill(ns: argparse.Namespace) -> int:
    from dmu_ray.refresh.backfill import run_backfill
    from dmu_ray.refresh.config import BackfillConfig

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
    from dmu_ray.evaluate.backfill_curve import backfill_curve
    from dmu_ray.refresh.config import BackfillConfig

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


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
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
