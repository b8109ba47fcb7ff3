"""Run tracking with MLflow: training metrics per epoch, evaluation results, reports and plots.

A :class:`Tracker` opens the store a :class:`~dmu_ray.settings.TrackingConfig` names (by default an
embedded SQLite file ``mlflow.db`` in the job's root folder, browsable with ``mlflow ui``) before any
cluster work, so a wrong URI fails the job up front. Once a run is started, a failure to log is
reported once on stderr and tracking stops for that run: the job's own outputs never depend on the
tracker. Everything is logged from the driver; workers never talk to the store.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dmu_ray.settings import TrackingConfig
from dmu_ray.storage import Location, redact

__all__ = ["Tracker", "TrackedRun", "TrackingError", "flatten", "metric_key", "parent", "store_for"]

DB_NAME = "mlflow.db"
ARTIFACTS = "mlflow-artifacts"
KEY_TAG = "dmu.key"  # sha1 of what identifies a run across restarts (a training run's URI)
_PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("dmu_ray_tracking_parent", default=None)
_INVALID = re.compile(r"[^\w./\- :]")  # MLflow's alphabet for metric and parameter names
_PARAM_MAX = 6000  # MLflow's limit on a parameter value


class TrackingError(ValueError):
    """The tracking store cannot be opened; the message names ``tracking.uri`` (credentials removed)."""


def metric_key(name: str) -> str:
    """``name`` in MLflow's alphabet (``mAP@100`` -> ``mAP_at_100``, ``TAR@FAR=0.01`` -> ``TAR_at_FAR_0.01``)."""
    return _INVALID.sub("_", name.replace("@", "_at_"))


#: where runs whose storage is on object storage are recorded by default: an embedded store on the
#: driver's local disk (``$DMU_RAY_HOME``, default ``~/.dmu-ray``), since none can live on S3
HOME_ENV, HOME_DEFAULT = "DMU_RAY_HOME", "~/.dmu-ray"


def local_store_folder() -> Path:
    """The local folder of the embedded store used when a job's root is on object storage."""
    return Path(os.environ.get(HOME_ENV) or HOME_DEFAULT).expanduser().resolve() / "mlflow"


def store_for(tc: TrackingConfig, root: Location) -> tuple[str | None, str | None, str]:
    """``(tracking URI, artefact location, note)``: the configured URI, else
    ``$MLFLOW_TRACKING_URI``, else SQLite in ``root`` (a local folder) with artefacts beside it,
    else (``root`` on object storage) SQLite in :func:`local_store_folder` on the driver's disk,
    with a note saying where; ``(None, None, "")`` when tracking is off."""
    if not tc.enabled:
        return None, None, ""
    if tc.uri:
        return tc.uri, None, ""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, None, ""
    note = ""
    if root.is_s3:
        folder = local_store_folder()
        note = (
            f"tracking: {root.uri} is on object storage, where no embedded MLflow store can live; runs are "
            f"recorded on this machine in {folder / DB_NAME} (set tracking.uri to a shared server, or "
            f"${HOME_ENV} to move it)"
        )
    else:
        folder = Path(root.path).resolve()
    return f"sqlite:///{folder / DB_NAME}", (folder / ARTIFACTS).as_uri(), note


def _quiet_mlflow() -> None:
    """MLflow's and its migrations' INFO lines stay off the terminal unless ``--verbose`` (set
    after MLflow is imported: its import configures its logger)."""
    import mlflow  # noqa: F401

    from dmu_ray.ray_session import verbose

    if not verbose():
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """An open MLflow store and experiment."""

    def __init__(self, client: Any, experiment_id: str, uri: str) -> None:
        self.client, self.experiment_id, self.uri = client, experiment_id, uri

    @classmethod
    def open(cls, tc: TrackingConfig, root: Location, *, say=None) -> Tracker | None:
        """Open the store (creating the embedded one and the experiment when needed); ``None``
        when tracking is off (``say`` gets where an S3 job's runs are recorded)."""
        uri, artifacts, note = store_for(tc, root)
        if note and say is not None:
            say(note)
        if uri is None:
            return None
        _quiet_mlflow()
        try:
            from mlflow.tracking import MlflowClient

            if uri.startswith("sqlite:///"):
                os.makedirs(os.path.dirname(uri[len("sqlite:///") :]) or ".", exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(tc.experiment)
            if exp is None:
                exp_id = client.create_experiment(tc.experiment, artifact_location=artifacts)
            elif exp.lifecycle_stage != "active":
                raise ValueError(f"experiment {tc.experiment!r} is deleted; restore it or name another")
            else:
                exp_id = exp.experiment_id
        except Exception as err:  # any failure of a foreign store: name it, without credentials
            raise TrackingError(
                f"tracking.uri: cannot open the MLflow store {redact(uri)}: {redact(str(err))[:300]}"
            ) from None
        return cls(client, exp_id, uri)

    def start(self, name: str, *, key: str | None = None, tags: dict[str, str] | None = None) -> TrackedRun:
        """A run named ``name``; with ``key``, the run earlier started with the same key is
        continued (a resumed training logs into the run it began), else a new one. Inside
        :func:`parent`, the run is that run's child."""
        tags = dict(tags or {})
        if key is not None:
            tags[KEY_TAG] = hashlib.sha1(key.encode()).hexdigest()
        if _PARENT.get():
            tags["mlflow.parentRunId"] = _PARENT.get()
        existing = None
        if key is not None:
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{tags[KEY_TAG]}'", max_results=1
            )
            existing = found[0] if found else None
        if existing is not None:
            run_id = existing.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            known = set(existing.data.params)
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            known = set()
        return TrackedRun(self, run_id, known)


class TrackedRun:
    """One MLflow run; every method logs or, after a first failure, does nothing."""

    def __init__(self, tracker: Tracker, run_id: str, known_params: set[str]) -> None:
        self.tracker, self.run_id, self._params = tracker, run_id, set(known_params)
        self.broken = False

    def _guard(self, what: str, fn, *args: Any) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as err:
            self.broken = True
            print(
                f"tracking: could not log {what} to {redact(self.tracker.uri)} ({redact(str(err))[:200]}); "
                "this run's tracking stops here, the job goes on",
                file=sys.stderr,
                flush=True,
            )

    def metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log the finite numbers of ``values`` (keys put into MLflow's alphabet) at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(metric_key(k), float(v), now, step or 0)
            for k, v in values.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            self._guard("metrics", self.tracker.client.log_batch, self.run_id, batch[i : i + 1000])

    def params(self, values: dict[str, Any]) -> None:
        """Log parameters not logged before (a continued run keeps the ones it has)."""
        from mlflow.entities import Param

        new = {
            metric_key(k): str(v)[:_PARAM_MAX] for k, v in values.items() if metric_key(k) not in self._params
        }
        batch = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(batch), 100):
            self._guard("parameters", self.tracker.client.log_batch, self.run_id, [], batch[i : i + 100])
        self._params |= set(new)

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:_PARAM_MAX]) for k, v in values.items()]
        self._guard("tags", self.tracker.client.log_batch, self.run_id, [], [], batch)

    def files(self, files: dict[str, bytes], folder: str | None = None) -> None:
        """Log ``{name: bytes}`` as artefacts of the run (under ``folder``)."""
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                Path(d, name).write_bytes(data)
            self._guard("files", self.tracker.client.log_artifacts, self.run_id, d, folder)

    def finish(self, ok: bool = True) -> None:
        self._guard(
            "the run's end", self.tracker.client.set_terminated, self.run_id, "FINISHED" if ok else "FAILED"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def parent(run: TrackedRun | None) -> Iterator[None]:
    """Runs started inside are children of ``run`` (the demo's stages under the demo's run)."""
    token = _PARENT.set(run.run_id if run is not None else None)
    try:
        yield
    finally:
        _PARENT.reset(token)
