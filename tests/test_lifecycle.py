"""The whole lifecycle at a tiny size on real data (scikit-learn's digits), on a local Ray cluster."""

import json

from dmu_ray.gallery import Gallery
from dmu_ray.gallery_ops import validate_gallery
from dmu_ray.lifecycle import LifecycleConfig, run_lifecycle


def gain_text(report):
    return next(v["text"] for v in report["verdict"] if "lifts the old gallery" in v["text"])


def test_lifecycle_end_to_end(ray_local, tmp_path):
    lc = LifecycleConfig(
        root=str(tmp_path / "demo"),
        dataset="digits",
        image_size=16,
        dim=32,
        epochs_old=3,
        epochs_new=3,
        batch_size=32,
        lr=0.05,
        upgrade_width=64,
        methods=["dmu"],
    )
    summary = run_lifecycle(lc, progress=False)
    root = tmp_path / "demo"
    # every stage left its output
    assert (root / "data/digits/_dataset.json").exists()
    assert (root / "runs/old-s0/export/model.pt").exists()
    assert (root / "runs/dmu-s0/export/model.pt").exists() and (
        root / "runs/dmu-s0/export/upgrade.pt"
    ).exists()
    for f in ("eval.json", "eval.md", "pairings.png"):
        assert (root / "eval/matrix-s0" / f).exists()
    report = json.loads((root / "eval/lifecycle-s0.json").read_text())
    assert report["dmu"]["pairings"]
    # the verdict quotes the evaluation's numbers, in the JSON and the Markdown report
    gain = next(v for v in report["verdict"] if "lifts the old gallery" in v["text"])["figures"]
    up = report["dmu"]["pairings"]["new/upgraded"]["mAP@100"]
    assert gain["new_upgraded"] == round(100 * up, 2) and f"{100 * up:.2f}" in gain_text(report)
    assert "## Verdict" in (root / "eval/lifecycle-s0.md").read_text()
    # counts reconcile: gallery images -> old gallery -> upgraded gallery, nothing lost
    n_gallery = json.loads((root / "data/digits/_dataset.json").read_text())["rows"]["gallery"]
    old = Gallery.open(str(root / "galleries/old-s0"))
    upg = Gallery.open(str(root / "galleries/old-s0-upgraded-by-dmu-s0"))
    assert (
        old.manifest.rows
        == n_gallery
        == upg.manifest.rows_in
        == upg.manifest.rows + upg.manifest.quarantined_rows
    )
    assert upg.manifest.quarantined_rows == 0 and validate_gallery(upg).ok
    assert upg.manifest.model.upgrade_module.startswith("dmu-s0-psi@")
    p = summary["dmu"]["pairings"]
    assert set(p) == {"old/old", "new/new", "new/old", "new/upgraded"}
    assert p["new/upgraded"]["queries"] == p["old/old"]["queries"] > 0
    # the upgrade buys something without backfilling
    assert p["new/upgraded"]["mAP@100"] > p["old/old"]["mAP@100"], p
    # re-running reuses every finished stage and gives the same answer
    again = run_lifecycle(lc, progress=False)
    assert again["dmu"]["pairings"]["new/upgraded"]["mAP@100"] == p["new/upgraded"]["mAP@100"]
