"""The results table of docs/results.md: methods x pairings on the glyph set, over several seeds.

    python benchmarks/results_table.py                          # 3 seeds, all variants
    python benchmarks/results_table.py --seeds 0 --epochs-new 2  # a quick look
    python benchmarks/results_table.py --split open-class --methods independent bct unibct \
        --root out/results-open-class                            # UniBCT's open-set protocol

For each seed: one lifecycle (old model on 30% of the classes, then every new-model variant, the
gallery refresh with each upgrade module, the evaluation). Prints mean +- std of mAP@100 and R@1
per variant and pairing as Markdown, and writes the raw numbers to <root>/results.json.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dmu_ray.lifecycle import VARIANTS, LifecycleConfig, run_lifecycle

PAIRINGS = ["old/old", "new/old", "new/upgraded", "new/new"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="out/results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS))
    ap.add_argument("--epochs-old", type=int, default=6)
    ap.add_argument("--epochs-new", type=int, default=4)
    ap.add_argument(
        "--split",
        default="extended-class",
        choices=["extended-class", "extended-data", "open-class", "open-data"],
        help="split protocol (use a separate --root per protocol: run names do not include it)",
    )
    args = ap.parse_args()
    runs = {}
    for seed in args.seeds:
        lc = LifecycleConfig(
            root=args.root,
            seed=seed,
            methods=args.methods,
            epochs_old=args.epochs_old,
            epochs_new=args.epochs_new,
            split=args.split,
        )
        runs[seed] = run_lifecycle(lc, progress=True)
    with open(f"{args.root}/results.json", "w") as f:
        json.dump(runs, f, indent=2)
    for metric in ("mAP@100", "R@1"):
        print(f"\n{metric} (%), {args.split}, mean +- std over seeds {args.seeds}\n")
        print("| method | " + " | ".join(PAIRINGS) + " |")
        print("| --- |" + " ---: |" * len(PAIRINGS))
        for m in args.methods:
            cells = []
            for p in PAIRINGS:
                vals = [
                    100 * runs[s][m]["pairings"][p][metric] for s in args.seeds if p in runs[s][m]["pairings"]
                ]
                cells.append(f"{np.mean(vals):.2f} +- {np.std(vals):.2f}" if vals else "-")
            print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
