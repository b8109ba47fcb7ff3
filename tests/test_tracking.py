"""Run tracking (issue 17): the MLflow store a config names, runs continued by key, metric names in
MLflow's alphabet, credentials never shown; the training progress board and watcher."""

import io

import pytest
import ray

from dmu_ray.config import TrackingConfig
from dmu_ray.storage import resolve
from dmu_ray.tracking import Tracker, TrackingError, flatten, metric_key, parent, store_for
from dmu_ray.train.progress import ProgressBoard, TrainWatcher


def test_store_and_metric_names(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = resolve(str(tmp_path / "runs"))
    uri, artifacts, why = store_for(TrackingConfig(), local)
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" and artifacts.endswith(
        "/runs/mlflow-artifacts"
    )
    assert store_for(TrackingConfig(enabled=False), local)[0] is None
    assert store_for(TrackingConfig(uri="http://tracker:5000"), local)[0] == "http://tracker:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert store_for(TrackingConfig(), local)[0] == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # a root on object storage: an embedded store on the driver's disk, and a note saying where
    monkeypatch.setenv("DMU_RAY_HOME", str(tmp_path / "home"))
    uri, _, note = store_for(TrackingConfig(), resolve("s3://bucket/runs"))
    assert uri == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    assert "runs are recorded on this machine in" in note and str(tmp_path / "home") in note
    assert metric_key("dmu:new/old/mAP@100") == "dmu:new/old/mAP_at_100"
    assert metric_key("TAR@FAR=0.001") == "TAR_at_FAR_0.001"
    assert flatten({"optim": {"lr": 0.1, "epochs": 2}, "ks": [1, 5]}) == {
        "optim.lr": 0.1,
        "optim.epochs": 2,
        "ks": [1, 5],
    }


def test_a_store_that_cannot_be_opened_is_named_without_its_credentials(tmp_path):
    with pytest.raises(
        TrackingError, match=r"tracking.uri: cannot open the MLflow store nosuch://\*\*\*@"
    ) as err:
        Tracker.open(TrackingConfig(uri="nosuch://alice:s3cr3t-pw@host/x"), resolve(str(tmp_path)))
    assert "s3cr3t-pw" not in str(err.value)


def test_runs_continue_by_key_and_nest_under_a_parent(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker.open(TrackingConfig(experiment="t"), resolve(str(tmp_path)))
    top = tracker.start("demo")
    with parent(top):
        first = tracker.start("train a", key="runs/a")
    first.params({"optim.lr": 0.1})
    first.metrics({"loss": 2.0, "mAP@100": 0.5, "nan": float("nan"), "text": "x"}, step=0)
    first.finish(False)  # e.g. the driver died; the training resumes later in another process
    again = tracker.start("train a", key="runs/a")
    assert again.run_id == first.run_id
    again.params({"optim.lr": 0.1, "rows": 10})  # known parameters are not logged twice (MLflow refuses)
    again.metrics({"loss": 1.0}, step=1)
    again.files({"export.json": b"{}"})
    again.finish(True)
    client = MlflowClient(tracker.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == top.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [
        (0, 2.0),
        (1, 1.0),
    ]
    assert run.data.metrics["mAP_at_100"] == 0.5 and "nan" not in run.data.metrics
    assert run.data.params == {"optim.lr": "0.1", "rows": "10"}
    assert [f.path for f in client.list_artifacts(first.run_id)] == ["export.json"]
    assert (tmp_path / "mlflow-artifacts").is_dir()  # artefacts beside the store, not in the cwd
    other = tracker.start("train b", key="runs/b")
    assert other.run_id != first.run_id and "mlflow.parentRunId" not in client.get_run(other.run_id).data.tags


def test_progress_watcher_draws_a_bar_or_prints_epoch_lines(ray_local):
    board = ProgressBoard.remote()
    bar, lines = io.StringIO(), io.StringIO()
    seen: list[int] = []
    try:
        ray.get(board.begin.remote(0, 2, 10))
        ray.get(board.step.remote(0, 5, 1.5))
        w_bar = TrainWatcher(board, "x", bar=True, stream=bar)
        w_lines = TrainWatcher(
            board, "x", bar=False, stream=lines, on_epoch=lambda m: seen.append(m["epoch"])
        )
        w_bar.poll()
        assert (
            w_bar.done_steps == 5 and "5/20" in bar.getvalue() and "epoch 1/2, loss 1.5000" in bar.getvalue()
        )
        ray.get(board.epoch_done.remote({"epoch": 0, "loss": 1.25, "seconds": 30.0, "samples_per_s": 64.0}))
        ray.get(board.step.remote(1, 4, 1.0))
        w_bar.poll()
        w_lines.poll()
        assert w_bar.done_steps == 14 and "14/20" in bar.getvalue() and "ETA" in bar.getvalue()
        assert lines.getvalue() == "  train x: epoch 1/2: loss 1.2500, 30s, 64 img/s, ETA 0:30\n"
        ray.get(board.epoch_done.remote({"epoch": 1, "loss": 1.0, "seconds": 10.0}))
        w_lines.poll()
        assert lines.getvalue().splitlines()[-1] == "  train x: epoch 2/2: loss 1.0000, 10s, ETA 0:00"
        assert seen == [0, 1]  # each finished epoch handed on once
    finally:
        ray.kill(board)
