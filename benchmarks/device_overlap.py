"""Does Parquet I/O keep an accelerator waiting? The refresh's per-file upgrader with psi off the CPU.

    python benchmarks/device_overlap.py                   # 2M x 256 float16, 8 files
    python benchmarks/device_overlap.py --rows 500000     # quicker
    python benchmarks/device_overlap.py --wait-ms 50      # a faster "device"

On a GPU actor psi's work leaves the CPU: the actor's thread launches it and waits, and what is
left for the CPU is Parquet (read, decode, sha256, encode, write). If the actor did that I/O in
line, the device would idle during it. This benchmark measures, on any machine, how much of that
wait the upgrader (``dmu_ray.refresh.upgrade_files.FileUpgrader``, what each refresh actor runs)
hides, with a stand-in for the device: a psi whose forward waits ``--wait-ms`` per batch without
holding a core or the GIL (as a thread waiting on a CUDA kernel does) and returns its input.
In the same run:

1. I/O only: every file read and written back with the gallery's options, no module, one thread;
2. the device's work alone: the number of batches x the wait;
3. the upgrader over every file with the stand-in, one batch per call (as on a GPU), one file at
   a time and then several at once on threads sharing the one device (a refresh actor with
   ``pool.files_per_actor`` > 1, the default on GPU actors); each batch's output checked on its
   own thread (``finish_aside``, the default on GPU actors), and once, for comparison, in line.

Prints each upgrader's time against the serial sum (1 + 2: an actor doing its I/O in line) and
against the larger of the two (perfect overlap), and the share of the run the device is busy.
By default the wait is set so that the device's work equals the I/O-only pass's time, where
overlap matters most. A stand-in, not a GPU: no host-device copies, no kernel launches, and the
normalisation after psi still runs on the CPU (on a GPU it would not); measure
on a GPU with benchmarks/gpu_check.py. Not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from refresh_throughput import io_only, make_gallery

from dmu_ray.gallery import Gallery, ModelInfo
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.refresh.upgrade_files import FileUpgrader
from dmu_ray.storage import resolve


class DeviceStandIn(UpgradeModule):
    """psi as an accelerator would look to the actor's thread: each call waits ``wait_s`` seconds
    (GIL released, no core held) and returns its input (unit rows stay unit rows)."""

    def __init__(self, dim: int, wait_s: float) -> None:
        super().__init__(dim, dim, width=8, depth=1)
        self.wait_s = wait_s
        self.calls = 0
        self.device = threading.Lock()  # one device: calls from several threads take turns

    def fused_for_inference(self) -> DeviceStandIn:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.device:
            time.sleep(self.wait_s)
            self.calls += 1
        return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rows-per-file", type=int, default=250_000)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument(
        "--wait-ms", type=float, default=None, help="device time per batch (default: I/O-matched)"
    )
    ap.add_argument("--workdir", default=None, help="where to put the data (default: a temp dir)")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="dmu-overlap-")
    src = os.path.join(work, "old")
    if not os.path.exists(os.path.join(src, "_manifest.json")):
        make_gallery(src, args.rows, args.dim, args.rows_per_file)
    gallery = Gallery.open(src)
    batches = sum(-(-f.rows // args.batch) for f in gallery.manifest.files)
    rows = gallery.manifest.rows

    t_io = rows / io_only(src, os.path.join(work, "io-only"))
    wait_s = args.wait_ms / 1000 if args.wait_ms is not None else t_io / batches
    t_dev = batches * wait_s

    model = ModelInfo(model_id="bench-new", dim=args.dim, dtype="float16", normalized=True)

    def upgrade_all(files_at_once: int, finish_aside: bool = True) -> float:
        """Seconds for the upgrader over every file, ``files_at_once`` files at a time on threads
        sharing one stand-in device (what a refresh actor with that many files in flight does);
        each batch's output checked on its own thread (as on a GPU actor) or in line."""
        out = os.path.join(work, f"upgraded-{files_at_once}-{finish_aside}")
        shutil.rmtree(out, ignore_errors=True)
        psi = DeviceStandIn(args.dim, wait_s)
        up = FileUpgrader(
            psi,
            gallery.loc,
            resolve(out),
            model,
            batch_size=args.batch,
            compute_rows=args.batch,  # one call per batch, as a GPU actor makes
            finish_aside=finish_aside,  # the default on a GPU actor: True
            expected={f.path: f for f in gallery.manifest.files},
        )
        t0 = time.perf_counter()
        with ThreadPoolExecutor(files_at_once) as pool:
            list(pool.map(up.upgrade_file, gallery.files))
        seconds = time.perf_counter() - t0
        assert psi.calls == batches, (psi.calls, batches)
        return seconds

    cores = os.cpu_count() or 1
    print(
        f"# {rows:,} x {args.dim} float16, {len(gallery.files)} files, {batches} batches of {args.batch:,}, {cores} cores"
    )
    print(f"{'I/O only (1 thread)':39s} {t_io:7.2f} s")
    print(f"{f'device alone ({batches} x {wait_s * 1000:.0f} ms)':39s} {t_dev:7.2f} s")
    print(
        f"{'in line (I/O, then the device)':39s} {t_io + t_dev:7.2f} s   device busy {t_dev / (t_io + t_dev):4.0%}"
    )
    runs = [(1, False, "1 file, output checks in line")]
    runs += [(k, True, f"{k} file(s) at once") for k in sorted({1, 2, cores})]
    for k, aside, name in runs:
        t_up = upgrade_all(k, aside)
        print(
            f"upgrader, {name:29s} {t_up:7.2f} s   device busy {t_dev / t_up:4.0%}   "
            f"{(t_io + t_dev) / t_up:.2f}x in line, {max(t_io, t_dev) / t_up:.2f}x perfect overlap"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
