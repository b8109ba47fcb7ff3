"""GPU path check: the CUDA code paths that CI (CPU only) cannot run, with ratios measured side by side.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu-smoke --rows 80000   # anywhere: the upgrader check's code

1. The training step (``dmu_ray.train.loop.train_step``, the one Ray Train workers run): a DMU
   Trainee with torchvision ResNet-18 new and old models, fp32 vs AMP (fp16 autocast + GradScaler,
   channels-last). Checks the loss stays finite and falls; prints steps/s and the AMP ratio.
2. The refresh's per-file upgrader (``dmu_ray.refresh.upgrade_files.FileUpgrader``, the one the Ray
   Data actors run) on CPU and on CUDA over the same 2M x 256 float16 gallery of 8 files, one file
   at a time and several at once (as a GPU actor with ``pool.files_per_actor`` does): checks the
   outputs agree and prints rows/s per GPU and the CPU-only figure of the same machine.
3. The FastFill and UniBCT training steps (same ``train_step``) in fp32 and AMP: finite, falling
   losses; and the backfill scorer (``dmu_ray.methods.fastfill.BackfillScorer``, what the backfill's
   Ray Data actors run) on CPU and CUDA: same vectors and scores.
4. The adapter fit's sufficient statistics (``PairStats.of``, what the pair join's tasks compute;
   on the task's GPU with ``num_gpus``) over 1M float16 pairs x 256-d: numpy's BLAS on the CPU vs
   torch on CUDA, the same sums (relative difference) and the seconds of each.
Needs torch with CUDA, torchvision, pyarrow, pydantic, PyYAML; not Ray (the Ray wrappers around
these paths are exercised on CPU by the test suite).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dmu_ray.adapters.stats import PairStats
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


def check_upgrader(
    device: torch.device, rows: int = 2_000_000, dim: int = 256, rows_per_file: int = 250_000
) -> None:
    """The refresh's upgrader over a gallery of several files (the issue's 2M x 256 float16 by
    default), as refresh actors on this machine would run it: on CUDA one file at a time and
    several at once on threads sharing the GPU (``pool.files_per_actor``, default ``max(2,
    num_cpus)`` on a GPU actor), each batch's output checked on its own thread as on a GPU
    actor; on the CPU one file at a time with every core, and one file per core with one torch
    thread each (as single-CPU actors would; threads here, processes under Ray). Prints rows/s,
    checks that no row is lost and that CPU and GPU outputs agree."""
    work = tempfile.mkdtemp(prefix="dmu-gpu-")
    src = resolve(os.path.join(work, "old"))
    rng = np.random.default_rng(0)
    files = []
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        m = rng.standard_normal((n, dim), dtype=np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        table = pa.table(
            {"id": np.arange(start, start + n), "embedding": embedding_array(m.astype(np.float16))}
        )
        files.append(f"part-{len(files):05d}.parquet")
        write_parquet_atomic(src.join(files[-1]), table)
    torch.manual_seed(0)
    psi = UpgradeModule(dim, dim, 512, 2)
    with torch.no_grad():
        psi.mlp[-1].weight.normal_(0, 0.05)
    model = ModelInfo(model_id="new", dim=dim, dtype="float16", normalized=True)
    cores = os.cpu_count() or 1
    runs = [("cpu", 1, cores), ("cpu", cores, 1)]
    if device.type != "cpu":
        runs += [(device.type, k, cores) for k in sorted({1, 2, 4, min(8, cores)})]
    out, rates = {}, {}
    threads = torch.get_num_threads()
    for dev, at_once, torch_threads in runs:
        dest = resolve(os.path.join(work, f"new-{dev}-{at_once}"))
        up = FileUpgrader(psi, src, dest, model, device=dev)
        torch.set_num_threads(torch_threads)
        up.upgrade_file(files[0])  # warm-up (CUDA context, caches); done again below
        t0 = time.perf_counter()
        with ThreadPoolExecutor(at_once) as pool:
            records = list(pool.map(up.upgrade_file, files))
        rates[dev, at_once] = rows / (time.perf_counter() - t0)
        assert sum(r["file"]["rows"] for r in records) == rows, "rows lost"
        out[dev] = embedding_matrix(pq.read_table(dest.join(files[-1]).path).column("embedding"))
        print(
            f"refresh upgrader on {dev:4}, {at_once:2} file(s) at once, {torch_threads:2} torch thread(s): "
            f"{rates[dev, at_once]:10,.0f} rows/s ({rows:,} x {dim} float16 in {len(files)} files, I/O included)"
        )
    torch.set_num_threads(threads)
    if device.type != "cpu":
        cpu_best = max(v for (d, _), v in rates.items() if d == "cpu")
        gpu_best = max(v for (d, _), v in rates.items() if d == device.type)
        diff = np.abs(out["cpu"].astype(np.float32) - out[device.type].astype(np.float32)).max()
        print(
            f"one GPU vs this machine's CPUs: {gpu_best / cpu_best:.2f}x (best of each), max abs difference {diff:.2e}"
        )
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


def check_pair_stats(device: torch.device, rows: int = 1_000_000, dim: int = 256) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    y = (x.astype(np.float32) @ np.linalg.qr(rng.standard_normal((dim, dim)))[0]).astype(np.float16)
    keep = rng.random(rows) < 0.9
    seconds, stats = [], []
    for dev in (None, device.type):  # numpy's BLAS on the CPU, then torch on the device
        PairStats.of(x[:70_000], y[:70_000], device=dev)  # warm-up (CUDA context, kernels)
        t0 = time.perf_counter()
        stats.append(PairStats.of(x, y, rows=keep, device=dev))
        seconds.append(time.perf_counter() - t0)
    a, b = stats
    rel = max(
        np.abs(getattr(a, k) - getattr(b, k)).max() / np.abs(getattr(a, k)).max()
        for k in ("sx", "sy", "xx", "xy")
    )
    print(
        f"pair statistics, {rows:,} x {dim} float16: numpy on the CPU {seconds[0]:.2f} s, torch on {device.type} "
        f"{seconds[1]:.2f} s ({seconds[0] / seconds[1]:.1f}x); max relative difference {rel:.1e}"
    )
    assert a.n == b.n and rel < 1e-5 and abs(a.yy - b.yy) / a.yy < 1e-6, (
        "numpy's and torch's pair statistics differ"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="gallery rows for the upgrader check")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="no GPU: run only the upgrader check on the CPU (a code check)",
    )
    args = ap.parse_args()
    if args.cpu_smoke:
        check_upgrader(torch.device("cpu"), rows=args.rows, rows_per_file=max(1, args.rows // 8))
        check_pair_stats(torch.device("cpu"), rows=args.rows)  # torch's path against numpy's, both on the CPU
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for GPU machines (--cpu-smoke runs its CPU part)")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    check_train_step(device)
    check_upgrader(device, rows=args.rows)
    check_fastfill_unibct(device)
    check_pair_stats(device)
    print("GPU paths OK")


if __name__ == "__main__":
    main()
