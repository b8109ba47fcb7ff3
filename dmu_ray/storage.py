"""URI -> pyarrow filesystem + path, and atomic writes on top of it.

One code path serves local disk and any S3-compatible store:

- ``/abs/path``, ``rel/path`` and ``file:///abs/path`` -> :class:`pyarrow.fs.LocalFileSystem`;
- ``s3://bucket/prefix`` -> :class:`pyarrow.fs.S3FileSystem`, with the endpoint, region and
  credentials of a :class:`~dmu_ray.config.StorageConfig` where given, else the standard AWS
  chain (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, shared files, instance/pod roles) and
  ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` for S3-compatible servers.

Credentials never appear in reprs, logs or manifests: :class:`Location` prints only the URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from dmu_ray.config import StorageConfig

__all__ = ["Location", "resolve", "write_bytes_atomic", "read_bytes", "TMP_DIR"]

#: Sub-folder that holds in-flight writes; pyarrow and Ray Data skip names starting with "_".
TMP_DIR = "_tmp"


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem, the path inside it, and the URI it came from."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __repr__(self) -> str:  # never show the filesystem (it may hold credentials)
        return f"Location({self.uri!r})"

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` below this one."""
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def list_files(self, suffix: str = "", recursive: bool = False) -> list[str]:
        """Names (relative to this location) of the files below it, sorted; hidden/underscore
        folders are skipped when recursive."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        out = []
        base = self.path.rstrip("/") + "/"
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            rel = info.path[len(base) :] if info.path.startswith(base) else info.base_name
            if any(part.startswith(("_", ".")) for part in rel.split("/")[:-1]):
                continue
            out.append(rel)
        return sorted(out)


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        # S3-compatible servers rarely care; without it pyarrow asks AWS for the bucket's region.
        kwargs["region"] = "us-east-1"
    if cfg.anonymous:
        kwargs["anonymous"] = True
    elif cfg.access_key_id is not None or cfg.secret_access_key is not None:
        if cfg.access_key_id is None or cfg.secret_access_key is None:
            raise ValueError("storage: access_key_id and secret_access_key must be given together")
        kwargs["access_key"] = cfg.access_key_id.get_secret_value()
        kwargs["secret_key"] = cfg.secret_access_key.get_secret_value()
        if cfg.session_token is not None:
            kwargs["session_token"] = cfg.session_token.get_secret_value()
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Turn a local path, ``file://`` URI or ``s3://bucket/prefix`` into a :class:`Location`."""
    if not uri:
        raise ValueError("empty URI")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        path = (parsed.netloc + parsed.path).rstrip("/")
        return Location(_s3_filesystem(storage or StorageConfig()), path, "s3://" + path)
    if scheme == "file":
        path = os.path.abspath(parsed.path)
    elif scheme in ("",) or (len(scheme) == 1 and os.name == "nt"):
        path = os.path.abspath(os.path.expanduser(uri))
    else:
        raise ValueError(f"{uri!r}: unsupported URI scheme {scheme!r} (use a local path, file:// or s3://)")
    return Location(pafs.LocalFileSystem(), path.rstrip("/") or "/", path.rstrip("/") or "/")


def write_bytes_atomic(loc: Location, data: bytes | pa.Buffer | memoryview) -> str:
    """Write ``data`` to ``loc`` so that readers see either nothing or the whole object.

    The bytes go to ``<dir>/_tmp/<name>.<uuid>`` first and are then moved into place: a rename on
    local disk, a server-side copy on S3 (the new key appears whole or not at all). Returns the
    sha256 hex digest of the bytes written.
    """
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    parent, name = posixpath.split(loc.path)
    tmp = posixpath.join(parent, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
    loc.fs.create_dir(posixpath.join(parent, TMP_DIR), recursive=True)
    try:
        with loc.fs.open_output_stream(tmp) as out:
            out.write(data)
        loc.fs.move(tmp, loc.path)
    except BaseException:
        with contextlib.suppress(OSError):
            loc.fs.delete_file(tmp)
        raise
    return digest


def read_bytes(loc: Location) -> bytes:
    """Read a whole object."""
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()
