"""The ground floor of every config: the settings all layers share (object storage, Ray Data
actor pools, run tracking) and the loading of a YAML/JSON file into a config class.

Every config is a pydantic model that forbids unknown keys. :func:`load_config` reads YAML or JSON
and turns any problem (unknown key, wrong type, missing field, bad value) into a
:class:`ConfigError` whose message names the file and the dotted path of each bad field, so a job
fails on the submitting machine before any cluster work starts. Each job's own config lives beside
its job (``train/config.py``, ``refresh/config.py``, ``evaluate/config.py``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator

from dmu_ray.schema import ConfigError, StrictModel, redact

__all__ = [
    "ConfigError",
    "StrictModel",
    "StorageConfig",
    "TrackingConfig",
    "ActorPoolConfig",
    "SECRET_KEYS",
    "UNION_TAGS",
    "parse_config",
    "read_config_data",
    "load_config",
    "all_at_least_one",
    "all_in_unit",
]

T = TypeVar("T", bound="StrictModel")


class StorageConfig(StrictModel):
    """How to reach object storage. Everything is optional: with nothing set, ``s3://`` URIs use
    the standard AWS chain (env vars, shared config/credentials files, instance or pod role) and
    AWS's endpoint. Credentials given here are kept as secrets and never printed or written out."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000; default: $AWS_ENDPOINT_URL_S3, "
        "$AWS_ENDPOINT_URL, else AWS.",
    )
    region: str | None = Field(default=None, description="AWS region; default: the AWS chain's.")
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anonymous: bool = False

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_has_scheme(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("must start with http:// or https://")
        return v


class TrackingConfig(StrictModel):
    """Where runs are logged with MLflow: training metrics per epoch, evaluation results, reports
    and plots. With ``uri`` unset: ``$MLFLOW_TRACKING_URI`` when set, else an embedded SQLite store
    ``mlflow.db`` in the job's root folder (train: ``storage_path``; evaluate: ``output``; demo:
    ``root``), browsable with ``mlflow ui``; a root on object storage has no embedded store, so
    tracking is then off unless a URI is given."""

    enabled: bool = Field(default=True, description="false: log nothing to MLflow")
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (http(s)://server, sqlite:///file.db, databricks); "
        "default: $MLFLOW_TRACKING_URI, else sqlite in the job's root folder",
    )
    experiment: str = Field(default="dmu-ray", min_length=1, description="MLflow experiment name")


class ActorPoolConfig(StrictModel):
    """Size of a Ray Data actor pool; ``min_actors < max_actors`` autoscales between the two."""

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=2, ge=1)
    num_cpus: float = Field(
        default=0.5, gt=0, description="CPUs per actor (fractional leaves room for reads)"
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor; 0 runs on CPU")
    batch_size: int = Field(default=65536, ge=1, description="rows per batch through the module")
    files_per_actor: int | None = Field(
        default=None,
        ge=1,
        description="refresh and backfill: files one actor works on at once, each with its own "
        "read/encode threads, so an actor's I/O keeps its GPU busy. On a CPU actor they are "
        "staggered: one file runs psi at a time (all the actor's CPUs), the others read, decode, "
        "encode and publish beside it. Default: 1 on a CPU actor (its cores run psi), "
        "max(2, num_cpus) on a GPU actor",
    )
    resource_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="how long to wait for a node that can hold one actor before failing (an "
        "autoscaling cluster needs minutes to start one; 0: fail at once)",
    )

    def files_in_flight(self) -> int:
        """Files one actor works on at once: ``files_per_actor``, or its default."""
        if self.files_per_actor is not None:
            return self.files_per_actor
        return max(2, int(self.num_cpus)) if self.num_gpus > 0 else 1

    @field_validator("max_actors")
    @classmethod
    def _max_ge_min(cls, v: int, info: Any) -> int:
        lo = info.data.get("min_actors")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= min_actors ({lo})")
        return v


def all_at_least_one(v: list[int], what: str) -> list[int]:
    if any(k < 1 for k in v):
        raise ValueError(f"every {what} must be >= 1 (got {v})")
    return v


def all_in_unit(v: list[float], what: str) -> list[float]:
    if any(not 0.0 < f < 1.0 for f in v):
        raise ValueError(f"every {what} must lie strictly between 0 and 1 (got {v})")
    return v


#: Config keys whose values are never shown in an error, whatever their type or section.
SECRET_KEYS = frozenset({"access_key_id", "secret_access_key", "session_token", "password", "token"})


#: tagged unions of config sections, by field: a config class registers its own (training's
#: ``method``), so an error names ``method.selective``, not ``method.bct.selective``
UNION_TAGS: dict[str, Container[str]] = {}


def _shown(value: Any, width: int = 80) -> str:
    """A refused value as an error message echoes it: a section (mapping) by its keys, anything
    else as its repr, cut at a whole ``width`` characters with an ellipsis (credentials redacted)."""
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in value)
        return f"a section with {keys}" if len(keys) <= 2 * width else f"a section of {len(value)} keys"
    text = redact(repr(value))
    return text if len(text) <= width else text[: width - 3] + "..."


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        parts = list(e["loc"])
        if len(parts) > 1 and parts[1] in UNION_TAGS.get(str(parts[0]), ()):
            del parts[1]  # the union's tag: "method.selective", not "method.bct.selective"
        loc = ".".join(str(p) for p in parts) or "<root>"
        secret = any(str(p) in SECRET_KEYS for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"]
            if secret:
                msg += " (value not shown)"
            elif "input" in e and e["type"] not in ("model_type", "dict_type"):
                msg += f" (got {_shown(e['input'])})"
        lines.append(f"  {loc}: {redact(msg)}")
    return "\n".join(lines)


def parse_config(cls: type[T], data: Any, source: str = "<dict>") -> T:
    """Validate ``data`` (a mapping) as ``cls``; raise :class:`ConfigError` naming ``source`` and fields."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML (or JSON) config file holds, unvalidated (errors name the file)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {p}: {err.strerror or err}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"config {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {err}"
        ) from None
    return {} if data is None else data


def load_config(cls: type[T], path: str | Path) -> T:
    """Load a YAML (or JSON) file as config class ``cls``; errors name the file and the field."""
    return parse_config(cls, read_config_data(path), str(path))
