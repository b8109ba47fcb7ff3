"""Typed job configs, validated when they are loaded.

Every config is a pydantic model that forbids unknown keys. :func:`load_config` reads YAML or JSON
and turns any problem (unknown key, wrong type, missing field, bad value) into a
:class:`ConfigError` whose message names the file and the dotted path of each bad field, so a job
fails on the submitting machine before any cluster work starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ConfigError",
    "StrictModel",
    "StorageConfig",
    "RefreshConfig",
    "ActorPoolConfig",
    "TrackingConfig",
    "TrainConfig",
    "MethodConfig",
    "EvaluateConfig",
    "NewModelSpec",
    "load_config",
    "parse_config",
]

from dmu_ray.methods.registry import METHODS, MethodConfig, make_method
from dmu_ray.schema import LOCATION, ConfigError, StrictModel

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
        "read/encode threads, so an actor's I/O keeps its GPU busy. Default: 1 on a CPU actor "
        "(its cores run psi), max(2, num_cpus) on a GPU actor",
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


class EmbedConfig(StrictModel):
    """``dmu-ray embed``: embed an image set with a model into a new gallery prefix (Ray Data)."""

    kind: Literal["embed"] = "embed"
    images: str = Field(
        description="image data set part (e.g. out/data/glyphs/gallery) or an id,uri[,label] table"
    )
    model: str = Field(description="embedding model artefact (e.g. export/model.pt)")
    output: str = Field(description="new gallery prefix (local or s3://); never inside the inputs")
    dtype: Literal["float16", "float32"] = "float16"
    overwrite: bool = Field(default=False, description="replace what the output prefix holds")
    rows_per_file: int = Field(default=1_000_000, ge=1, description="rows per Parquet file of the gallery")
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: auto/local")


BACKFILL_POLICIES = ("uncertainty", "random", "old-discriminativeness")
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


SPLITS = ("all", "extended-data", "extended-class", "open-data", "open-class")


class DataConfig(StrictModel):
    """Training images and the split protocol that picks the old or new model's share of them."""

    uri: Annotated[str, LOCATION] = Field(description="image data set root (holds _dataset.json and train/)")
    split: Literal[SPLITS] = "all"  # type: ignore[valid-type]
    role: Literal["old", "new"] = Field(
        default="new", description="which side of the split this run trains on"
    )
    old_fraction: float = Field(
        default=0.3, gt=0, lt=1, description="share of data/classes the old model sees"
    )
    split_seed: int = 0
    augment: bool = True
    flip: bool = Field(
        default=False, description="random horizontal flip (off: it changes characters' classes)"
    )
    crop_scale: tuple[float, float] = (0.6, 1.0)
    decode_cpus: float = Field(default=0.5, gt=0, description="CPUs per decode task (leave room for workers)")
    cache: Literal["auto", "memory", "off"] = Field(
        default="auto",
        description="keep the decoded training images between epochs in the object store: auto (when "
        "they take at most 30% of it), memory (always; Ray spills to disk past it), off (decode every epoch)",
    )


class ModelConfig(StrictModel):
    """The new (or old) embedding model and its classifier. The backbone starts from random
    weights, from a library's pretrained weights (``pretrained``), or from a state-dict file
    (``weights``); the embedding layer and classifier always start fresh."""

    backbone: str = Field(
        default="small",
        description="dmu-ray's small, resnet18, resnet34, resnet50 (adapted to any channel count), or a "
        "library architecture: torchvision:NAME, timm:NAME",
    )
    pretrained: str | None = Field(
        default=None,
        description="a torchvision:/timm: backbone's library weights, fetched by the library on the cluster: "
        "'default', or a torchvision weights name such as ResNet50_Weights.IMAGENET1K_V2",
    )
    weights: Annotated[str | None, LOCATION] = Field(
        default=None, description="URI (local or s3://) of a state-dict file for the backbone"
    )
    mean: list[float] | None = Field(
        default=None,
        min_length=1,
        description="input normalisation (x - mean) / std; default: the library's for torchvision:/timm: "
        "backbones (ImageNet's), 0.5 for dmu-ray's",
    )
    std: list[float] | None = Field(default=None, min_length=1)
    dim: int = Field(default=128, ge=2)
    head: Literal["arcface", "cosface", "softmax"] = "arcface"
    s: float = Field(default=30.0, gt=0)
    m: float = Field(default=0.3, ge=0, lt=1.5)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from dmu_ray.models.backbone_names import BACKBONES, is_library_backbone

        if v in BACKBONES or is_library_backbone(v):
            return v
        raise ValueError(f"must be one of {', '.join(BACKBONES)}, or torchvision:NAME / timm:NAME")

    @model_validator(mode="after")
    def _one_init(self) -> ModelConfig:
        if self.pretrained and self.weights:
            raise ValueError("give pretrained (library weights) or weights (a file), not both")
        if self.pretrained and ":" not in self.backbone:
            raise ValueError(
                f"pretrained names library weights and needs a torchvision:/timm: backbone, not {self.backbone!r} "
                "(use weights: URI for a state-dict file)"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and any(x <= 0 for x in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class OptimConfig(StrictModel):
    """SGD with momentum, cosine schedule after a linear warm-up (the DMU paper's recipe)."""

    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    epochs: int = Field(default=30, ge=1)
    warmup_epochs: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=256, ge=2, description="per worker")
    amp: bool = Field(default=True, description="mixed precision on GPU (ignored on CPU)")


class ScalingSection(StrictModel):
    """Ray Train workers. With ``min_workers`` set the run is elastic: it starts with as many
    workers (``min_workers`` to ``num_workers``) as the cluster holds, goes on with fewer when a
    node is lost, and grows when nodes join (checked every ``resize_check_s``); every change of
    size restarts the worker group from the last epoch checkpoint."""

    num_workers: int = Field(default=2, ge=1, description="workers (the most, when elastic)")
    min_workers: int | None = Field(default=None, ge=1, description="set: elastic, at least this many")
    resize_check_s: float = Field(
        default=60.0, gt=0, description="elastic: how often a running group looks for room to grow"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0)
    resource_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="how long to wait for a node that can hold one worker before failing (an "
        "autoscaling cluster needs minutes to start one; 0: fail at once)",
    )
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        default="PACK", description="PACK fills nodes one by one; SPREAD puts workers on different nodes"
    )

    @field_validator("min_workers")
    @classmethod
    def _min_le_max(cls, v: int | None, info: Any) -> int | None:
        hi = info.data.get("num_workers")
        if v is not None and hi is not None and v > hi:
            raise ValueError(f"must be <= num_workers ({hi})")
        return v


class TrainConfig(StrictModel):
    """``dmu-ray train``: one Ray Train run (old model, or new model with a method)."""

    kind: Literal["train"] = "train"
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name; same name resumes")
    storage_path: Annotated[str, LOCATION] = Field(
        description="where runs live (local path or s3://bucket/prefix)"
    )
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(
        default_factory=lambda: make_method(name="independent"),
        description=f"the upgrade method, by name: {', '.join(METHODS)} (see dmu_ray/methods/catalog/)",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    embed_pool: ActorPoolConfig = Field(
        default_factory=lambda: ActorPoolConfig(batch_size=256),
        description="actors embedding training images before training starts (UniBCT's prototypes, "
        "old-classifier prototypes)",
    )
    max_failures: int = Field(default=2, ge=-1, description="worker failures to recover from (-1: unlimited)")
    failure_drill_epoch: int | None = Field(
        default=None, ge=1, description="kill one worker once during this epoch, to exercise recovery"
    )
    seed: int = 0
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = None


def _all_at_least_one(v: list[int], what: str) -> list[int]:
    if any(k < 1 for k in v):
        raise ValueError(f"every {what} must be >= 1 (got {v})")
    return v


def _all_in_unit(v: list[float], what: str) -> list[float]:
    if any(not 0.0 < f < 1.0 for f in v):
        raise ValueError(f"every {what} must lie strictly between 0 and 1 (got {v})")
    return v


class RevisitedSection(StrictModel):
    """Options of the ``revisited`` protocol (Revisited Oxford/Paris)."""

    ground_truth: str = Field(
        description="the protocol's ground-truth file: gnd_roxford5k.pkl / gnd_rparis6k.pkl or the same as .json"
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1, description="k of mP@k")

    @field_validator("ks")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        return _all_at_least_one(v, "k")


class TemplatesSection(StrictModel):
    """Options of the ``templates`` protocol (IJB-C style template verification/identification)."""

    table: str = Field(
        description="CSV/Parquet of template,id[,media,subject,set]: the images of each template"
    )
    pairs: str | None = Field(default=None, description="CSV/Parquet of probe,reference[,genuine]: 1:1 pairs")
    fars: list[float] = Field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2], description="FARs of template TAR@FAR"
    )
    fpirs: list[float] = Field(default_factory=lambda: [1e-2, 1e-1], description="FPIRs of TPIR@FPIR")
    ranks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="ranks of 1:N identification")

    @field_validator("fars", "fpirs")
    @classmethod
    def _rates_in_unit(cls, v: list[float]) -> list[float]:
        return _all_in_unit(v, "rate")

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, v: list[int]) -> list[int]:
        return _all_at_least_one(v, "rank")


NEW_GALLERY_ROLES = ("new", "upgraded", "mixed")


class NewModelSpec(StrictModel):
    """One new model of a several-model evaluation (``new_models:``), with what belongs to it."""

    model: str = Field(description="new model artefact URI")
    upgrade_module: str | None = Field(default=None, description="its upgrade module: adds new/upgraded")
    galleries: dict[Literal["new", "upgraded", "mixed"], str] = Field(
        default_factory=dict,
        description="already-embedded galleries of this model (its own, upgraded into its space, backfilled)",
    )


class EvaluateConfig(StrictModel):
    """``dmu-ray evaluate``: every query/gallery model pairing on a labelled query set and gallery,
    for one new model (``new_model``) or several side by side (``new_models``); each query/gallery
    set is embedded once per distinct model artefact, however many times it is named."""

    kind: Literal["evaluate"] = "evaluate"
    data: str = Field(description="image data set whose query/ and gallery/ parts are evaluated")
    old_model: str = Field(description="old model artefact URI")
    new_model: str | None = Field(default=None, description="new model artefact URI (or new_models)")
    new_models: dict[str, NewModelSpec] = Field(
        default_factory=dict,
        description="several new models by name (e.g. independent, bct, dmu), each evaluated against the "
        "one old model and old gallery; instead of new_model",
    )
    upgrade_module: str | None = Field(default=None, description="upgrade module: adds new/upgraded")
    independent_model: str | None = Field(default=None, description="independently trained new model")
    galleries: dict[Literal["old", "new", "upgraded", "mixed"], str] = Field(
        default_factory=dict,
        description="already-embedded gallery prefixes to use instead of embedding images",
    )

    @model_validator(mode="after")
    def _one_way_to_name_new_models(self) -> EvaluateConfig:
        if (self.new_model is None) == (not self.new_models):
            raise ValueError(
                "give new_model (one new model) or new_models (several by name), not both or neither"
            )
        if self.new_models:
            if self.upgrade_module is not None:
                raise ValueError(
                    "upgrade_module: with new_models, give each model's upgrade_module in its entry"
                )
            shared = [r for r in self.galleries if r != "old"]
            if shared:
                raise ValueError(
                    f"galleries: with new_models only the old gallery is shared; put {shared} under the "
                    "entry of the new model they belong to"
                )
            for name in self.new_models:
                if not name or not all(c.isalnum() or c in "-_." for c in name) or name == "old":
                    raise ValueError(
                        f"new_models: {name!r} is not a usable name (letters, digits, '-', '_', '.'; not 'old')"
                    )
            # a new model may be named 'independent' (the lifecycle evaluates the independent model's
            # new/old beside the others); it must then be the independent model itself
            ind = self.new_models.get("independent")
            if ind is not None and self.independent_model is not None and ind.model != self.independent_model:
                raise ValueError(
                    f"new_models.independent: {ind.model} is not independent_model ({self.independent_model}); "
                    "the model named 'independent' must be the independent model"
                )
        return self

    def models(self) -> dict[str, NewModelSpec]:
        """The new models by name; the single ``new_model`` form is the one model named ``new``."""
        if self.new_models:
            return dict(self.new_models)
        assert self.new_model is not None
        return {
            "new": NewModelSpec(
                model=self.new_model,
                upgrade_module=self.upgrade_module,
                galleries={r: u for r, u in self.galleries.items() if r in NEW_GALLERY_ROLES},
            )
        }

    @property
    def several(self) -> bool:
        """Whether new models are given by name (``new_models``), so pairings carry the name."""
        return bool(self.new_models)

    output: str = Field(description="folder for eval.json, eval.md and plots (local or s3://)")
    title: str = "retrieval by query/gallery model pairing"
    verify_galleries: bool = Field(
        default=True,
        description="check every stored gallery file against its manifest (bytes, sha256, rows) before its "
        "vectors are used; false reads them as they are",
    )
    max_quarantined_share: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="stop when a gallery or query set lost more than this share of its rows to quarantine "
        "(e.g. a model that outputs NaN), naming the model and the reason",
    )
    check_gallery_models: bool = Field(
        default=True,
        description="refuse a gallery whose dmu.model says another model (or no upgrade module) made it "
        "than the one it is paired with; false checks dimensions only",
    )
    protocols: list[str] = Field(
        default_factory=lambda: ["retrieval", "verification"],
        min_length=1,
        description="evaluation protocols run for every pairing (registered in dmu_ray/evaluate/protocols.py)",
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    map_at: int = Field(default=100, ge=1)
    tar_fars: list[float] = Field(default_factory=lambda: [1e-3, 1e-2])
    revisited: RevisitedSection | None = Field(default=None, description="ground truth of protocol revisited")
    templates: TemplatesSection | None = Field(default=None, description="templates of protocol templates")

    @field_validator("ks")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        return _all_at_least_one(v, "k")

    @field_validator("tar_fars")
    @classmethod
    def _fars_in_unit(cls, v: list[float]) -> list[float]:
        return _all_in_unit(v, "FAR")

    exact_max: int = Field(
        default=2_000_000,
        ge=1,
        description="exact search up to this gallery size, IVF above (docs/benchmarks.md: exact is faster than IVF at 1M)",
    )
    nprobe: int = Field(default=16, ge=1)
    pq_m: int | None = Field(default=None, ge=1, description="IVF-PQ sub-quantizers (None: IVF-Flat)")
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = None


#: Config keys whose values are never shown in an error, whatever their type or section.
SECRET_KEYS = frozenset({"access_key_id", "secret_access_key", "session_token", "password", "token"})


def _format_errors(err: ValidationError, source: str) -> str:
    from dmu_ray.storage import redact

    lines = [f"invalid config {source}:"]
    for e in err.errors():
        parts = list(e["loc"])
        if len(parts) > 1 and parts[0] == "method" and parts[1] in METHODS:
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
                shown = redact(repr(e["input"]))
                msg += f" (got {shown[:80]})"
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


class GalleryStateSpec(StrictModel):
    """One gallery state of a cross-generation matrix: the data set's gallery images embedded by
    ``model`` (a name of ``query_models`` or an artefact URI) and then upgraded by each of
    ``upgrade`` in order (in memory), or a committed gallery prefix (``gallery``) as it is stored."""

    model: str | None = Field(default=None, description="a query_models name or a model artefact URI")
    upgrade: list[str] = Field(default_factory=list, description="upgrade-module URIs applied in order")
    gallery: str | None = Field(default=None, description="a committed gallery prefix (instead of model)")

    @model_validator(mode="after")
    def _one_source(self) -> GalleryStateSpec:
        if (self.model is None) == (self.gallery is None):
            raise ValueError(
                "give model (embed the gallery images, then upgrade) or gallery (a stored prefix)"
            )
        if self.gallery is not None and self.upgrade:
            raise ValueError(
                "upgrade applies to a model's vectors; refresh a stored gallery with dmu-ray refresh"
            )
        return self


class MatrixConfig(StrictModel):
    """``dmu-ray evaluate`` over generations (``kind: evaluate-matrix``): every query model against
    every gallery state (v1's gallery never refreshed, refreshed once or twice, embedded by each
    generation...), one retrieval evaluation per cell, a heat map of the headline metric."""

    kind: Literal["evaluate-matrix"] = "evaluate-matrix"
    data: str = Field(description="image data set whose query/ and gallery/ parts are evaluated")
    query_models: dict[str, str] = Field(min_length=1, description="query models by name (rows), in order")
    gallery_states: dict[str, GalleryStateSpec] = Field(min_length=1, description="gallery states (columns)")
    output: str = Field(description="folder for matrix.json, matrix.md and matrix.png (local or s3://)")
    title: str = "query model x gallery state"
    metric: str = Field(default="mAP@100", description="the figure of the heat map (mAP@K or R@K)")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    map_at: int = Field(default=100, ge=1)
    exact_max: int = Field(default=2_000_000, ge=1, description="exact search up to this gallery size")
    nprobe: int = Field(default=16, ge=1)
    pq_m: int | None = Field(default=None, ge=1)
    verify_galleries: bool = Field(
        default=True,
        description="check every stored gallery file against its manifest (bytes, sha256, rows) before its "
        "vectors are used; false reads them as they are",
    )
    max_quarantined_share: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="stop when a gallery or query set lost more than this share of its rows to quarantine "
        "(e.g. a model that outputs NaN), naming the model and the reason",
    )
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = None

    @field_validator("ks")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        return _all_at_least_one(v, "k")

    @model_validator(mode="after")
    def _names_and_metric(self) -> MatrixConfig:
        for what, names in (("query_models", self.query_models), ("gallery_states", self.gallery_states)):
            for n in names:
                if not n or any(c in n for c in "/|\n"):
                    raise ValueError(f"{what}: {n!r} is not a usable name (no '/', '|' or newline)")
        m = re.fullmatch(r"(mAP|R)@(\d+)", self.metric)
        if m is None:
            raise ValueError(f"metric: {self.metric!r} is not mAP@K or R@K")
        k = int(m.group(2))
        if (m.group(1) == "mAP" and k != self.map_at) or (m.group(1) == "R" and k not in self.ks):
            raise ValueError(f"metric: {self.metric} is not computed (map_at {self.map_at}, ks {self.ks})")
        return self


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


def load_evaluate_config(path: str | Path) -> EvaluateConfig | MatrixConfig:
    """An evaluate job's config: ``kind: evaluate-matrix`` (generations) is a :class:`MatrixConfig`,
    anything else an :class:`EvaluateConfig`."""
    data = read_config_data(path)
    cls = MatrixConfig if isinstance(data, dict) and data.get("kind") == "evaluate-matrix" else EvaluateConfig
    return parse_config(cls, data, str(path))
