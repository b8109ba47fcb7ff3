"""Training-loop overhead: dmu-ray's Ray Train loop vs the same step in plain torch, side by side.

    python benchmarks/train_overhead.py                      # DMU step, small CNN, glyphs, batch 64
    python benchmarks/train_overhead.py --method independent --epochs 4
    python benchmarks/train_overhead.py --train-instances 16   # longer epochs (~36 s)

Both sides run the same Trainee (model, classifier, upgrade module, loss), the same batch size,
one torch thread, and the same per-batch transform on the training side (``TrainTransform``:
random resized crop + normalisation as one batched op). Two pairs, measured in one run:

- pre-decoded: the plain loop draws batches from pixels decoded once; the Ray loop trains with
  ``data.cache: memory`` (decoded once by Ray Data, kept in the object store between epochs);
- same data work: the plain loop decodes every batch from its Parquet rows; the Ray loop trains
  with ``data.cache: off`` (Ray Data reads and decodes every epoch, in tasks beside the worker,
  one stream over the run's epochs).

The Ray figure is the mean samples/s of the epochs after the first (the first includes the pool's
and the process group's start). Prints each Ray loop's ratio to its plain counterpart.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from dmu_ray.config import TrainConfig
from dmu_ray.data.images import TrainTransform, decode_images, read_dataset_info
from dmu_ray.data.importers import import_glyphs
from dmu_ray.train.job import plan_training, run_training
from dmu_ray.train.loop import build_trainee, train_step


def plain_steps_per_s(cfg: TrainConfig, steps: int, *, decode_every_step: bool) -> float:
    """Steps/s of the same Trainee in one process. ``decode_every_step``: each batch is decoded
    from its Parquet rows before the step; else batches are drawn from pixels decoded once. Both
    then apply the training transform the Ray worker applies."""
    plan = plan_training(cfg)
    info = {"num_classes": plan.data.num_classes, "channels": plan.data.channels, "rows": plan.rows}
    trainee, old_model = build_trainee(cfg, info)
    t = pq.read_table(plan.train_loc.path, filesystem=plan.train_loc.fs, columns=["id", "image", "label"])
    size, ch = plan.data.image_size, plan.data.channels
    c = cfg.data
    transform = TrainTransform(c.augment, c.flip, c.crop_scale, plan.mean, plan.std, seed=0)
    if not decode_every_step:
        px_all = torch.from_numpy(decode_images(t.column("image").to_pylist(), size, ch, np.uint8))
        y_all = torch.from_numpy(t.column("label").to_numpy())
    opt = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=cfg.optim.lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    bs = cfg.optim.batch_size
    trainee.train()
    gen = torch.Generator().manual_seed(0)
    t0 = None
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()  # after warm-up
        idx = torch.randint(0, t.num_rows, (bs,), generator=gen)
        if decode_every_step:
            b = t.take(idx.numpy())
            px = torch.from_numpy(decode_images(b.column("image").to_pylist(), size, ch, np.uint8))
            y = torch.from_numpy(b.column("label").to_numpy())
        else:
            px, y = px_all[idx], y_all[idx]
        train_step(trainee, old_model, transform(px), y, opt, scaler, amp=False)
    return steps / (time.perf_counter() - t0)


def ray_steps_per_s(out: dict, batch: int) -> tuple[float, float]:
    """Mean steps/s of the epochs after the first, and their mean seconds before the first batch."""
    hist = out["history"][1:] or out["history"]
    return float(np.mean([h["samples_per_s"] for h in hist])) / batch, float(
        np.mean([h["first_batch_s"] for h in hist])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["independent", "dmu"], default="dmu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--train-instances",
        type=int,
        default=4,
        help="glyph images per (char, face): 4 gives 5,736 images (~9 s epochs), 16 about four times that",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="dmu-train-bench-")
    data = os.path.join(work, "glyphs")
    import_glyphs(data, train_instances=args.train_instances)
    base = {
        "storage_path": os.path.join(work, "runs"),
        "data": {"uri": data},
        "model": {"backbone": "small", "dim": 128},
        "optim": {"epochs": args.epochs, "batch_size": args.batch},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    }
    old_uri = None
    if args.method == "dmu":
        old = run_training(
            TrainConfig(name="old", **{**base, "optim": {"epochs": 1, "batch_size": args.batch}}),
            progress=False,
        )
        old_uri = old["model"]
    method = {"name": args.method, "old_model": old_uri}
    cfg = TrainConfig(name="plain", method=method, **base)
    pre = plain_steps_per_s(cfg, steps=60, decode_every_step=False)
    inline = plain_steps_per_s(cfg, steps=60, decode_every_step=True)
    ray = {}
    for cache in ("memory", "off"):
        rc = TrainConfig(
            name=f"ray-{cache}", method=method, **{**base, "data": {"uri": data, "cache": cache}}
        )
        ray[cache] = ray_steps_per_s(run_training(rc, progress=False), args.batch)
    n = read_dataset_info(data).rows["train"]
    print(
        f"# {args.method}, small CNN, batch {args.batch}, {n:,} glyph images, 1 worker x 1 CPU, {args.epochs} epochs"
    )
    for cache, (_, wait) in ray.items():
        print(f"# Ray, data.cache {cache}: {wait:.2f} s per epoch before its first batch")
    print(f"plain loop, pre-decoded pixels               {pre:8.2f} steps/s   1.00x")
    print(f"plain loop, decode every batch               {inline:8.2f} steps/s   {inline / pre:.2f}x")
    m, o = ray["memory"][0], ray["off"][0]
    print(f"Ray loop, data.cache memory (decoded once)   {m:8.2f} steps/s   {m / pre:.2f}x pre-decoded plain")
    print(
        f"Ray loop, data.cache off (decode each epoch) {o:8.2f} steps/s   {o / inline:.2f}x same data work plain"
    )


if __name__ == "__main__":
    main()
