"""The lifecycle at a tiny size on real data (scikit-learn's digits), on a local Ray cluster: three
generations, and the evaluation of every variant. (The single upgrade end to end, with the reuse of
finished stages, is test_cli_output's demo test: one run checks the command's output and the stages.)"""

import json

import pytest

from dmu_ray.gallery import Gallery
from dmu_ray.gallery_ops import validate_gallery
from dmu_ray.lifecycle import LifecycleConfig, run_lifecycle


def tiny(root, **options) -> LifecycleConfig:
    """The lifecycle at test size: digits at 16 px, 32-d, 3 epochs a model."""
    return LifecycleConfig(
        root=str(root),
        dataset="digits",
        image_size=16,
        dim=32,
        epochs_old=3,
        epochs_new=3,
        batch_size=32,
        lr=0.05,
        upgrade_width=64,
        **options,
    )


@pytest.mark.slow
def test_three_generations_each_against_the_one_before(ray_local, tmp_path):
    """Issue 14: v1 (30% of the classes), v2 (60%, DMU against v1), v3 (all, DMU against v2); the
    cards link the generations; v1's gallery is refreshed twice (through psi_12, then psi_23),
    v2's once, each recording its whole chain; one matrix of every query model x gallery state."""
    from dmu_ray.gallery_ops import inspect_gallery
    from dmu_ray.models.artifact import load_artifact

    lc = tiny(tmp_path / "gen", generations=3).model_copy(update={"epochs_old": 1, "epochs_new": 1})
    assert lc.generation_fractions() == [0.3, 0.6, 1.0]
    summary = run_lifecycle(lc, progress=False)
    root = tmp_path / "gen"
    models = [load_artifact(str(root / f"runs/v{g}-s0/export/model.pt")) for g in (1, 2, 3)]
    psis = {g: load_artifact(str(root / f"runs/v{g}-s0/export/upgrade.pt")) for g in (2, 3)}
    assert [m.card.model_extra["generation"] for m in models] == [1, 2, 3]
    assert models[2].card.model_extra["ancestry"] == [models[0].ident, models[1].ident]
    assert models[2].card.old_model["id"] == models[1].ident
    assert [sum(m.card.trained_classes) for m in models] == sorted(
        sum(m.card.trained_classes) for m in models
    )
    assert sum(models[2].card.trained_classes) == 10 > sum(models[0].card.trained_classes)
    # psi_23 maps v2's exact space to v3's exact space
    assert psis[3].card.old_model["id"] == models[1].ident and psis[3].card.new_model["id"] == models[2].ident

    twice = Gallery.open(str(root / "galleries/v1-to-v2-to-v3-s0"))
    (chain,) = twice.model.chains().values()
    assert [s["space"] for s in chain] == [models[0].ident, models[1].ident, models[2].ident]
    assert [s["artifact"] for s in chain[1:]] == [psis[2].ident, psis[3].ident]
    assert inspect_gallery(twice)["lineage"][0]["rows"] == twice.num_rows and validate_gallery(twice).ok

    states = ["v1", "v1>v2", "v2", "v1>v2>v3", "v2>v3", "v3"]
    matrix = json.loads((root / "eval/generations-s0/matrix.json").read_text())
    assert matrix["galleries"] == states and matrix["queries"] == ["v1", "v2", "v3"]
    assert (root / "eval/generations-s0/matrix.png").read_bytes()[:4] == b"\x89PNG"
    cells = summary["cells"]
    assert all(0 < cells[q][g] <= 1 for q in ("v1", "v2", "v3") for g in states)
    assert f"- v2>v3: embed {models[1].ident} -> upgrade {psis[3].ident}" in summary["markdown"]

    # a state computed in memory (v2's vectors through psi_23) scores what the stored refresh does
    from dmu_ray.config import MatrixConfig
    from dmu_ray.evaluate.generations import run_matrix

    mem = run_matrix(
        MatrixConfig(
            data=str(root / "data/digits"),
            query_models={"v3": str(root / "runs/v3-s0/export/model.pt")},
            gallery_states={
                "stored": {"gallery": str(root / "galleries/v2-to-v3-s0")},
                "computed": {
                    "model": str(root / "runs/v2-s0/export/model.pt"),
                    "upgrade": [str(psis[3].uri)],
                },
            },
            output=str(root / "eval/by-hand"),
            tracking={"enabled": False},
        ),
        progress=False,
    )
    row = mem["cells"]["v3"]
    assert abs(row["stored"]["mAP@100"] - row["computed"]["mAP@100"]) < 0.02  # float16 storage only
    assert row["stored"]["mAP@100"] == cells["v3"]["v2>v3"]
    assert mem["lineage"]["computed"][0]["steps"] == f"embed {models[1].ident} -> upgrade {psis[3].ident}"


def test_every_variant_can_be_evaluated_together(tmp_path):
    """The evaluation the lifecycle runs after all its training accepts every variant it offers
    (independent among them: it was refused as a model name, after an hour of training)."""
    from dmu_ray.lifecycle import VARIANTS, evaluate_config

    lc = tiny(tmp_path, methods=list(VARIANTS))
    models = {m: f"{tmp_path}/runs/{m}/export/model.pt" for m in lc.methods}
    cfg = evaluate_config(
        lc,
        f"{tmp_path}/data",
        f"{tmp_path}/old",
        f"{tmp_path}/runs/old/export/model.pt",
        models,
        {"dmu": f"{tmp_path}/up"},
    )
    assert set(cfg.models()) == set(VARIANTS)
    assert cfg.independent_model == models["independent"]
    assert cfg.models()["dmu"].galleries == {"upgraded": f"{tmp_path}/up"}
