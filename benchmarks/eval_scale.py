"""Evaluation at scale: one compatibility-matrix pairing over a 1M-vector gallery, timed.

    python benchmarks/eval_scale.py                        # 1M x 128 gallery, 10k queries
    python benchmarks/eval_scale.py --gallery 200000       # quicker

Builds a labelled gallery and query set (class centres on the unit sphere plus noise), then in
the same run times:
1. the floor: one exact faiss search (IndexFlatIP) of the queries for the top 100, nothing else;
2. ``evaluate_pairing`` (retrieval + verification metrics, as ``dmu-ray evaluate`` runs for each
   pairing) with exact search (the default up to ``exact_max``), IVF-Flat and IVF-PQ;
and prints seconds, the ratio to the floor and the recall each approximate index reports against
exact search. Not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from dmu_ray.evaluate.matrix import MetricsConfig, evaluate_pairing
from dmu_ray.evaluate.search import SearchConfig


def labelled(
    n: int, centres: np.ndarray, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=20_000)
    ap.add_argument("--noise", type=float, default=0.09, help="per-dimension noise around a class centre")
    ap.add_argument("--pq-m", type=int, default=32, help="IVF-PQ sub-quantizers")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    g, gl = labelled(args.gallery, centres, args.noise, rng)
    q, ql = labelled(args.queries, centres, args.noise, rng)
    print(
        f"# gallery {args.gallery:,} x {args.dim}, {args.queries:,} queries, {args.classes:,} classes, "
        f"{os.cpu_count()} cores, faiss {faiss.__version__}; generated in {time.perf_counter() - t0:.1f}s"
    )

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(g)
    index.search(q, 100)
    floor = time.perf_counter() - t0
    print(f"{'exact top-100 search only (floor)':<44} {floor:>8.1f} s   1.00x")

    mcfg = MetricsConfig()
    for what, scfg in (
        ("evaluate_pairing, exact", SearchConfig(exact_max=args.gallery)),
        ("evaluate_pairing, IVF-Flat", SearchConfig(exact_max=args.gallery - 1)),
        (
            f"evaluate_pairing, IVF-PQ m={args.pq_m}",
            SearchConfig(exact_max=args.gallery - 1, pq_m=args.pq_m),
        ),
    ):
        t0 = time.perf_counter()
        r = evaluate_pairing("bench", q, ql, g, gl, mcfg, scfg)
        s = time.perf_counter() - t0
        recall = r.get("search_recall_vs_exact")
        extra = f"   recall@100 vs exact {recall:.3f}" if recall is not None else ""
        print(
            f"{what:<44} {s:>8.1f} s   {s / floor:.2f}x   mAP@100 {100 * r['mAP@100']:.2f}  "
            f"R@1 {100 * r['R@1']:.2f}  [{r['index']}]{extra}"
        )


if __name__ == "__main__":
    main()
