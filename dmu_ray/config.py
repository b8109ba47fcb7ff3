"""Every config class in one namespace, for users and scripts: ``from dmu_ray.config import
TrainConfig``. Nothing inside the library imports this module: each job's config lives beside its
job (:mod:`dmu_ray.train.config`, :mod:`dmu_ray.refresh.config`, :mod:`dmu_ray.evaluate.config`,
:mod:`dmu_ray.lifecycle`), the shared settings at the ground floor (:mod:`dmu_ray.settings`), so
this facade sits at the top of the layers with the command line (docs/decisions.md)."""

from __future__ import annotations

from dmu_ray.adapters.config import AdapterFitConfig
from dmu_ray.evaluate.config import (
    NEW_GALLERY_ROLES,
    EmbedConfig,
    EvaluateConfig,
    GalleryStateSpec,
    MatrixConfig,
    NewModelSpec,
    RevisitedSection,
    TemplatesSection,
    load_evaluate_config,
)
from dmu_ray.methods.registry import MethodConfig
from dmu_ray.plan.config import BenchConfig, PlanConfig
from dmu_ray.refresh.config import (
    BACKFILL_POLICIES,
    CURVE_POLICIES,
    BackfillConfig,
    BackfillCurveSection,
    RefreshConfig,
)
from dmu_ray.schema import ConfigError, StrictModel
from dmu_ray.settings import (
    SECRET_KEYS,
    ActorPoolConfig,
    StorageConfig,
    TrackingConfig,
    load_config,
    parse_config,
    read_config_data,
)
from dmu_ray.train.config import SPLITS, DataConfig, ModelConfig, OptimConfig, ScalingSection, TrainConfig

__all__ = [
    "AdapterFitConfig",
    "BenchConfig",
    "PlanConfig",
    "ConfigError",
    "StrictModel",
    "StorageConfig",
    "TrackingConfig",
    "ActorPoolConfig",
    "SECRET_KEYS",
    "parse_config",
    "read_config_data",
    "load_config",
    "RefreshConfig",
    "BackfillConfig",
    "BackfillCurveSection",
    "BACKFILL_POLICIES",
    "CURVE_POLICIES",
    "EmbedConfig",
    "EvaluateConfig",
    "NewModelSpec",
    "RevisitedSection",
    "TemplatesSection",
    "GalleryStateSpec",
    "MatrixConfig",
    "NEW_GALLERY_ROLES",
    "load_evaluate_config",
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScalingSection",
    "SPLITS",
    "MethodConfig",
]
