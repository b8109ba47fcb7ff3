"""Shared fixtures: a real S3 endpoint on loopback (moto's server mode) and gallery roots on both
local disk and that endpoint, so the same tests run against each."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest

from dmu_ray.config import StorageConfig

BUCKET = "dmu-test"


@pytest.fixture(scope="session", autouse=True)
def _dmu_home(tmp_path_factory) -> Iterator[None]:
    """Jobs whose storage is on S3 record their runs in an embedded store under $DMU_RAY_HOME: a
    folder of this session, never the user's home (CLI subprocesses inherit it)."""
    old = os.environ.get("DMU_RAY_HOME")
    os.environ["DMU_RAY_HOME"] = str(tmp_path_factory.mktemp("dmu-home"))
    yield
    if old is None:
        os.environ.pop("DMU_RAY_HOME", None)
    else:
        os.environ["DMU_RAY_HOME"] = old


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (minutes each) run first: xdist hands tests out in collection order,
    so a long test collected last would keep one worker busy while the other sits idle. The sort
    is stable: within each kind the files' order stays."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.endpoint, region="us-east-1")

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port for the whole session, with one bucket."""
    from moto.server import ThreadedMotoServer

    # Dummy credentials for the loopback server; the standard AWS chain picks them up in every
    # process (Ray workers inherit the environment of the driver that starts them).
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ[k] = v
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    srv = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket=BUCKET)
    srv.client().create_bucket(Bucket=BUCKET)
    try:
        yield srv
    finally:
        server.stop()


@dataclass
class Root:
    """A place to put galleries: ``uri(name)`` gives a fresh URI below it."""

    kind: str
    base: str
    storage: StorageConfig | None
    s3: S3Server | None = None

    def uri(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Root:
    """A gallery root on local disk, then on the loopback S3 server."""
    if request.param == "local":
        return Root("local", str(tmp_path), None)
    srv: S3Server = request.getfixturevalue("s3")
    return Root("s3", f"s3://{srv.bucket}/{uuid.uuid4().hex[:10]}", srv.storage, srv)


@pytest.fixture(scope="module")
def ray_local(s3):
    """A real local Ray cluster (2 CPUs) for the test module. Depends on ``s3`` so that the
    workers inherit the loopback endpoint's credentials from the environment.

    One cluster per module, not per session: twice in fresh-clone runs, an in-process driver
    that had run a worker's jobs for 20-30 minutes stopped hearing of its actors' creation (the
    GCS logged each actor created; the driver's log showed PENDING_CREATION and nothing after), and
    every later actor pool of that process waited to its test's timeout (docs/decisions.md). A
    new driver per module starts with a fresh subscription."""
    import ray

    if ray.is_initialized():  # a cluster an earlier test's library call started on its own
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
