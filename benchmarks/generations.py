"""Three (or N) generations over several seeds: the query-model x gallery-state matrix, mean and
spread over seeds (docs/results.md, issue 14).

    python benchmarks/generations.py --seeds 0 1 2 --root out/gen3-glyphs            # ~5 min a seed
    python benchmarks/generations.py --dataset fonts --seeds 0 1 2 --root out/gen3-fonts  # ~25 min a seed

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
    ap.add_argument(
        "--by-classes",
        action="store_true",
        help="also: v2 queries on v1's gallery, stored and through psi_12, split by whether v2 trained on "
        "the query's class",
    )
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
    if a.by_classes:
        by_classes(a.root, a.dataset, a.seeds)


def by_classes(root: str, dataset: str, seeds: list[int]) -> None:
    """mAP@100 of v2's queries on v1's gallery (stored, and refreshed through psi_12), for the
    query classes v2 (and so psi_12) trained on and for those it never saw. In-process, no Ray."""
    import pyarrow.parquet as pq

    from dmu_ray.config import StorageConfig
    from dmu_ray.data.images import read_dataset_info
    from dmu_ray.evaluate.matrix import MetricsConfig, evaluate_pairing
    from dmu_ray.gallery import Gallery, embedding_matrix
    from dmu_ray.models.artifact import load_artifact
    from dmu_ray.models.inference import _EmbedActor

    data = f"{root}/data/{dataset}"
    info = read_dataset_info(data)
    queries = pq.read_table(f"{data}/query")
    mcfg = MetricsConfig(protocols=["retrieval"])
    print("\nv2 queries on v1's gallery, mAP@100 (%), by whether v2 / psi_12 trained on the query's class\n")
    print("| seed | seen: stored | seen: through psi_12 | unseen: stored | unseen: through psi_12 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for seed in seeds:
        v2 = f"{root}/runs/v2-s{seed}/export/model.pt"
        seen = np.asarray(load_artifact(v2).card.trained_classes)
        q = _EmbedActor(v2, StorageConfig(), info.image_size, info.channels, threads=2, gpu=False)(queries)
        row = []
        for part in (seen, ~seen):
            mask = part[q["label"]]
            for name in (f"v1-s{seed}", f"v1-to-v2-s{seed}"):
                t = Gallery.open(f"{root}/galleries/{name}").read(columns=["id", "label", "embedding"])
                g = embedding_matrix(t.column("embedding")).astype(np.float32)
                r = evaluate_pairing(
                    name, q["embedding"][mask], q["label"][mask], g, t.column("label").to_numpy(), mcfg
                )
                row.append(f"{100 * r['mAP@100']:.1f}")
        print(f"| {seed} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
