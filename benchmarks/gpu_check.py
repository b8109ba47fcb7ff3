"""GPU path check: the CUDA code paths that CI (CPU only) cannot run, with ratios measured side by side.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU

1. The training step (``dmu_ray.train.loop.train_step``, the one Ray Train workers run): a DMU
   Trainee with torchvision ResNet-18 new and old models, fp32 vs AMP (fp16 autocast + GradScaler,
   channels-last). Checks the loss stays finite and falls; prints steps/s and the AMP ratio.
2. The refresh's per-file upgrader (``dmu_ray.refresh.upgrade_files.FileUpgrader``, the one the Ray
   Data actors run) on CPU and on CUDA over the same gallery file: checks the outputs agree and
   prints rows/s and the ratio.
3. The FastFill and UniBCT training steps (same ``train_step``) in fp32 and AMP: finite, falling
   losses; and the backfill scorer (``dmu_ray.methods.fastfill.BackfillScorer``, what the backfill's
   Ray Data actors run) on CPU and CUDA: same vectors and scores.
Needs torch with CUDA, torchvision, pyarrow, pydantic, PyYAML; not Ray (the Ray wrappers around
these paths are exercised on CPU by the test suite).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dmu_ray.gallery import ModelInfo, embedding_array, embedding_matrix, write_parquet_atomic
from dmu_ray.methods.fastfill import BackfillScorer
from dmu_ray.methods.registry import make_method
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.refresh.upgrade_files import FileUpgrader
from dmu_ray.storage import resolve
from dmu_ray.train.loop import Trainee, train_step


def check_train_step(device: torch.device, steps: int = 40, batch: int = 128, size: int = 112) -> None:
    rng = torch.Generator(device="cpu").manual_seed(0)
    classes = 100
    x_all = torch.randn(batch * 4, 3, size, size, generator=rng)
    y_all = torch.randint(0, classes, (batch * 4,), generator=rng)
    rates = {}
    for amp in (False, True):
        torch.manual_seed(0)
        old = EmbeddingModel("resnet18", 128, 3).to(device).eval().to(memory_format=torch.channels_last)
        old.requires_grad_(False)
        old_head = MarginHead(128, classes)
        trainee = Trainee(
            EmbeddingModel("resnet18", 128, 3),
            MarginHead(128, classes),
            make_method(name="dmu", old_model="x"),
            psi=UpgradeModule(128, 128, 512, 2),
            old_head=old_head,
            old_classes=torch.ones(classes, dtype=torch.bool),
        )
        trainee = trainee.to(device).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        losses = []
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            j = (i % 4) * batch
            x, y = x_all[j : j + batch].to(device, non_blocking=True), y_all[j : j + batch].to(device)
            loss, _ = train_step(trainee, old, x, y, opt, scaler, amp)
            losses.append(float(loss))
        torch.cuda.synchronize()
        rates[amp] = steps / (time.perf_counter() - t0)
        assert all(np.isfinite(losses)), f"non-finite loss with amp={amp}: {losses}"
        first, last = np.mean(losses[:4]), np.mean(losses[-4:])
        print(
            f"train step, ResNet-18 DMU, batch {batch} @ {size}px, amp={amp!s:5}: {rates[amp]:7.2f} steps/s, "
            f"loss {first:.3f} -> {last:.3f}"
        )
        assert last < first, "the loss did not fall on a fixed set of batches"
    print(f"AMP vs fp32: {rates[True] / rates[False]:.2f}x")


def check_upgrader(device: torch.device, rows: int = 1_000_000, dim: int = 256) -> None:
    work = tempfile.mkdtemp(prefix="dmu-gpu-")
    src = resolve(os.path.join(work, "old"))
    rng = np.random.default_rng(0)
    m = rng.standard_normal((rows, dim), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    table = pa.table({"id": np.arange(rows), "embedding": embedding_array(m.astype(np.float16))})
    write_parquet_atomic(src.join("part-00000.parquet"), table)
    torch.manual_seed(0)
    psi = UpgradeModule(dim, dim, 512, 2)
    with torch.no_grad():
        psi.mlp[-1].weight.normal_(0, 0.05)
    model = ModelInfo(model_id="new", dim=dim, dtype="float16", normalized=True)
    out, rates = {}, {}
    for dev in ("cpu", device.type):
        dest = resolve(os.path.join(work, f"new-{dev}"))
        up = FileUpgrader(psi, src, dest, model, batch_size=262144, device=dev)
        up.upgrade_file("part-00000.parquet")  # warm-up (CUDA context, caches)
        t0 = time.perf_counter()
        rec = up.upgrade_file("part-00000.parquet")
        rates[dev] = rec["rows_in"] / (time.perf_counter() - t0)
        out[dev] = embedding_matrix(pq.read_table(dest.join("part-00000.parquet").path).column("embedding"))
        print(
            f"refresh upgrader on {dev:4}: {rates[dev]:12,.0f} rows/s ({rows:,} x {dim} float16, file read+write included)"
        )
    diff = np.abs(out["cpu"].astype(np.float32) - out[device.type].astype(np.float32)).max()
    print(f"GPU vs CPU: {rates[device.type] / rates['cpu']:.2f}x, max abs difference {diff:.2e}")
    assert diff < 5e-3, "CPU and GPU upgraded vectors differ"


def check_fastfill_unibct(device: torch.device, steps: int = 30, batch: int = 128, size: int = 112) -> None:
    rng = torch.Generator(device="cpu").manual_seed(0)
    classes = 100
    x_all = torch.randn(batch * 4, 3, size, size, generator=rng)
    y_all = torch.randint(0, classes, (batch * 4,), generator=rng)
    for name in ("fastfill", "unibct"):
        for amp in (False, True):
            torch.manual_seed(0)
            old = EmbeddingModel("resnet18", 128, 3).to(device).eval().to(memory_format=torch.channels_last)
            old.requires_grad_(False)
            if name == "fastfill":
                trainee = Trainee(
                    EmbeddingModel("resnet18", 128, 3),
                    MarginHead(128, classes),
                    make_method(name="fastfill", old_model="o", new_model="n"),
                    psi=UpgradeModule(128, 128, 512, 2, uncertainty=True),
                    frozen_model=True,
                )
            else:
                trainee = Trainee(
                    EmbeddingModel("resnet18", 128, 3),
                    MarginHead(128, classes),
                    make_method(name="unibct", old_model="o"),
                    old_head=MarginHead(128, classes),
                    old_classes=torch.ones(classes, dtype=torch.bool),
                )
                old = None  # UniBCT needs no old features during training
            trainee = trainee.to(device).to(memory_format=torch.channels_last).train()
            opt = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
            scaler = torch.amp.GradScaler("cuda", enabled=amp)
            losses = []
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(steps):
                j = (i % 4) * batch
                x, y = x_all[j : j + batch].to(device), y_all[j : j + batch].to(device)
                loss, _ = train_step(trainee, old, x, y, opt, scaler, amp)
                losses.append(float(loss))
            torch.cuda.synchronize()
            rate = steps / (time.perf_counter() - t0)
            assert all(np.isfinite(losses)), f"{name}: non-finite loss with amp={amp}: {losses}"
            first, last = np.mean(losses[:4]), np.mean(losses[-4:])
            print(f"train step, {name:8} amp={amp!s:5}: {rate:7.2f} steps/s, loss {first:.3f} -> {last:.3f}")
            assert last < first, f"{name}: the loss did not fall on a fixed set of batches"
    torch.manual_seed(0)
    psi = UpgradeModule(128, 128, 512, 2, uncertainty=True)
    with torch.no_grad():
        psi.mlp[-1].weight.normal_(0, 0.05)
    head = MarginHead(128, classes)
    mat = torch.nn.functional.normalize(torch.randn(200_000, 128), dim=1).numpy()
    ids = np.arange(len(mat))
    policies = ["uncertainty", "random", "old-discriminativeness"]
    res = {d: BackfillScorer(policies, psi, head, device=d)(ids, mat) for d in ("cpu", device.type)}
    dy = np.abs(res["cpu"][0] - res[device.type][0]).max()
    ds = max(np.abs(res["cpu"][1][p] - res[device.type][1][p]).max() for p in policies)
    print(f"backfill scorer CPU vs GPU: max abs difference {dy:.2e} (vectors), {ds:.2e} (scores)")
    assert dy < 1e-3 and ds < 1e-3, "CPU and GPU backfill scores differ"


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for GPU machines")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    check_train_step(device)
    check_upgrader(device)
    check_fastfill_unibct(device)
    print("GPU paths OK")


if __name__ == "__main__":
    main()
