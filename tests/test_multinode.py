"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`): the
refresh job is submitted through the job API, the second node's raylet is killed part way, and
the job must still commit every id exactly once. Teardown kills only this cluster's processes."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from dmu_ray.gallery import Gallery, GalleryWriter, ModelInfo, embedding_array
from dmu_ray.gallery_ops import validate_gallery
from dmu_ray.models.artifact import save_upgrade_module
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.storage import resolve
from dmu_ray.submit import submit

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_matching(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def cluster_logs(temp: str, lines: int = 15) -> str:
    """The tails of the job-related logs of the test cluster, for failure messages."""
    out = []
    for log in sorted(Path(temp).glob("session_latest/logs/*")):
        if log.name.startswith(("dashboard_JobHead", "dashboard_agent", "job-driver")) and log.suffix in (
            ".log",
            ".err",
        ):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {log.name}\n" + "\n".join(tail))
    return "\n".join(out)


@pytest.fixture
def two_node_cluster(monkeypatch):
    tag = uuid.uuid4().hex[:8]
    temp = f"/tmp/dmu-mn-{tag}"
    port, dash, nm_port = free_port(), free_port(), free_port()
    # Loopback-only test cluster: no auth token to hand between the nodes (Ray 2.60 enables token
    # auth by default; real clusters must give every node the head's token, see docs/cluster.md).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--temp-dir", temp, "--disable-usage-stats"]

    def own_ports() -> list[str]:  # per node, so nothing collides with another Ray on this machine
        return [
            f"--{opt}={free_port()}"
            for opt in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
        ]

    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--include-dashboard",
            "true",
            *common,
            *own_ports(),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--address",
                f"127.0.0.1:{port}",
                "--node-manager-port",
                str(nm_port),
                *common,
                *own_ports(),
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=120,
        )
        yield {
            "address": f"http://127.0.0.1:{dash}",
            "worker_raylet": f"node_manager_port={nm_port}",
            "temp": temp,
        }
    finally:
        for pid in pids_matching(temp):  # only this cluster's processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_refresh_job_survives_losing_a_node(two_node_cluster, tmp_path):
    n_files, rows = 12, 4000
    src = tmp_path / "old"
    rng = np.random.default_rng(0)
    with GalleryWriter(
        resolve(str(src)),
        ModelInfo(model_id="old", dim=64, dtype="float16", normalized=True),
        rows_per_file=rows,
    ) as w:
        m = rng.standard_normal((n_files * rows, 64)).astype(np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        w.write(
            pa.table({"id": np.arange(n_files * rows), "embedding": embedding_array(m.astype(np.float16))})
        )
    torch.manual_seed(0)
    save_upgrade_module(str(tmp_path / "psi.pt"), UpgradeModule(64, 64, 1024, 3), {"id": "psi"})
    job_dir = tmp_path / "job"
    (job_dir / "jobs").mkdir(parents=True)
    shutil.copy(ROOT / "jobs/refresh_gallery.py", job_dir / "jobs/refresh_gallery.py")
    out = tmp_path / "new"
    (job_dir / "refresh.yaml").write_text(
        yaml.safe_dump(
            {
                "source": str(src),
                "output": str(out),
                "module": str(tmp_path / "psi.pt"),
                "dtype": "float16",
                "pool": {"min_actors": 2, "max_actors": 2, "num_cpus": 0.5, "batch_size": 512},
            }
        )
    )
    try:
        sid, _ = submit(
            "refresh",
            str(job_dir / "refresh.yaml"),
            two_node_cluster["address"],
            working_dir=str(job_dir),
            follow=False,
        )
    except RuntimeError as err:
        raise AssertionError(f"{err}\n{cluster_logs(two_node_cluster['temp'])}") from err
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(two_node_cluster["address"])
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "_parts").glob("*.json"))) < 2:
        assert client.get_job_status(sid) not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs(
            sid
        )[-3000:] + cluster_logs(two_node_cluster["temp"])
        time.sleep(0.2)
    committed_before = len(list((out / "_parts").glob("*.json")))
    assert 2 <= committed_before < n_files, "the job finished before the node could be killed"
    raylets = [p for p in pids_matching(two_node_cluster["worker_raylet"])]
    assert raylets, "worker raylet not found"
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)  # the second node dies with its actors
    while time.time() < deadline and client.get_job_status(sid) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        time.sleep(1)
    logs = client.get_job_logs(sid)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED, logs[-3000:]
    g = Gallery.open(str(out))
    ids = g.read(columns=["id"]).column("id").to_numpy()
    assert len(ids) == n_files * rows and len(np.unique(ids)) == len(ids)  # every id exactly once
    assert validate_gallery(g).ok
    workers = {json.loads(p.read_text())["worker"] for p in (out / "_parts").glob("*.json")}
    assert len(workers) == 2, f"files were committed by {len(workers)} node(s); the killed node did no work"
