"""FastFill's backfill curve on the glyph set: does the uncertainty order beat random order?

    python benchmarks/backfill_curve.py --root out/results --seeds 0 1 2

For each seed: the lifecycle's old model (30% of the classes) and independently trained new model
with the old gallery (all reused when benchmarks/results_table.py already ran under the same
root and seed), then the FastFill transformation trained on Ray Train (method ``fastfill``: old
and new model frozen), then ``dmu-ray backfill-curve``'s computation for the three policies.
Prints each policy's curve area and its ratio to random order's area measured in the same run,
and writes the curves to <root>/eval/backfill-curve-s<seed>/.
"""

from __future__ import annotations

import argparse

import numpy as np

from dmu_ray.config import BackfillConfig
from dmu_ray.evaluate.backfill_curve import backfill_curve
from dmu_ray.lifecycle import LifecycleConfig, _train_cfg, run_lifecycle
from dmu_ray.train.job import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="out/results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs-old", type=int, default=6)
    ap.add_argument("--epochs-new", type=int, default=4)
    ap.add_argument("--epochs-transform", type=int, default=4)
    args = ap.parse_args()
    areas: dict[str, list[float]] = {}
    curves = {}
    for seed in args.seeds:
        lc = LifecycleConfig(
            root=args.root,
            seed=seed,
            methods=["independent"],
            epochs_old=args.epochs_old,
            epochs_new=args.epochs_new,
        )
        run_lifecycle(lc, progress=True)  # the names below are the lifecycle's
        old = f"{args.root}/runs/old-s{seed}/export/model.pt"
        new = f"{args.root}/runs/independent-s{seed}/export/model.pt"
        method = {"name": "fastfill", "old_model": old, "new_model": new, "upgrade_width": lc.upgrade_width}
        ff = run_training(_train_cfg(lc, f"fastfill-s{seed}", "new", method, args.epochs_transform))
        cfg = BackfillConfig(
            source=f"{args.root}/galleries/old-s{seed}",
            images=f"{args.root}/data/{lc.dataset}/gallery",
            module=ff["upgrade_module"],
            new_model=new,
            old_model=old,
            output=f"{args.root}/galleries/unused",
            curve={
                "queries": f"{args.root}/data/{lc.dataset}/query",
                "output": f"{args.root}/eval/backfill-curve-s{seed}",
            },
        )
        res = backfill_curve(cfg)
        curves[seed] = res
        for policy, a in res["area"].items():
            areas.setdefault(policy, []).append(a)
    fractions = curves[args.seeds[0]]["fractions"]
    metric = curves[args.seeds[0]]["metric"]
    print(f"\n{metric} (%) of new queries against the mixed gallery, mean over seeds {args.seeds}\n")
    print("| policy | " + " | ".join(f"{f:.0%}" for f in fractions) + " | area | area / random |")
    print("| --- |" + " ---: |" * (len(fractions) + 2))
    for policy in areas:
        mean = np.mean([curves[s]["curves"][policy] for s in args.seeds], axis=0)
        ratios = [a / r for a, r in zip(areas[policy], areas["random"], strict=True)]
        print(
            f"| {policy} | "
            + " | ".join(f"{100 * v:.1f}" for v in mean)
            + f" | {np.mean(areas[policy]):.4f} +- {np.std(areas[policy]):.4f}"
            + f" | {np.mean(ratios):.3f}x ({', '.join(f'{r:.3f}' for r in ratios)}) |"
        )


if __name__ == "__main__":
    main()
