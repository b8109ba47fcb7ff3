"""URI -> pyarrow filesystem + path, and atomic writes on top of it.

One code path serves local disk and any S3-compatible store:

- ``/abs/path``, ``rel/path`` and ``file:///abs/path`` -> :class:`pyarrow.fs.LocalFileSystem`;
- ``s3://bucket/prefix`` -> :class:`pyarrow.fs.S3FileSystem`, with the endpoint, region and
  credentials of a :class:`~dmu_ray.settings.StorageConfig` where given, else the standard AWS
  chain (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, shared files, instance/pod roles) and
  ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` for S3-compatible servers.

Credentials never appear in reprs, logs or manifests: :class:`Location` prints only the URI, a URI
with credentials in it (``s3://KEY:SECRET@bucket``) is refused without echoing them, and
:func:`redact` scrubs any message that is about to be shown.

Paths that come from data (a manifest, a commit record) are joined with :meth:`Location.join`,
which refuses any part that would leave the location (``..``, absolute paths): what a file lists
can never make dmu-ray read or write outside the prefix it was given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from dmu_ray.schema import canonical_location, redact
from dmu_ray.settings import StorageConfig

__all__ = [
    "Location",
    "StorageError",
    "resolve",
    "write_bytes_atomic",
    "create_exclusive",
    "release_if_alone",
    "check_relative",
    "read_bytes",
    "redact",
    "TMP_DIR",
    "CSV_SUFFIXES",
    "parse_table",
    "read_existing",
]

#: Sub-folder that holds in-flight writes; pyarrow and Ray Data skip names starting with "_".
TMP_DIR = "_tmp"


class StorageError(ValueError):
    """A URI or storage location that cannot be used; the message names it (credentials redacted)."""


def check_relative(part: str) -> None:
    """Refuse a path part that would leave the folder it is joined to."""
    if not isinstance(part, str) or not part:
        raise StorageError(f"path {part!r} is empty or not a string")
    pieces = part.replace("\\", "/").split("/")
    if part.startswith("/") or ".." in pieces or "://" in part or (len(part) > 1 and part[1] == ":"):
        raise StorageError(f"path {redact(part)!r} leaves its folder (absolute, '..' or a URI)")


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem, the path inside it, and the URI it came from.

    ``storage`` is the config it was resolved with (kept for the few operations that pyarrow's
    filesystem cannot do, such as S3's conditional put); it never shows in the repr."""

    fs: pafs.FileSystem
    path: str
    uri: str
    storage: StorageConfig | None = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:  # never show the filesystem (it may hold credentials)
        return f"Location({self.uri!r})"

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` below this one. Every part must stay below it: an absolute
        part, a ``..`` component or a URI raises :class:`StorageError` (paths read from manifests
        and commit records go through here)."""
        for part in parts:
            check_relative(part)
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri, self.storage)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> str | None:
        """The bucket of an ``s3://`` location (None on local disk)."""
        return self.path.split("/", 1)[0] if self.is_s3 else None

    def _real(self) -> str:
        return os.path.realpath(self.path) if not self.is_s3 else self.path

    def contains(self, other: Location) -> bool:
        """True when ``other`` is this location or lies below it (same store; symlinks resolved
        on local disk)."""
        if self.is_s3 != other.is_s3:
            return False
        mine, theirs = self._real().rstrip("/"), other._real().rstrip("/")
        return theirs == mine or theirs.startswith(mine + "/") or mine in ("", "/")

    def overlaps(self, other: Location) -> bool:
        """True when one of the two locations holds the other."""
        return self.contains(other) or other.contains(self)

    def missing_bucket(self) -> bool:
        """True for an ``s3://`` location whose bucket does not exist (or cannot be seen)."""
        if not self.is_s3:
            return False
        try:
            return self.fs.get_file_info(self.bucket).type == pafs.FileType.NotFound
        except OSError:
            return True

    def describe_missing(self) -> str:
        """Why this location is not there, in words: a missing bucket is named as such."""
        if self.missing_bucket():
            return (
                f"bucket {self.bucket!r} does not exist or is not visible with these credentials ({self.uri})"
            )
        return f"{self.uri} does not exist"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def list_files(self, suffix: str = "", recursive: bool = False, data_only: bool = False) -> list[str]:
        """Names (relative to this location) of the files below it, sorted; hidden/underscore
        folders are skipped when recursive. ``data_only`` also skips hidden/underscore file names:
        what pyarrow's dataset discovery reads (not a partial upload, not ``_manifest.json``)."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        out = []
        base = self.path.rstrip("/") + "/"
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            rel = info.path[len(base) :] if info.path.startswith(base) else info.base_name
            parts = rel.split("/")
            if any(part.startswith(("_", ".")) for part in (parts if data_only else parts[:-1])):
                continue
            out.append(rel)
        return sorted(out)

    def all_files(self) -> list[str]:
        """Paths of every file below this location at any depth, hidden and ``_`` names included
        (what a claim's owner must know is there); none when it cannot be listed."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        try:
            infos = self.fs.get_file_info(sel)
        except (OSError, ValueError):
            return []
        return [i.path for i in infos if i.type == pafs.FileType.File]


@dataclass(frozen=True)
class _S3Settings:
    """Endpoint, region and explicit credentials of a StorageConfig, with the environment's
    defaults applied; shared by the pyarrow filesystem and the boto3 client."""

    endpoint: str | None
    region: str | None
    anonymous: bool
    keys: tuple[str, str, str | None] | None  # access key, secret key, session token


def _s3_settings(cfg: StorageConfig) -> _S3Settings:
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and endpoint:
        # S3-compatible servers rarely care; without it pyarrow asks AWS for the bucket's region.
        region = "us-east-1"
    keys = None
    if not cfg.anonymous and (cfg.access_key_id is not None or cfg.secret_access_key is not None):
        if cfg.access_key_id is None or cfg.secret_access_key is None:
            raise ValueError("storage: access_key_id and secret_access_key must be given together")
        token = cfg.session_token.get_secret_value() if cfg.session_token is not None else None
        keys = (cfg.access_key_id.get_secret_value(), cfg.secret_access_key.get_secret_value(), token)
    return _S3Settings(endpoint, region, cfg.anonymous, keys)


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    s = _s3_settings(cfg)
    kwargs: dict = {}
    if s.endpoint:
        parsed = urlparse(s.endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    if s.region:
        kwargs["region"] = s.region
    if s.anonymous:
        kwargs["anonymous"] = True
    elif s.keys is not None:
        kwargs["access_key"], kwargs["secret_key"] = s.keys[:2]
        if s.keys[2] is not None:
            kwargs["session_token"] = s.keys[2]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Turn a local path, ``file://`` URI or ``s3://bucket/prefix`` into a :class:`Location`."""
    if not uri:
        raise StorageError("empty URI")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if "@" in parsed.netloc and scheme:
        raise StorageError(
            f"{redact(uri)!r}: credentials in a URI are not accepted (and are not shown here); "
            "give them through the AWS chain (environment, shared files, instance role) or a "
            "config's storage: section"
        )
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        canonical = canonical_location(uri)
        storage = storage or StorageConfig()
        return Location(_s3_filesystem(storage), canonical.removeprefix("s3://"), canonical, storage)
    path = canonical_location(uri)  # an absolute local path, or the URI as given for another scheme
    if not os.path.isabs(path):
        raise StorageError(
            f"{redact(uri)!r}: unsupported URI scheme {scheme!r} (use a local path, file:// or s3://)"
        )
    return Location(pafs.LocalFileSystem(), path, path, storage)


def write_bytes_atomic(loc: Location, data: bytes | pa.Buffer | memoryview) -> str:
    """Write ``data`` to ``loc`` so that readers see either nothing or the whole object.

    S3: one PUT of the bytes (a multipart upload above :data:`S3_MULTIPART_BYTES`, completed only
    when every part is there and aborted on failure): S3 makes the key appear whole or not at all,
    so nothing is written twice. Local disk: the bytes go to ``<dir>/_tmp/<name>.<uuid>`` and are
    renamed into place; the ``_tmp`` folder is removed when it is left empty. Returns the sha256
    hex digest of the bytes written.
    """
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    if loc.is_s3:
        _s3_put(loc, data)
        return digest
    parent, name = posixpath.split(loc.path)
    tmp_dir = posixpath.join(parent, TMP_DIR)
    tmp = posixpath.join(tmp_dir, f"{name}.{uuid.uuid4().hex}")
    try:
        for attempt in range(5):
            loc.fs.create_dir(tmp_dir, recursive=True)
            try:  # another writer of this folder may remove the empty _tmp between the two calls
                out = loc.fs.open_output_stream(tmp)
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        with out:
            out.write(data)
        loc.fs.move(tmp, loc.path)
    except BaseException:
        with contextlib.suppress(OSError):
            loc.fs.delete_file(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmp_dir)  # only when empty: other writers' files keep it
    return digest


#: S3 objects above this many bytes are uploaded in parts (one PUT below).
S3_MULTIPART_BYTES = 256 * 1024 * 1024


def _s3_put(loc: Location, data: bytes | pa.Buffer | memoryview) -> None:
    import io

    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    bucket, _, key = loc.path.partition("/")
    view = memoryview(data)
    try:
        client = _s3_client(loc.storage)
        if view.nbytes <= S3_MULTIPART_BYTES:
            client.put_object(
                Bucket=bucket, Key=key, Body=data if isinstance(data, bytes) else view.tobytes()
            )
        else:
            cfg = TransferConfig(multipart_threshold=S3_MULTIPART_BYTES, multipart_chunksize=64 * 1024 * 1024)
            client.upload_fileobj(io.BytesIO(view), bucket, key, Config=cfg)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise StorageError(f"bucket {bucket!r} does not exist ({loc.uri})") from None
        raise OSError(f"{loc.uri}: upload failed ({code or err})") from None


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create the object at ``loc`` with ``data`` only if nothing is there yet, atomically.

    Returns True when this call created it, False when something already existed (whoever wrote
    it won). Local disk: the bytes go to a temporary file that is then hard-linked into place
    (``link`` fails if the name exists, and readers never see a partial file). S3: a conditional
    PUT (``If-None-Match: *``), which S3 and S3-compatible stores evaluate atomically.
    """
    if loc.is_s3:
        return _s3_put_if_absent(loc, data)
    parent, name = posixpath.split(loc.path)
    os.makedirs(posixpath.join(parent, TMP_DIR), exist_ok=True)
    tmp = posixpath.join(parent, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, loc.path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(posixpath.join(parent, TMP_DIR))  # only when empty


def release_if_alone(loc: Location, name: str) -> bool:
    """Delete the claim ``name`` under ``loc`` (what :func:`create_exclusive` made) when it is the only
    file below ``loc``: a job that claimed a location and failed before writing anything else frees
    it. True when it was removed."""
    if [p.rsplit("/", 1)[-1] for p in loc.all_files()] != [name]:
        return False
    with contextlib.suppress(OSError):
        loc.fs.delete_file(loc.join(name).path)
        return True
    return False


def _s3_client(cfg: StorageConfig | None):
    """A boto3 S3 client with the same endpoint, region and credentials as the pyarrow filesystem."""
    import boto3

    s = _s3_settings(cfg or StorageConfig())
    kwargs: dict = {"endpoint_url": s.endpoint, "region_name": s.region}
    if s.anonymous:
        from botocore import UNSIGNED
        from botocore.config import Config

        kwargs["config"] = Config(signature_version=UNSIGNED)
    elif s.keys is not None:
        kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"], kwargs["aws_session_token"] = s.keys
    return boto3.client("s3", **kwargs)


def _s3_put_if_absent(loc: Location, data: bytes) -> bool:
    from botocore.exceptions import ClientError

    bucket, _, key = loc.path.partition("/")
    try:
        _s3_client(loc.storage).put_object(Bucket=bucket, Key=key, Body=bytes(data), IfNoneMatch="*")
        return True
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        if code == "NoSuchBucket":
            raise StorageError(f"bucket {bucket!r} does not exist ({loc.uri})") from None
        raise StorageError(f"{loc.uri}: conditional put failed ({code or status})") from None


def read_bytes(loc: Location) -> bytes:
    """Read a whole object."""
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def read_existing(loc: Location, error: type[Exception], what: str = "file", prefix: str = "") -> bytes:
    """Read a whole object that must exist: a missing one raises ``error("<prefix><uri>: no such
    <what>")`` (the caller's error type, so its command reports it plainly)."""
    try:
        return read_bytes(loc)
    except FileNotFoundError:
        raise error(f"{prefix}{loc.uri}: no such {what}") from None


#: suffixes read as delimited text by :func:`parse_table` (a ``.tsv`` is tab-separated)
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv")


def parse_table(
    data: bytes,
    path: str,
    column_types: dict[str, pa.DataType] | None = None,
    csv_suffixes: tuple = CSV_SUFFIXES,
) -> pa.Table:
    """A table from the bytes of a CSV/TSV file (by ``path``'s suffix) or else a Parquet file;
    raises ``pyarrow.ArrowInvalid``/``OSError`` for bytes that are neither."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    low = path.lower()
    if low.endswith(csv_suffixes):
        opts = pacsv.ParseOptions(delimiter="\t" if low.endswith(".tsv") else ",")
        conv = pacsv.ConvertOptions(column_types=column_types or {})
        return pacsv.read_csv(pa.BufferReader(data), parse_options=opts, convert_options=conv)
    return pq.read_table(pa.BufferReader(data))
