"""``dmu-ray demo``: the whole upgrade lifecycle."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import (
    _literal_choices,
    _storage,
    _storage_args,
)


def _cmd_demo(ns: argparse.Namespace) -> int:
    from dmu_ray.evaluate.report import markdown_table
    from dmu_ray.lifecycle import LifecycleConfig, run_lifecycle
    from dmu_ray.settings import load_config, parse_config

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
    if "plan" in summary:
        p = summary["plan"]
        print(
            f"\nThe plan for a {lc.plan_rows:,}-row gallery like the demo's, upgraded to {p['method']}'s model on "
            f"{lc.plan_workers} workers like this machine's (figures measured here by dmu-ray bench; prices are "
            f"the demo's examples, {lc.plan_prices.cpu_worker_hour:g} {lc.plan_prices.currency} per CPU worker-hour):"
        )
        for s in p["sentences"]:
            print(f"- {s}")
        print(f"(plan: {p['files']['plan.md']})")
    return 0


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    from dmu_ray.lifecycle import VARIANTS, LifecycleConfig

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
