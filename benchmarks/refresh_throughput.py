"""Refresh throughput: the Ray Data refresh vs a plain single-process loop, side by side.

    python benchmarks/refresh_throughput.py                 # 2M x 256 float16 (the issue's default)
    python benchmarks/refresh_throughput.py --rows 500000   # quicker

    python benchmarks/refresh_throughput.py --s3            # also S3 -> S3 on a loopback moto server
    python benchmarks/refresh_throughput.py --module linear # a fitted linear adapter (one matmul a batch)

Generates a gallery of N x d vectors on local disk, then in the same run:
1. I/O only: every file read and written back with the gallery's write options, no module (the
   box's limit for this job);
2. plain loop: for each file, pyarrow read -> torch upgrade module -> normalise -> pyarrow write
   (the yardstick: psi called per 65k-row batch); and the same loop calling psi on the few
   thousand rows at a time that the refresh uses on a CPU (an equally tuned loop, for reference);
3. ``dmu-ray refresh`` through Ray Data with 1 CPU's worth of actors, then 2 CPUs' worth (and, with
   ``--s3``, 2 actors reading and writing a loopback S3 server: moto, from the dev extras).
Also psi alone on one thread, and from it the box's bound for a CPU refresh: the I/O pass and psi's
work spread perfectly over every core, counted two ways: from the I/O pass's wall time (as if it ran
on one core; the figure of earlier runs) and from its CPU seconds (Arrow's read runs on more than
one thread: the bound that holds). Prints rows/s for each, the ratio to the plain loop and to the
I/O-only pass; for each refresh also the pool's start-up (from the job's start to its first
file's), the rate after it (what a longer job tends to), the refresh's own attribution (busy and
CPU seconds per phase and actor), its CPU seconds against the bound's work for the same rows, and
the whole box's CPU during the call (idle cores; the actors, Ray's daemons and workers, the
driver: benchmarks/box_cpu.py, from Linux's /proc).
Not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from box_cpu import BoxCpu

from dmu_ray.config import ActorPoolConfig, RefreshConfig, StorageConfig
from dmu_ray.gallery import GalleryWriter, ModelInfo, embedding_array, embedding_matrix, parquet_write_options
from dmu_ray.models.artifact import save_upgrade_module
from dmu_ray.models.linear_map import LinearMap
from dmu_ray.models.upgrade import CPU_COMPUTE_ROWS, UpgradeModule
from dmu_ray.ray_session import ensure_ray
from dmu_ray.refresh import run_refresh
from dmu_ray.storage import resolve


def make_gallery(path: str, rows: int, dim: int, rows_per_file: int) -> None:
    rng = np.random.default_rng(0)
    model = ModelInfo(model_id="bench-old", dim=dim, dtype="float16", normalized=True)
    with GalleryWriter(resolve(path), model, rows_per_file=rows_per_file) as w:
        step = 250_000
        for start in range(0, rows, step):
            n = min(step, rows - start)
            m = rng.standard_normal((n, dim), dtype=np.float32)
            m /= np.linalg.norm(m, axis=1, keepdims=True)
            w.write(
                pa.table(
                    {"id": np.arange(start, start + n), "embedding": embedding_array(m.astype(np.float16))}
                )
            )


def plain_loop(
    src: str, out: str, module: UpgradeModule, batch: int, compute_rows: int | None = None
) -> float:
    """The yardstick: one process, pyarrow read -> torch -> pyarrow write, file by file (psi called
    on ``compute_rows`` rows at a time when given, as the refresh does on a CPU; else per batch)."""
    os.makedirs(out, exist_ok=True)
    files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
    t0 = time.perf_counter()
    rows = 0
    with torch.inference_mode():
        for f in files:
            table = pq.read_table(os.path.join(src, f))
            outs = []
            for start in range(0, table.num_rows, batch):
                t = table.slice(start, batch)
                x = torch.from_numpy(embedding_matrix(t.column("embedding")).astype(np.float32))
                step = compute_rows or len(x)
                y = np.concatenate(
                    [
                        torch.nn.functional.normalize(module(x[i : i + step]), dim=1).half().numpy()
                        for i in range(0, len(x), step)
                    ]
                )
                outs.append(t.set_column(1, "embedding", embedding_array(y)))
            result = pa.concat_tables(outs)
            pq.write_table(result, os.path.join(out, f), **parquet_write_options(result.schema))
            rows += table.num_rows
    return rows / (time.perf_counter() - t0)


def warm(src: str) -> float:
    """Read every file of ``src`` once, untimed by the passes: each pass then reads from the page
    cache (in one run the I/O-only pass, the first, read files another run had pushed out of it
    and ran 15% slower than with them cached, which flattered the refresh). Returns the GiB read."""
    total = 0
    for f in sorted(os.listdir(src)):
        with open(os.path.join(src, f), "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total / 2**30


def io_only(src: str, out: str) -> tuple[float, float]:
    """The box's limit: read every file and write it back with the same options, no module.
    Returns rows/s and the process's CPU seconds a row (Arrow's read uses more than one thread)."""
    os.makedirs(out, exist_ok=True)
    files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    for f in files:
        table = pq.read_table(os.path.join(src, f))
        pq.write_table(table, os.path.join(out, f), **parquet_write_options(table.schema))
        rows += table.num_rows
    return rows / (time.perf_counter() - t0), (time.process_time() - c0) / rows


def psi_only(src: str, module: UpgradeModule, compute_rows: int) -> float:
    """psi alone on one thread (slices of ``compute_rows``, normalise, float16), over the first
    file's rows held in memory: rows/s of one core's worth of the module's work."""
    first = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))[0]
    mat = embedding_matrix(pq.read_table(os.path.join(src, first)).column("embedding")).copy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(mat), compute_rows):
            x = torch.from_numpy(mat[i : i + compute_rows]).float()  # torch's cast, as the refresh
            torch.nn.functional.normalize(module(x), dim=1).half()
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return len(mat) / seconds


def s3_server(src: str) -> tuple[object, StorageConfig, str]:
    """A moto S3 server on a loopback port holding a copy of the gallery at ``src``."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    for k, v in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[k] = v  # before Ray starts: its workers inherit the environment
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    storage = StorageConfig(endpoint_url=endpoint, region="us-east-1")
    dest = resolve("s3://bench/old", storage)
    pafs.copy_files(src, dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    return server, storage, "s3://bench/old"


def _print_attribution(a: dict | None) -> float:
    """Where the run's wall time went (the refresh's own attribution, from its commit records);
    returns the actor processes' CPU seconds in their files (0 without an attribution)."""
    if not a:
        return 0.0
    total = sum(x.get("cpu_s", 0.0) for x in a["actors"].values())
    print(
        f"    wall {a['wall_s']:.1f} s: pool start {a['pool_start_s']:.1f} s, actors busy {a['busy_share']:.0%} of their wall"
    )
    for name, x in a["actors"].items():
        print(
            f"    actor {name}: {x['files']} files, first at {x['start_s']:.1f} s, busy {x['busy_s']:.1f} s "
            f"(its process's CPU {x.get('cpu_s', 0.0):.1f} s), gaps {x['gaps_s']:.1f} s, idle tail {x['tail_s']:.1f} s"
        )
    print(
        "    phases (busy s, summed over files; reader/module/encoder threads overlap): "
        + ", ".join(f"{k} {v:.1f}" for k, v in a["phases_s"].items())
    )
    cpu = a.get("phases_cpu_s") or {}
    if cpu:
        print(
            "    the same phases' CPU s (their own thread's; Arrow's pool and torch's threads not in it): "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v >= 0.05)
        )
        print(
            f"    actor processes' CPU in their files {total:.1f} s, of which the phases' threads "
            f"{sum(cpu.values()):.1f} s; {os.cpu_count()} cores x wall {a['wall_s']:.1f} s = "
            f"{(os.cpu_count() or 1) * a['wall_s']:.1f} core-seconds"
        )
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--out-dim", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rows-per-file", type=int, default=250_000)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--workdir", default=None, help="where to put the data (default: a temp dir)")
    ap.add_argument("--s3", action="store_true", help="also refresh S3 -> S3 on a loopback moto server")
    ap.add_argument(
        "--module",
        choices=["mlp", "linear"],
        default="mlp",
        help="the upgrade module: the residual MLP (default) or a linear adapter (adapter fit's procrustes/affine)",
    )
    ap.add_argument(
        "--files-per-actor",
        type=int,
        nargs="+",
        default=[None],
        help="files each refresh actor works on at once, one refresh run per value (default: the "
        "pool's own default); on a CPU actor files beyond the first are staggered (one in psi)",
    )
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="dmu-bench-")
    src = os.path.join(work, "old")
    cpus = os.cpu_count() or 2
    print(
        f"# {args.rows:,} x {args.dim} float16, files of {args.rows_per_file:,} rows, "
        + ("a linear adapter" if args.module == "linear" else f"psi width {args.width}")
        + f", {cpus} cores"
    )
    if not os.path.exists(os.path.join(src, "_manifest.json")):
        t0 = time.perf_counter()
        make_gallery(src, args.rows, args.dim, args.rows_per_file)
        print(f"# generated in {time.perf_counter() - t0:.1f}s")
    if args.module == "linear":
        w = np.linalg.qr(np.random.default_rng(1).standard_normal((args.dim, args.dim)))[0][:, : args.out_dim]
        module = LinearMap.from_arrays(w.astype(np.float32))
    else:
        module = UpgradeModule(args.dim, args.out_dim, args.width, 2).eval()
    module_uri = os.path.join(work, "psi.pt")
    save_upgrade_module(module_uri, module, {"id": "bench"})

    torch.set_num_threads(cpus)
    print(
        f"# source read once before the passes ({warm(src):.1f} GiB): every pass reads it from the page cache"
    )
    io, io_cpu = io_only(src, os.path.join(work, "io-only"))
    plain = plain_loop(src, os.path.join(work, "plain"), module, args.batch)
    tuned = plain_loop(src, os.path.join(work, "plain-chunked"), module, args.batch, CPU_COMPUTE_ROWS)

    def row(what: str, rate: float) -> None:
        print(f"{what:<40} {rate:>12,.0f} rows/s   {rate / plain:.2f}x plain   {rate / io:.2f}x I/O-only")

    row("I/O only (read + write, 1 process)", io)
    row("plain loop (1 process)", plain)
    row(f"  the same, psi on {CPU_COMPUTE_ROWS:,}-row slices", tuned)
    # The job's CPU work is the I/O pass plus psi; spread perfectly over every core it takes
    # (1/io + 1/psi) / cpus seconds a row: no CPU refresh can beat that on this box. The I/O pass
    # runs on Arrow's threads too, so its wall time understates its work: the bound from CPU
    # seconds (the I/O pass's process CPU, psi's one thread) is the one that holds.
    psi = psi_only(src, module, CPU_COMPUTE_ROWS)
    row("psi only (1 thread, rows in memory)", psi)
    print(f"  (the I/O pass used {io_cpu * io:.2f} cores: {io_cpu * 1e6:.2f} CPU us a row)")
    row(f"bound: I/O + psi over {cpus} cores (wall)", cpus / (1 / io + 1 / psi))
    bound_work = io_cpu + 1 / psi  # CPU seconds a row
    row("bound: the same from CPU seconds", cpus / bound_work)
    server, s3_storage, s3_src = s3_server(src) if args.s3 else (None, None, None)
    ensure_ray(num_cpus=cpus)
    runs = [
        (n, src, os.path.join(work, f"ray-{n}-{f}"), None, f)
        for n in sorted({1, cpus})
        for f in args.files_per_actor
    ]
    if args.s3:
        runs.append((cpus, s3_src, "s3://bench/ray-out", s3_storage, args.files_per_actor[0]))
    for actors, source, out, storage, files in runs:
        if storage is None:
            shutil.rmtree(out, ignore_errors=True)
        cfg = RefreshConfig(
            source=source,
            output=out,
            module=module_uri,
            dtype="float16",
            pool=ActorPoolConfig(
                min_actors=actors,
                max_actors=actors,
                num_cpus=1.0,
                batch_size=args.batch,
                files_per_actor=files,
            ),
            storage=storage or StorageConfig(),
        )
        with BoxCpu() as box:
            res = run_refresh(cfg, progress=False)
        where = " (S3 -> S3, loopback)" if storage else ""
        at_once = f", {files} files each" if files else ""
        row(f"ray refresh, {actors} actor(s) x 1 CPU{at_once}{where}", res.rows_per_s)
        work_s = _print_attribution(res.extra.get("attribution"))
        serves = "; the driver's process also runs the S3 server" if storage else ""
        print(f"    {box.summary()} (the whole call: plan, pool, files, manifest{serves})")
        print(f"    the most CPU outside the actors: {box.top()}")
        if work_s:
            print(
                f"    the refresh's work: {work_s:.1f} CPU s in its files, {work_s / (bound_work * res.rows_done_now):.2f}x "
                f"the bound's ({bound_work * res.rows_done_now:.1f} CPU s of I/O pass and psi for these rows)"
            )
        start = res.extra.get("pool_start_s")
        if start is not None and res.seconds > start:
            # the same run without its fixed cost: what a longer job tends to
            row(
                f"  after the pool's start ({start:.1f} s of {res.seconds:.1f} s)",
                res.rows_done_now / (res.seconds - start),
            )
    if server is not None:
        server.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
