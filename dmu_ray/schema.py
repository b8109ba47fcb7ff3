"""The ground floor of the configs: the base of every config section, location fields, and the
redaction of what configs and errors show. Registered components (e.g. the methods in
:mod:`dmu_ray.methods.catalog`) define their own config sections on it without importing the job
configs that collect them."""

from __future__ import annotations

import os
import re
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ConfigError",
    "StrictModel",
    "LOCATION",
    "canonical_location",
    "with_canonical_locations",
    "comparable_dump",
    "redact",
]


class ConfigError(ValueError):
    """A config file (or dict) that does not validate; the message names the file and fields."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class _LocationField:
    """Marks a config field that names a storage location: ``Annotated[str, LOCATION]``."""

    def __repr__(self) -> str:
        return "LOCATION"


#: metadata of a config field naming a storage location (local path, ``file://`` or ``s3://``):
#: such fields are compared by the location they name (:func:`with_canonical_locations`)
LOCATION = _LocationField()


def canonical_location(uri: str) -> str:
    """The location a URI names, spelled one way: an absolute local path (``file://`` and ``~``
    expanded, relative paths taken from the working directory) or ``s3://bucket/key``; no trailing
    slash. Other schemes come back as given."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        return "s3://" + (parsed.netloc + parsed.path).rstrip("/")
    if scheme == "file":
        path = os.path.abspath(parsed.path)
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        path = os.path.abspath(os.path.expanduser(uri))
    else:
        return uri
    return path.rstrip("/") or "/"


def _canonicalise(model: BaseModel, dump: dict[str, Any], tags: bool) -> dict[str, Any]:
    """``dump`` (a ``model_dump`` of ``model``, possibly with fields left out), in place and walking
    its sections: every ``LOCATION`` field spelled by :func:`canonical_location`; with ``tags``,
    the one-value ``Literal`` fields (a section's tag, e.g. a method's ``name``) that
    ``exclude_defaults`` left out put back: at its default the tag still says which kind of
    section it is."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            if isinstance(dump.get(name), dict):
                _canonicalise(value, dump[name], tags)
        elif tags and get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
            dump[name] = value
        elif name in dump and isinstance(value, str) and any(m is LOCATION for m in field.metadata):
            dump[name] = canonical_location(value)
    return dump


def with_canonical_locations(model: BaseModel, dump: dict[str, Any]) -> dict[str, Any]:
    """``dump`` (a ``model_dump`` of ``model``) with every ``LOCATION`` field spelled by
    :func:`canonical_location`, in place; sections are walked."""
    return _canonicalise(model, dump, tags=False)


def comparable_dump(model: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    """What a config means, for comparing two of them: its fields without the defaults (an option
    added later at its default changes nothing) but with every section's tag (``bct`` and ``dmu``
    at their defaults are different methods), locations spelled one way (``out/runs`` from the
    working directory and its absolute path are one location)."""
    dump = model.model_dump(mode="json", exclude=exclude, exclude_defaults=True)
    return _canonicalise(model, dump, tags=True)


_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with credentials removed: the user-info part of any URI (``s3://KEY:SECRET@``),
    the values of the AWS credential variables of this environment, and ``secrets``. (At the
    ground floor: config errors use it; :mod:`dmu_ray.storage` re-exports it.)"""
    out = _URI_USERINFO.sub(r"\1***@", str(text))
    values = [os.environ.get(k) for k in _SECRET_ENV] + list(secrets or [])
    for v in sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True):
        out = out.replace(v, "***")
    return out
