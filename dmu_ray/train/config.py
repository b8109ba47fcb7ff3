"""Config of ``dmu-ray train``: data and split, model, optimiser, scaling, method (the method
registry is imported here, and only here among the configs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from dmu_ray.methods.registry import METHODS, MethodConfig, make_method
from dmu_ray.schema import LOCATION, StrictModel
from dmu_ray.settings import UNION_TAGS, ActorPoolConfig, StorageConfig, TrackingConfig

__all__ = [
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScalingSection",
    "SPLITS",
    "MethodConfig",
]


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


UNION_TAGS["method"] = METHODS  # live: methods registered later count too
