"""Config of ``dmu-ray adapter fit``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from dmu_ray.schema import LOCATION, StrictModel
from dmu_ray.settings import StorageConfig

__all__ = ["AdapterFitConfig", "GateSection", "MlpSection", "ADAPTERS", "CLOSED_FORMS", "TRAINED"]

#: the closed-form adapters (fitted from sufficient statistics in one pass over the pairs)
CLOSED_FORMS = ("procrustes", "affine")
#: the trained ones (the residual upgrade module on Ray Train; with FastFill's uncertainty head)
TRAINED = ("mlp", "mlp-uncertainty")
ADAPTERS = CLOSED_FORMS + TRAINED


class MlpSection(StrictModel):
    """How the ``mlp`` adapters train on Ray Train: a residual MLP whose skip path starts at the
    closed-form map (``init``), fitted to the target vectors by cosine on the fitted pairs (with
    ``mlp-uncertainty``, under FastFill's heteroscedastic loss, so its head predicts each row's
    error). One code path for CPU and GPU workers (DDP: gloo or NCCL)."""

    width: int = Field(default=1024, ge=1, description="hidden width of the residual MLP")
    depth: int = Field(default=1, ge=1, description="hidden blocks (Linear, BatchNorm, ReLU)")
    init: Literal["affine", "procrustes", "zero"] = Field(
        default="affine",
        description="where the skip path starts: the closed-form fit on the same pairs, or zero",
    )
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=512, ge=2, description="pairs per step and worker")
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP)")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = Field(default=False, description="one GPU per worker (NCCL); CPU workers use gloo")
    shuffle_buffer: int = Field(default=20_000, ge=0, description="pairs in each worker's shuffle buffer")
    seed: int = Field(default=0)


class GateSection(StrictModel):
    """The label-free gate on the held-out pairs: up to ``max_gallery`` held-out items taken in a
    seeded random order (a hash of the id and ``seed``, so not the first by id: ids often follow a
    class or a folder), the first ``queries`` of them queries, each searched among all the other
    items (its own row left out); each strategy's share of the full re-embedding's (new/new) top
    ``k``."""

    queries: int = Field(
        default=1000, ge=1, description="held-out items used as queries, at most (all of them where fewer)"
    )
    max_gallery: int = Field(
        default=50_000,
        ge=2,
        description="held-out items in the gate, at most: each query is searched among the others",
    )
    k: int = Field(default=10, ge=1, description="neighbours compared with new/new's")
    min_share: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="the adapter's strategy must reach this share, else the command exits 1 (a pipeline "
        "refuses the switch); unset: report only",
    )
    backfill: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default=[0.1, 0.25, 0.5],
        description="gallery side: shares of the gallery re-embedded with the new model (the rest adapted), "
        "by policy random and, with adapter mlp-uncertainty, uncertainty (highest first)",
    )

    @model_validator(mode="after")
    def _room_for_k(self) -> GateSection:
        if self.max_gallery <= self.k:
            raise ValueError(
                f"gate.max_gallery ({self.max_gallery}) must exceed gate.k ({self.k}): each query's top-k "
                "is searched among the other items"
            )
        return self


class AdapterFitConfig(StrictModel):
    """``dmu-ray adapter fit``: fit an adapter between two frozen models from the pairs of two
    committed galleries that share ids (the old model's vectors and the new model's of the same
    items), then gate it on the held-out pairs."""

    kind: Literal["adapter-fit"] = "adapter-fit"
    old_gallery: Annotated[str, LOCATION] = Field(description="committed gallery of old-model vectors")
    new_gallery: Annotated[str, LOCATION] = Field(
        description="committed gallery of new-model vectors of (some of) the same ids"
    )
    output: Annotated[str, LOCATION] = Field(
        description="new folder: adapter.pt (the artefact), gate.json, gate.md, gate.png, holdout/ (the held-out pairs)"
    )
    direction: Literal["gallery", "query"] = Field(
        default="gallery",
        description="gallery: old vectors -> the new space (dmu-ray refresh/backfill apply it); query: "
        "new-model queries -> the old space (the old gallery and its index stay)",
    )
    adapter: Literal[ADAPTERS] = Field(  # type: ignore[valid-type]
        default="procrustes",
        description="procrustes (orthogonal), affine (least squares), mlp (residual MLP on Ray Train) or "
        "mlp-uncertainty (with FastFill's uncertainty head: backfill --policy uncertainty)",
    )
    center: bool = Field(default=False, description="procrustes: fit on centred vectors (adds a bias)")
    ridge: Annotated[float, Field(ge=0)] | Literal["auto"] | None = Field(
        default=None,
        description="affine and the mlp kinds' affine start: ridge penalty (per pair), or auto (their "
        "default): the one of 0 and 1e-5..10 x the inputs' mean variance whose map, fitted on the other "
        "pairs, keeps most of new/new's top-k on the tune share",
    )
    tune: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="ridge auto: seeded share of the fitted pairs its choice is scored on (then fitted on "
        "too); less where it would be more than about 20,000 pairs",
    )
    rank: int | None = Field(default=None, ge=1, description="affine: rank of the map (reduced-rank fit)")
    mlp: MlpSection | None = Field(default=None, description="adapter mlp / mlp-uncertainty: the training")
    holdout: float = Field(default=0.1, gt=0, lt=1, description="seeded share of pairs held out for the gate")
    seed: int = Field(default=0, description="seed of the held-out share and of the gate's order (by id)")
    min_matched_share: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="refuse when fewer of the smaller gallery's ids have a pair in the other",
    )
    bucket_rows: int = Field(
        default=1_000_000,
        ge=1,
        description="most rows per bucket of the join on Ray Data (its tasks' memory); more buckets are made to give every CPU a share",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per join task")
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs per join task: the statistics' products run on it (torch, float32; TF32 "
        "only for float16 vectors, where it is exact; summed in float64); 0: on the task's CPU (numpy's BLAS)",
    )
    resource_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="how long to wait for a node that can hold one join task before failing (an "
        "autoscaling cluster needs minutes to start one; 0: fail at once)",
    )
    id: str | None = Field(default=None, description="the adapter's id (default: <old model>-><new model>)")
    gate: GateSection = Field(default_factory=GateSection)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: auto/local")

    @model_validator(mode="after")
    def _options_of_the_adapter(self) -> AdapterFitConfig:
        if self.adapter == "procrustes" and (self.ridge is not None or self.rank):
            raise ValueError("ridge and rank are options of adapter: affine")
        if self.adapter == "affine" and self.center:
            raise ValueError("center is an option of adapter: procrustes (affine always fits a bias)")
        if self.adapter in TRAINED:
            if self.center:
                raise ValueError("center is an option of adapter: procrustes")
            if self.mlp is None:
                self.mlp = MlpSection()
        elif self.mlp is not None:
            raise ValueError(f"mlp is the section of adapter: mlp or mlp-uncertainty, not {self.adapter}")
        if self.ridge is not None and self.ridge_choice is None:
            raise ValueError(
                f"ridge is an option of the affine fit: adapter affine, or an mlp adapter with mlp.init: "
                f"affine (here mlp.init is {self.mlp.init})"
            )
        if self.adapter == "mlp-uncertainty" and self.direction == "query":
            raise ValueError(
                "adapter mlp-uncertainty orders a backfill of gallery rows: it needs direction: gallery "
                "(use mlp for a query-side adapter)"
            )
        return self

    @property
    def ridge_choice(self) -> float | Literal["auto"] | None:
        """The ridge the fit uses: None where none applies (procrustes, an mlp from procrustes or
        zero), else the configured one, auto when unset."""
        affine = self.adapter == "affine" or (self.mlp is not None and self.mlp.init == "affine")
        if not affine:
            return None
        return "auto" if self.ridge is None else self.ridge
