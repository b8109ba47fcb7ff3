"""What an off-the-shelf adapter costs (issue 36's performance goals), measured in one run.

    python benchmarks/adapter_costs.py                     # 1M pairs x 256 float16, 1280-d queries
    python benchmarks/adapter_costs.py --pairs 200000      # quicker

1. The closed-form fit against an I/O-only read of the same pair files on the same pool: two
   galleries of N items sharing ids (old d, new d) are generated; the I/O-only pass is one Ray task
   per gallery file (1 CPU each, as the join's) reading its ids and vectors; the fit is
   ``adapter fit``'s join and the Procrustes solve. With ``--layout aligned`` (the default) file
   ``i`` of both galleries holds the same ids, as when dmu-ray embeds one listing with both models:
   the join is one pass, file pair by file pair; with ``--layout shuffled`` the new gallery holds
   the ids in another order: the two-pass hash join (bucket, then join). A warm-up read starts
   Ray's workers first; then read and fit alternate ``--repeats`` times (medians). Goal: fit >=
   0.9x the read. ``--num-gpus`` gives each join task that share of a GPU, where the statistics'
   products then run (``adapter fit``'s ``num_gpus``).
2. The query-side adapter's added latency per query at batch 1 on one CPU thread, at 1280-d
   (EfficientNet-Lite2's width): the fitted LinearMap against a bare ``torch.mm`` and a numpy
   matmul of the same shape; the affine adapter of rank r (stored as its factors) for each of
   ``--ranks``, through torch and as the same two products in numpy; the MLP adapter (width 1024)
   beside them. Goal (Drift-Adapter's figure): under 10 microseconds.
The refresh with a linear adapter against the I/O-only pass is ``refresh_throughput.py --module
linear``. Not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from dmu_ray.adapters.pairs import join_pairs
from dmu_ray.adapters.stats import procrustes
from dmu_ray.gallery import Gallery, GalleryWriter, ModelInfo, embedding_array
from dmu_ray.models.linear_map import LinearMap
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.ray_session import ensure_ray
from dmu_ray.storage import resolve


def make_gallery(
    path: str, rows: int, dim: int, model: str, rows_per_file: int, seed: int, shuffled: bool = False
) -> Gallery:
    """Unit vectors of ids 0..rows-1, in that order (or, ``shuffled``, in a seeded random order)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(rows) if shuffled else np.arange(rows)
    with GalleryWriter(resolve(path), ModelInfo(model_id=model, dim=dim), rows_per_file=rows_per_file) as w:
        for start in range(0, rows, 250_000):
            n = min(250_000, rows - start)
            m = rng.standard_normal((n, dim), dtype=np.float32)
            m /= np.linalg.norm(m, axis=1, keepdims=True)
            w.write(
                pa.table({"id": ids[start : start + n], "embedding": embedding_array(m.astype(np.float16))})
            )
    return Gallery.open(path)


def _read_file(task: dict) -> int:
    """The I/O-only pass of one gallery file: its ids and vectors read, nothing else."""
    g, rel = task["gallery"], task["file"]
    return g.parquet_file(rel).read(columns=["id", "embedding"]).num_rows


def read_only(galleries: list[Gallery]) -> float:
    import ray

    remote = ray.remote(num_cpus=1)(_read_file)
    t0 = time.perf_counter()
    rows = sum(ray.get([remote.remote({"gallery": g, "file": f}) for g in galleries for f in g.files]))
    return rows / (time.perf_counter() - t0)


def fit(old: Gallery, new: Gallery, work: str, bucket_rows: int, num_gpus: float) -> tuple[float, float]:
    t0 = time.perf_counter()
    counts, stats = join_pairs(
        old,
        new,
        resolve(os.path.join(work, "_pairs")),
        resolve(os.path.join(work, "holdout")),
        direction="gallery",
        holdout=0.01,
        seed=0,
        bucket_rows=bucket_rows,
        num_gpus=num_gpus,
    )
    t_join = time.perf_counter() - t0
    procrustes(stats)
    seconds = time.perf_counter() - t0
    return (old.num_rows + new.num_rows) / seconds, t_join / seconds


def _rates(xs: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in xs)


def per_call_us(fn, x, reps: int) -> float:
    for _ in range(200):
        fn(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rows-per-file", type=int, default=250_000)
    ap.add_argument("--bucket-rows", type=int, default=1_000_000)
    ap.add_argument("--query-dim", type=int, default=1280)
    ap.add_argument("--reps", type=int, default=20_000)
    ap.add_argument("--layout", choices=["aligned", "shuffled"], default="aligned")
    ap.add_argument(
        "--ranks", type=int, nargs="+", default=[32, 64, 128], help="ranks of the factored adapter"
    )
    ap.add_argument("--repeats", type=int, default=3, help="read and fit passes, alternated (medians)")
    ap.add_argument(
        "--num-gpus",
        type=float,
        default=0.0,
        help="GPU share per join task (adapter fit's num_gpus; e.g. 1/cores on a 1-GPU node): the statistics on the GPU",
    )
    args = ap.parse_args()

    cpus = os.cpu_count() or 2
    work = tempfile.mkdtemp(prefix="dmu-adapter-bench-")
    try:
        print(
            f"# 1. fit vs read: {args.pairs:,} pairs x {args.dim}-d float16, files of {args.rows_per_file:,}, "
            f"{args.layout} layout, {cpus} cores"
        )
        old = make_gallery(os.path.join(work, "old"), args.pairs, args.dim, "o", args.rows_per_file, 0)
        new = make_gallery(
            os.path.join(work, "new"),
            args.pairs,
            args.dim,
            "n",
            args.rows_per_file,
            1,
            args.layout == "shuffled",
        )
        ensure_ray(num_cpus=cpus)
        read_only([old, new])  # warm-up: Ray's worker processes started and their imports done
        reads, rates = [], []
        for rep in range(args.repeats):  # alternated, so neither pass gets the box's warmer moments
            reads.append(read_only([old, new]))
            rate, join_share = fit(old, new, os.path.join(work, f"fit{rep}"), args.bucket_rows, args.num_gpus)
            rates.append(rate)
        read, rate = float(np.median(reads)), float(np.median(rates))
        print(f"I/O-only read of both galleries        {read:>12,.0f} rows/s   (each pass: {_rates(reads)})")
        print(
            f"closed-form fit (join + statistics)    {rate:>12,.0f} rows/s   {rate / read:.2f}x the read "
            f"(goal >= 0.9x; the join is {join_share:.0%} of it; each pass: {_rates(rates)})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    d = args.query_dim
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    w = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    lin = LinearMap.from_arrays(w, np.zeros(d, np.float32))
    mlp = UpgradeModule(d, d, 1024, 1, skip_linear=True).fused_for_inference()
    x = torch.from_numpy(rng.standard_normal((1, d)).astype(np.float32))
    wt = torch.from_numpy(w)
    xn = x.numpy()
    low = {}
    with torch.inference_mode():
        bare = per_call_us(lambda v: torch.mm(v, wt), x, args.reps)
        npy = per_call_us(lambda v: v @ w, xn, args.reps)
        adapted = per_call_us(lin, x, args.reps)
        normed = per_call_us(lambda v: torch.nn.functional.normalize(lin(v), dim=1), x, args.reps)
        mlp_us = per_call_us(mlp, x, max(1, args.reps // 4))
        for r in args.ranks:  # the affine fit of rank r, stored factored (w's leading r directions)
            m = LinearMap.from_arrays(w[:, :r] @ w[:r], np.zeros(d, np.float32), rank=r)
            a, b, c = (t.detach().numpy() for t in (m.left, m.right, m.bias))
            low[r] = (
                per_call_us(m, x, args.reps),
                per_call_us(lambda v, a=a, b=b, c=c: v @ a @ b + c, xn, args.reps),
            )
    print(f"# 2. query-side adapter, batch 1, {d}-d, 1 CPU thread ({args.reps:,} calls)")
    print(f"bare torch.mm (1x{d} @ {d}x{d})          {bare:8.1f} us/query")
    print(f"numpy matmul, same shape                 {npy:8.1f} us/query   {npy / bare:.2f}x torch.mm")
    print(
        f"LinearMap adapter (x W + b)              {adapted:8.1f} us/query   {adapted / bare:.2f}x torch.mm"
    )
    print(f"  with the unit-length normalisation     {normed:8.1f} us/query   {normed / bare:.2f}x torch.mm")
    for r, (t_us, n_us) in low.items():
        print(
            f"rank-{r:<4} affine adapter (factored)    {t_us:8.1f} us/query   {t_us / bare:.2f}x torch.mm; "
            f"the same products in numpy {n_us:.1f} us"
        )
    print(f"mlp adapter (width 1024, fused)          {mlp_us:8.1f} us/query   {mlp_us / bare:.2f}x torch.mm")
    print("goal (Drift-Adapter's figure): under 10 us added per query")


if __name__ == "__main__":
    main()
