"""What a person sees (issue 17): a dmu-ray command run as a user runs it prints its own lines and
no Ray-internal log line by default; ``--verbose`` brings Ray's logs back; ``--quiet`` also drops
the progress lines."""

import os
import re
import subprocess
import sys

import pytest
from test_train import digits  # noqa: F401  (the fixture)

from dmu_ray.models.artifact import save_embedding_model
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead

#: lines Ray itself writes: timestamped log records, worker/actor output, native-code log lines
RAY_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR)\b|\((\w+ )?pid=\d+|^\[\d{4}-\d\d-\d\d [^]]* [IWE] \d+ \d+\]"
    r"|tqdm is not installed|State API may be temporarily unavailable"
)


#: a safety net only (one demo run takes about 4 minutes on a quiet 2-core box)
RUN_TIMEOUT_S = 1200


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DMU_RAY_VERBOSE", "DMU_RAY_QUIET")
    }
    cmd = [sys.executable, "-m", "dmu_ray.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)


def test_quiet_by_default_and_ray_logs_with_verbose(tmp_path, digits):  # noqa: F811
    model = str(tmp_path / "m.pt")
    save_embedding_model(model, EmbeddingModel("small", 8, 1), MarginHead(8, 10), {"id": "m"})
    base = ["embed", "--images", f"{digits}/gallery", "--model", model]

    default = _run(*base, "--output", str(tmp_path / "a"))
    assert default.returncode == 0, default.stderr
    ray_lines = [ln for ln in default.stderr.splitlines() if RAY_LINE.search(ln)]
    assert ray_lines == [], ray_lines
    assert "embedding " in default.stderr and "Ray dashboard: http://" in default.stderr
    assert default.stdout.startswith(f"committed {tmp_path / 'a'}")

    verbose = _run("--verbose", *base, "--output", str(tmp_path / "b"))
    assert verbose.returncode == 0, verbose.stderr
    assert any(RAY_LINE.search(ln) for ln in verbose.stderr.splitlines()), verbose.stderr

    quiet = _run(*base, "--output", str(tmp_path / "c"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the demo runs twice; each run is bounded by _run's own safety net
def test_demo_tells_its_story_quietly(tmp_path):
    """The demo (BCT and DMU side by side; at test size through --config) leaves every stage's
    output, reconciles its counts, prints its stages, the matrices and the verdict, whose numbers are
    those of its JSON report, and no Ray-internal line; DMU's upgrade lifts the old gallery; a re-run
    reuses every finished stage and gives the same answer. (This was also test_lifecycle's
    end-to-end test, run in-process: one run of the lifecycle checks both.)"""
    import json

    import yaml

    from dmu_ray.gallery import Gallery
    from dmu_ray.gallery_ops import validate_gallery

    root = tmp_path / "demo"
    tiny = {  # digits at 16 px, 32-d, 3 epochs a model
        "image_size": 16,
        "dim": 32,
        "epochs_old": 3,
        "epochs_new": 3,
        "batch_size": 32,
        "lr": 0.05,
        "upgrade_width": 64,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    args = ["demo", "--dataset", "digits", "--config", str(tmp_path / "tiny.yaml"), "--storage", str(root)]
    res = _run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    ray_lines = [ln for ln in (res.stderr + res.stdout).splitlines() if RAY_LINE.search(ln)]
    assert ray_lines == [], ray_lines
    assert "new model: bct" in res.stderr and "new model: dmu" in res.stderr
    report = json.loads((root / "eval/lifecycle-s0.json").read_text())
    assert set(report) >= {"bct", "dmu", "verdict"}
    said = res.stdout.split("What it says:", 1)[1]
    for v in report["verdict"]:
        assert f"- {v['text']}" in said
    dmu, bct = (100 * report[m]["pairings"]["new/old"]["mAP@100"] for m in ("dmu", "bct"))
    assert f"DMU scores {dmu:.2f} and BCT {bct:.2f}" in said
    # the verdict quotes the evaluation's numbers, in the JSON and the Markdown report
    gain = next(v for v in report["verdict"] if "lifts the old gallery" in v["text"])
    up = report["dmu"]["pairings"]["new/upgraded"]["mAP@100"]
    assert gain["figures"]["new_upgraded"] == round(100 * up, 2) and f"{100 * up:.2f}" in gain["text"]
    assert "## Verdict" in (root / "eval/lifecycle-s0.md").read_text()
    # every stage left its output
    assert (root / "runs/old-s0/export/model.pt").exists()
    for m in ("bct", "dmu"):
        assert (root / f"runs/{m}-s0/export/model.pt").exists()
    assert (root / "runs/dmu-s0/export/upgrade.pt").exists()
    for f in ("eval.json", "eval.md", "pairings.png"):
        assert (root / "eval/matrix-s0" / f).exists()
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
    p = report["dmu"]["pairings"]
    assert set(p) == {"old/old", "new/new", "new/old", "new/upgraded"}
    assert p["new/upgraded"]["queries"] == p["old/old"]["queries"] > 0
    # the upgrade buys something without backfilling
    assert p["new/upgraded"]["mAP@100"] > p["old/old"]["mAP@100"], p
    # the demo ends with the plan for a billion-row gallery, from this machine's bench and its own evaluation
    plan = json.loads((root / "plan/plan-dmu-s0/plan.json").read_text())
    assert "The plan for a 1,000,000,000-row gallery" in res.stdout
    for sentence in plan["sentences"]:
        assert f"- {sentence}" in res.stdout
    costed = {r["name"]: r for r in plan["paths"]}
    assert costed["re-embed"]["worker_hours"] > costed["refresh"]["worker_hours"] > 0
    assert costed["refresh"]["quality"] == pytest.approx(
        p_up := up / report["dmu"]["pairings"]["new/new"]["mAP@100"]
    )
    assert p_up > 0 and (root / "plan/bench-dmu-s0/bench.json").exists()
    # training progress off a terminal: a line per epoch with its ETA; MLflow's INFO lines stay off
    assert re.search(r"train dmu-s0: epoch 1/3: loss [\d.]+, \d+s, \d+ img/s, ETA \d", res.stderr), res.stderr
    assert "INFO mlflow" not in res.stderr and "alembic" not in res.stderr

    # the run is browsable: MLflow's embedded store under the root, read back with MLflow's client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dmu-ray")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"demo s0", "old-s0", "bct-s0", "dmu-s0", runs_title(runs)}, set(runs)
    demo = runs.pop("demo s0")
    assert all(r.data.tags["mlflow.parentRunId"] == demo.info.run_id for r in runs.values())
    assert demo.info.status == "FINISHED" and demo.data.params["methods"] == "['bct', 'dmu']"
    loss = client.get_metric_history(runs["dmu-s0"].info.run_id, "loss")
    assert sorted(m.step for m in loss) == [0, 1, 2]
    assert max(loss, key=lambda m: m.step).value == report_loss(root, "dmu-s0")
    assert runs["dmu-s0"].data.params["optim.epochs"] == "3"
    assert runs["dmu-s0"].data.tags["dmu.upgrade_module"].endswith("dmu-s0/export/upgrade.pt")
    ev = runs[runs_title(runs)]
    assert ev.data.metrics["dmu:new/old/mAP_at_100"] == report["dmu"]["pairings"]["new/old"]["mAP@100"]
    assert {f.path for f in client.list_artifacts(ev.info.run_id)} >= {"eval.json", "eval.md", "pairings.png"}
    assert demo.data.metrics["dmu/new_old_vs_old_old"] == report["dmu"]["headline"]["new_old_vs_old_old"]

    # re-running reuses every finished stage and gives the same answer
    again = _run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train dmu-s0: already finished" in again.stderr and "already committed" in again.stderr
    assert "already evaluated (same config, models, galleries and data)" in again.stderr
    redo = json.loads((root / "eval/lifecycle-s0.json").read_text())
    assert redo["dmu"]["pairings"]["new/upgraded"]["mAP@100"] == p["new/upgraded"]["mAP@100"]


def runs_title(runs) -> str:
    """The evaluation's run: the one that is not a training or the demo."""
    return next(n for n, r in runs.items() if r.data.tags.get("dmu.kind") == "evaluate")


def report_loss(root, name: str) -> float:
    """The last epoch's loss as the exported model card records it."""
    from dmu_ray.models.artifact import load_artifact

    return load_artifact(str(root / "runs" / name / "export/model.pt")).card.metrics["loss"]
