"""Submitting dmu-ray jobs to a Ray cluster through the job API (``JobSubmissionClient``).

The config is validated here, before anything reaches the cluster. The job runs ``python
jobs/<job>.py --config <config>`` with the working directory uploaded as its runtime env (the
config path is relative to it) and the package importable from it; cluster images provide the
dependencies (``pip install -e .`` in the image, see docs/cluster.md), or ``pip`` adds them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from dmu_ray.adapters.config import AdapterFitConfig
from dmu_ray.evaluate.config import EmbedConfig, EvaluateConfig, load_evaluate_config
from dmu_ray.plan.config import BenchConfig, PlanConfig
from dmu_ray.refresh.config import BackfillConfig, RefreshConfig
from dmu_ray.settings import load_config
from dmu_ray.train.config import TrainConfig

JOBS: dict[str, tuple[str, type | None]] = {
    "train": ("jobs/train.py", TrainConfig),
    "refresh": ("jobs/refresh_gallery.py", RefreshConfig),
    "evaluate": ("jobs/evaluate.py", EvaluateConfig),
    "embed": ("jobs/embed.py", EmbedConfig),
    "backfill": ("jobs/backfill.py", BackfillConfig),
    "lifecycle": ("jobs/lifecycle.py", None),
    "adapter": ("jobs/adapter_fit.py", AdapterFitConfig),
    "bench": ("jobs/bench.py", BenchConfig),
    "plan": ("jobs/plan.py", PlanConfig),
}
AGENT_WAIT_S = 90
EXCLUDES = [".git", "out", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".whl", ".gl"]


def runtime_env(working_dir: str, pip: list[str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": {"PYTHONPATH": "."}}
    if pip:
        env["pip"] = pip
    return env


def submit(
    job: str,
    config: str | None,
    address: str,
    *,
    working_dir: str = ".",
    pip: list[str] | None = None,
    submission_id: str | None = None,
    follow: bool = True,
) -> tuple[str, str | None]:
    """Validate the config, submit the job; with ``follow``, stream its logs until it ends.
    Returns ``(submission_id, final status or None)``."""
    from ray.job_submission import JobSubmissionClient

    script, cfg_cls = JOBS[job]
    if cfg_cls is not None:
        if not config:
            raise ValueError(f"job {job!r} needs --config")
        # fail on this machine, not on the cluster (an evaluate config may be a generations matrix)
        load_evaluate_config(config) if job == "evaluate" else load_config(cfg_cls, config)
    rel_config = None
    if config:
        try:
            rel_config = str(Path(config).resolve().relative_to(Path(working_dir).resolve()))
        except ValueError:
            raise ValueError(
                f"--config {config} must be inside the working dir {working_dir} (it is uploaded with it)"
            ) from None
    entrypoint = f"python {script}" + (f" --config {rel_config}" if rel_config else "")
    client = JobSubmissionClient(address)
    env = runtime_env(working_dir, pip)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            sid = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id)
            break
        except RuntimeError as err:  # a cluster that just started has no job agent for a few seconds
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"submitted {sid}: {entrypoint}", file=sys.stderr, flush=True)
    if not follow:
        return sid, None
    return sid, follow_job(client, sid)


def follow_job(client, sid: str) -> str:
    """Print the job's logs as they come; return its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(sid))
