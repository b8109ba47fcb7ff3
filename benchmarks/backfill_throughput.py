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
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow.dataset as pads
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbone", default="resnet18", choices=["small", "resnet18", "resnet34", "resnet50"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--actors", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--part", default="train", help="the data set part embedded (train: 5,736 glyph images)")
    a = ap.parse_args()

    from dmu_ray.data.images import DecodeBatch, read_dataset_info
    from dmu_ray.data.importers import import_glyphs
    from dmu_ray.models.artifact import build_embedding_model, load_artifact, save_embedding_model
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead
    from dmu_ray.models.inference import embed_images
    from dmu_ray.ray_session import ensure_ray
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

    # 1. the plain loop: read, decode, forward, in one process on every core
    torch.set_num_threads(cores)
    art = load_artifact(model_uri)
    model = build_embedding_model(art)[0].eval()
    pre = art.card.preprocessing
    decode = DecodeBatch(info.image_size, info.channels, mean=pre.mean, std=pre.std, out_size=pre.size)
    t0 = time.perf_counter()
    table = pads.dataset(part, format="parquet").to_table(columns=["id", "image", "label"])
    n = table.num_rows
    with torch.inference_mode():
        for i in range(0, n, a.batch):
            model(torch.from_numpy(decode(table.slice(i, a.batch))["image"]))
    plain = n / (time.perf_counter() - t0)
    print(f"{'plain loop (1 process, ' + str(cores) + ' threads)':<44} {plain:>9,.1f} images/s   1.00x")

    ensure_ray(num_cpus=cores)
    for actors in sorted({1, a.actors}):
        cpus = min(1.0, (cores - 1) / actors) if actors > 1 else 1.0  # leave a CPU for the reads
        pool = ActorPoolConfig(min_actors=actors, max_actors=actors, num_cpus=cpus, batch_size=a.batch)
        embed_images(part, model_uri, pool=pool)  # warm: the first run's imports and caches
        t0 = time.perf_counter()  # the timed run includes its pool's start, as every backfill's does
        ids, _, _ = embed_images(part, model_uri, pool=pool)
        rate = len(ids) / (time.perf_counter() - t0)
        print(
            f"{f'embed_images, {actors} actor(s) x {cpus:g} CPU':<44} {rate:>9,.1f} images/s   {rate / plain:.2f}x plain"
            f"   {rate / actors:,.1f} per worker ({rate / actors / (plain / cores):.2f}x the plain loop per core)"
        )


if __name__ == "__main__":
    main()
