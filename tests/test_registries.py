"""Registries and name lists (issue 19): every method is a registered class in its own file, every
name list has one source, and the l2 method (added as one file) trains on Ray Train."""

import pkgutil
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmu_ray.methods.catalog as catalog
from dmu_ray.cli import build_parser
from dmu_ray.config import (
    BACKFILL_POLICIES,
    SPLITS,
    BackfillCurveSection,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    parse_config,
)
from dmu_ray.data.importers import IMPORTERS
from dmu_ray.lifecycle import VARIANTS, LifecycleConfig
from dmu_ray.methods import fastfill
from dmu_ray.methods.registry import METHODS, MethodConfig, make_method, method_from_saved
from dmu_ray.models.artifact import load_artifact
from dmu_ray.models.backbones import BACKBONES
from dmu_ray.models.heads import HEADS, MarginHead
from dmu_ray.submit import JOBS
from dmu_ray.train.job import _saved_config
from dmu_ray.train.trainee import Trainee


def literal(model, field: str) -> tuple:
    ann = model.model_fields[field].annotation
    return typing.get_args(typing.get_args(ann)[0] if typing.get_origin(ann) is list else ann)


def choices(*path: str) -> list:
    parser = build_parser()
    for name in path[:-1]:
        sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
        parser = sub.choices[name]
    return next(a.choices for a in parser._actions if a.dest == path[-1])


def test_every_catalog_file_registers_one_method_of_its_name():
    # a file is named after its method, a dash in the name an underscore in the file
    files = sorted(
        m.name.replace("_", "-") for m in pkgutil.iter_modules(catalog.__path__) if not m.name.startswith("_")
    )
    assert sorted(METHODS) == files
    union = typing.get_args(typing.get_args(MethodConfig)[0])  # Annotated[Union[...], ...]
    tags = {cls.model_fields["name"].default for cls in union}
    assert tags == set(METHODS)


def test_name_lists_have_one_source():
    assert set(literal(LifecycleConfig, "backbone")) == set(BACKBONES)
    for name in (*BACKBONES, "torchvision:resnet18", "timm:resnet18"):
        assert ModelConfig(backbone=name).backbone == name
    for bad in ("resnet", "timm:", "keras:resnet50"):
        with pytest.raises(ValueError, match="torchvision:NAME / timm:NAME"):
            ModelConfig(backbone=bad)
    assert set(literal(ModelConfig, "head")) == set(HEADS)
    assert literal(DataConfig, "split") == SPLITS
    assert set(literal(LifecycleConfig, "split")) == set(SPLITS) - {"all"}
    assert literal(BackfillCurveSection, "policies") == (*BACKFILL_POLICIES, "oracle")
    assert BACKFILL_POLICIES == fastfill.POLICIES
    assert set(choices("data", "import", "dataset")) == set(IMPORTERS) | {"folder", "table"}
    assert set(literal(LifecycleConfig, "dataset")) <= set(IMPORTERS)
    assert choices("demo", "dataset") == list(literal(LifecycleConfig, "dataset"))
    assert choices("demo", "split") == list(literal(LifecycleConfig, "split"))
    assert choices("submit", "job") == list(JOBS)
    assert set(literal(LifecycleConfig, "methods")) == set(VARIANTS)
    trainable = {n for n, c in METHODS.items() if not c.needs_new_model}
    assert trainable <= set(VARIANTS) and {v["name"] for v in VARIANTS.values()} <= set(METHODS)


def test_method_configs_are_typed_per_method():
    base = {"name": "x", "storage_path": "s", "data": {"uri": "d"}}
    with pytest.raises(ConfigError, match=r"method\.selective: unknown key"):  # a DMU switch on BCT
        parse_config(TrainConfig, {**base, "method": {"name": "bct", "old_model": "o", "selective": False}})
    with pytest.raises(ConfigError, match="does not match any of the expected tags: 'bct'"):
        parse_config(TrainConfig, {**base, "method": {"name": "magic"}})
    with pytest.raises(ConfigError, match="needs method.new_model"):
        parse_config(TrainConfig, {**base, "method": {"name": "fastfill", "old_model": "o"}})
    assert parse_config(TrainConfig, base).method.name == "independent"


def test_configs_saved_before_the_registry_still_read():
    legacy_bag = {  # what every run and export card saved as its method section until now
        "name": "bct", "old_model": "o.pt", "new_model": None, "compat_weight": 1.0,
        "discriminativeness": "prob", "selective": True, "adapt": True, "adapt_weighting": True,
        "upgrade_width": 512, "upgrade_depth": 2, "upgrade_in_dim": None, "upgrade_weight": 1.0,
        "align_weight": 1.0, "transform_ce_weight": 1.0, "prototype_k": 10, "prototype_alpha": 0.5,
        "prototype_iters": 2, "prototype_refine": True,
    }  # fmt: skip
    saved = {"name": "r", "storage_path": "s", "data": {"uri": "d"}, "method": legacy_bag}
    assert _saved_config(saved).method == make_method(name="bct", old_model="o.pt", new_classes="exclude")
    uni = _saved_config({**saved, "method": {**legacy_bag, "name": "unibct"}}).method
    assert uni.refinement == "vote"  # prototype_refine: true meant the neighbour vote
    plain = make_method(name="unibct", old_model="o.pt", prototype_refine=False)
    assert plain.refinement == "none"
    assert method_from_saved({"name": "nope", "x": 1}) == {"name": "nope", "x": 1}


class _Given(nn.Module):
    """A 'model' whose output is its input, normalised: hand-made features through a Trainee."""

    def forward(self, x):
        return F.normalize(x, dim=1)


def test_l2_loss_on_hand_made_features():
    torch.manual_seed(0)
    f_o = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    head = MarginHead(4, 3)
    t = Trainee(_Given(), head, make_method(name="l2", old_model="o", compat_weight=0.5),
                old_head=MarginHead(4, 3), old_classes=torch.ones(3))  # fmt: skip
    x = torch.randn(6, 4, requires_grad=True)
    loss, stats = t(x, labels, f_o)
    f_n = F.normalize(x, dim=1)
    ce = F.cross_entropy(head(f_n, labels), labels)
    l2 = ((f_n - f_o) ** 2).sum(1).mean()
    assert loss.item() == pytest.approx((ce + 0.5 * l2).item(), rel=1e-6)
    assert stats["compat"].item() == pytest.approx(l2.item()) and set(stats) == {
        "ce",
        "compat",
        "new_old_cos",
    }
    _, same = t(f_o.clone(), labels, f_o)  # new features equal to the old ones: nothing to pull
    assert same["compat"].item() == pytest.approx(0.0, abs=1e-10) and same[
        "new_old_cos"
    ].item() == pytest.approx(1.0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cards_are_typed_and_checked_at_load(tmp_path):
    import io

    from dmu_ray.models.artifact import ArtifactError, save_embedding_model
    from dmu_ray.models.card import CardError, EmbeddingCard, UpgradeCard, check_compatible
    from dmu_ray.models.embedding import EmbeddingModel

    uri = str(tmp_path / "m.pt")
    save_embedding_model(uri, EmbeddingModel("small", 8, 1), MarginHead(8, 3), {"id": "m", "epochs": 2})
    card = load_artifact(uri).card
    assert isinstance(card, EmbeddingCard) and (card.dim, card.num_classes, card.version) == (8, 3, "2")
    assert card.preprocessing.mean == [0.5] and card.preprocessing.std == [0.5]  # today's (x - .5) / .5

    # an artefact written before cards were typed (a plain dict, no preprocessing) still loads
    legacy = {"format": "dmu-ray.artifact/1", "kind": "embedding_model", "state_dict": {},
              "card": {"id": "old", "backbone": "small", "dim": 8, "in_channels": 1, "num_classes": 3,
                       "head": "arcface", "s": 30.0, "m": 0.3, "history": [{"epoch": 0}]}}  # fmt: skip
    buf = io.BytesIO()
    torch.save(legacy, buf)
    (tmp_path / "legacy.pt").write_bytes(buf.getvalue())
    assert load_artifact(str(tmp_path / "legacy.pt")).card.id == "old"
    # a card that lies about itself fails at load, naming the file and the field
    legacy["card"] = {**legacy["card"], "dim": 0, "trained_classes": [True]}
    buf = io.BytesIO()
    torch.save(legacy, buf)
    (tmp_path / "bad.pt").write_bytes(buf.getvalue())
    with pytest.raises(
        ArtifactError, match=r"bad\.pt: its card does not validate \(dim: .*greater than or equal to 1"
    ):
        load_artifact(str(tmp_path / "bad.pt"))

    old = EmbeddingCard(
        id="o", backbone="small", dim=8, in_channels=1, num_classes=3, head="arcface", s=30, m=0.3
    )
    new = old.model_copy(update={"id": "n", "dim": 16})
    psi = UpgradeCard(in_dim=8, out_dim=16, width=4, depth=1, new_model_id="n")
    check_compatible(old=old, new=new, psi=psi, gallery_dim=8, channels=1, num_classes=3)
    with pytest.raises(CardError, match="takes 8-d input but the old model embeds in 16 dims"):
        check_compatible(old=new, psi=psi)
    with pytest.raises(CardError, match="trained towards model 'n', but the new model is 'x'"):
        check_compatible(new=new.model_copy(update={"id": "x"}), psi=psi)
    with pytest.raises(CardError, match="gallery holds 16-d vectors but the upgrade module takes 8-d"):
        check_compatible(psi=psi, gallery_dim=16)
    with pytest.raises(CardError, match="takes 1-channel images, the images have 3"):
        check_compatible(old=old, channels=3)


def test_preprocessing_from_the_card_reaches_the_model():
    import numpy as np
    import pyarrow as pa

    from dmu_ray.data.images import DecodeBatch, encode_png
    from dmu_ray.models.embedding import EmbeddingModel, Renormalized

    img = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    batch = pa.table({"image": [encode_png(img)], "label": [0], "id": [1]})
    x01 = DecodeBatch(8, 1, mean=(0.0,), std=(1.0,))(batch)["image"]
    custom = DecodeBatch(8, 1, mean=(0.2,), std=(0.3,))(batch)["image"]
    np.testing.assert_allclose(custom, (x01 - 0.2) / 0.3, rtol=1e-5)
    default = DecodeBatch(8, 1)(batch)["image"]  # dmu-ray's own models: (x - 0.5) / 0.5, as before
    np.testing.assert_allclose(default, (x01 - 0.5) / 0.5, rtol=1e-6)
    torch.manual_seed(0)
    model = EmbeddingModel("small", 8, 1).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(custom))
        got = Renormalized(model, [0.2], [0.3])(torch.from_numpy(default))  # what training feeds it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_evaluation_protocols_are_registered_and_chosen_by_config():
    import numpy as np

    from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing
    from dmu_ray.evaluate.protocols import PROTOCOLS

    assert {"retrieval", "verification"} <= set(PROTOCOLS)
    rng = np.random.default_rng(0)
    g_labels = np.repeat(np.arange(5), 4)
    centers = rng.standard_normal((5, 8))
    g = (centers[g_labels] + 0.1 * rng.standard_normal((20, 8))).astype(np.float32)
    q_labels = np.arange(5)
    q = (centers + 0.1 * rng.standard_normal((5, 8))).astype(np.float32)
    both = evaluate_pairing("p", q, q_labels, g, g_labels)
    ret = evaluate_pairing("p", q, q_labels, g, g_labels, MetricsConfig(protocols=["retrieval"]))
    ver = evaluate_pairing("p", q, q_labels, g, g_labels, MetricsConfig(protocols=["verification"]))
    assert ret["mAP@100"] == pytest.approx(1.0) and ret["R@1"] == 1.0  # well separated classes
    assert not any(k.startswith("TAR") for k in ret) and "mAP@100" not in ver and "index" not in ver
    assert ver["TAR@FAR=0.01"] == pytest.approx(1.0)
    assert both == {**ret, **ver}
    with pytest.raises(EvaluationError, match="unknown protocol"):
        evaluate_pairing("p", q, q_labels, g, g_labels, MetricsConfig(protocols=["oxford"]))
