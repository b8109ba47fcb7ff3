"""Backfill's re-embedding throughput: images/s through dmu-ray's Ray Data embedding (what
``dmu-ray backfill`` runs on the rows it re-embeds) against a plain decode + forward loop of the
same model in one process, in the same run (issue 39).

    python benchmarks/backfill_throughput.py                       # glyphs at 64 px, a ResNet-18
    python benchmarks/backfill_throughput.py --backbone small      # dmu-ray's small CNN

Builds under --workdir (default: a temp dir) the glyph set at --size px and an embedding model of
--backbone (random weights: the cost does not depend on their values), then times:
1. plain loop: pyarrow read of the gallery part -> DecodeBatch (the card's preprocessing) ->
   forward, in batches, torch on every core (the yardstick);
2. ``embed_images`` (models/inference.py, the backfill's and evaluate's embedding) with 1 actor
   x 1 CPU, then --actors actors sharing what the node's CPUs leave after one for the Parquet
   reads that feed them (1 CPU each at most; 2 actors on 2 cores get 0.5: a pool that holds every
   CPU starves its reads, and dmu-ray refuses it). Each timed call includes its actor pool's
   start, as a backfill's does (one torch thread per actor);
and prints images/s, per worker, and the ratio to the plain loop (and per core). Not a test.

Attribution, printed below the rates: the plain loop on one thread (the per-core yardstick,
measured, not divided), split into its decode and its forward; the fixed cost of a call
(``embed_images`` of a one-batch part with the same pool: Ray Data's start, the actors' start
and the model's load), and of it the share of the same pipeline with an actor that only passes
ids through (Ray Data's start and the actors' processes, no torch, no model); and each pool's rate
once that fixed cost is taken off.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch


class _PassIds:
    """An actor that does nothing: what Ray Data's pipeline and the actor processes cost alone."""

    def __call__(self, batch):  # noqa: ANN001, ANN204  (a pyarrow Table in, a dict out)
        return {"id": batch.column("id").to_numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbone", default="resnet18", choices=["small", "resnet18", "resnet34", "resnet50"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--actors", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--part", default="train", help="the data set part embedded (train: 5,736 glyph images)")
    a = ap.parse_args()

    import ray.data

    from dmu_ray.data.images import DecodeBatch, read_dataset_info
    from dmu_ray.data.importers import import_glyphs
    from dmu_ray.models.artifact import build_embedding_model, load_artifact, save_embedding_model
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead
    from dmu_ray.models.inference import embed_images
    from dmu_ray.ray_session import collect_batches, ensure_ray, map_on_pool
    from dmu_ray.settings import ActorPoolConfig

    work = a.workdir or tempfile.mkdtemp(prefix="dmu-backfill-bench-")
    data = os.path.join(work, "glyphs")
    if not os.path.exists(os.path.join(data, "_dataset.json")):
        import_glyphs(data, image_size=a.size)
    info = read_dataset_info(data)
    model_uri = os.path.join(work, f"{a.backbone}.pt")
    torch.manual_seed(0)
    save_embedding_model(
        model_uri,
        EmbeddingModel(a.backbone, 128, info.channels),
        MarginHead(128, info.num_classes),
        {"id": "bench"},
    )
    part = os.path.join(data, a.part)
    cores = os.cpu_count() or 2
    print(f"# glyphs {a.part}, {a.size} px, {a.backbone}, batch {a.batch}, {cores} cores")

    # 1. the plain loop: read, decode, forward, in one process on every core, then on one thread
    art = load_artifact(model_uri)
    model = build_embedding_model(art)[0].eval()
    pre = art.card.preprocessing
    decode = DecodeBatch(info.image_size, info.channels, mean=pre.mean, std=pre.std, out_size=pre.size)

    def plain_loop(threads: int) -> tuple[float, float, float]:
        """(images/s, decode s, forward s) of read -> decode -> forward on ``threads`` threads."""
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        table = pads.dataset(part, format="parquet").to_table(columns=["id", "image", "label"])
        dec = fwd = 0.0
        with torch.inference_mode():
            for i in range(0, table.num_rows, a.batch):
                t1 = time.perf_counter()
                x = torch.from_numpy(decode(table.slice(i, a.batch))["image"])
                t2 = time.perf_counter()
                model(x)
                dec, fwd = dec + t2 - t1, fwd + time.perf_counter() - t2
        return table.num_rows / (time.perf_counter() - t0), dec, fwd

    plain, _, _ = plain_loop(cores)
    print(f"{'plain loop (1 process, ' + str(cores) + ' threads)':<44} {plain:>9,.1f} images/s   1.00x")
    one, dec1, fwd1 = plain_loop(1)
    print(f"{'plain loop (1 process, 1 thread)':<44} {one:>9,.1f} images/s   {one / plain:.2f}x")

    # a one-batch part of the same data set: what a call costs before its first image
    tiny = os.path.join(data, "_bench_one_batch")
    os.makedirs(tiny, exist_ok=True)
    first = pads.dataset(part, format="parquet").head(a.batch, columns=["id", "image", "label"])
    pq.write_table(first, os.path.join(tiny, "part-00000.parquet"))

    ensure_ray(num_cpus=cores)
    fixed: dict[int, float] = {}
    bare: dict[int, float] = {}
    rates: dict[int, float] = {}
    n = 0
    for actors in sorted({1, a.actors}):
        cpus = min(1.0, (cores - 1) / actors) if actors > 1 else 1.0  # leave a CPU for the reads
        pool = ActorPoolConfig(min_actors=actors, max_actors=actors, num_cpus=cpus, batch_size=a.batch)
        embed_images(part, model_uri, pool=pool)  # warm: the first run's imports and caches
        t0 = time.perf_counter()
        embed_images(tiny, model_uri, pool=pool)
        fixed[actors] = time.perf_counter() - t0
        t0 = time.perf_counter()
        collect_batches(map_on_pool(ray.data.read_parquet(tiny).select_columns(["id"]), _PassIds, pool, {}))
        bare[actors] = time.perf_counter() - t0
        t0 = time.perf_counter()  # the timed run includes its pool's start, as every backfill's does
        ids, _, _ = embed_images(part, model_uri, pool=pool)
        wall, n = time.perf_counter() - t0, len(ids)
        rate = rates[actors] = n / wall
        print(
            f"{f'embed_images, {actors} actor(s) x {cpus:g} CPU':<44} {rate:>9,.1f} images/s   {rate / plain:.2f}x plain"
            f"   {rate / actors:,.1f} per worker ({rate / actors / one:.2f}x the plain loop on 1 thread)"
        )

    print(f"\n# attribution ({n:,} images)")
    print(
        f"plain loop on 1 thread: decode {dec1:.1f} s ({dec1 / (dec1 + fwd1):.0%}), forward {fwd1:.1f} s "
        f"({fwd1 / (dec1 + fwd1):.0%}) of {n / one:.1f} s"
    )
    for actors, rate in rates.items():
        steady = n / max(n / rate - fixed[actors], 1e-9)
        print(
            f"{actors} actor(s): a call's fixed cost (a one-batch part) {fixed[actors]:.1f} s of {n / rate:.1f} s "
            f"(the same pipeline with a do-nothing actor {bare[actors]:.1f} s); "
            f"after it {steady:,.1f} images/s = {steady / plain:.2f}x the plain loop, "
            f"{steady / actors / one:.2f}x the 1-thread loop per actor"
        )


if __name__ == "__main__":
    main()
