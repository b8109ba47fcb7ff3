import os

import pyarrow.fs as pafs
import pytest

from dmu_ray.config import StorageConfig
from dmu_ray.storage import read_bytes, resolve, write_bytes_atomic


def test_resolve_local_forms(tmp_path):
    for uri in (str(tmp_path), f"file://{tmp_path}", str(tmp_path) + "/"):
        loc = resolve(uri)
        assert isinstance(loc.fs, pafs.LocalFileSystem)
        assert loc.path == str(tmp_path)
    rel = resolve("some/rel")
    assert rel.path == os.path.abspath("some/rel")
    # one spelling per location, shared with the configs' comparisons
    from dmu_ray.schema import canonical_location

    assert {
        canonical_location(u) for u in (str(tmp_path), f"file://{tmp_path}/", os.path.relpath(tmp_path))
    } == {resolve(str(tmp_path)).uri}
    assert (
        canonical_location("s3://bucket/a/b/") == canonical_location("s3://bucket/a/b") == "s3://bucket/a/b"
    )
    assert canonical_location("hdfs://x/y") == "hdfs://x/y"  # not ours to spell


@pytest.mark.parametrize(
    "uri, words", [("s3://", "needs a bucket"), ("gs://b/x", "unsupported URI scheme"), ("", "empty")]
)
def test_resolve_rejects(uri, words):
    with pytest.raises(ValueError, match=words):
        resolve(uri)


def test_s3_credentials_not_in_repr(s3):
    cfg = StorageConfig(endpoint_url=s3.endpoint, access_key_id="AKIAXX", secret_access_key="sekrit")
    loc = resolve(f"s3://{s3.bucket}/x", cfg)
    assert "sekrit" not in repr(loc) and "AKIAXX" not in repr(loc)
    with pytest.raises(ValueError, match="together"):
        resolve(f"s3://{s3.bucket}/x", StorageConfig(endpoint_url=s3.endpoint, access_key_id="only-one"))


def test_atomic_write_roundtrip(root):
    loc = resolve(root.uri("obj/data.bin"), root.storage)
    digest = write_bytes_atomic(loc, b"hello" * 1000)
    assert read_bytes(loc) == b"hello" * 1000 and len(digest) == 64
    # nothing left in flight under its name or in _tmp
    tmp = loc.fs.get_file_info(pafs.FileSelector(os.path.dirname(loc.path) + "/_tmp", allow_not_found=True))
    assert tmp == []
    if root.s3 is not None:
        # the object is real on the S3 endpoint: boto3 sees the same bytes
        key = loc.path.split("/", 1)[1]
        body = root.s3.client().get_object(Bucket=root.s3.bucket, Key=key)["Body"].read()
        assert body == b"hello" * 1000


def test_endpoint_from_standard_env(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    loc = resolve(f"s3://{s3.bucket}/env-endpoint/x.bin")
    write_bytes_atomic(loc, b"abc")
    assert s3.client().get_object(Bucket=s3.bucket, Key="env-endpoint/x.bin")["Body"].read() == b"abc"


def test_atomic_writes_leave_no_tmp_folder(root):
    """A committed write leaves its object and nothing else: no empty ``_tmp/`` folder on local
    disk, no ``_tmp/`` directory marker on S3 (issue 17)."""
    from dmu_ray.storage import create_exclusive

    loc = resolve(root.uri("clean/a.bin"), root.storage)
    parent = os.path.dirname(loc.path)

    def listing():
        found = loc.fs.get_file_info(pafs.FileSelector(parent, recursive=True))
        return sorted(os.path.relpath(f.path, parent) for f in found)

    write_bytes_atomic(loc, b"a")
    write_bytes_atomic(resolve(root.uri("clean/b.bin"), root.storage), b"b")
    assert listing() == ["a.bin", "b.bin"]
    if root.s3 is not None:
        prefix = parent.split("/", 1)[1] + "/"
        assert root.s3.keys(prefix) == [prefix + "a.bin", prefix + "b.bin"]
    else:
        assert create_exclusive(resolve(root.uri("clean/c.bin"), root.storage), b"c")
        assert listing() == ["a.bin", "b.bin", "c.bin"]
