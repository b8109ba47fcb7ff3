"""Three (or N) generations over several seeds: the query-model x gallery-state matrix, mean and
spread over seeds (docs/results.md, issue 14).

    python benchmarks/generations.py --seeds 0 1 2 --root out/gen3-glyphs            # ~5 min a seed
    python benchmarks/generations.py --dataset fonts --seeds 0 --root out/gen3-fonts  # many-class set

Each seed is ``dmu-ray demo --generations N`` (re-running reuses finished stages); the table is
read back from each seed's ``eval/generations-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dmu_ray.lifecycle import LifecycleConfig, run_lifecycle
from dmu_ray.storage import read_bytes, resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="out/gen3-glyphs")
    ap.add_argument("--dataset", default="glyphs", choices=["glyphs", "digits", "fonts"])
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--method", default="dmu", help="generation_method (a lifecycle variant)")
    ap.add_argument("--epochs-old", type=int, default=6)
    ap.add_argument("--epochs-new", type=int, default=6)
    ap.add_argument("--report-only", action="store_true", help="only read back finished seeds")
    a = ap.parse_args()
    runs = []
    for seed in a.seeds:
        lc = LifecycleConfig(
            root=a.root,
            dataset=a.dataset,
            generations=a.generations,
            generation_method=a.method,
            epochs_old=a.epochs_old,
            epochs_new=a.epochs_new,
            seed=seed,
        )
        if not a.report_only:
            run_lifecycle(lc)
        runs.append(json.loads(read_bytes(resolve(a.root).join("eval", f"generations-s{seed}.json"))))
    cells = [r["cells"] for r in runs]
    queries = list(cells[0])
    states = list(cells[0][queries[0]])
    print(
        f"\n{runs[0]['metric']} (%), mean ± sd over seeds {a.seeds}; rows: query model, columns: gallery state\n"
    )
    print("| query \\ gallery | " + " | ".join(states) + " |")
    print("| --- |" + " ---: |" * len(states))
    for q in queries:
        vals = []
        for g in states:
            x = np.array([100 * c[q][g] for c in cells])
            vals.append(f"{x.mean():.2f} ± {x.std(ddof=1) if len(x) > 1 else 0:.2f}")
        print(f"| {q} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
