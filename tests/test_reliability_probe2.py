"""The second hostile probe's defects (issue 34), one test each: every one failed on the code
before its fix. Real parts throughout: a local Ray cluster (and separate `ray start` nodes where
the workers must differ from the driver), real Parquet, the loopback S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from test_cli_gallery import run as cli
from test_model_sources import TinyNet
from test_multinode import LocalCluster, free_port
from test_refresh import cfg_for, make_module, make_source
from test_reliability import _eval_parts
from test_train import config as train_config
from test_train import digits  # noqa: F401  (the fixture)

from dmu_ray.config import ConfigError, EvaluateConfig
from dmu_ray.data.image_import import ImportOptions, import_images, list_folder, read_table
from dmu_ray.data.importers import import_digits
from dmu_ray.data.inspect import validate_dataset
from dmu_ray.evaluate.embed import embed_to_gallery
from dmu_ray.evaluate.galleries import keep_finite
from dmu_ray.evaluate.job import check_inputs
from dmu_ray.evaluate.matrix import EvaluationError
from dmu_ray.gallery import Gallery, GalleryError, GalleryWriter, IdSet, ModelInfo, embedding_array
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    ArtifactError,
    load_artifact,
    save_artifact,
    save_embedding_model,
)
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.refresh import run_refresh
from dmu_ray.refresh.job import JOB_MARKER, RefreshError
from dmu_ray.storage import resolve
from dmu_ray.train.job import plan_training


def tiny_model(path: Path, seed: int, dim: int = 8) -> str:
    torch.manual_seed(seed)
    save_embedding_model(str(path), EmbeddingModel("small", dim, 1), MarginHead(dim, 10), {"id": "m"})
    return str(path)


def vectors(uri: str) -> np.ndarray:
    t = Gallery.open(uri).read(columns=["id", "embedding"]).sort_by("id")
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


# ---------------------------------------------------------------- 1. what workers load is what was checked


@pytest.fixture
def cluster_elsewhere(monkeypatch, tmp_path):
    """An existing Ray cluster whose nodes run in another folder than the driver, and whose
    environment names another S3 endpoint (a loopback port where nothing listens) than a driver
    that finds its store through ``$AWS_ENDPOINT_URL``: what the driver's environment resolves,
    the workers do not see."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    home = tmp_path / "cluster-cwd"
    home.mkdir()
    cluster = LocalCluster(f"/tmp/dmu-p2-{uuid.uuid4().hex[:8]}", cwd=str(home))
    cluster.env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    cluster.env["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        cluster.start_head(2)
        yield cluster, home
    finally:
        cluster.stop()


def test_a_relative_model_path_on_an_existing_cluster_embeds_with_the_drivers_file(
    cluster_elsewhere,
    tmp_path,
    digits,  # noqa: F811
):
    cluster, home = cluster_elsewhere
    here = tmp_path / "driver-cwd"
    here.mkdir()
    theirs = tiny_model(home / "relmodel.pt", seed=1)  # same name, other weights, in the nodes' folder
    mine = tiny_model(here / "relmodel.pt", seed=2)
    address = f"127.0.0.1:{cluster.port}"

    def embed(model: str, out: str) -> None:
        r = subprocess.run(
            [
                "dmu-ray",
                "embed",
                "--images",
                f"{digits}/gallery",
                "--model",
                model,
                "--output",
                out,
                "--ray-address",
                address,
                "--max-actors",
                "1",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            cwd=here,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr

    embed("relmodel.pt", str(tmp_path / "g-rel"))
    embed(theirs, str(tmp_path / "g-theirs"))
    got, other = vectors(str(tmp_path / "g-rel")), vectors(str(tmp_path / "g-theirs"))
    assert not np.allclose(got, other, atol=1e-2)  # the two files embed differently
    steps = Gallery.open(str(tmp_path / "g-rel")).model.chains()
    sha = hashlib.sha256(Path(mine).read_bytes()).hexdigest()
    assert any(sha in json.dumps(c) for c in steps.values())  # lineage names the driver's file...
    # ...and the vectors are that file's: the same as embedding it by its absolute path
    embed(mine, str(tmp_path / "g-abs"))
    np.testing.assert_array_equal(got, vectors(str(tmp_path / "g-abs")))


def test_a_worker_refuses_an_artefact_with_other_bytes_than_the_driver_checked(tmp_path):
    path = tiny_model(tmp_path / "m.pt", seed=0)
    good = load_artifact(path, kind=EMBEDDING_MODEL)
    assert load_artifact(path, kind=EMBEDDING_MODEL, sha256=good.sha256).sha256 == good.sha256
    with pytest.raises(ArtifactError, match="but the driver checked"):
        load_artifact(path, kind=EMBEDDING_MODEL, sha256="0" * 64)


# ------------------------------------------------------------------- 2. one import a destination


def image_folder(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_two_imports_into_one_destination_one_wins_and_the_other_touches_nothing(ray_local, tmp_path):
    src = image_folder(tmp_path / "photos")
    dest = str(tmp_path / "ds")
    barrier, results = threading.Barrier(2), {}

    def run(size: int) -> None:
        listing = list_folder(str(src))
        barrier.wait()
        try:
            results[size] = import_images(listing, dest, ImportOptions(size=size, channels=1), progress=False)
        except GalleryError as err:
            results[size] = err

    threads = [threading.Thread(target=run, args=(s,)) for s in (16, 24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    won = [s for s, r in results.items() if not isinstance(r, Exception)]
    lost = [r for r in results.values() if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "claimed by another import" in str(lost[0]) or "already holds files" in str(lost[0])
    assert validate_dataset(dest) == []
    info = json.loads((tmp_path / "ds" / "_dataset.json").read_text())
    assert info["image_size"] == won[0] and sum(info["rows"].values()) == 12
    # a packaged importer into a committed data set is refused too, and changes nothing
    before = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    with pytest.raises(GalleryError, match="already holds files \\(a committed data set\\)"):
        import_digits(dest, image_size=8)
    assert {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()} == before


def test_a_packaged_import_that_fails_before_writing_releases_its_claim(tmp_path, monkeypatch):
    from dmu_ray.data import importers

    def broken(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(importers, "write_image_part", broken)
    with pytest.raises(OSError, match="disk gone"):
        import_digits(str(tmp_path / "d"), image_size=8)
    assert not any(p.is_file() for p in (tmp_path / "d").rglob("*"))  # not even the claim
    monkeypatch.undo()
    import_digits(str(tmp_path / "d"), image_size=8)  # so the folder can be used again
    assert validate_dataset(str(tmp_path / "d")) == []


# ------------------------------------------------------- 3. readers that compute figures verify files


def test_evaluate_refuses_a_gallery_file_replaced_after_its_commit(tmp_path):
    p = _eval_parts(tmp_path)
    cfg = EvaluateConfig(
        data=str(tmp_path / "data"),
        old_model=p["old_model"],
        new_model=p["new_model"],
        upgrade_module=p["upgrade_module"],
        galleries={"old": p["old"]},
        output=str(tmp_path / "out"),
    )
    check_inputs(cfg)  # as committed: fine
    part = next((tmp_path / "g-old").glob("part-*.parquet"))
    t = pq.read_table(part)
    pq.write_table(pa.concat_tables([t, t]), part)  # every id twice, a valid Parquet file
    with pytest.raises(EvaluationError, match="changed after its gallery was committed"):
        check_inputs(cfg)
    with pytest.raises(GalleryError, match="bytes, the manifest says|sha256 differs"):
        Gallery.open(p["old"], verify=True).read()
    cfg.verify_galleries = False  # the escape hatch reads it as it is
    check_inputs(cfg)
    assert Gallery.open(p["old"]).read().num_rows == 2 * t.num_rows


# ---------------------------------------------------- 4. a set that lost its rows stops the evaluation


def test_a_gallery_lost_to_quarantine_or_a_nan_model_stops_the_evaluation(tmp_path):
    p = _eval_parts(tmp_path)
    nan = str(tmp_path / "g-nan")
    old_ident = load_artifact(p["old_model"]).ident
    with GalleryWriter(resolve(nan), ModelInfo(model_id="old-m", dim=16, extra={"artifact": old_ident})) as w:
        m = np.full((20, 16), np.nan, np.float32)
        m[:2] = 1.0
        w.write(pa.table({"id": np.arange(20), "embedding": embedding_array(m), "label": np.arange(20) % 3}))
    cfg = EvaluateConfig(
        data=str(tmp_path / "data"),
        old_model=p["old_model"],
        new_model=p["new_model"],
        galleries={"old": nan},
        output=str(tmp_path / "out"),
    )
    with pytest.raises(EvaluationError, match=r"lost 18 of its 20 rows \(90.0%\).*'old-m'.*NaN"):
        check_inputs(cfg)
    cfg.max_quarantined_share = 0.95
    check_inputs(cfg)
    # vectors evaluate embeds itself: NaN rows are dropped up to the share, else the model is named
    ids, labels = np.arange(10), np.zeros(10, int)
    x = np.ones((10, 4), np.float32)
    x[3] = np.nan
    (kept_ids, _, kept), lost = keep_finite((ids, labels, x), "query set", "m@abc", 0.2)
    assert lost == 1 and 3 not in kept_ids and np.isfinite(kept).all()
    with pytest.raises(EvaluationError, match="model m@abc gave NaN/Inf vectors for 1 of the 10 images"):
        keep_finite((ids, labels, x), "query set", "m@abc", 0.01)


# ------------------------------------------------------------------------ 5. labels from a table


def test_table_labels_blank_ones_are_missing_and_integers_are_bounded(tmp_path):
    (tmp_path / "t.csv").write_text("uri,label\na.png,cat\nb.png,\nc.png,  \nd.png,dog\n")
    listing = read_table(str(tmp_path / "t.csv"))
    assert listing.class_names == ["cat", "dog"]
    assert listing.table.column("reason").to_pylist() == [None, "no label", "no label", None]
    (tmp_path / "n.csv").write_text("uri,label\na.png,0\nb.png,5000000\nc.png,1\n")
    with pytest.raises(GalleryError, match=r"1 value\(s\) >= 100,000 .*5,000,001 classes.*--max-classes"):
        read_table(str(tmp_path / "n.csv"))
    assert len(read_table(str(tmp_path / "n.csv"), max_classes=10_000_000).class_names) == 5_000_001
    r = cli("data", "import", "table", str(tmp_path / "n.csv"), str(tmp_path / "ds"), "--quiet")
    assert r.returncode == 2 and "--max-classes" in r.stderr and not (tmp_path / "ds").exists()


# --------------------------------------------------------------- 6. the model's output against its card


def lying_card(tmp_path: Path, dim: int = 64) -> str:
    """An imported (TorchScript) model artefact whose card was edited to say ``dim`` while the
    network embeds in 8 dims."""
    from dmu_ray.models.sources import import_model_artifact

    torch.jit.script(TinyNet(dim=8).eval()).save(str(tmp_path / "net.ts"))
    true = str(tmp_path / "true.pt")
    import_model_artifact(
        str(tmp_path / "net.ts"), true, model_id="m", channels=1, size=16, mean=[0.5], std=[0.5]
    )
    src = load_artifact(true)
    path = str(tmp_path / "lying.pt")
    save_artifact(path, EMBEDDING_MODEL, src.state_dict, src.card.to_dict() | {"dim": dim})
    return path


def test_embed_stops_when_the_model_does_not_give_what_its_card_says(ray_local, tmp_path, digits):  # noqa: F811
    model = lying_card(tmp_path)
    with pytest.raises(Exception, match=r"returned an output of shape \(2, 8\).*card says 64-d"):
        embed_to_gallery(f"{digits}/gallery", model, str(tmp_path / "g"))
    assert not (tmp_path / "g" / "_manifest.json").exists()
    # 12. the command says it in one line, naming the artefact, then where the logs are
    r = cli("embed", "--images", f"{digits}/gallery", "--model", model, "--output", str(tmp_path / "g2"))
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("dmu-ray: error:")]
    assert errors[0].startswith("dmu-ray: error: EmbeddingOutputError: model m@")
    assert "card says 64-d" in errors[0] and "Ray's full logs:" in errors[1]
    assert "Traceback" not in r.stderr + r.stdout and len(r.stderr.splitlines()) < 15
    r = cli(
        "--verbose",
        "embed",
        "--images",
        f"{digits}/gallery",
        "--model",
        model,
        "--output",
        str(tmp_path / "g3"),
    )
    assert r.returncode == 2 and "Traceback" in r.stderr


# ------------------------------------- 7. workers must reach the storage before the output is claimed


def test_refresh_checks_a_workers_access_before_claiming_and_releases_a_failed_claim(
    cluster_elsewhere, s3, tmp_path, ray_local
):
    cluster, _ = cluster_elsewhere
    base = f"s3://{s3.bucket}/p2-{uuid.uuid4().hex[:8]}"
    src = make_source(f"{base}/src", s3.storage, files=2, rows=50)
    make_module(str(tmp_path / "psi.pt"), None)
    cfg = tmp_path / "refresh.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "source": src,
                "output": f"{base}/out",
                "module": str(tmp_path / "psi.pt"),
                "pool": {"max_actors": 1, "num_cpus": 0.5},
            }
        )
    )
    # the driver reaches the store through its environment; the cluster's workers cannot
    r = subprocess.run(
        ["dmu-ray", "refresh", "--config", str(cfg), "--ray-address", f"127.0.0.1:{cluster.port}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "AWS_ENDPOINT_URL": s3.endpoint, "AWS_REGION": "us-east-1"},
    )
    assert r.returncode == 2, r.stderr
    assert "a Ray worker cannot " in r.stderr and "Nothing was claimed" in r.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in r.stderr  # no credential echoed
    assert s3.keys(f"{base.split('/', 3)[3]}/out") == []
    # a job that fails before its first commit releases its claim: the output is free again
    out = f"{base}/out2"
    with pytest.raises(Exception, match="injected failure"):
        run_refresh(
            cfg_for(src, out, str(tmp_path / "psi.pt"), s3.storage), progress=False, fail_after_files=0
        )
    assert s3.keys(f"{out.split('/', 3)[3]}/{JOB_MARKER}") == []


def test_a_committed_refresh_whose_file_changed_is_not_skipped_silently(ray_local, tmp_path):
    src = make_source(str(tmp_path / "src"), None, files=2, rows=50)
    make_module(str(tmp_path / "psi.pt"), None)
    cfg = cfg_for(src, str(tmp_path / "out"), str(tmp_path / "psi.pt"), None)
    run_refresh(cfg, progress=False)
    part = sorted((tmp_path / "out").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-100])  # truncated later
    with pytest.raises(RefreshError, match=r"is \d+ bytes \(the manifest says \d+ bytes\).*gallery validate"):
        run_refresh(cfg, progress=False)


# ----------------------------------------------------------------- 8. duplicate ids are reported


def test_duplicate_ids_are_reported_not_an_index_error(tmp_path):
    seen = IdSet()
    seen.add(np.arange(5))
    seen.add(np.array([], np.int64))  # a batch whose ids were all seen before
    assert seen.contains(np.array([1, 7])).tolist() == [True, False]
    folder = tmp_path / "vecs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):  # b repeats every id of a
        ids = np.arange(10) if name != "c" else np.arange(10, 20)
        emb = rng.standard_normal((10, 4)).astype(np.float32)
        t = pa.table({"id": ids, "embedding": embedding_array(emb)})
        meta = {b"dmu.model": ModelInfo(model_id="m", dim=4, dtype="float32", normalized=False).to_json()}
        pq.write_table(t.replace_schema_metadata(meta), folder / f"{name}.parquet")
    r = cli("gallery", "import", str(folder), str(tmp_path / "g"), "--model-id", "m")
    assert r.returncode == 0, r.stderr
    assert "20 rows" in r.stdout and "10 quarantined" in r.stdout and "duplicate id" in r.stdout
    r = cli("gallery", "validate", str(folder), "--allow-uncommitted")
    assert r.returncode == 1 and "duplicate" in r.stdout and "IndexError" not in r.stderr


# ------------------------------------------------------- 9. labels beyond the declared classes


def test_training_refuses_labels_beyond_the_declared_classes(tmp_path):
    data = tmp_path / "d"
    import_digits(str(data), image_size=8)
    meta = json.loads((data / "_dataset.json").read_text())
    meta["num_classes"] = 5
    (data / "_dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"labels outside 0..4 \(labels 0..9\).*declares 5 classes"):
        plan_training(train_config("t", str(tmp_path / "runs"), str(data)))


# -------------------------------------------------------------- 10. file names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_rest_imported(ray_local, tmp_path):
    src = image_folder(tmp_path / "photos", n=6)
    bad = os.path.join(os.fsencode(src / "c0"), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write((src / "c0" / "0.png").read_bytes())
    listing = list_folder(str(src))
    reasons = [r for r in listing.table.column("reason").to_pylist() if r]
    assert reasons == ["file name is not UTF-8 (bytes escaped: c0/caf\\xe9.png); rename it to import it"]
    info = import_images(listing, str(tmp_path / "ds"), ImportOptions(size=16, channels=1), progress=False)
    assert info.extra["import"]["imported"] == 6 and info.extra["import"]["quarantined"] == 1


# ------------------------------------------------------------ 11. flags to give, not a pydantic dump


def test_model_import_with_one_channel_says_which_flags_to_give(tmp_path):
    torch.jit.script(TinyNet().eval()).save(str(tmp_path / "x.ts"))
    r = cli("model", "import", str(tmp_path / "x.ts"), str(tmp_path / "m.pt"), "--id", "x", "--channels", "1")
    assert r.returncode == 2
    assert "give --mean and --std with 1 comma-separated value(s) each" in r.stderr
    assert "1 or 1" not in r.stderr and not (tmp_path / "m.pt").exists()
    r = cli(
        "model", "import", str(tmp_path / "x.ts"), str(tmp_path / "m.pt"), "--id", "x", "--channels", "1",
        "--mean", "0.5", "--std", "0.5", "--size", "16",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
