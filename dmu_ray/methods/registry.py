"""The method registry: every method in :mod:`dmu_ray.methods.catalog`, the config type that
``TrainConfig.method`` validates against (a discriminated union on ``name``, so an unknown field
fails naming it), and the helpers that build one from a dict."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

import dmu_ray.methods.catalog  # noqa: F401  (registers the built-in methods)
from dmu_ray.methods.base import METHODS, Method

__all__ = ["METHODS", "Method", "MethodConfig", "make_method", "method_from_saved"]

#: ``TrainConfig.method``'s type: one of the registered method classes, chosen by ``name``.
MethodConfig = Annotated[Union[tuple(METHODS.values())], Field(discriminator="name")]  # noqa: UP007

_ADAPTER: TypeAdapter[Method] = TypeAdapter(MethodConfig)


def make_method(**fields: Any) -> Method:
    """A method config from keyword fields, e.g. ``make_method(name="dmu", old_model=uri)``."""
    return _ADAPTER.validate_python(fields)


def method_from_saved(d: dict[str, Any]) -> dict[str, Any]:
    """A method section saved by an earlier dmu-ray (one bag of every method's fields) reduced to
    the fields its method has, so runs and exports written before the registry still resume and
    match. Unknown names are left for validation to refuse. Sections saved before a behaviour
    became the default keep the behaviour they were trained with (``new_classes: exclude``)."""
    cls = METHODS.get(d.get("name")) if isinstance(d, dict) else None
    if cls is None:
        return d
    legacy = getattr(cls, "legacy_fields", frozenset())
    out = {k: v for k, v in d.items() if k in cls.model_fields or k in legacy}
    if "new_classes" in cls.model_fields and "new_classes" not in d:
        out["new_classes"] = "exclude"  # what BCT/DMU did before the extension existed
    return out
