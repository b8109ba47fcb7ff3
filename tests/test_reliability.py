"""The hostile probe's findings (issue 16), one test per item: data never destroyed or corrupted,
wrong answers refused before work starts, secrets never echoed, every file named. Real local
folders, the loopback S3 server, a real local Ray cluster and the installed console script."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_cli_gallery import run as cli
from test_refresh import DIM, cfg_for, interrupted_refresh, make_module, make_source, source_table

from dmu_ray.config import ConfigError, EvaluateConfig, RefreshConfig, parse_config
from dmu_ray.evaluate.job import check_inputs, run_evaluation
from dmu_ray.evaluate.matrix import EvaluationError
from dmu_ray.gallery import (
    MANIFEST_NAME,
    Gallery,
    GalleryError,
    GalleryWriter,
    ModelInfo,
    embedding_array,
)
from dmu_ray.gallery_ops import import_vectors, validate_gallery
from dmu_ray.models.artifact import load_artifact, save_embedding_model, save_upgrade_module
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.ray_session import RayUnavailableError
from dmu_ray.refresh import job as refresh_job
from dmu_ray.refresh import run_refresh
from dmu_ray.refresh.job import JOB_MARKER, RefreshError
from dmu_ray.storage import StorageError, create_exclusive, resolve


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------- 1. an import never eats its input


def test_import_refuses_to_overwrite_its_own_input_cli(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    vecs = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    np.save(d / "v.npy", vecs)
    r = cli("gallery", "import", str(d / "v.npy"), str(d), "--model-id", "m", "--overwrite")
    assert r.returncode == 2 and "overlap" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert np.array_equal(np.load(d / "v.npy"), vecs)  # the input is untouched

    # a gallery's own part file imported into that gallery, with --overwrite
    gal = tmp_path / "gal"
    assert cli("gallery", "import", str(d / "v.npy"), str(gal), "--model-id", "m").returncode == 0
    before = snapshot(gal)
    r = cli("gallery", "import", str(gal / "part-00000.parquet"), str(gal), "--model-id", "m", "--overwrite")
    assert r.returncode == 2 and "overlap" in r.stderr, r.stderr
    assert snapshot(gal) == before and validate_gallery(Gallery.open(str(gal))).ok


def test_import_refuses_overlap_on_s3_and_with_a_parent_destination(root, tmp_path):
    g = root.uri("g")
    src = import_vectors_from(tmp_path, g, root)
    m = Gallery.open(g, root.storage).manifest
    part = f"{g}/{m.files[0].path}"
    for dest in (g, root.uri("")):  # the input's own prefix, and a prefix that holds it
        with pytest.raises(GalleryError, match="overlap"):
            import_vectors(part, dest, model_id="m", overwrite=True, storage=root.storage)
    assert validate_gallery(Gallery.open(g, root.storage)).ok and src.exists()


def import_vectors_from(tmp_path: Path, dest: str, root) -> Path:
    npy = tmp_path / "v.npy"
    np.save(npy, np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32))
    import_vectors(str(npy), dest, model_id="m", rows_per_file=20, storage=root.storage)
    return npy


# ------------------------------------------------------- 2. paths from a manifest stay in their prefix


def test_manifest_paths_outside_the_prefix_are_refused(ray_local, tmp_path):
    src = make_source(str(tmp_path / "old"), None, files=2, rows=20)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.parquet").write_bytes((tmp_path / "old" / "part-00000.parquet").read_bytes())
    mpath = tmp_path / "old" / MANIFEST_NAME
    man = json.loads(mpath.read_text())
    man["files"][0]["path"] = "../victim/x.parquet"
    mpath.write_text(json.dumps(man))
    before = snapshot(victim)

    r = cli("gallery", "validate", src)
    assert r.returncode != 0 and "leaves its folder" in r.stderr, r.stdout + r.stderr
    make_module(str(tmp_path / "psi.pt"), None)
    with pytest.raises(GalleryError, match="leaves its folder"):
        run_refresh(cfg_for(src, str(tmp_path / "new"), str(tmp_path / "psi.pt"), None), progress=False)
    assert snapshot(victim) == before and not (tmp_path / "new").exists()
    with pytest.raises(StorageError):
        resolve(str(tmp_path)).join("a/../../b")


# ------------------------------------------------- 3. refresh checks what it reads against the manifest


def test_refresh_refuses_a_changed_source_file(ray_local, tmp_path):
    src = make_source(str(tmp_path / "old"), None, files=3, rows=50)
    make_module(str(tmp_path / "psi.pt"), None)
    victim = tmp_path / "old" / "part-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    victim.write_bytes(bytes(data))
    out = tmp_path / "new"
    with pytest.raises(Exception, match=r"part-00001\.parquet changed after its gallery was committed"):
        run_refresh(cfg_for(src, str(out), str(tmp_path / "psi.pt"), None), progress=False)
    assert not (out / MANIFEST_NAME).exists()
    assert not (out / "_parts" / "part-00001.parquet.json").exists()


def test_manifests_that_do_not_add_up_are_refused(tmp_path):
    src = make_source(str(tmp_path / "old"), None, files=2, rows=20)
    mpath = tmp_path / "old" / MANIFEST_NAME
    good = json.loads(mpath.read_text())
    twice = {**good, "files": [good["files"][0], good["files"][0]], "rows_in": 40}
    mpath.write_text(json.dumps(twice))
    with pytest.raises(GalleryError, match="listed more than once"):
        Gallery.open(src)
    r = cli("gallery", "validate", src)
    assert r.returncode != 0 and "listed more than once" in r.stderr
    mpath.write_text(json.dumps({**good, "rows": 41}))
    with pytest.raises(GalleryError, match="states rows = 41"):
        Gallery.open(src)
    mpath.write_text(json.dumps({**good, "rows_in": 39}))
    with pytest.raises(GalleryError, match="do not reconcile"):
        Gallery.open(src)


# --------------------------------------------------------- 4. resume verifies commits against their files


def test_resume_redoes_commits_whose_files_are_gone_or_changed(ray_local, tmp_path):
    cfg, out = interrupted_refresh(tmp_path, 3)
    committed = sorted(p.name[: -len(".json")] for p in (out / "_parts").glob("*.json"))
    assert len(committed) == 3
    (out / committed[0]).unlink()  # a committed output deleted
    changed = out / committed[1]
    changed.write_bytes(changed.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    rec = out / "_parts" / f"{committed[2]}.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "file": {"path": "../escape.parquet"}}))
    res = run_refresh(cfg, progress=False)
    assert res.files_done_now == 6 and res.skipped_files == 0
    g = Gallery.open(str(out))
    ids = g.read(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(600)) and len(set(ids)) == 600
    assert validate_gallery(g).ok and not (tmp_path / "escape.parquet").exists()


# --------------------------------------------------- 5. an import commits nothing its validate rejects


def test_import_quarantines_float16_overflow_and_unnormalisable_rows(root, tmp_path):
    vecs = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    vecs[3, 2] = 1e6  # finite in float32, Inf in float16
    vecs[5] = 0.0  # a zero vector cannot be L2-normalised
    np.save(tmp_path / "v.npy", vecs)
    m = import_vectors(
        str(tmp_path / "v.npy"), root.uri("g16"), model_id="m", dtype="float16", storage=root.storage
    )
    assert m.rows == 49 and m.quarantine_reasons == {"value out of float16 range (NaN/Inf once stored)": 1}
    m = import_vectors(
        str(tmp_path / "v.npy"), root.uri("gn"), model_id="m", normalize=True, storage=root.storage
    )
    assert m.rows == 49 and m.quarantine_reasons == {"zero vector (cannot be L2-normalised)": 1}
    m = import_vectors(
        str(tmp_path / "v.npy"),
        root.uri("g16n"),
        model_id="m",
        dtype="float16",
        normalize=True,
        storage=root.storage,
    )
    assert m.rows == 49 and m.quarantined_rows == 1  # normalising first brings 1e6 into range
    for name in ("g16", "gn", "g16n"):
        g = Gallery.open(root.uri(name), root.storage)
        assert validate_gallery(g).ok, validate_gallery(g).problems
        assert sorted(g.read(columns=["id"]).column("id").to_pylist()) == [
            i for i in range(50) if i != (5 if name != "g16" else 3)
        ]


# ------------------------------------------------------------- 6. two jobs cannot both claim an output


def test_exclusive_create_on_disk_and_s3(root):
    loc = resolve(root.uri("claim/_refresh.json"), root.storage)
    if not loc.is_s3:
        Path(loc.path).parent.mkdir(parents=True)
    assert create_exclusive(loc, b"first") is True
    assert create_exclusive(loc, b"second") is False
    with loc.fs.open_input_stream(loc.path) as f:
        assert f.read() == b"first"


def test_two_different_refreshes_into_one_output_one_wins(ray_local, root, monkeypatch):
    src = make_source(root.uri("old"), root.storage, files=2, rows=50)
    make_module(root.uri("psi.pt"), root.storage)
    out = root.uri("new")
    cfgs = [cfg_for(src, out, root.uri("psi.pt"), root.storage) for _ in range(2)]
    cfgs[1].dtype = "float32"
    # widen the gap between the checks and the claim: both plans finish before either claims
    barrier = threading.Barrier(2, timeout=60)
    real_plan = refresh_job.plan_refresh

    def slow_plan(cfg, **kw):
        plan = real_plan(cfg, **kw)
        barrier.wait()
        return plan

    monkeypatch.setattr(refresh_job, "plan_refresh", slow_plan)
    outcome: dict[str, object] = {}

    def go(i: int) -> None:
        try:
            outcome[cfgs[i].dtype] = run_refresh(cfgs[i], progress=False)
        except Exception as err:  # noqa: BLE001 - the loser's error is the point
            outcome[cfgs[i].dtype] = err

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    errors = {k: v for k, v in outcome.items() if isinstance(v, Exception)}
    assert len(outcome) == 2 and len(errors) == 1, outcome
    ((loser, err),) = errors.items()
    assert isinstance(err, RefreshError) and "claimed by another refresh job" in str(err)
    winner = "float16" if loser == "float32" else "float32"
    g = Gallery.open(out, root.storage)
    assert g.model.dtype == winner and validate_gallery(g).ok
    marker = resolve(out, root.storage).join(JOB_MARKER)
    with marker.fs.open_input_stream(marker.path) as f:
        assert json.loads(f.read())["dtype"] == winner


# ----------------------------------------------- 7. evaluate checks every gallery before embedding


def _eval_parts(tmp_path: Path) -> dict[str, str]:
    old, new, psi = (str(tmp_path / n) for n in ("old.pt", "new.pt", "psi.pt"))
    save_embedding_model(old, EmbeddingModel("small", 16, 1), MarginHead(16, 3), {"id": "old-m"})
    # old and new of one dimension: a swap of galleries is not caught by their shapes
    save_embedding_model(new, EmbeddingModel("small", 16, 1), MarginHead(16, 3), {"id": "new-m"})
    save_upgrade_module(psi, UpgradeModule(16, 16, 8, 1), {"id": "psi", "new_model_id": "new-m"})
    rng = np.random.default_rng(0)

    def gallery(name: str, model: ModelInfo) -> str:
        uri = str(tmp_path / name)
        with GalleryWriter(resolve(uri), model) as w:
            m = rng.standard_normal((20, model.dim)).astype(np.float32)
            w.write(
                pa.table({"id": np.arange(20), "embedding": embedding_array(m), "label": np.arange(20) % 3})
            )
        return uri

    old_ident = load_artifact(old).ident
    return {
        "old_model": old,
        "new_model": new,
        "upgrade_module": psi,
        "old": gallery("g-old", ModelInfo(model_id="old-m", dim=16, extra={"artifact": old_ident})),
        "upgraded": gallery(
            "g-up", ModelInfo(model_id="new-m", dim=16, upgrade_module=load_artifact(psi).ident)
        ),
        "imported": gallery("g-imp", ModelInfo(model_id="prod-v1", dim=16)),
        "wide": gallery("g-wide", ModelInfo(model_id="new-m", dim=24, upgrade_module="x")),
    }


def test_evaluate_refuses_galleries_of_the_wrong_model_before_any_work(tmp_path):
    p = _eval_parts(tmp_path)

    def cfg(galleries: dict[str, str], **kw) -> EvaluateConfig:
        return EvaluateConfig(
            data=str(tmp_path / "no-data-needed"),
            old_model=p["old_model"],
            new_model=p["new_model"],
            upgrade_module=p["upgrade_module"],
            galleries=galleries,
            output=str(tmp_path / "eval"),
            **kw,
        )

    check_inputs(cfg({"old": p["old"], "upgraded": p["upgraded"]}))  # the right pairing passes
    swapped = cfg({"old": p["upgraded"], "upgraded": p["old"]})
    t0 = time.perf_counter()
    with pytest.raises(EvaluationError, match="galleries.old .* upgraded by psi@"):
        run_evaluation(swapped, progress=False)  # fails in the checks: no Ray, no embedding
    assert time.perf_counter() - t0 < 30
    with pytest.raises(EvaluationError, match="embedded by model 'prod-v1', but old_model is 'old-m'"):
        check_inputs(cfg({"old": p["imported"]}))
    check_inputs(cfg({"old": p["imported"]}, check_gallery_models=False))  # the documented way out
    with pytest.raises(EvaluationError, match="galleries.upgraded .* not produced by an upgrade module"):
        check_inputs(cfg({"upgraded": p["old"]}))
    with pytest.raises(EvaluationError, match="galleries.upgraded: .* holds 24-d vectors"):
        check_inputs(cfg({"upgraded": p["wide"]}))
    with pytest.raises(EvaluationError, match="galleries.old: .*nowhere does not exist"):
        check_inputs(cfg({"old": str(tmp_path / "nowhere")}))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EvaluationError, match="output: .*afile is a file"):
        check_inputs(cfg({}).model_copy(update={"output": str(tmp_path / "afile")}))
    for bad, field in (({"ks": [0, 5]}, "ks"), ({"ks": []}, "ks"), ({"tar_fars": [0.01, 1.0]}, "tar_fars")):
        with pytest.raises(ConfigError, match=field):
            parse_config(EvaluateConfig, {**cfg({}).model_dump(), **bad})


# ------------------------------------------------------- 8. the dimension comes from the schema or --dim


def test_dimension_from_schema_or_dim_never_from_the_first_file(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    empty_var = pa.table({"id": pa.array([], pa.int64()), "embedding": pa.array([], pa.list_(pa.float32()))})
    pq.write_table(empty_var, folder / "a.parquet")  # zero rows first
    pq.write_table(
        pa.table({"id": [1, 2, 3], "embedding": pa.array([[1.0, 2, 3, 4], [1.0, 2, 3, 4], [1.0, 2]])}),
        folder / "b.parquet",
    )
    with pytest.raises(GalleryError, match="variable-length list.*--dim"):
        import_vectors(str(folder), str(tmp_path / "g0"), model_id="m")
    m = import_vectors(str(folder), str(tmp_path / "g1"), model_id="m", dim=4)
    assert m.model.dim == 4 and m.rows == 2 and m.quarantined_rows == 1
    m = import_vectors(str(folder), str(tmp_path / "g2"), model_id="m", infer_dim=True)
    assert m.model.dim == 4 and m.rows == 2

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    t = source_table(5, 0)
    pq.write_table(t.slice(0, 0), fixed / "a.parquet")  # zero rows, but the schema says 16
    pq.write_table(t, fixed / "b.parquet")
    m = import_vectors(str(fixed), str(tmp_path / "g3"), model_id="m")
    assert m.model.dim == DIM and m.rows == 5
    r = cli("gallery", "import", str(folder), str(tmp_path / "g4"), "--model-id", "m", "--dim", "4")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------ 9. impossible settings fail in seconds


def test_a_gpu_pool_on_a_cluster_without_gpus_fails_before_writing(ray_local, tmp_path):
    src = make_source(str(tmp_path / "old"), None, files=1, rows=10)
    make_module(str(tmp_path / "psi.pt"), None)
    cfg = cfg_for(src, str(tmp_path / "new"), str(tmp_path / "psi.pt"), None, num_gpus=1)
    t0 = time.perf_counter()
    with pytest.raises(RayUnavailableError, match="GPU"):
        run_refresh(cfg, progress=False)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "new").exists()


def test_a_ray_address_where_nothing_listens_fails_before_writing(tmp_path):
    from conftest import _free_port

    src = make_source(str(tmp_path / "old"), None, files=1, rows=10)
    make_module(str(tmp_path / "psi.pt"), None)
    conf = {"source": src, "output": str(tmp_path / "new"), "module": str(tmp_path / "psi.pt")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(conf))
    t0 = time.perf_counter()
    r = cli("refresh", "--config", str(tmp_path / "r.yaml"), "--ray-address", f"127.0.0.1:{_free_port()}")
    assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- 10. secrets never echoed


def test_credentials_are_never_echoed(tmp_path):
    r = cli("gallery", "inspect", "s3://AKIAEXAMPLEKEY:SuperSecret123@bucket/x")
    assert r.returncode == 2 and "credentials in a URI" in r.stderr
    assert "SuperSecret123" not in r.stdout + r.stderr and "AKIAEXAMPLEKEY" not in r.stderr
    conf = {
        "source": "s3://b/old",
        "output": "s3://b/new",
        "module": "s3://b/psi.pt",
        "storage": {"access_key_id": "AKIAEXAMPLEKEY", "secret_access_key": 987654321987},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(conf))
    r = cli("refresh", "--config", str(tmp_path / "r.yaml"))
    assert r.returncode == 2 and "storage.secret_access_key" in r.stderr, r.stderr
    assert "987654321987" not in r.stdout + r.stderr
    with pytest.raises(ConfigError) as info:
        parse_config(RefreshConfig, {**conf, "output": "ftp://user:hunter22@host/x", "dtype": 3})
    assert "hunter22" not in str(info.value) and "987654321987" not in str(info.value)


# ------------------------------------------------------ 11. every file named, clear errors, no traceback


def test_bad_files_are_named_and_mixed_ids_are_a_clear_error(s3, tmp_path):
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(source_table(200, 0), good)
    (tmp_path / "trunc.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ("fake.parquet", "trunc.parquet"):
        r = cli("gallery", "import", str(tmp_path / name), str(tmp_path / f"g-{name}"), "--model-id", "m")
        assert r.returncode == 2 and name in r.stderr and "Traceback" not in r.stderr, r.stderr

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(source_table(5, 0), mixed / "a.parquet")
    pq.write_table(
        source_table(5, 5).set_column(0, "id", pa.array([f"s{i}" for i in range(5)])), mixed / "b.parquet"
    )
    r = cli("gallery", "import", str(mixed), str(tmp_path / "g-mixed"), "--model-id", "m")
    assert r.returncode == 2 and "b.parquet: ids are string here but int64" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    r = cli("gallery", "inspect", "s3://no-such-bucket-dmu/x", "--endpoint-url", s3.endpoint)
    assert r.returncode == 2 and "bucket 'no-such-bucket-dmu' does not exist" in r.stderr, r.stderr
    assert "allow-uncommitted" not in r.stderr
    conf = {"source": "s3://no-such-bucket-dmu/old", "output": f"s3://{s3.bucket}/x", "module": "m.pt"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**conf, "storage": {"endpoint_url": s3.endpoint}}))
    r = cli("refresh", "--config", str(tmp_path / "r.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "allow" not in r.stderr, r.stderr
    # an uncommitted prefix: inspect names its own option
    (tmp_path / "unc").mkdir()
    pq.write_table(source_table(5, 0), tmp_path / "unc" / "a.parquet")
    r = cli("gallery", "inspect", str(tmp_path / "unc"))
    assert r.returncode == 2 and "--allow-uncommitted" in r.stderr


# -------------------------------------------------------------------- 12. ids are int64 or string


def test_ids_are_conformed_to_int64_or_refused(tmp_path):
    t = source_table(6, 0)
    i32 = t.set_column(0, "id", pa.array(np.arange(6, dtype=np.int32)))
    pq.write_table(i32, tmp_path / "i32.parquet")
    m = import_vectors(str(tmp_path / "i32.parquet"), str(tmp_path / "g32"), model_id="m")
    g = Gallery.open(str(tmp_path / "g32"))
    assert m.id_type == "int64" and g.schema().field("id").type == pa.int64()
    big = t.set_column(0, "id", pa.array(np.array([1, 2, 3, 4, 5, 2**63 + 7], dtype=np.uint64)))
    pq.write_table(big, tmp_path / "u64.parquet")
    with pytest.raises(GalleryError, match=r"u64\.parquet: id 9223372036854775815 does not fit in int64"):
        import_vectors(str(tmp_path / "u64.parquet"), str(tmp_path / "gu"), model_id="m")
    small = t.set_column(0, "id", pa.array(np.arange(6, dtype=np.uint64)))
    pq.write_table(small, tmp_path / "u64ok.parquet")
    m = import_vectors(str(tmp_path / "u64ok.parquet"), str(tmp_path / "gu2"), model_id="m")
    assert m.id_type == "int64" and m.rows == 6
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "ids.npy", np.array([7, 8, 9], dtype=np.int32))
    m = import_vectors(
        str(tmp_path / "v.npy"), str(tmp_path / "gn"), model_id="m", ids=str(tmp_path / "ids.npy")
    )
    assert m.id_type == "int64"


def test_embed_refuses_an_output_that_holds_its_images_before_any_work(tmp_path):
    from dmu_ray.evaluate.embed import embed_to_gallery

    images = tmp_path / "data" / "gallery"
    images.mkdir(parents=True)
    (images / "part-00000.parquet").write_bytes(b"images")
    with pytest.raises(GalleryError, match="overlap"):
        embed_to_gallery(str(images), str(tmp_path / "m.pt"), str(tmp_path / "data"), overwrite=True)
    assert (images / "part-00000.parquet").read_bytes() == b"images"
