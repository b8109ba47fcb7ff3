"""``dmu-ray bench`` and ``dmu-ray plan``: what each upgrade path costs on this cluster, and buys."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import _job_args, _job_config


def _cmd_bench(ns: argparse.Namespace) -> int:
    from dmu_ray.plan.bench import run_bench
    from dmu_ray.plan.config import BenchConfig

    cfg = _job_config(BenchConfig, ns)
    out = run_bench(cfg, progress=not ns.quiet)
    w = out["workers"]
    print(
        f"bench on {w['count']} {w['kind'].upper()} worker(s) ({w['num_cpus']:g} CPU, {w['num_gpus']:g} GPU each) -> {out['file']}"
    )
    for name, f in out["figures"].items():
        extra = f" ({f['us_per_query']:.1f} us per query, one at a time)" if name == "query" else ""
        print(f"  {name}: {f['per_worker']:,.1f} {f['unit']} per worker{extra}")
    return 0


def _cmd_plan(ns: argparse.Namespace) -> int:
    from dmu_ray.plan.config import PlanConfig
    from dmu_ray.plan.job import run_plan
    from dmu_ray.settings import load_config

    out = run_plan(load_config(PlanConfig, ns.config))
    for s in out["sentences"]:
        print(f"- {s}")
    print(f"plan: {out['files']['plan.md']} (also plan.json, plan.png)")
    return 0


def add_parser(sub) -> None:
    """Add ``bench`` and ``plan`` to the ``dmu-ray`` sub-parsers ``sub``."""
    b = sub.add_parser(
        "bench",
        help="measure, on this cluster, what a plan needs: embed, refresh, query-adapter and training throughputs",
        description="Times the jobs' own per-item code (embedding actor, refresh file upgrader, query "
        "adapter, train step) on samples of your artefacts and data, on workers.count Ray actors with "
        "the resources you ask for; writes <output>/bench.json with the cluster's description.",
    )
    _job_args(b, "bench config (YAML/JSON, kind: bench; see configs/bench_local.yaml)")
    b.set_defaults(func=_cmd_bench)
    p = sub.add_parser(
        "plan",
        help="every upgrade path's worker-hours, wall time, money and measured quality; Pareto front",
        description="Reads a bench.json, prices per worker-hour, the gallery's size and the quality "
        "evidence already produced (eval.json, gate.json, backfill_curve.json); writes plan.json, "
        "plan.md and plan.png (cost against quality, Pareto front marked). Runs no cluster work.",
    )
    p.add_argument(
        "--config", required=True, help="plan config (YAML/JSON, kind: plan; see configs/plan_local.yaml)"
    )
    p.set_defaults(func=_cmd_plan)
