"""The standard evaluation protocols (issue 15): Revisited Oxford/Paris (easy/hard/junk, mAP and
mP@k for E/M/H) and IJB-C style templates (pooling, TAR@FAR on template pairs, TPIR@FPIR), on
hand-computed cases, ground-truth files the tests write, and through ``dmu-ray evaluate`` on Ray."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train import digits  # noqa: F401  (the fixture)

from dmu_ray.config import EvaluateConfig
from dmu_ray.evaluate.ground_truth import GroundTruthError, load_revisited, load_templates
from dmu_ray.evaluate.job import check_inputs, run_evaluation
from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing
from dmu_ray.evaluate.metrics import revisited_ap_mp, tar_at_far, tpir_at_fpir
from dmu_ray.models.artifact import save_embedding_model
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.inference import embed_images


def test_revisited_ap_and_mp_by_hand():
    # positives {1, 3}, junk {2}: ranking 2,1,0,3,4,5 -> without junk 1,0,3,4,5: hits at ranks 0, 2
    ap, mp = revisited_ap_mp(np.array([2, 1, 0, 3, 4, 5]), np.array([1, 3]), np.array([2]), [1, 2, 5])
    assert ap == pytest.approx(((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    # mP@k divides by min(k, rank of the last positive = 3)
    assert mp == {1: 1.0, 2: pytest.approx(0.5), 5: pytest.approx(2 / 3)}
    assert revisited_ap_mp(np.arange(4), np.array([], np.int64), np.array([0]), [1]) is None


def _gnd(**over):
    d = {
        "imlist": ["a", "b", "c", "d", "e"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"easy": [0], "hard": [1], "junk": [4], "bbx": [0, 0, 10, 10]},
            {"easy": [], "hard": [2, 3], "junk": []},
        ],
    }
    d.update(over)
    return d


def test_revisited_ground_truth_files(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(_gnd()))
    gt = load_revisited(str(tmp_path / "g.json"))
    s = gt.settings()
    # Easy: hard images are ignored (junk); Hard: easy ones are
    assert [a.tolist() for a in s["E"][0]] == [[0], []] and sorted(s["E"][1][0].tolist()) == [1, 4]
    assert [a.tolist() for a in s["M"][0]] == [[0, 1], [2, 3]]
    assert [a.tolist() for a in s["H"][0]] == [[1], [2, 3]] and sorted(s["H"][1][0].tolist()) == [0, 4]
    # the official format is a pickle with numpy arrays: read without running code
    official = _gnd(gnd=[{k: np.asarray(v) for k, v in e.items()} for e in _gnd()["gnd"]])
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(official))
    assert [a.tolist() for a in load_revisited(str(tmp_path / "g.pkl")).hard] == [[1], [2, 3]]

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"imlist": Evil()}))
    with pytest.raises(GroundTruthError, match="refusing .*system: a ground-truth file holds data only"):
        load_revisited(str(tmp_path / "evil.pkl"))
    bad = _gnd(gnd=[{"easy": [7], "hard": [], "junk": []}, {"easy": [], "hard": [], "junk": []}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\.easy: position 7 outside imlist \(0\.\.4\)"):
        load_revisited(str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps(_gnd(qimlist=["q0"])))
    with pytest.raises(GroundTruthError, match="gnd has 2 entries but qimlist 1 queries"):
        load_revisited(str(tmp_path / "short.json"))
    with pytest.raises(GroundTruthError, match="no such file"):
        load_revisited(str(tmp_path / "none.json"))


def unit(angle_deg):
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_revisited_protocol_on_a_pairing(tmp_path):
    # gallery ids 10..14 are imlist's a..e; id 99 is a distractor; queries have ids 5 and 6
    gnd = _gnd(query_ids=[5, 6], gallery_ids=[10, 11, 12, 13, 14])
    (tmp_path / "g.json").write_text(json.dumps(gnd))
    g, g_ids = unit([0, 40, 100, 95, 5, 50]), np.array([10, 11, 12, 13, 14, 99])
    q, q_ids = unit([1, 97]), np.array([5, 6])
    mcfg = MetricsConfig(
        protocols=["revisited"], ground_truth={"revisited": load_revisited(str(tmp_path / "g.json"))}
    )
    m = evaluate_pairing("t", q, np.zeros(2), g, np.zeros(6), mcfg, q_ids=q_ids, g_ids=g_ids)
    # q0 at 1 deg ranks ids 10 (0), 14 (5, junk), 11 (40), 99 (50), 13, 12
    #   Medium: positives 10, 11 -> ranks 0 and 1 after junk removal: AP 1
    #   Hard: positive 11, easy 10 ignored: ranks 11 first -> AP 1
    # q1 at 97 deg ranks 13 (95), 12 (100), 99, 11, 14, 10: positives 12, 13 at ranks 0, 1 -> AP 1
    assert m["mAP(M)"] == pytest.approx(1.0) and m["mAP(H)"] == pytest.approx(1.0)
    assert m["mAP(E)"] == pytest.approx(1.0)  # only q0 has easy positives; q1 does not count
    assert m["distractors"] == 1 and m["mP@5(M)"] == pytest.approx(1.0)
    # a distractor placed before q0's hard positive lowers Hard but not Easy
    g2 = unit([0, 40, 100, 95, 5, 20])
    m2 = evaluate_pairing("t", q, np.zeros(2), g2, np.zeros(6), mcfg, q_ids=q_ids, g_ids=g_ids)
    assert m2["mAP(E)"] == pytest.approx(1.0)
    # q0 Hard (easy 10 and junk 14 removed): 99 at rank 0, its positive 11 at rank 1: the
    # trapezoid between precision 0/1 before the hit and 1/2 at it gives AP 0.25; q1 keeps 1
    assert m2["mAP(H)"] == pytest.approx(((0 / 1 + 1 / 2) / 2 + 1.0) / 2)
    with pytest.raises(EvaluationError, match=r"revisited queries .*: 1 id\(s\) not found, e\.g\. \[6\]"):
        evaluate_pairing("t", q[:1], np.zeros(1), g, np.zeros(6), mcfg, q_ids=q_ids[:1], g_ids=g_ids)


def _write(path, cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_templates_pool_by_media_and_score(tmp_path):
    # two probe templates (query side) and a gallery set G1 with subjects 1 and 2
    table = _write(
        tmp_path / "t.parquet",
        {
            "template": ["p1", "p1", "p1", "p2", "r1", "r2"],
            "id": [0, 1, 2, 3, 0, 1],
            "media": [7, 7, 8, 9, 1, 2],
            "subject": [1, 1, 1, 3, 1, 2],
            "set": ["probe", "probe", "probe", "probe", "G1", "G1"],
        },
    )
    pairs = _write(tmp_path / "p.parquet", {"probe": ["p1", "p1", "p2"], "reference": ["r1", "r2", "r1"]})
    ts = load_templates(table, pairs)
    q_ids = np.array([0, 1, 2, 3])
    q = unit([0, 20, 90, 180])
    # media 7 = mean of 0 and 20 deg (10 deg); media 8 = 90 deg; template = normalised mean
    want = unit([10])[0] * np.cos(np.deg2rad(10)) + unit([90])[0]
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(ts.pool(["p1"], q_ids, q, "t")[0], want, atol=1e-6)
    g_ids, g = np.array([0, 1]), unit([45, 135])
    mcfg = MetricsConfig(
        protocols=["templates"],
        ground_truth={"templates": ts},
        template_fars=[0.5],
        fpirs=[0.5],
        identification_ranks=[1, 2],
    )
    m = evaluate_pairing("t", q, np.zeros(4), g, np.zeros(2), mcfg, q_ids=q_ids, g_ids=g_ids)
    p1 = ts.pool(["p1"], q_ids, q, "t")[0]
    p2 = ts.pool(["p2"], q_ids, q, "t")[0]
    scores = np.array([p1 @ g[0], p1 @ g[1], p2 @ g[0]])
    genuine = np.array([True, False, False])  # subjects 1-1, 1-2, 3-1
    assert m["template TAR@FAR=0.5"] == tar_at_far(scores, genuine, [0.5])[0.5] and m["template_pairs"] == 3
    # 1:N: p1 (subject 1) is mated; p2 (subject 3) is not in G1
    assert m["mated_probes[G1]"] == 1 and m["non_mated_probes[G1]"] == 1
    top1_right = (p1 @ g[0]) > (p1 @ g[1])
    assert m["rank1[G1]"] == float(top1_right) and m["rank2[G1]"] == 1.0


def test_tpir_at_fpir_by_hand():
    # 3 probes x 2 gallery templates (subjects 10, 20); probe subjects 10, 20, 99 (non-mated)
    scores = np.array([[0.9, 0.1], [0.6, 0.5], [0.7, 0.2]])
    got = tpir_at_fpir(scores, np.array([10, 20, 99]), np.array([10, 20]), [0.5, 0.99], [1, 2])
    # FPIR 0.5 of one non-mated probe: floor(0.5) = 0 false alarms -> threshold 0.7: probe 0 (0.9,
    # right) passes; probe 1's top is the wrong subject
    assert got["TPIR@FPIR=0.5"] == 0.5 and got["rank1"] == 0.5 and got["rank2"] == 1.0
    assert got["mated_probes"] == 2 and got["non_mated_probes"] == 1
    closed = tpir_at_fpir(scores[:2], np.array([10, 20]), np.array([10, 20]), [0.1], [1])
    assert np.isnan(closed["TPIR@FPIR=0.1"]) and closed["rank1"] == 0.5  # no non-mated probes


def test_template_tables_are_checked(tmp_path):
    with pytest.raises(GroundTruthError, match=r"missing column\(s\) \['id'\]"):
        load_templates(_write(tmp_path / "a.parquet", {"template": [1]}))
    two_subjects = _write(tmp_path / "b.parquet", {"template": [1, 1], "id": [0, 1], "subject": [3, 4]})
    with pytest.raises(GroundTruthError, match="template 1 has more than one subject"):
        load_templates(two_subjects)
    no_probe = _write(tmp_path / "c.parquet", {"template": [1], "id": [0], "set": ["G1"]})
    with pytest.raises(GroundTruthError, match="names no 'probe' templates"):
        load_templates(no_probe)
    ok = _write(tmp_path / "d.parquet", {"template": [1, 2], "id": [0, 1]})
    with pytest.raises(GroundTruthError, match="nothing to measure"):
        load_templates(ok)
    pairs = _write(tmp_path / "p.parquet", {"probe": [1], "reference": [5]})
    with pytest.raises(GroundTruthError, match=r"1 template\(s\) not in .*d\.parquet, e\.g\. \[5\]"):
        load_templates(ok, pairs)


def test_evaluate_runs_the_standard_protocols_on_ray(ray_local, tmp_path, digits):  # noqa: F811
    """``dmu-ray evaluate`` with revisited and templates next to retrieval: ground truth read and
    checked before embedding, metrics for every pairing, the report's protocol table."""
    for name in ("old", "new"):
        save_embedding_model(
            str(tmp_path / f"{name}.pt"), EmbeddingModel("small", 16, 1), MarginHead(16, 10), {"id": name}
        )
    q = pq.read_table(f"{digits}/query", columns=["id", "label"]).to_pydict()
    g = pq.read_table(f"{digits}/gallery", columns=["id", "label"]).to_pydict()
    q_ids, q_lab = np.array(q["id"]), np.array(q["label"])
    g_ids, g_lab = np.array(g["id"]), np.array(g["label"])
    queries = [int(np.flatnonzero(q_lab == c)[0]) for c in range(5)]  # one query per digit 0-4
    gnd = []
    for i in queries:
        same = np.flatnonzero(g_lab == q_lab[i])
        gnd.append({"easy": same[::2].tolist(), "hard": same[1::2][:-1].tolist(), "junk": same[-1:].tolist()})
    doc = {
        "imlist": [str(x) for x in g_ids],
        "qimlist": [str(q_ids[i]) for i in queries],
        "gnd": gnd,
        "query_ids": q_ids[queries].tolist(),
        "gallery_ids": g_ids.tolist(),
    }
    (tmp_path / "gnd.json").write_text(json.dumps(doc))
    rows = []  # probes: 3 query images per digit; gallery set G1: digits 0-7 from 4 gallery images
    for c in range(10):
        rows += [(f"p{c}", int(i), "probe") for i in q_ids[q_lab == c][:3]]
        if c < 8:
            rows += [(f"g{c}", int(i), "G1") for i in g_ids[g_lab == c][:4]]
    table = _write(
        tmp_path / "tpl.parquet",
        dict(zip(["template", "id", "set"], map(list, zip(*rows, strict=True)), strict=True)),
    )
    pairs = _write(
        tmp_path / "pairs.parquet",
        {
            "probe": [f"p{c}" for c in range(8) for _ in range(8)],
            "reference": [f"g{d}" for _ in range(8) for d in range(8)],
        },
    )
    cfg = EvaluateConfig(
        data=digits,
        old_model=str(tmp_path / "old.pt"),
        new_model=str(tmp_path / "new.pt"),
        output=str(tmp_path / "eval"),
        protocols=["retrieval", "revisited", "templates"],
        revisited={"ground_truth": str(tmp_path / "gnd.json")},
        templates={"table": table, "pairs": pairs, "fars": [0.1], "fpirs": [0.5]},
    )
    result = run_evaluation(cfg, progress=False)
    for name in ("old/old", "new/new", "new/old"):
        m = result["pairings"][name]
        assert {
            "mAP(E)",
            "mAP(M)",
            "mAP(H)",
            "mP@10(M)",
            "template TAR@FAR=0.1",
            "TPIR@FPIR=0.5[G1]",
            "rank1[G1]",
        } <= set(m)
        assert m["mated_probes[G1]"] == 8 and m["non_mated_probes[G1]"] == 2 and m["template_pairs"] == 64
    # the wiring by id: new/new's Medium mAP equals the metric computed from embed_images' vectors
    ids, _, x = embed_images(f"{digits}/query", cfg.new_model)
    gi, _, gx = embed_images(f"{digits}/gallery", cfg.new_model)
    mcfg = MetricsConfig(
        protocols=["revisited"], ground_truth={"revisited": load_revisited(cfg.revisited.ground_truth)}
    )
    direct = evaluate_pairing("d", x, np.zeros(len(x)), gx, np.zeros(len(gx)), mcfg, q_ids=ids, g_ids=gi)
    assert result["pairings"]["new/new"]["mAP(M)"] == pytest.approx(direct["mAP(M)"])
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "Protocol metrics (%):" in md and "mAP(H)" in md and "TPIR@FPIR=0.5[G1]" in md
    # a successful import and evaluation leave no empty _tmp folders behind (issue 17)
    from pathlib import Path

    assert not list(Path(digits).rglob("_tmp")) and not list((tmp_path / "eval").rglob("_tmp"))

    # checked before any embedding: a ground-truth image the data set lacks, a missing section
    doc["query_ids"][0] = 10**9
    (tmp_path / "gnd.json").write_text(json.dumps(doc))
    with pytest.raises(
        EvaluationError, match=r"revisited \(.*gnd\.json\): images of the data set query part: 1 id"
    ):
        check_inputs(cfg)
    with pytest.raises(EvaluationError, match="templates: protocol 'templates' needs this section"):
        check_inputs(cfg.model_copy(update={"templates": None, "protocols": ["templates"]}))


def test_templates_outside_every_set_serve_the_pairs(tmp_path):
    table = _write(
        tmp_path / "t.parquet",
        {"template": ["p", "g", "v1", "v2"], "id": [0, 1, 2, 3], "set": ["probe", "G1", None, None]},
    )
    ts = load_templates(table, _write(tmp_path / "p.parquet", {"probe": ["v1"], "reference": ["v2"]}))
    assert ts.probe_templates() == ["p"] and ts.gallery_sets() == {"G1": ["g"]}
    assert ts.query_side().tolist() == [0, 2] and ts.gallery_side().tolist() == [1, 3]
