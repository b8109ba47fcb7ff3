"""Training-loop overhead: dmu-ray's Ray Train loop vs the same step in plain torch, side by side.

    python benchmarks/train_overhead.py                      # DMU step, small CNN, glyphs, batch 64
    python benchmarks/train_overhead.py --method independent --epochs 4

Both sides run the same Trainee (model, classifier, upgrade module, loss) with the same batch size
and one torch thread. The plain side runs twice in one process: over tensors decoded once, and
decoding + augmenting every batch from its Parquet rows (the data work the Ray side does every
epoch). The Ray side is ``dmu-ray train`` with one worker (Ray Data decodes and augments in
parallel tasks); its figure is the last epoch's samples/s. Prints the Ray loop's ratio to each:
against the same data work, and against pre-decoded data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow.parquet as pq
import torch

from dmu_ray.config import TrainConfig
from dmu_ray.data.images import DecodeBatch, read_dataset_info
from dmu_ray.data.importers import import_glyphs
from dmu_ray.train.job import plan_training, run_training
from dmu_ray.train.loop import build_trainee, train_step


def plain_steps_per_s(cfg: TrainConfig, steps: int, *, decode_every_step: bool) -> float:
    """Steps/s of the same Trainee in one process. ``decode_every_step``: each batch is decoded and
    augmented from its Parquet rows before the step (the data work the Ray side does every epoch,
    done inline); else batches are drawn from tensors decoded once."""
    plan = plan_training(cfg)
    info = {"num_classes": plan.data.num_classes, "channels": plan.data.channels, "rows": plan.rows}
    trainee, old_model = build_trainee(cfg, info)
    t = pq.read_table(plan.train_loc.path, filesystem=plan.train_loc.fs, columns=["id", "image", "label"])
    decode = DecodeBatch(plan.data.image_size, plan.data.channels, augment=True, mean=plan.mean, std=plan.std)
    if not decode_every_step:
        batch = decode(t)
        x_all, y_all = torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])
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
            b = decode(t.take(idx.numpy()))
            x, y = torch.from_numpy(b["image"]), torch.from_numpy(b["label"])
        else:
            x, y = x_all[idx], y_all[idx]
        train_step(trainee, old_model, x, y, opt, scaler, amp=False)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["independent", "dmu"], default="dmu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="dmu-train-bench-")
    data = os.path.join(work, "glyphs")
    import_glyphs(data)
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
    cfg = TrainConfig(name="bench", method={"name": args.method, "old_model": old_uri}, **base)
    pre = plain_steps_per_s(cfg, steps=60, decode_every_step=False)
    inline = plain_steps_per_s(cfg, steps=60, decode_every_step=True)
    out = run_training(cfg, progress=False)
    ray_sps = out["metrics"]["samples_per_s"] / args.batch
    n = read_dataset_info(data).rows["train"]
    print(f"# {args.method}, small CNN, batch {args.batch}, {n:,} glyph images, 1 worker x 1 CPU")
    m = out["metrics"]
    if "first_batch_s" in m:
        print(
            f"# Ray's last epoch: {m['seconds']:.1f} s, of which {m['first_batch_s']:.1f} s before its first batch "
            f"(the Ray Data pipeline starting again); {m['steps']:.0f} steps"
        )
    print(f"plain loop, pre-decoded tensors              {pre:8.2f} steps/s   1.00x")
    print(f"plain loop, decode + augment every batch     {inline:8.2f} steps/s   {inline / pre:.2f}x")
    print(
        f"Ray Train loop, Ray Data decode + augment    {ray_sps:8.2f} steps/s   {ray_sps / pre:.2f}x pre-decoded, "
        f"{ray_sps / inline:.2f}x same data work"
    )


if __name__ == "__main__":
    main()
