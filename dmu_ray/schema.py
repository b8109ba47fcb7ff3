"""The base of every config section (kept apart from :mod:`dmu_ray.config` so that registered
components, e.g. the methods in :mod:`dmu_ray.methods.catalog`, can define their own config
sections without importing the job configs that collect them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "StrictModel"]


class ConfigError(ValueError):
    """A config file (or dict) that does not validate; the message names the file and fields."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
