"""Configs of ``dmu-ray refresh`` and ``dmu-ray backfill`` (with its curve)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dmu_ray.methods.backfill_policies import BACKFILL_POLICIES
from dmu_ray.schema import StrictModel
from dmu_ray.settings import ActorPoolConfig, StorageConfig

__all__ = [
    "RefreshConfig",
    "BackfillConfig",
    "BackfillCurveSection",
    "BACKFILL_POLICIES",
    "CURVE_POLICIES",
]


class RefreshConfig(StrictModel):
    """``dmu-ray refresh``: upgrade an old gallery prefix into a new one with the upgrade module."""

    kind: Literal["refresh"] = "refresh"
    source: str = Field(description="URI of the committed old gallery prefix")
    output: str = Field(description="URI of the new gallery prefix (never the source)")
    module: str | list[str] = Field(
        description="URI of the exported upgrade-module artefact, or a list of them (generations: "
        "psi_12, psi_23, ...): each row goes through the modules that lead from its lineage's space "
        "to the last module's target space"
    )
    dtype: Literal["float16", "float32"] = "float16"
    normalize: bool = True
    pool: ActorPoolConfig = Field(default_factory=ActorPoolConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: auto/local")

    @property
    def modules(self) -> list[str]:
        return [self.module] if isinstance(self.module, str) else list(self.module)

    @field_validator("module")
    @classmethod
    def _some_module(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("name at least one upgrade module")
        if len(set([v] if isinstance(v, str) else v)) != (1 if isinstance(v, str) else len(v)):
            raise ValueError("an upgrade module is listed twice")
        return v

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


BackfillPolicy = Literal[BACKFILL_POLICIES]  # type: ignore[valid-type]
#: a curve may also draw the oracle order (realised transformation error: needs every new vector,
#: so it bounds the other orders from above but cannot choose what a real backfill re-embeds)
CURVE_POLICIES = (*BACKFILL_POLICIES, "oracle")
CurvePolicy = Literal[CURVE_POLICIES]  # type: ignore[valid-type]


class BackfillCurveSection(StrictModel):
    """``dmu-ray backfill-curve``: the metric of new-model queries against the mixed gallery at
    each backfill fraction, for each policy (computed in memory from one pass of each model)."""

    queries: str = Field(description="image data set part embedded with the new model as queries")
    fractions: list[float] = Field(
        default_factory=lambda: [round(i / 10, 1) for i in range(11)],
        description="backfill fractions from 0 to 1",
    )
    policies: list[CurvePolicy] = Field(default_factory=lambda: list(CURVE_POLICIES))
    metric: str = Field(default="mAP@100", description="a metric of evaluate's pairings (mAP@K, R@K)")
    output: str = Field(description="folder for backfill_curve.json and backfill_curve.png")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if len(v) < 2 or any(not 0.0 <= f <= 1.0 for f in v) or sorted(set(v)) != v:
            raise ValueError("must be at least two distinct increasing values in [0, 1]")
        if v[0] != 0.0 or v[-1] != 1.0:
            raise ValueError("must start at 0 and end at 1 (the curve's area spans the whole axis)")
        return v


class BackfillConfig(StrictModel):
    """``dmu-ray backfill``: FastFill's partial backfill. Every old vector is transformed by the
    module; the ``fraction`` of rows the ``policy`` ranks first are re-embedded from their images
    with the new model instead; the mixed gallery records each row's provenance."""

    kind: Literal["backfill"] = "backfill"
    source: str = Field(description="URI of the committed old gallery prefix")
    images: str = Field(
        description="the gallery's images (same ids): an image data set part, or a table (.csv/.parquet) of "
        "id,uri listing them (local paths or s3://; decoded at the new model's input size)"
    )
    module: str = Field(description="URI of the transformation (an upgrade-module artefact)")
    new_model: str = Field(description="URI of the new model artefact (re-embeds the chosen rows)")
    old_model: str | None = Field(
        default=None, description="old model artefact (policy old-discriminativeness)"
    )
    policy: BackfillPolicy = "uncertainty"
    fraction: float = Field(default=0.1, ge=0, le=1, description="share of rows re-embedded")
    output: str = Field(description="URI of the mixed gallery prefix (never the source)")
    seed: int = Field(default=0, description="seed of the random policy")
    dtype: Literal["float16", "float32"] = "float16"
    pool: ActorPoolConfig = Field(default_factory=ActorPoolConfig)
    embed_pool: ActorPoolConfig = Field(
        default_factory=lambda: ActorPoolConfig(batch_size=256), description="actors re-embedding images"
    )
    curve: BackfillCurveSection | None = None
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = None

    @model_validator(mode="after")
    def _old_model_for_policy(self) -> BackfillConfig:
        needs = [self.policy] + (self.curve.policies if self.curve else [])
        if "old-discriminativeness" in needs and not self.old_model:
            raise ValueError(
                "policy 'old-discriminativeness' needs old_model (its classifier scores the items)"
            )
        return self
