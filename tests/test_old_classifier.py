"""Old classifiers from class prototypes (issue 12 part 2, issue 13's BCT extension): an imported
old model without classifier gets one built on Ray (class means of its features), and BCT/DMU
extend an old classifier to the classes it never saw unless told not to."""

import numpy as np
import pytest
import torch
from test_model_sources import TinyNet
from test_train import config

from dmu_ray.data.importers import import_digits
from dmu_ray.methods.old_classifier import calibrated_scale
from dmu_ray.models.artifact import build_embedding_model, load_artifact, save_embedding_model
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.inference import embed_images
from dmu_ray.models.sources import import_model_artifact
from dmu_ray.train.job import plan_training, run_training


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits"
    import_digits(str(path), image_size=16)
    return str(path)


def class_means(feats: np.ndarray, labels: np.ndarray, classes) -> np.ndarray:
    out = np.stack([feats[labels == c].mean(0) for c in classes])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_an_imported_old_model_without_classifier_trains_dmu(ray_local, tmp_path, digits):
    torch.manual_seed(2)
    torch.jit.script(TinyNet(dim=32).eval()).save(str(tmp_path / "deployed.pt"))
    old = str(tmp_path / "old.pt")
    import_model_artifact(
        str(tmp_path / "deployed.pt"), old, model_id="prod-v1", channels=1, size=24, mean=[0.4], std=[0.3]
    )
    assert not load_artifact(old).card.has_classifier
    cfg = config(
        "dmu", str(tmp_path / "runs"), digits, optim={"epochs": 1}, method={"name": "dmu", "old_model": old}
    )
    out = run_training(cfg, progress=False)
    # the prototype classifier: the old network, one row per class = mean old feature of the class
    built = load_artifact(str(tmp_path / "runs" / "dmu" / "old_classifier.pt"))
    c = built.card
    assert c.prototype_classes == [True] * 10 and c.classifier_classes == [True] * 10
    assert c.derived_from == load_artifact(old).ident and c.id == "prod-v1"
    ids, labels, feats = embed_images(f"{digits}/train", old)
    _, head = build_embedding_model(built)
    np.testing.assert_allclose(head.weight.detach().numpy(), class_means(feats, labels, range(10)), atol=1e-5)
    # its head: a cosine softmax without margin, scaled to classify the old features best (issue 37)
    assert (c.head, c.m) == ("softmax", 0.0) and (head.kind, head.m) == ("softmax", 0.0)
    assert c.s == pytest.approx(calibrated_scale(feats, labels, class_means(feats, labels, range(10)))[0])
    # DMU trained against it: compatibility and discriminativeness were measured
    m = out["metrics"]
    assert m["compat"] > 0 and 0 < m["old_d"] <= 1 and "upgrade" in m and m["constrained"] == 1.0
    hist = load_artifact(out["model"]).card.history[-1]  # the run card keeps d's distribution per epoch
    assert {"old_d", "d_q10", "d_q50", "d_q90", "d_near0", "d_near1", "w_max", "constrained"} <= set(hist)
    card = load_artifact(out["model"]).card
    assert card.old_model["id"].startswith("prod-v1@") and card.old_classifier.endswith("old_classifier.pt")
    # a resumed run reuses it (same file, not rebuilt)
    before = (tmp_path / "runs" / "dmu" / "old_classifier.pt").stat().st_mtime_ns
    plan = plan_training(cfg)
    assert plan.cfg.method.prepare(plan, progress=False)["old_classifier"].endswith("old_classifier.pt")
    assert (tmp_path / "runs" / "dmu" / "old_classifier.pt").stat().st_mtime_ns == before


def test_unibct_scores_an_imported_old_models_prototypes_with_a_fitted_head(ray_local, tmp_path, digits):
    """UniBCT against an old model without classifier: its prototypes get the cosine softmax that
    classifies the old features best (as BCT's and DMU's prototype classifier), not the new head's
    ArcFace margin; an old model with a classifier keeps that head's kind, scale and margin."""
    torch.manual_seed(5)
    torch.jit.script(TinyNet(dim=32).eval()).save(str(tmp_path / "deployed.pt"))
    old = str(tmp_path / "old.pt")
    import_model_artifact(
        str(tmp_path / "deployed.pt"), old, model_id="prod-v1", channels=1, size=24, mean=[0.4], std=[0.3]
    )
    method = {"name": "unibct", "old_model": old, "refinement": "none"}
    cfg = config("u", str(tmp_path / "runs"), digits, method=method)
    plan = plan_training(cfg)
    info = plan.info() | cfg.method.prepare(plan, progress=False)
    _, labels, feats = embed_images(f"{digits}/train", old)
    protos = np.asarray(info["prototypes"])
    np.testing.assert_allclose(protos, class_means(feats, labels, range(10)), atol=1e-5)
    s = calibrated_scale(feats, labels, protos)[0]
    assert info["prototype_head"] == {"kind": "softmax", "s": pytest.approx(s), "m": 0.0}
    t, _ = cfg.method.build(cfg, info)
    assert (t.old_head.kind, t.old_head.m) == ("softmax", 0.0) and t.old_head.s == pytest.approx(s)
    assert t.head.m > 0  # the new model's own head keeps its margin
    # an old model with a classifier: its head scores the prototypes, nothing is fitted
    save_embedding_model(
        str(tmp_path / "own.pt"),
        EmbeddingModel("small", 32, 1),
        MarginHead(32, 10, "cosface", 20.0, 0.2),
        {"id": "own"},
    )
    cfg = config("v", str(tmp_path / "runs"), digits, method=method | {"old_model": str(tmp_path / "own.pt")})
    plan = plan_training(cfg)
    info = plan.info() | cfg.method.prepare(plan, progress=False)
    assert "prototype_head" not in info
    t, _ = cfg.method.build(cfg, info)
    assert (t.old_head.kind, t.old_head.s, t.old_head.m) == ("cosface", 20.0, pytest.approx(0.2))


def test_bct_extends_the_old_classifier_to_new_classes_unless_told_not_to(ray_local, tmp_path, digits):
    """An old dmu-ray model that knew classes 0-5 only: BCT (extended-class, all classes) gets
    rows 6-9 from the old model's class means, keeps rows 0-5 as trained; 'exclude' builds none."""
    torch.manual_seed(3)
    model, head = EmbeddingModel("small", 32, 1).eval(), MarginHead(32, 10)
    known = [c < 6 for c in range(10)]
    old = str(tmp_path / "old.pt")
    save_embedding_model(old, model, head, {"id": "old", "trained_classes": known})
    runs = str(tmp_path / "runs")
    for method in ("bct", "dmu"):
        plan = plan_training(config(method, runs, digits, method={"name": method, "old_model": old}))
        info = plan.cfg.method.prepare(plan, progress=False)
        built = load_artifact(info["old_classifier"])
        assert built.card.prototype_classes == [not k for k in known]
        assert built.card.classifier_classes == [True] * 10
        w = built.state_dict["classifier.weight"].numpy()
        np.testing.assert_array_equal(w[:6], head.weight.detach().numpy()[:6])
        ids, labels, feats = embed_images(f"{digits}/train", old)
        np.testing.assert_allclose(w[6:], class_means(feats, labels, range(6, 10)), atol=1e-5)
        trainee, _ = plan.cfg.method.build(plan.cfg, {"num_classes": 10, "channels": 1, **info})
        assert trainee.old_classes.all()
    plan = plan_training(
        config("bct-x", runs, digits, method={"name": "bct", "old_model": old, "new_classes": "exclude"})
    )
    assert plan.cfg.method.prepare(plan, progress=False) == {}
    trainee, _ = plan.cfg.method.build(plan.cfg, {"num_classes": 10, "channels": 1})
    assert trainee.old_classes.tolist() == known


def test_new_classes_is_only_a_field_of_methods_with_an_old_classifier(tmp_path, digits):
    from dmu_ray.config import ConfigError, TrainConfig, parse_config

    base = config("x", str(tmp_path), digits).model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"method\.new_classes: unknown key"):
        parse_config(
            TrainConfig, {**base, "method": {"name": "l2", "old_model": "o.pt", "new_classes": "extend"}}
        )
    with pytest.raises(ConfigError, match=r"method\.new_classes"):
        parse_config(
            TrainConfig, {**base, "method": {"name": "bct", "old_model": "o.pt", "new_classes": "all"}}
        )


def test_relative_paths_in_a_train_config_mean_the_submitting_folder(
    ray_local, tmp_path, digits, monkeypatch
):
    """Ray Train workers run in the run's own folder: a relative old_model (as in
    configs/train_dmu_local.yaml) must still be found by them."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(4)
    (tmp_path / "models").mkdir()
    save_embedding_model(
        "models/old.pt", EmbeddingModel("small", 32, 1).eval(), MarginHead(32, 10), {"id": "old"}
    )
    out = run_training(
        config(
            "rel", "runs", digits, optim={"epochs": 1}, method={"name": "bct", "old_model": "models/old.pt"}
        ),
        progress=False,
    )
    assert out["metrics"]["compat"] > 0 and (tmp_path / "runs" / "rel" / "export" / "model.pt").exists()


def test_the_prototype_head_scale_minimises_the_old_features_cross_entropy():
    """calibrated_scale picks, among its scales, the one with the lowest cross-entropy of the old
    features under ``s * cos``, and that is far below what a margin head gives the same features
    when class means sit close together (the issue-37 case: a 0.3 rad ArcFace margin made the old
    features' own loss worse than a uniform guess)."""
    from dmu_ray.methods.old_classifier import SCALES

    rng = np.random.default_rng(0)
    centre = rng.normal(size=64)  # every class near one direction, as post-ReLU features are
    means = centre + 0.35 * rng.normal(size=(20, 64))
    labels = rng.integers(0, 20, size=4000)
    feats = means[labels] + 0.3 * rng.normal(size=(4000, 64))
    protos = class_means(feats, labels, range(20))
    s, ce, top1 = calibrated_scale(feats, labels, protos)
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = x @ protos.T

    def cross_entropy(logits):
        z = logits - logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))

    by_scale = [cross_entropy(t * cos) for t in SCALES]
    assert s == SCALES[int(np.argmin(by_scale))] and ce == pytest.approx(min(by_scale))
    assert top1 == pytest.approx(np.mean(cos.argmax(1) == labels))
    own = cos[np.arange(len(labels)), labels]
    arc = cos.copy()
    arc[np.arange(len(labels)), labels] = np.cos(np.arccos(np.clip(own, -1, 1)) + 0.3)
    assert ce < 0.5 * cross_entropy(30 * arc), (ce, cross_entropy(30 * arc))
    # a seeded sample stands in for many rows and gives nearly the same scale
    s_sample = calibrated_scale(feats, labels, protos, max_rows=1000)[0]
    assert 0.5 < s_sample / s < 2


def test_an_old_classifier_built_with_a_margin_head_is_rebuilt_not_reused(tmp_path):
    """A run resuming reuses its prototype classifier only when it has the calibrated head: one
    written before (the new model's ArcFace margin over the class means) is built again."""
    from dmu_ray.methods.old_classifier import reusable_old_classifier
    from dmu_ray.models.artifact import EMBEDDING_MODEL, save_artifact

    torch.jit.script(TinyNet(dim=8).eval()).save(str(tmp_path / "deployed.pt"))
    import_model_artifact(
        str(tmp_path / "deployed.pt"),
        str(tmp_path / "old.pt"),
        model_id="v1",
        channels=1,
        mean=[0.5],
        std=[0.5],
    )
    old = load_artifact(str(tmp_path / "old.pt"))
    build = np.ones(3, dtype=bool)
    for head, m, reused in (("arcface", 0.3, False), ("softmax", 0.0, True)):
        state = dict(old.state_dict) | {"classifier.weight": torch.eye(3, 8)}
        card = old.card.to_dict() | {
            "num_classes": 3,
            "head": head,
            "s": 30.0,
            "m": m,
            "classifier_classes": build.tolist(),
            "prototype_classes": build.tolist(),
            "derived_from": old.ident,
        }
        dest = str(tmp_path / f"{head}.pt")
        save_artifact(dest, EMBEDDING_MODEL, state, card)
        assert (reusable_old_classifier(dest, old, build, None) is not None) == reused, head
