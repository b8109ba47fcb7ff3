"""Retrieval metrics on hand-computed cases, faiss exact vs IVF, bad inputs, report files."""

import json

import numpy as np
import pytest
from test_train import digits  # noqa: F401  (the fixture)

from dmu_ray.config import ConfigError, EvaluateConfig, parse_config
from dmu_ray.evaluate.job import check_inputs
from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing, headline
from dmu_ray.evaluate.metrics import average_precision, recall_at, relevance, tar_at_far
from dmu_ray.evaluate.report import markdown_table, write_report
from dmu_ray.evaluate.search import SearchConfig, search
from dmu_ray.gallery import Gallery, GalleryWriter, ModelInfo, embedding_array
from dmu_ray.models.artifact import save_embedding_model, save_upgrade_module
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.storage import resolve


def unit(angle_deg):
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_metrics_on_a_hand_computed_case():
    # q0 (label 0) ranks gallery labels [0, 1, 0]; q1 (label 1) ranks [0, 0, 1]
    rel = relevance(np.array([[0, 1, 0], [0, 0, 1]]), np.array([0, 1]))
    ap = average_precision(rel, np.array([2, 1]))
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 1 / 3])
    assert recall_at(rel, [1, 2, 3]) == {1: 0.5, 2: 0.5, 3: 1.0}
    # AP@K uses min(n_relevant, K) in the denominator
    np.testing.assert_allclose(average_precision(rel, np.array([2, 1]), k=1), [1.0, 0.0])


def test_pairing_metrics_from_real_vectors():
    # gallery on the unit circle; queries at 0 deg (label 0) and 100 deg (label 1)
    g = unit([0, 10, 90, 95, 180])
    gl = np.array([0, 1, 1, 0, 2])
    q, ql = unit([0, 100]), np.array([0, 1])
    m = evaluate_pairing("t", q, ql, g, gl, MetricsConfig(ks=[1, 2], map_at=3, tar_fars=[0.25]))
    # q0 ranks 0,10,90,95,180 -> labels 0,1,1,0,2: AP = (1 + 2/4)/2 = 0.75 ; q1 ranks 95,90,180|10,...
    # q1 at 100 deg: 95 (0), 90 (1), 180 (2), 10 (1), 0 (0) -> AP = (1/2 + 2/4)/2 = 0.5
    assert m["mAP"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["R@1"] == 0.5 and m["R@2"] == 1.0
    # mAP@3: q0 top3 labels 0,1,1 -> (1/1)/min(2,3) = 0.5 ; q1 top3 0,1,2 -> (1/2)/2 = 0.25
    assert m["mAP@3"] == pytest.approx(0.375)
    assert m["index"] == "flat" and m["queries"] == 2 and m["gallery"] == 5
    assert "TAR@FAR=0.25" in m


def test_tar_at_far():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    same = np.array([True, False, True, False, True, False, False, False])
    # impostors sorted: 0.8 0.6 0.4 0.3 0.2 ; FAR 0.2 -> 1 of 5 false accepts allowed -> threshold 0.6
    assert tar_at_far(scores, same, [0.2]) == {0.2: pytest.approx(2 / 3)}


def test_exact_and_ivf_agree_within_the_reported_recall():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 32))
    gl = rng.integers(0, 50, 6000)
    g = centers[gl] + 0.3 * rng.standard_normal((6000, 32))
    ql = rng.integers(0, 50, 300)
    q = centers[ql] + 0.3 * rng.standard_normal((300, 32))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    mc = MetricsConfig(ks=[1, 10], map_at=100, full_map_max=0, tar_fars=[])
    exact = evaluate_pairing("e", q, ql, g, gl, mc, SearchConfig(exact_max=10_000))
    ivf = evaluate_pairing("i", q, ql, g, gl, mc, SearchConfig(exact_max=1000, nprobe=4))
    assert exact["index"] == "flat" and ivf["index"].startswith("ivf")
    loss = 1 - ivf["search_recall_vs_exact"]
    assert 0 <= loss < 0.5
    assert abs(exact["mAP@100"] - ivf["mAP@100"]) <= loss + 0.02
    assert abs(exact["R@1"] - ivf["R@1"]) <= loss + 0.02
    pq_res = search(q.astype(np.float32), g.astype(np.float32), 10, SearchConfig(exact_max=1000, pq_m=8))
    assert pq_res.index.startswith("ivf") and "pq8" in pq_res.index and pq_res.recall_vs_exact is not None


def test_bad_inputs_are_named(tmp_path):
    q, ql = unit([0, 90]), np.array([0, 1])
    with pytest.raises(EvaluationError, match="new/old: queries are 2-d but the gallery is 3-d"):
        evaluate_pairing("new/old", q, ql, np.ones((4, 3), np.float32), np.zeros(4, int))
    with pytest.raises(EvaluationError, match="old/old: the gallery is empty"):
        evaluate_pairing("old/old", q, ql, np.zeros((0, 2), np.float32), np.zeros(0, int))
    save_embedding_model(
        str(tmp_path / "old.pt"), EmbeddingModel("small", 16, 1), MarginHead(16, 3), {"id": "old"}
    )
    save_embedding_model(
        str(tmp_path / "new.pt"), EmbeddingModel("small", 32, 1), MarginHead(32, 3), {"id": "new"}
    )
    # a pre-embedded gallery without labels
    with GalleryWriter(resolve(str(tmp_path / "nolabel")), ModelInfo(model_id="old", dim=16)) as w:
        import pyarrow as pa

        w.write(pa.table({"id": [1, 2], "embedding": embedding_array(np.eye(16, dtype=np.float32)[:2])}))
    cfg = EvaluateConfig(
        data="d",
        old_model=str(tmp_path / "old.pt"),
        new_model=str(tmp_path / "new.pt"),
        galleries={"old": str(tmp_path / "nolabel")},
        output=str(tmp_path / "out"),
    )
    # its labels come from the data set's gallery images by id: every id must have one
    with pytest.raises(EvaluationError, match="data: cannot read the labels of .*d/gallery"):
        check_inputs(cfg)
    from dmu_ray.data.images import write_image_part

    data = tmp_path / "data"
    write_image_part(resolve(str(data / "gallery")), [b"x", b"y"], np.array([4, 5]), np.array([1, 3]))
    cfg.data = str(data)
    with pytest.raises(
        EvaluationError, match=r"galleries\.old: .*nolabel has no 'label' column and 1 of its 2 ids .*\[2\]"
    ):
        check_inputs(cfg)
    write_image_part(resolve(str(data / "gallery")), [b"x", b"y"], np.array([4, 5]), np.array([1, 2]))
    from dmu_ray.evaluate.galleries import gallery_vectors

    ids, labels, _ = gallery_vectors(
        Gallery.open(str(tmp_path / "nolabel")), check_inputs(cfg)["labels"]["old"]
    )
    assert labels.tolist() == [4, 5] and ids.tolist() == [1, 2]
    # models of mismatched dims: the upgrade module does not map old -> new
    save_upgrade_module(str(tmp_path / "psi.pt"), UpgradeModule(16, 16, 8, 1))
    bad = EvaluateConfig(
        data="d",
        old_model=str(tmp_path / "old.pt"),
        new_model=str(tmp_path / "new.pt"),
        upgrade_module=str(tmp_path / "psi.pt"),
        output="o",
    )
    with pytest.raises(EvaluationError, match="psi.pt outputs 16-d vectors but new_model embeds in 32 dims"):
        check_inputs(bad)
    with pytest.raises(EvaluationError, match="new_model: .* no such artefact"):
        check_inputs(
            EvaluateConfig(
                data="d", old_model=str(tmp_path / "old.pt"), new_model=str(tmp_path / "x.pt"), output="o"
            )
        )


def test_report_on_s3(s3):
    pairings = {
        "old/old": {"mAP@100": 0.5, "R@1": 0.6},
        "new/upgraded": {"mAP@100": 0.7, "R@1": 0.8},
        "new/old": {"mAP@100": 0.55, "R@1": 0.62},
    }
    result = {"pairings": pairings, "headline_metric": "mAP@100", "headline": headline(pairings, "mAP@100")}
    assert result["headline"]["gain_without_backfill"] == pytest.approx(0.2)
    files = write_report(resolve(f"s3://{s3.bucket}/eval-report", s3.storage), result)
    body = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="eval-report/eval.json")["Body"].read())
    assert body["format"] == "dmu-ray.eval/1" and body["pairings"]["new/upgraded"]["R@1"] == 0.8
    md = s3.client().get_object(Bucket=s3.bucket, Key="eval-report/eval.md")["Body"].read().decode()
    assert "| new/upgraded | 70.00 | 80.00 |" in md
    assert (
        "takes the old gallery from 50.00 (old/old) to 70.00 mAP@100 for new-model queries (new/upgraded): +20.00."
        in md
    )
    png = s3.client().get_object(Bucket=s3.bucket, Key="eval-report/pairings.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and set(files) == {"json", "markdown", "plot"}


@pytest.mark.slow
def test_several_new_models_in_one_evaluation_embed_each_set_once(ray_local, tmp_path, digits, capsys):  # noqa: F811
    """``new_models``: each query/gallery set is embedded once per distinct artefact (a model named
    twice, or the same file under two paths, is embedded once), every model gets its own matrix
    against the one old model, and the numbers equal a direct computation."""
    import shutil

    from dmu_ray.evaluate.job import run_evaluation
    from dmu_ray.models.inference import embed_images

    torch = pytest.importorskip("torch")
    paths = {}
    for i, name in enumerate(("old", "bct", "dmu")):
        torch.manual_seed(i)
        paths[name] = str(tmp_path / f"{name}.pt")
        save_embedding_model(paths[name], EmbeddingModel("small", 16, 1), MarginHead(16, 10), {"id": name})
    shutil.copy(paths["bct"], tmp_path / "bct-copy.pt")  # same bytes, another path
    psi = str(tmp_path / "psi.pt")
    save_upgrade_module(psi, UpgradeModule(16, 16, 8, 1), {"id": "psi", "new_model_id": "dmu"})
    cfg = EvaluateConfig(
        data=digits,
        old_model=paths["old"],
        new_models={
            "bct": {"model": paths["bct"]},
            "dmu": {"model": paths["dmu"], "upgrade_module": psi},
            "dmu-again": {"model": paths["dmu"]},
            "independent": {"model": str(tmp_path / "bct-copy.pt")},  # as the lifecycle names it
        },
        independent_model=str(tmp_path / "bct-copy.pt"),
        output=str(tmp_path / "eval"),
    )
    capsys.readouterr()
    result = run_evaluation(cfg, progress=True)
    said = capsys.readouterr().err
    # old, bct (= independent) and dmu: queries and gallery once each
    assert said.count("embedding queries with") == 3 and said.count("embedding gallery with") == 3, said
    assert result["embedded_sets"] == 6
    assert said.count("upgrading the old gallery") == 1
    p = result["pairings"]
    assert {
        "old/old",
        "independent/independent",
        "bct:new/old",
        "dmu:new/upgraded",
        "dmu-again:new/new",
    } <= set(p)
    assert "dmu-again:new/upgraded" not in p and "bct:new/upgraded" not in p
    assert all(r["seconds"] >= 0 for r in p.values())
    # each model's own matrix, with the shared pairings in it, and its headline
    assert result["models"]["dmu"]["pairings"]["old/old"] == p["old/old"]
    assert set(result["headline"]) == {"bct", "dmu", "dmu-again", "independent"}
    assert p["independent:new/new"] == p["independent/independent"]  # one search
    assert p["independent:new/old"]["mAP@100"] == p["bct:new/old"]["mAP@100"]  # same bytes as bct
    assert result["headline"]["dmu"]["new_old_vs_old_old"] == pytest.approx(
        p["dmu:new/old"]["mAP@100"] - p["old/old"]["mAP@100"]
    )
    assert result["headline"]["dmu"]["compatibility_cost"] == pytest.approx(
        p["independent/independent"]["mAP@100"] - p["dmu:new/new"]["mAP@100"]
    )
    # eval.md says it in the demo's plain sentences, one vocabulary, no bullets
    md = markdown_table(result)
    assert "Compatibility costs dmu" in md and "dmu's queries on the untouched old gallery score" in md
    assert "\n- " not in md
    assert p["dmu:new/new"] == p["dmu-again:new/new"]
    assert p["bct:new/new"]["mAP@100"] == p["independent/independent"]["mAP@100"]  # one artefact
    assert p["bct:new/new"]["mAP@100"] != p["dmu:new/new"]["mAP@100"]  # different models differ
    # the wiring: dmu's new/old equals the metrics of the vectors embed_images gives directly
    qi, ql, qx = embed_images(f"{digits}/query", paths["dmu"])
    gi, gl, gx = embed_images(f"{digits}/gallery", paths["old"])
    direct = evaluate_pairing("d", qx, ql, gx, gl)
    assert p["dmu:new/old"]["mAP@100"] == pytest.approx(direct["mAP@100"])
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert (
        "| dmu:new/upgraded |" in md
        and "dmu's queries on the untouched old gallery" in md
        and "seconds" in md
    )
    # one way to name the new models; shared galleries other than old belong to a model
    for bad, match in (
        ({"new_model": paths["dmu"]}, "new_model .* or new_models"),
        ({"upgrade_module": psi}, "each model's upgrade_module"),
        ({"galleries": {"upgraded": "x"}}, "only the old gallery is shared"),
        ({"new_models": {"old": {"model": paths["dmu"]}}}, "'old' is not a usable name"),
        ({"new_models": {"independent": {"model": paths["dmu"]}}}, "must be the independent model"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_config(EvaluateConfig, {**cfg.model_dump(), **bad})
