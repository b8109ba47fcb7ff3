"""FastFill's partial backfill and backfill curve on a real local Ray cluster, real images (the
digits data set) and real models, with everything on the loopback S3 server."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from dmu_ray.config import BackfillConfig
from dmu_ray.data.importers import import_digits
from dmu_ray.evaluate.backfill_curve import backfill_curve
from dmu_ray.evaluate.embed import embed_to_gallery
from dmu_ray.evaluate.matrix import MetricsConfig, evaluate_pairing
from dmu_ray.gallery import EMB, Gallery, embedding_matrix
from dmu_ray.gallery_ops import inspect_gallery, validate_gallery
from dmu_ray.lineage import LINEAGE_COLUMN
from dmu_ray.methods.fastfill import BackfillScorer, select_top
from dmu_ray.models.artifact import load_artifact, save_embedding_model, save_upgrade_module
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.inference import embed_images
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.refresh.backfill import BackfillError, run_backfill
from dmu_ray.storage import read_bytes, resolve


def make_setup(base: str, storage) -> dict:
    """Digits images, an old (16-d) and a new (32-d) model, a FastFill transformation between them
    (untrained: its uncertainty branch still gives every row a distinct score), and the old gallery."""
    data = f"{base}/data/digits"
    import_digits(data, image_size=16, storage=storage)
    torch.manual_seed(0)
    uris = {"data": data}
    for name, dim in (("old", 16), ("new", 32)):
        uris[name] = f"{base}/models/{name}.pt"
        save_embedding_model(
            uris[name],
            EmbeddingModel("small", dim, 1),
            MarginHead(dim, 10),
            {"id": name, "epochs": 1},
            storage,
        )
    uris["module"] = f"{base}/models/fastfill.pt"
    psi = UpgradeModule(16, 32, 32, 1, uncertainty=True)
    save_upgrade_module(
        uris["module"], psi, {"id": "ff", "new_model_id": "new", "new_model_version": "1"}, storage
    )
    uris["gallery"] = f"{base}/galleries/old"
    embed_to_gallery(f"{data}/gallery", uris["old"], uris["gallery"], storage=storage, rows_per_file=150)
    return uris


def config(u: dict, output: str, storage, **over) -> BackfillConfig:
    base = {
        "source": u["gallery"],
        "images": f"{u['data']}/gallery",
        "module": u["module"],
        "new_model": u["new"],
        "old_model": u["old"],
        "output": output,
        "fraction": 0.25,
        "storage": storage.model_dump() if storage else {},
        "pool": {"min_actors": 1, "max_actors": 2, "batch_size": 256},
    }
    return BackfillConfig.model_validate({**base, **over})


@pytest.mark.slow
def test_backfill_and_curve_on_s3(ray_local, s3):
    st = s3.storage
    u = make_setup(f"s3://{s3.bucket}/backfill", st)
    out = f"s3://{s3.bucket}/backfill/galleries/mixed"
    cfg = config(u, out, st)
    res = run_backfill(cfg, progress=False)

    src = Gallery.open(u["gallery"], st)
    old = src.read(columns=["id", EMB])
    ids = old.column("id").to_numpy()
    n = len(ids)
    assert len(src.files) > 1 and res.manifest.rows == n
    # what the policy must have chosen, recomputed here from the old vectors
    from dmu_ray.models.artifact import build_upgrade_module

    psi = build_upgrade_module(load_artifact(u["module"], st))
    y, scores = BackfillScorer(["uncertainty"], psi)(ids, embedding_matrix(old.column(EMB)))
    chosen = set(ids[select_top(ids, scores["uncertainty"], 0.25)])
    assert len(chosen) == round(0.25 * n)

    g = Gallery.open(out, st)
    t = g.read()
    assert sorted(t.column("id").to_pylist()) == sorted(ids.tolist())  # every row, once
    prov = np.asarray(t.column("provenance").to_pylist())
    got_ids = t.column("id").to_numpy()
    assert set(got_ids[prov == "new"]) == chosen
    # lineage (issue 14): re-embedded rows have the new model's one-step chain, the others the old
    # gallery's chain followed by psi
    lineage = np.asarray(pc.cast(t.column(LINEAGE_COLUMN), pa.string()).to_pylist())
    new_art, psi_art = load_artifact(u["new"], st), load_artifact(u["module"], st)
    (old_key,) = src.model.chains()
    assert set(lineage[prov == "new"]) == {new_art.ident}
    assert set(lineage[prov == "transformed"]) == {f"{old_key}>{psi_art.ident}"}
    counts = {c["chain"]: c["rows"] for c in inspect_gallery(g)["lineage"]}
    assert counts == {new_art.ident: len(chosen), f"{old_key}>{psi_art.ident}": n - len(chosen)}
    emb = embedding_matrix(t.column(EMB)).astype(np.float32)
    new_ids, _, new_vecs = embed_images(f"{u['data']}/gallery", u["new"], storage=st)
    new_by_id = dict(zip(new_ids.tolist(), new_vecs, strict=True))
    y_by_id = dict(zip(ids.tolist(), y, strict=True))
    for i, row in zip(got_ids, emb, strict=True):
        want = new_by_id[i] if i in chosen else y_by_id[i]
        assert np.allclose(row, want, atol=2e-3), i
    b = g.manifest.extra["backfill"]
    assert (b["policy"], b["rows_new"], b["rows_transformed"]) == (
        "uncertainty",
        len(chosen),
        n - len(chosen),
    )
    assert g.model.model_id == "new" and validate_gallery(g).ok
    # the same backfill again: already committed, nothing redone
    assert run_backfill(cfg, progress=False).files_done_now == 0

    # the curve: 0% is the transformed gallery and 100% the new one, whatever the policy
    curve_cfg = config(
        u,
        out,
        st,
        curve={
            "queries": f"{u['data']}/query",
            "fractions": [0.0, 0.5, 1.0],
            "output": f"s3://{s3.bucket}/backfill/eval/curve",
        },
    )
    c = backfill_curve(curve_cfg, progress=False)
    assert set(c["curves"]) == {"uncertainty", "random", "old-discriminativeness", "oracle"}
    assert -1 <= c["uncertainty_error_spearman"] <= 1 and c["mean_transform_error"] > 0
    firsts = {v[0] for v in c["curves"].values()}
    lasts = {v[-1] for v in c["curves"].values()}
    assert len(firsts) == 1 and len(lasts) == 1
    _, q_labels, q = embed_images(f"{u['data']}/query", u["new"], storage=st)
    _, g_labels, _ = embed_images(f"{u['data']}/gallery", u["new"], storage=st)
    full = evaluate_pairing("new/new", q, q_labels, new_vecs, g_labels, MetricsConfig(tar_fars=[]))
    assert lasts.pop() == pytest.approx(full["mAP@100"], abs=1e-6)
    assert "backfill/eval/curve/backfill_curve.png" in s3.keys("backfill/eval/curve/")
    saved = json.loads(read_bytes(resolve(f"s3://{s3.bucket}/backfill/eval/curve/backfill_curve.json", st)))
    assert saved["area"] == c["area"] and saved["format"] == "dmu-ray.backfill-curve/1"


def test_backfill_refuses_what_cannot_be_joined(ray_local, tmp_path):
    u = make_setup(str(tmp_path), None)
    out = str(tmp_path / "mixed")
    # the query images are not the gallery's: the selected rows have no image, nothing is written
    with pytest.raises(BackfillError, match="selected gallery ids have no image"):
        run_backfill(config(u, out, None, images=f"{u['data']}/query"), progress=False)
    assert not (tmp_path / "mixed").exists()
    # a transformation trained towards another model
    other = str(tmp_path / "models/other.pt")
    save_upgrade_module(other, UpgradeModule(16, 32, 32, 1, uncertainty=True), {"new_model_id": "newer"})
    with pytest.raises(BackfillError, match="trained towards model 'newer'"):
        run_backfill(config(u, out, None, module=other), progress=False)
    # the uncertainty order needs a transformation with an uncertainty branch
    plain = str(tmp_path / "models/plain.pt")
    save_upgrade_module(plain, UpgradeModule(16, 32, 32, 1), {"new_model_id": "new"})
    with pytest.raises(BackfillError, match="uncertainty branch"):
        run_backfill(config(u, out, None, module=plain), progress=False)
    # ... which the random order does not
    res = run_backfill(config(u, out, None, module=plain, policy="random", fraction=0.0), progress=False)
    assert res.manifest.extra["backfill"]["rows_new"] == 0


def test_backfill_re_embeds_from_a_uri_table(ray_local, tmp_path):
    """The gallery's images listed by a table of id,uri (files anywhere, not a dmu-ray data set):
    the backfill re-embeds from them exactly as from the data set part holding the same images."""
    import pyarrow.parquet as pq

    u = make_setup(str(tmp_path), None)
    # the new model's card says its input size (as every model dmu-ray exports or imports does)
    from dmu_ray.models.artifact import load_artifact, save_artifact

    art = load_artifact(u["new"])
    save_artifact(
        u["new"], "embedding_model", art.state_dict, art.card.to_dict() | {"preprocessing": {"size": 16}}
    )
    imgs = pq.read_table(f"{u['data']}/gallery")
    (tmp_path / "photos").mkdir()
    lines = ["id,uri"]
    for i, b in zip(imgs.column("id").to_pylist(), imgs.column("image").to_pylist(), strict=True):
        (tmp_path / "photos" / f"{i}.png").write_bytes(b)
        lines.append(f"{i},photos/{i}.png")
    (tmp_path / "images.csv").write_text("\n".join(lines))
    by_part = run_backfill(config(u, str(tmp_path / "g1"), None), progress=False)
    by_table = run_backfill(
        config(u, str(tmp_path / "g2"), None, images=str(tmp_path / "images.csv")), progress=False
    )
    assert (
        by_table.manifest.extra["backfill"]["rows_new"] == by_part.manifest.extra["backfill"]["rows_new"] > 0
    )
    a, b = (Gallery.open(str(tmp_path / g)).read().sort_by("id") for g in ("g1", "g2"))
    assert a.column("provenance").to_pylist() == b.column("provenance").to_pylist()
    np.testing.assert_allclose(embedding_matrix(a.column(EMB)), embedding_matrix(b.column(EMB)), atol=1e-3)
    # a listed image that cannot be read is an error naming it; nothing is committed
    chosen = b.filter(pc.equal(b.column("provenance"), "new")).column("id")[0].as_py()
    (tmp_path / "photos" / f"{chosen}.png").unlink()
    with pytest.raises(Exception, match=rf"image of id {chosen} at .*{chosen}\.png: unreadable"):
        run_backfill(
            config(u, str(tmp_path / "g3"), None, images=str(tmp_path / "images.csv")), progress=False
        )
    assert not (tmp_path / "g3" / "_manifest.json").exists()
    # a curve measures retrieval: a table without labels is refused, not measured as zero
    (tmp_path / "photos" / f"{chosen}.png").write_bytes(
        imgs.filter(pc.equal(imgs.column("id"), chosen)).column("image")[0].as_py()
    )
    from dmu_ray.evaluate.matrix import EvaluationError

    curve = {"queries": f"{u['data']}/query", "fractions": [0.0, 1.0], "output": str(tmp_path / "curve")}
    with pytest.raises(EvaluationError, match=r"gallery images have no label"):
        backfill_curve(
            config(u, str(tmp_path / "g5"), None, images=str(tmp_path / "images.csv"), curve=curve),
            progress=False,
        )
    # a table without ids cannot be joined to the gallery
    (tmp_path / "noid.csv").write_text("uri\nphotos/1.png\n")
    with pytest.raises(BackfillError, match=r"images: .*noid\.csv: missing column\(s\) \['id'\]"):
        run_backfill(config(u, str(tmp_path / "g4"), None, images=str(tmp_path / "noid.csv")), progress=False)
