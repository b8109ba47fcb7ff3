"""``dmu-ray bench``: the throughputs a plan needs, measured on the cluster it runs on.

Each figure is measured on ``workers.count`` Ray actors at once, each holding the resources the
jobs' workers ask for, running the jobs' own per-item code on samples of the user's data:
- ``embed``: the embedding actor of evaluate / backfill (:class:`~dmu_ray.models.inference._EmbedActor`:
  the model's preprocessing, decode, forward), images/s per worker;
- ``refresh``: the refresh's per-file work (:class:`~dmu_ray.refresh.upgrade_files.FileUpgrader`:
  read and sha256, row checks, module, encode, write, commit record) on the gallery's first
  files, into a scratch folder under the output (removed after), rows/s per worker;
- ``query``: a query-side adapter, one query at a time (microseconds each) and in batches;
- ``train``: the train loop's step (:func:`~dmu_ray.train.loop.train_step`), images/s per worker.
The median of ``repeats`` timed repeats is kept (after ``warmup`` untimed ones), with every repeat.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

from dmu_ray import __version__
from dmu_ray.models.artifact import EMBEDDING_MODEL, UPGRADE_MODULE, load_artifact
from dmu_ray.plan.config import BenchConfig
from dmu_ray.storage import Location, resolve, write_bytes_atomic

__all__ = ["BenchError", "FORMAT", "run_bench", "read_bench"]

FORMAT = "dmu-ray.bench/1"


class BenchError(ValueError):
    """Bad bench input (an artefact of the wrong kind, a sample that cannot be read), or a bench
    JSON that is not one."""


def _ident(art) -> dict[str, str]:
    return {"uri": art.uri, "id": str(art.card.id), "sha256": art.sha256, "ident": art.ident}


def _sample_images(uri: str, n: int, storage) -> tuple[pa.Table, bool]:
    """The first ``n`` rows of an image data set part (``id, image, label``), or of an id,uri
    table (``id, uri, label``: fetched by the worker, as a backfill does); and which it is."""
    import pyarrow.dataset as pads

    from dmu_ray.data.image_import import is_table, read_table

    if is_table(uri):
        t = read_table(uri, storage, need_label=False, need_id=True).table
        return t.select(["id", "uri", "label"]).slice(0, n), True
    loc = resolve(uri, storage)
    files = loc.list_files(".parquet", recursive=True, data_only=True)
    if not files:
        raise BenchError(f"{uri}: no Parquet files of images")
    ds = pads.dataset([loc.join(f).path for f in files], filesystem=loc.fs, format="parquet")
    t = ds.head(n, columns=["id", "image", "label"])
    if t.num_rows == 0:
        raise BenchError(f"{uri}: no images")
    return t, False


class _BenchWorker:
    """One measured worker: holds a job worker's resources and runs its per-item code."""

    def __init__(self, threads: int, gpu: bool) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.threads, self.gpu = max(1, threads), gpu
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"

    def describe(self) -> dict[str, Any]:
        import os

        import ray
        import torch

        return {
            "node": ray.get_runtime_context().get_node_id(),
            "device": self.device,
            "gpu_name": torch.cuda.get_device_name(0) if self.device == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }

    def embed(self, spec: dict[str, Any], table: pa.Table, fetch: bool, rounds: int) -> list[float]:
        """Seconds per round of fetching (id,uri tables), decoding and embedding ``table``."""
        from dmu_ray.models.inference import _EmbedActor, fetch_images

        actor = _EmbedActor(
            spec["uri"],
            spec["sha256"],
            spec["storage"],
            spec["size"],
            spec["channels"],
            self.threads,
            self.gpu,
        )
        bs, out = spec["batch_size"], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(0, table.num_rows, bs):
                part = table.slice(i, bs)
                actor(fetch_images(part, spec["storage"]) if fetch else part)
            self._sync()
            out.append(time.perf_counter() - t0)
        return out

    def refresh(self, spec: dict[str, Any], rounds: int) -> list[float]:
        """Seconds per round of upgrading ``spec['files']`` into a fresh scratch folder each round."""
        from dmu_ray.models.artifact import build_upgrade_module
        from dmu_ray.refresh.upgrade_files import FileUpgrader

        art = load_artifact(
            spec["module_uri"], spec["storage"], kind=UPGRADE_MODULE, sha256=spec["module_sha256"]
        )
        upgrader = FileUpgrader(
            build_upgrade_module(art),
            spec["src"],
            spec["scratch"],
            spec["model"],
            normalize=spec["normalize"],
            batch_size=spec["batch_size"],
            device=self.device,
            expected=spec["expected"],
            routing=spec["routing"],
        )
        out = []
        for r in range(rounds):
            upgrader.out = spec["scratch"].join(f"round-{r}")
            t0 = time.perf_counter()
            for rel in spec["files"]:
                upgrader.upgrade_file(rel)
            self._sync()
            out.append(time.perf_counter() - t0)
        return out

    def query(self, spec: dict[str, Any], rounds: int) -> dict[str, list[float]]:
        """Per round: seconds for ``queries`` single-query calls, and for the same queries in batches."""
        import torch

        from dmu_ray.models.artifact import build_upgrade_module
        from dmu_ray.models.upgrade import through_chain

        art = load_artifact(spec["uri"], spec["storage"], kind=UPGRADE_MODULE, sha256=spec["sha256"])
        module = build_upgrade_module(art).to(self.device)
        n, bs = spec["queries"], spec["batch_size"]
        x = torch.nn.functional.normalize(
            torch.randn(n, art.card.in_dim, generator=torch.Generator().manual_seed(0)), dim=1
        )
        x = x.to(self.device)
        single, batched = [], []
        with torch.inference_mode():
            for _ in range(rounds):
                t0 = time.perf_counter()
                for i in range(n):
                    through_chain([module], x[i : i + 1])
                self._sync()
                single.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for i in range(0, n, bs):
                    through_chain([module], x[i : i + bs])
                self._sync()
                batched.append(time.perf_counter() - t0)
        return {"single": single, "batched": batched}

    def train(self, spec: dict[str, Any], table: pa.Table, rounds: int) -> list[float]:
        """Seconds per round of ``steps`` training steps at ``batch_size``."""
        import torch

        from dmu_ray.data.images import DecodeBatch
        from dmu_ray.methods.registry import make_method
        from dmu_ray.models.artifact import build_embedding_model
        from dmu_ray.models.heads import MarginHead
        from dmu_ray.train.loop import train_step
        from dmu_ray.train.trainee import Trainee

        art = load_artifact(spec["uri"], spec["storage"], kind=EMBEDDING_MODEL, sha256=spec["sha256"])
        model = build_embedding_model(art)[0].train().to(self.device)
        old = None
        if spec.get("old_uri"):
            o = load_artifact(
                spec["old_uri"], spec["storage"], kind=EMBEDDING_MODEL, sha256=spec["old_sha256"]
            )
            old = build_embedding_model(o)[0].eval().to(self.device)
        pre = art.card.preprocessing
        d = DecodeBatch(spec["size"], spec["channels"], mean=pre.mean, std=pre.std, out_size=pre.size)(table)
        x, y = torch.from_numpy(d["image"]), torch.from_numpy(d["label"].astype(np.int64))
        classes = int(max(spec["classes"], int(y.max()) + 1))
        trainee = Trainee(model, MarginHead(art.card.dim, classes), make_method(name="independent")).to(
            self.device
        )
        opt = torch.optim.SGD(trainee.parameters(), lr=0.01, momentum=0.9)
        amp = self.device == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        bs, steps, n, out = spec["batch_size"], spec["steps"], len(y), []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for s in range(steps):
                idx = torch.arange(s * bs, (s + 1) * bs) % n
                train_step(trainee, old, x[idx].to(self.device), y[idx].to(self.device), opt, scaler, amp)
            self._sync()
            out.append(time.perf_counter() - t0)
        return out

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def _median_rate(per_worker: list[list[float]], items: int, warmup: int) -> dict[str, Any]:
    """Items/s per worker: the median over workers of each one's median timed round."""
    timed = [rounds[warmup:] for rounds in per_worker]
    rates = [items / statistics.median(r) for r in timed]
    return {
        "per_worker": statistics.median(rates),
        "workers": [round(r, 3) for r in rates],
        "seconds": [[round(s, 5) for s in r] for r in timed],
        "items_per_round": items,
    }


def _check_output(out: Location) -> None:
    if out.exists() and out.list_files(recursive=True):
        raise BenchError(f"output {out.uri} already holds files; give a new folder")


def run_bench(cfg: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Measure every figure ``cfg`` asks for; write ``<output>/bench.json``; return its content.
    Every input is opened and checked before a worker starts."""
    import ray

    from dmu_ray.ray_session import ensure_ray, require_resources

    def note(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    st, w = cfg.storage, cfg.workers
    out = resolve(cfg.output, st)
    _check_output(out)
    rounds = cfg.warmup + cfg.repeats
    specs: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}
    if cfg.embed is not None:
        from dmu_ray.models.inference import image_source

        art = load_artifact(cfg.embed.model, st, kind=EMBEDDING_MODEL)
        size, channels, _ = image_source(cfg.embed.images, art.card, st)
        table, fetch = _sample_images(cfg.embed.images, cfg.embed.sample, st)
        specs["embed"] = {
            "uri": art.uri,
            "sha256": art.sha256,
            "storage": st,
            "size": size,
            "channels": channels,
            "batch_size": cfg.embed.batch_size,
            "table": table,
            "fetch": fetch,
        }
        artifacts["new_model"] = _ident(art) | {"dim": art.card.dim}
    if cfg.refresh is not None:
        specs["refresh"], artifacts["upgrade"] = _refresh_spec(cfg, out)
    if cfg.query is not None:
        art = load_artifact(cfg.query.adapter, st, kind=UPGRADE_MODULE)
        if art.card.direction != "query":
            raise BenchError(
                f"query.adapter {art.uri}: a gallery-side module (direction {art.card.direction}); the query "
                "figure needs a query-side adapter (adapter fit with direction: query)"
            )
        specs["query"] = {
            "uri": art.uri,
            "sha256": art.sha256,
            "storage": st,
            "queries": cfg.query.queries,
            "batch_size": cfg.query.batch_size,
        }
        artifacts["query_adapter"] = _ident(art) | {"in_dim": art.card.in_dim, "out_dim": art.card.out_dim}
    if cfg.train is not None:
        from dmu_ray.data.images import read_dataset_info

        t = cfg.train
        art = load_artifact(t.model, st, kind=EMBEDDING_MODEL)
        info = read_dataset_info(resolve(t.images, st).uri.rsplit("/", 1)[0], st)
        table, fetch = _sample_images(t.images, max(t.batch_size, 4 * t.batch_size), st)
        if fetch:
            raise BenchError(
                f"train.images {t.images}: a data set part (<data>/train) is needed, not a table"
            )
        spec = {
            "uri": art.uri,
            "sha256": art.sha256,
            "storage": st,
            "size": info.image_size,
            "channels": info.channels,
            "classes": info.num_classes,
            "batch_size": t.batch_size,
            "steps": t.steps,
            "table": table,
        }
        artifacts["train_model"] = _ident(art)
        if t.old_model is not None:
            o = load_artifact(t.old_model, st, kind=EMBEDDING_MODEL)
            spec |= {"old_uri": o.uri, "old_sha256": o.sha256}
            artifacts["train_old_model"] = _ident(o)
        specs["train"] = spec

    ensure_ray(cfg.ray_address)
    require_resources(
        {"CPU": w.num_cpus, "GPU": w.num_gpus}, f"a bench worker (workers.num_cpus {w.num_cpus:g})"
    )
    have = ray.cluster_resources()
    for key, each in (("CPU", w.num_cpus), ("GPU", w.num_gpus)):
        if each and w.count * each > have.get(key, 0.0) + 1e-9:  # measured at once: all must be up together
            raise BenchError(
                f"workers: {w.count} worker(s) x {each:g} {key} need {w.count * each:g} {key}s at once, and the "
                f"cluster has {have.get(key, 0.0):g}; lower workers.count (figures are per worker)"
            )
    Worker = ray.remote(num_cpus=w.num_cpus, num_gpus=w.num_gpus or None)(_BenchWorker)
    threads = max(1, int(round(w.num_cpus)))
    workers = [Worker.remote(threads, w.num_gpus > 0) for _ in range(w.count)]
    figures: dict[str, Any] = {}
    try:
        described = ray.get([a.describe.remote() for a in workers])
        if "embed" in specs:
            s = specs["embed"]
            note(f"bench: embedding {s['table'].num_rows} images x {rounds} on {w.count} worker(s)")
            ref = ray.put(s["table"])
            spec = {k: v for k, v in s.items() if k not in ("table", "fetch")}
            got = ray.get([a.embed.remote(spec, ref, s["fetch"], rounds) for a in workers])
            figures["embed"] = _median_rate(got, s["table"].num_rows, cfg.warmup) | {"unit": "images/s"}
        if "refresh" in specs:
            s = specs["refresh"]
            note(
                f"bench: refreshing {len(s['files'])} file(s), {s['rows']:,} rows x {rounds} on {w.count} worker(s)"
            )
            got = ray.get(
                [
                    a.refresh.remote(s | {"scratch": s["scratch"].join(f"worker-{i}")}, rounds)
                    for i, a in enumerate(workers)
                ]
            )
            figures["refresh"] = _median_rate(got, s["rows"], cfg.warmup) | {
                "unit": "rows/s",
                "dim": s["dim"],
            }
        if "query" in specs:
            s = specs["query"]
            note(f"bench: mapping {s['queries']} queries x {rounds} on {w.count} worker(s)")
            got = ray.get([a.query.remote(s, rounds) for a in workers])
            single = _median_rate([g["single"] for g in got], s["queries"], cfg.warmup)
            batched = _median_rate([g["batched"] for g in got], s["queries"], cfg.warmup)
            figures["query"] = {
                "us_per_query": 1e6 / single["per_worker"],
                "per_worker": single["per_worker"],
                "batched_per_worker": batched["per_worker"],
                "batch_size": s["batch_size"],
                "unit": "queries/s",
                "single": single,
                "batched": batched,
            }
        if "train" in specs:
            s = specs["train"]
            note(f"bench: {s['steps']} training steps of {s['batch_size']} x {rounds} on {w.count} worker(s)")
            ref = ray.put(s["table"])
            spec = {k: v for k, v in s.items() if k != "table"}
            got = ray.get([a.train.remote(spec, ref, rounds) for a in workers])
            figures["train"] = _median_rate(got, s["steps"] * s["batch_size"], cfg.warmup) | {
                "unit": "images/s"
            }
    finally:
        for a in workers:
            ray.kill(a)
        scratch = out.join("_scratch")
        if scratch.exists():
            scratch.fs.delete_dir(scratch.path)
    import torch

    result = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": f"dmu-ray {__version__}",
        "cluster": {
            "nodes": [
                {k: n["Resources"].get(k, 0.0) for k in ("CPU", "GPU", "memory")}
                for n in ray.nodes()
                if n.get("Alive")
            ],
            "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
            "ray": ray.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "workers": w.model_dump() | {"kind": "gpu" if w.num_gpus > 0 else "cpu", "measured": described},
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "artifacts": artifacts,
        "samples": {
            k: {"rows": v["rows"], "files": len(v["files"]), "gallery": v["src"].uri}
            if k == "refresh"
            else {"images": v["table"].num_rows}
            if k in ("embed", "train")
            else {"queries": v["queries"]}
            for k, v in specs.items()
        },
        "figures": figures,
    }
    write_bytes_atomic(out.join("bench.json"), json.dumps(result, indent=2).encode())
    result["file"] = out.join("bench.json").uri
    return result


def _refresh_spec(cfg: BenchConfig, out: Location) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a worker needs to upgrade the sample files, checked as the refresh checks its job."""
    from dmu_ray.refresh.config import RefreshConfig
    from dmu_ray.refresh.plan import plan_refresh

    r = cfg.refresh
    assert r is not None
    scratch = out.join("_scratch")
    plan = plan_refresh(
        RefreshConfig(
            source=r.gallery,
            output=scratch.join("plan").uri,
            module=r.module,
            dtype=r.dtype,
            storage=cfg.storage,
        )
    )
    entries = {f.path: f for f in plan.source.manifest.files}
    files, rows = [], 0
    for rel in plan.source.files:
        if files and rows >= r.rows:
            break
        files.append(rel)
        rows += entries[rel].rows
    art = plan.artifact
    spec = {
        "module_uri": art.uri,
        "module_sha256": art.sha256,
        "storage": cfg.storage,
        "src": plan.source.loc,
        "scratch": scratch,
        "model": plan.model,
        "normalize": True,
        "batch_size": r.batch_size,
        "expected": {f: entries[f] for f in files},
        "routing": plan.routing,
        "files": files,
        "rows": rows,
        "dim": plan.source.model.dim,
    }
    return spec, _ident(art) | {"in_dim": art.card.in_dim, "out_dim": art.card.out_dim}


def read_bench(uri: str, storage=None) -> dict[str, Any]:
    """A bench JSON (``bench.json`` or its folder), checked to be one."""
    from dmu_ray.storage import read_bytes

    loc = resolve(uri, storage)
    if not uri.endswith(".json"):
        loc = loc.join("bench.json")
    try:
        d = json.loads(read_bytes(loc))
    except FileNotFoundError:
        raise BenchError(f"bench {loc.uri}: not found (dmu-ray bench writes it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchError(f"bench {loc.uri}: not JSON ({err})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise BenchError(f"bench {loc.uri}: not a dmu-ray bench file (format {FORMAT})")
    return d
