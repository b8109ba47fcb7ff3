"""Gallery refresh on a real local Ray cluster, against local disk and the loopback S3 server."""

import gc
import itertools
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import torch

from dmu_ray.config import ActorPoolConfig, RefreshConfig
from dmu_ray.gallery import (
    Gallery,
    GalleryWriter,
    Manifest,
    ModelInfo,
    UncommittedGalleryError,
    embedding_array,
    embedding_matrix,
    write_manifest,
    write_parquet_atomic,
)
from dmu_ray.gallery_ops import validate_gallery
from dmu_ray.models.artifact import save_upgrade_module
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.refresh import plan_refresh, run_refresh
from dmu_ray.refresh.job import RefreshError
from dmu_ray.refresh.upgrade_files import FileUpgrader, Overrides
from dmu_ray.storage import resolve

DIM = 16


def source_table(n: int, start: int, dim: int = DIM, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + start)
    m = rng.standard_normal((n, dim)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return pa.table(
        {
            "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "embedding": embedding_array(m.astype(np.float16)),
            "label": pa.array(np.arange(start, start + n) % 7),
            "url": pa.array([f"s3://imgs/{i}.jpg" for i in range(start, start + n)]),
        }
    )


def make_source(uri, storage, files=4, rows=300) -> str:
    with GalleryWriter(
        resolve(uri, storage),
        ModelInfo(model_id="old-r18", dim=DIM, dtype="float16", normalized=True),
        rows_per_file=rows,
    ) as w:
        w.write(source_table(files * rows, 0))
    return uri


def make_module(uri, storage, in_dim=DIM, out_dim=24) -> UpgradeModule:
    torch.manual_seed(0)
    m = UpgradeModule(in_dim, out_dim, width=32, depth=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        for bn in (m.mlp[1], m.mlp[4]):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    save_upgrade_module(uri, m, {"id": "psi-test", "new_model_id": "new-r50"}, storage)
    return m


def forge_gallery(uri, storage, tables: dict[str, pa.Table], dim=DIM) -> None:
    """A committed gallery whose files were not checked by the writer (as from a foreign tool)."""
    loc = resolve(uri, storage)
    entries = [write_parquet_atomic(loc.join(name), t) for name, t in tables.items()]
    for e, name in zip(entries, tables, strict=True):
        e.path = name
    model = ModelInfo(model_id="old", dim=dim, dtype="float16", normalized=True)
    write_manifest(
        loc, Manifest(model=model, files=entries, rows_in=sum(t.num_rows for t in tables.values()))
    )


def cfg_for(src, out, module, storage, **pool) -> RefreshConfig:
    return RefreshConfig(
        source=src,
        output=out,
        module=module,
        dtype="float16",
        pool=ActorPoolConfig(min_actors=1, max_actors=2, num_cpus=0.5, batch_size=128, **pool),
        storage=storage or {},
    )


def test_refresh_on_s3_matches_plain_torch(ray_local, s3):
    root = f"s3://{s3.bucket}/refresh-exact"
    src = make_source(f"{root}/old", s3.storage)
    module = make_module(f"{root}/psi.pt", s3.storage)
    res = run_refresh(cfg_for(src, f"{root}/new", f"{root}/psi.pt", s3.storage), progress=False)
    assert res.files_done_now == 4 and res.manifest.rows == 1200 and res.manifest.quarantined_rows == 0

    old = Gallery.open(src, s3.storage).read()
    new_g = Gallery.open(f"{root}/new", s3.storage)
    new = new_g.read()
    assert new.column("id").to_pylist() == old.column("id").to_pylist()
    assert new.column("url").to_pylist() == old.column("url").to_pylist()
    assert new.column("label").to_pylist() == old.column("label").to_pylist()
    with torch.no_grad():
        ref = module(torch.from_numpy(embedding_matrix(old.column("embedding")).astype(np.float32)))
        ref = torch.nn.functional.normalize(ref, dim=1).half().numpy()
    got = embedding_matrix(new.column("embedding"))
    assert got.shape == (1200, 24) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=2e-3)
    m = new_g.manifest
    assert (
        m.model.model_id == "new-r50" and m.model.dim == 24 and m.model.upgrade_module.startswith("psi-test@")
    )
    assert m.model.source_gallery == src
    assert [f.path for f in m.files] == Gallery.open(src, s3.storage).files  # one output per input
    assert validate_gallery(new_g).ok
    # a re-run of a committed job does nothing
    again = run_refresh(cfg_for(src, f"{root}/new", f"{root}/psi.pt", s3.storage), progress=False)
    assert again.files_done_now == 0 and again.skipped_files == 4


def interrupted_refresh(tmp_path, fail_after: int):
    """A 6-file refresh (one actor) that dies after ``fail_after`` committed files: ``(cfg, out)``."""
    src = make_source(str(tmp_path / "old"), None, files=6, rows=100)
    make_module(str(tmp_path / "psi.pt"), None)
    out = tmp_path / "new"
    cfg = cfg_for(src, str(out), str(tmp_path / "psi.pt"), None)
    cfg.pool.max_actors = 1
    with pytest.raises(Exception, match="injected failure"):
        run_refresh(cfg, progress=False, fail_after_files=fail_after)
    return cfg, out


def cpus_come_back(safety_net_s: float = 120.0) -> bool:
    """Whether every CPU of the local cluster is free again (polled; the wait is a safety net)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    end = time.monotonic() + safety_net_s
    while ray.available_resources().get("CPU", 0) < total:
        if time.monotonic() > end:
            return False
        time.sleep(0.5)
    return True


def test_killed_refresh_resumes_exactly_once(ray_local, tmp_path):
    # a failed run's actors stop with it: Python's cyclic collector (off here) is not what frees
    # their CPUs for the next job (the ONNX embedding after this test once waited 10 minutes)
    gc.disable()
    try:
        cfg, out = interrupted_refresh(tmp_path, 2)
        assert cpus_come_back(), "the failed refresh's actors still hold CPUs"
    finally:
        gc.enable()
    committed = sorted(p.name for p in (out / "_parts").glob("*.json"))
    assert len(committed) == 2
    assert not (out / "_manifest.json").exists()
    with pytest.raises(UncommittedGalleryError):
        Gallery.open(str(out))
    before = {n[:-5]: (out / n[:-5]).stat().st_mtime_ns for n in committed}
    # simulate a crash between publishing a data file and its commit record
    (out / "_parts" / committed[1]).unlink()
    res = run_refresh(cfg, progress=False)
    assert res.files_done_now == 5 and res.skipped_files == 1
    run = res.manifest.extra["refresh"]
    # the pool's start is timed from this run's own files (the kept file's record is older)
    assert 0 < run["last_run_pool_start_s"] < run["last_run_seconds"]
    assert res.extra["pool_start_s"] == run["last_run_pool_start_s"]
    assert f"{run['last_run_pool_start_s']:.1f} s of" in res.summary()
    # issue 39: each commit record keeps its phases' busy seconds; the run's attribution sums them
    import json

    rec = json.loads((out / "_parts" / committed[1]).read_text())
    assert {"read", "sha256", "decode", "checks", "psi", "finish", "encode", "publish"} <= set(rec["phases"])
    assert rec["phases"]["psi"] > 0 and all(v >= 0 for v in rec["phases"].values())
    att = run["last_run_attribution"]
    assert att == res.extra["attribution"] and sum(a["files"] for a in att["actors"].values()) == 5
    assert att["pool_start_s"] == run["last_run_pool_start_s"] and 0 < att["busy_share"] <= 1.5
    assert att["phases_s"]["psi"] >= rec["phases"]["psi"]
    # and the CPU seconds: each phase's thread's, never more than the phase's busy (wall) seconds
    # (a clock's granularity aside), and the actor process's in the file
    assert set(rec["phases_cpu"]) == set(rec["phases"]) - {"encode_wait"}
    assert all(0 <= rec["phases_cpu"][k] <= rec["phases"][k] + 0.02 for k in rec["phases_cpu"])
    assert rec["phases_cpu"]["psi"] > 0 and rec["cpu_s"] >= rec["phases_cpu"]["psi"]
    assert att["phases_cpu_s"]["psi"] >= rec["phases_cpu"]["psi"]
    assert sum(a["cpu_s"] for a in att["actors"].values()) >= rec["cpu_s"] > 0
    assert rec["cpu_clock"][1] - rec["cpu_clock"][0] == pytest.approx(rec["cpu_s"], abs=1e-3)
    keep = committed[0][:-5]
    assert (out / keep).stat().st_mtime_ns == before[keep]  # committed work untouched
    ids = Gallery.open(str(out)).read(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(600)) and len(set(ids)) == len(ids)  # none missing, none twice
    assert validate_gallery(Gallery.open(str(out))).ok


def test_bad_rows_and_wrong_dim_shard_are_quarantined(ray_local, tmp_path):
    good = source_table(50, 0)
    nan_t = source_table(40, 100)
    emb = embedding_matrix(nan_t.column("embedding")).copy()
    emb[[3, 7]] = np.nan
    nan_t = nan_t.set_column(1, "embedding", embedding_array(emb))
    wrong = source_table(30, 200, dim=DIM + 4)
    forge_gallery(str(tmp_path / "old"), None, {"a.parquet": good, "b.parquet": nan_t, "c.parquet": wrong})
    make_module(str(tmp_path / "psi.pt"), None)
    ctx = ray.data.DataContext.get_current()
    before = (ctx.wait_for_min_actors_s, ctx.autoscaling_config.actor_pool_util_upscaling_threshold)
    res = run_refresh(
        cfg_for(str(tmp_path / "old"), str(tmp_path / "new"), str(tmp_path / "psi.pt"), None), progress=False
    )
    # the refresh's Ray Data knobs stay in its own context: the caller's next job starts as before
    after = ray.data.DataContext.get_current()
    assert (
        after.wait_for_min_actors_s,
        after.autoscaling_config.actor_pool_util_upscaling_threshold,
    ) == before
    m = res.manifest
    assert m.rows == 50 + 38 and m.quarantined_rows == 2 + 30 and m.rows_in == 120
    assert m.quarantine_reasons == {
        "NaN/Inf or null value in embedding": 2,
        f"wrong dimension {DIM + 4} (expected {DIM})": 30,
    }
    assert [f.rows for f in m.files] == [50, 38, 0]
    assert validate_gallery(Gallery.open(str(tmp_path / "new"))).ok


def test_bad_setups_fail_before_any_work(tmp_path):
    make_source(str(tmp_path / "old"), None, files=2, rows=20)
    make_module(str(tmp_path / "psi.pt"), None)
    make_module(str(tmp_path / "psi32.pt"), None, in_dim=32)
    ok = dict(source=str(tmp_path / "old"), output=str(tmp_path / "new"), module=str(tmp_path / "psi.pt"))

    with pytest.raises(
        RefreshError, match="gallery holds 16-d vectors but upgrade module .*psi32.pt takes 32-d"
    ):
        plan_refresh(RefreshConfig(**{**ok, "module": str(tmp_path / "psi32.pt")}))
    with pytest.raises(RefreshError, match="must not be the source"):
        plan_refresh(RefreshConfig(**{**ok, "output": str(tmp_path / "old")}))
    with pytest.raises(UncommittedGalleryError):
        plan_refresh(RefreshConfig(**{**ok, "source": str(tmp_path / "nothing")}))
    with pytest.raises(Exception, match="no such artefact"):
        plan_refresh(RefreshConfig(**{**ok, "module": str(tmp_path / "missing.pt")}))

    # a shard without the embedding column: named, and nothing is written
    forge_gallery(
        str(tmp_path / "broken"),
        None,
        {
            "a.parquet": source_table(10, 0),
            "b.parquet": source_table(10, 10).drop_columns(["embedding"]),
        },
    )
    with pytest.raises(RefreshError, match=r"b\.parquet: missing column 'embedding'"):
        plan_refresh(RefreshConfig(**{**ok, "source": str(tmp_path / "broken")}))
    assert not (tmp_path / "new").exists()

    # an output prefix that already holds another gallery is refused and left as it was
    other = make_source(str(tmp_path / "other"), None, files=1, rows=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "other").glob("*.*")}
    with pytest.raises(RefreshError, match="already holds a different gallery"):
        plan_refresh(RefreshConfig(**{**ok, "output": other}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "other").glob("*.*")} == before


def test_a_min_max_pool_grows_when_files_wait(ray_local, tmp_path):
    """The README's pool (1 to 2 actors): with files waiting while the first actor is busy, Ray Data
    starts the second one (issue 18: the default 175% threshold never let it), and the manifest says
    how many actors did this run's files."""
    src = make_source(str(tmp_path / "src"), None, files=12, rows=40000)
    psi = str(tmp_path / "psi.pt")
    torch.manual_seed(0)
    # ~4 s a file on one core: files wait while the first actor works, for much longer than an
    # actor takes to start (at ~2 s a file the second actor sometimes came too late on a busy box)
    save_upgrade_module(psi, UpgradeModule(DIM, 24, width=1024, depth=3), {"id": "wide"})
    cfg = RefreshConfig(
        source=src,
        output=str(tmp_path / "out"),
        module=psi,
        pool=ActorPoolConfig(min_actors=1, max_actors=2, num_cpus=0.5, batch_size=2000),
    )
    res = run_refresh(cfg, progress=False)
    assert res.manifest.rows == 480_000
    assert res.manifest.extra["refresh"]["last_run_actors"] == 2


def test_the_fused_module_computes_what_the_module_computes():
    """The refresh runs psi with BatchNorm folded into the Linear before it: the same function."""
    torch.manual_seed(0)
    for in_dim, out_dim in ((16, 16), (16, 24)):
        m = UpgradeModule(in_dim, out_dim, width=32, depth=3)
        m.train()
        for _ in range(5):  # non-trivial running statistics and affine parameters
            m(torch.randn(64, in_dim) * 3 + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        m.eval()
        x = torch.randn(500, in_dim)
        fused = m.fused_for_inference()
        assert not any(isinstance(layer, torch.nn.BatchNorm1d) for layer in fused.modules())
        assert torch.allclose(fused(x), m(x), atol=1e-5)
        assert m.mlp[1].training is False and isinstance(m.mlp[1], torch.nn.BatchNorm1d)  # untouched


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_module_runs_in_chunks_of_rows_with_the_same_output(tmp_path, dtype):
    """On a CPU the upgrader calls psi on a few thousand rows at a time (faster, in cache); a
    batch that is not a multiple of the chunk, any route, either output dtype: the same rows out."""
    first = make_module(str(tmp_path / "a.pt"), None, out_dim=DIM)
    second = make_module(str(tmp_path / "b.pt"), None, in_dim=DIM, out_dim=DIM)
    loc = resolve(str(tmp_path))
    model = ModelInfo(model_id="new", dim=DIM, dtype=dtype, normalized=True)
    whole = FileUpgrader([first, second], loc, loc, model, batch_size=100)
    chunked = FileUpgrader([first, second], loc, loc, model, batch_size=100, compute_rows=7)
    assert whole.compute_rows >= 100 and chunked.compute_rows == 7
    mat = embedding_matrix(source_table(100, 0).column("embedding"))
    for route in (None, [0, 1], []):
        a, b = whole.upgrade_matrix(mat, route), chunked.upgrade_matrix(mat, route)
        assert a.shape == b.shape == (100, DIM) and a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_allclose(
            a.astype(np.float32), b.astype(np.float32), atol=1e-3 if dtype == "float16" else 1e-6
        )
    with torch.no_grad():
        ref = torch.nn.functional.normalize(first(torch.from_numpy(mat.astype(np.float32))), dim=1)
    np.testing.assert_allclose(chunked.upgrade_matrix(mat).astype(np.float32), ref.numpy(), atol=2e-3)


def test_a_call_run_again_keeps_the_committed_file(tmp_path):
    """Ray runs a file's call again when it retries a task or rebuilds outputs lost with a node's
    object store (test_multinode's node loss did this to every file): a file committed by this
    run is returned as committed, not upgraded and written again; a record that no longer counts
    (its file changed) is redone."""
    module = make_module(str(tmp_path / "psi.pt"), None)
    src, out = resolve(str(tmp_path / "src")), resolve(str(tmp_path / "out"))
    entry = write_parquet_atomic(src.join("a.parquet"), source_table(120, 0))
    entry.path = "a.parquet"
    model = ModelInfo(model_id="new", dim=24, dtype="float16", normalized=True)
    up = FileUpgrader([module], src, out, model, batch_size=50, expected={"a.parquet": entry})
    first = up.upgrade_file("a.parquet")
    written = out.join("a.parquet").path
    stamp = os.stat(written).st_mtime_ns
    again = up.upgrade_file("a.parquet")
    assert again["started_at"] == first["started_at"] and again["file"] == first["file"]
    assert os.stat(written).st_mtime_ns == stamp  # not written again
    with open(written, "ab") as f:  # the committed file no longer matches its record
        f.write(b"x")
    redone = up.upgrade_file("a.parquet")
    assert redone["file"]["sha256"] == first["file"]["sha256"]  # the same rows, written anew
    assert os.stat(written).st_mtime_ns != stamp


def test_files_per_actor_defaults():
    assert ActorPoolConfig().files_in_flight() == 1  # a CPU actor's cores run psi
    assert ActorPoolConfig(num_gpus=1, num_cpus=1).files_in_flight() == 2  # I/O beside the GPU
    assert ActorPoolConfig(num_gpus=1, num_cpus=6).files_in_flight() == 6
    assert ActorPoolConfig(num_gpus=0.5, num_cpus=4, files_per_actor=3).files_in_flight() == 3
    with pytest.raises(ValueError, match="files_per_actor"):
        ActorPoolConfig(files_per_actor=0)


def test_an_actor_works_on_several_files_at_once_exactly_once(ray_local, tmp_path):
    """``files_per_actor: 2`` (a GPU actor's default): one actor upgrades two files at the same
    time, on threads, so one file's Parquet work runs beside the other's psi; every file is still
    upgraded exactly once and right."""
    src = make_source(str(tmp_path / "src"), None, files=6, rows=20000)
    psi_uri = str(tmp_path / "psi.pt")
    torch.manual_seed(0)
    psi = UpgradeModule(DIM, 24, width=1024, depth=3).eval()  # ~0.5 s a file: calls that last
    save_upgrade_module(psi_uri, psi, {"id": "wide"})
    out = tmp_path / "out"
    cfg = RefreshConfig(
        source=src,
        output=str(out),
        module=psi_uri,
        pool=ActorPoolConfig(min_actors=1, max_actors=1, num_cpus=1, batch_size=5000, files_per_actor=2),
    )
    res = run_refresh(cfg, progress=False)
    assert res.files_done_now == 6 and res.manifest.extra["refresh"]["last_run_actors"] == 1
    spans = sorted(
        (r["started_at"], r["started_at"] + r["seconds"])
        for r in (json.loads(p.read_text()) for p in (out / "_parts").glob("*.json"))
    )
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans  # two files at once
    old = Gallery.open(src).read()
    new = Gallery.open(str(out)).read()
    assert new.column("id").to_pylist() == old.column("id").to_pylist()  # none lost, none twice
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            psi(torch.from_numpy(embedding_matrix(old.column("embedding")).astype(np.float32))), dim=1
        )
    got = embedding_matrix(new.column("embedding")).astype(np.float32)
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-3)
    assert validate_gallery(Gallery.open(str(out))).ok


class Overflowing(UpgradeModule):
    """psi that scales the rows whose first value is above 0.4 out of float16's range."""

    def __init__(self) -> None:
        super().__init__(DIM, DIM, width=8, depth=1)

    def fused_for_inference(self) -> "Overflowing":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, :1] > 0.4, x * 1e6, x)


class Crowded(UpgradeModule):
    """The identity psi that notes how many files' threads are in it at once; with ``company``, its
    first call waits (up to a safety net) for another thread to come in, so that two files'
    psi running together is seen whenever it can happen."""

    def __init__(self, company: bool) -> None:
        super().__init__(DIM, DIM, width=8, depth=1)
        self.company, self.active, self.most = company, 0, 0
        self.lock, self.arrived = threading.Lock(), threading.Event()

    def fused_for_inference(self) -> "Crowded":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            first = not self.arrived.is_set() and self.active == 1
            if self.active > 1:
                self.arrived.set()
        if self.company and first:
            self.arrived.wait(60)
        time.sleep(0.01)
        with self.lock:
            self.active -= 1
        return x


def test_a_cpu_actors_staggered_files_run_psi_one_at_a_time(tmp_path):
    """Issue 39: a CPU actor with two files in flight gives psi to one file at a time (one compute
    slot), so the other file's read, decode, encode and publish run beside it instead of a second
    psi thread on the same cores; without the slot both files are in psi together. Same output."""
    from concurrent.futures import ThreadPoolExecutor

    src = resolve(str(tmp_path / "src"))
    for i, name in enumerate(("a.parquet", "b.parquet")):
        write_parquet_atomic(src.join(name), source_table(200, i * 200))
    model = ModelInfo(model_id="new", dim=DIM, dtype="float16", normalized=True)
    outs = {}
    for slots in (None, 1):
        psi = Crowded(company=slots is None)
        out = resolve(str(tmp_path / f"out-{slots}"))
        up = FileUpgrader(psi, src, out, model, batch_size=50, compute_slots=slots)
        with ThreadPoolExecutor(2) as files:
            recs = list(files.map(up.upgrade_file, ["a.parquet", "b.parquet"]))
        assert psi.most == (2 if slots is None else 1)
        assert [r["rows_in"] for r in recs] == [200, 200]
        assert all(("slot_wait" in r["phases"]) == (slots == 1) for r in recs)
        outs[slots] = [pq.read_table(out.join(n).path) for n in ("a.parquet", "b.parquet")]
    for a, b in zip(outs[None], outs[1], strict=True):
        assert a.equals(b) and a.num_rows == 200


class ThreadNoting(Overrides):
    """Overrides that note which threads looked them up (where each batch's output is finished)."""

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        return super().lookup(ids)


def test_output_checks_on_their_own_thread_give_what_in_line_gives(tmp_path):
    """A GPU actor checks and assembles each batch's output on a finisher thread while psi runs
    the next batch: the same output rows, the same quarantine (same order) and the same record as
    when it is done in line, over batches with bad input rows, bad output rows and overrides."""
    t = source_table(230, 0)
    emb = embedding_matrix(t.column("embedding")).copy()
    emb[[3, 60, 61, 200]] = np.nan  # input rows the contract rejects, in three batches
    t = t.set_column(1, "embedding", embedding_array(emb))
    src = resolve(str(tmp_path / "src"))
    write_parquet_atomic(src.join("a.parquet"), t)
    model = ModelInfo(model_id="new", dim=DIM, dtype="float16", normalized=False)
    got = {}
    for aside in (False, True):
        overrides = ThreadNoting(np.arange(0, 230, 9), np.ones((26, DIM), dtype=np.float32))
        overrides.threads = set()
        out = resolve(str(tmp_path / f"out-{aside}"))
        up = FileUpgrader(
            Overflowing(), src, out, model, normalize=False, batch_size=50, overrides=overrides,
            finish_aside=aside,
        )  # fmt: skip
        rec = up.upgrade_file("a.parquet")
        got[aside] = (
            rec,
            pq.read_table(out.join("a.parquet").path),
            pq.read_table(out.join("_quarantine/a.parquet").path),
        )
        assert overrides.threads and all(n.startswith("output-check") == aside for n in overrides.threads)
    (rec_a, out_a, q_a), (rec_b, out_b, q_b) = got[False], got[True]
    overflow = "upgrade output: value out of float16 range (NaN/Inf once stored)"
    assert rec_a["reasons"]["NaN/Inf or null value in embedding"] == 4 and rec_a["reasons"][overflow] > 3
    assert rec_a["rows_new"] > 0 and rec_a["rows_in"] == 230
    for key in ("rows_in", "reasons", "rows_new"):
        assert rec_a[key] == rec_b[key], key
    assert rec_a["file"]["rows"] == rec_b["file"]["rows"] == out_a.num_rows
    assert out_a.equals(out_b)
    assert q_a.drop_columns(["embedding"]).equals(q_b.drop_columns(["embedding"]))
    assert str(q_a.column("embedding").to_pylist()) == str(
        q_b.column("embedding").to_pylist()
    )  # NaN reads nan
    nan, big = np.isnan(emb).any(axis=1), emb[:, 0].astype(np.float32) > 0.4
    want = []  # batch by batch: the rows the input check took, then those the output check took
    for start in range(0, 230, 50):
        in_batch = np.arange(start, min(start + 50, 230))
        want += in_batch[nan[in_batch]].tolist() + in_batch[big[in_batch] & ~nan[in_batch]].tolist()
    assert q_a.column("_dmu_source_row").to_pylist() == want


def test_a_runs_attribution_from_its_commit_records_by_hand():
    """Issue 39: the pool's start, each actor's busy seconds, gaps and idle tail, the phases summed."""
    from dmu_ray.refresh.records import attribution

    t0 = 1000.0
    recs = [
        {
            "actor": "a",
            "started_at": 1002.0,
            "seconds": 3.0,
            "rows_in": 10,
            "phases": {"psi": 2.0, "read": 0.5},
            "phases_cpu": {"psi": 1.5, "read": 0.1},
            "cpu_s": 2.5,
        },
        {
            "actor": "a",
            "started_at": 1005.5,
            "seconds": 2.0,
            "rows_in": 10,
            "phases": {"psi": 1.0},
            "phases_cpu": {"psi": 0.75},
            "cpu_s": 1.25,
        },
        {"actor": "b", "started_at": 1003.0, "seconds": 4.0, "rows_in": 5, "phases": {"encode": 1.5}},
        {"actor": "b", "rows_in": 5},  # a record of an older dmu-ray: no times, left out
    ]
    a = attribution(recs, t0, 8.0)
    assert a["pool_start_s"] == 2.0 and a["wall_s"] == 8.0
    assert a["actors"]["a"] == {
        "files": 2,
        "rows": 20,
        "start_s": 2.0,
        "busy_s": 5.0,
        "cpu_s": 3.75,
        "gaps_s": 0.5,
        "tail_s": 0.5,
    }
    assert a["actors"]["b"] == {
        "files": 1,
        "rows": 5,
        "start_s": 3.0,
        "busy_s": 4.0,
        "cpu_s": 0.0,  # a record without CPU seconds counts none
        "gaps_s": 0.0,
        "tail_s": 1.0,
    }
    assert a["busy_share"] == round(9.0 / 16.0, 4)
    assert a["phases_s"] == {"psi": 3.0, "encode": 1.5, "read": 0.5}
    assert attribution([{"actor": "a"}], t0, 1.0) == {}
    # files in progress together in one actor (staggered CPU files, a GPU actor's files): their
    # spans on the process's CPU clock are merged, so the process's CPU counts once; a restarted
    # process (another pid) has its own clock
    together = [
        {"actor": "c", "started_at": 1001.0, "seconds": 4.0, "rows_in": 1, "cpu_s": 4.0, "cpu_clock": [10.0, 14.0], "pid": 7},
        {"actor": "c", "started_at": 1003.0, "seconds": 3.0, "rows_in": 1, "cpu_s": 3.0, "cpu_clock": [12.0, 15.0], "pid": 7},
        {"actor": "c", "started_at": 1006.0, "seconds": 1.0, "rows_in": 1, "cpu_s": 1.0, "cpu_clock": [0.5, 1.5], "pid": 8},
    ]  # fmt: skip
    assert attribution(together, t0, 8.0)["actors"]["c"]["cpu_s"] == 6.0  # 5 on pid 7, 1 on pid 8
