"""Configs of ``dmu-ray bench`` (measure what a plan needs, on the cluster it runs on) and
``dmu-ray plan`` (what each upgrade path costs and buys)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from dmu_ray.schema import LOCATION, StrictModel
from dmu_ray.settings import StorageConfig

__all__ = [
    "BenchConfig",
    "BenchWorkers",
    "EmbedBench",
    "RefreshBench",
    "QueryBench",
    "TrainBench",
    "PlanConfig",
    "PlanGallery",
    "PlanPrices",
    "PlanCluster",
    "PlanTraining",
    "PlanEvidence",
]


class BenchWorkers(StrictModel):
    """The workers each figure is measured on: ``count`` Ray actors at once, each with these
    resources (what the jobs' pools ask for). Figures are per worker, measured while all of them
    run, so workers that share a node share its memory bandwidth and disks as in a job."""

    count: int = Field(default=1, ge=1, description="workers measured at once")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per worker")
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per worker (> 0: a GPU worker, priced as one)"
    )


class EmbedBench(StrictModel):
    """Embedding images with the new model (a backfill's and a re-embedding's cost): decode and
    forward of the model's own preprocessing, on a sample of the images."""

    model: Annotated[str, LOCATION] = Field(description="the new model's artefact")
    images: Annotated[str, LOCATION] = Field(
        description="images it embeds: a data set part (<data>/gallery) or an id,uri table"
    )
    sample: int = Field(default=256, ge=1, description="images timed per repeat")
    batch_size: int = Field(default=64, ge=1)


class RefreshBench(StrictModel):
    """Refreshing a gallery with an upgrade module or a gallery-side adapter: the refresh's own
    per-file work (read and sha256, checks, module, encode, write, commit record) on the first
    files of a committed gallery, written under the bench's output and removed after."""

    module: Annotated[str, LOCATION] = Field(description="upgrade module or gallery-side adapter")
    gallery: Annotated[str, LOCATION] = Field(description="a committed gallery in the module's input space")
    rows: int = Field(
        default=200_000, ge=1, description="at most this many rows per repeat (whole files; at least one)"
    )
    batch_size: int = Field(
        default=65536, ge=1, description="rows per batch, as the refresh's pool.batch_size"
    )
    dtype: Literal["float16", "float32"] = Field(default="float16", description="the output's dtype")


class QueryBench(StrictModel):
    """Mapping queries through a query-side adapter: one query at a time (the latency a search
    adds) and in batches."""

    adapter: Annotated[str, LOCATION] = Field(
        description="a query-side adapter (adapter fit, direction query)"
    )
    queries: int = Field(default=2000, ge=10, description="queries timed one at a time per repeat")
    batch_size: int = Field(default=1024, ge=1, description="queries per batch for the batch figure")


class TrainBench(StrictModel):
    """Training steps of the new model's architecture (forward, margin-head loss, backward, step;
    with ``old_model``, its frozen forward too, which every compatibility loss needs), on decoded
    sample images; AMP on a GPU as the train loop runs it."""

    model: Annotated[str, LOCATION] = Field(
        description="artefact whose architecture is trained (e.g. the new model)"
    )
    old_model: Annotated[str, LOCATION] | None = Field(default=None, description="the frozen old model")
    images: Annotated[str, LOCATION] = Field(description="a data set part with labels (<data>/train)")
    batch_size: int = Field(default=64, ge=2)
    steps: int = Field(default=10, ge=1, description="steps timed per repeat")


class BenchConfig(StrictModel):
    """``dmu-ray bench``: the throughputs a plan needs, measured on this cluster with samples of
    the user's own artefacts and data. Each section is optional; at least one is required."""

    kind: Literal["bench"] = "bench"
    output: Annotated[str, LOCATION] = Field(
        description="new folder: bench.json (scratch files removed after)"
    )
    workers: BenchWorkers = Field(default_factory=BenchWorkers)
    embed: EmbedBench | None = None
    refresh: RefreshBench | None = None
    query: QueryBench | None = None
    train: TrainBench | None = None
    repeats: int = Field(default=3, ge=1, description="timed repeats per figure (the median is kept)")
    warmup: int = Field(default=1, ge=0, description="untimed repeats first")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = None

    @model_validator(mode="after")
    def _something(self) -> BenchConfig:
        if not any((self.embed, self.refresh, self.query, self.train)):
            raise ValueError("nothing to measure: give at least one of embed, refresh, query, train")
        return self


class PlanGallery(StrictModel):
    """The gallery to upgrade: its rows, or a committed gallery to read them from."""

    rows: int | None = Field(default=None, gt=0)
    uri: Annotated[str, LOCATION] | None = Field(
        default=None, description="a committed gallery (its manifest's rows)"
    )
    dim: int | None = Field(
        default=None, gt=0, description="its vectors' dimension (checked against the bench's refresh)"
    )
    dtype: Literal["float16", "float32"] = "float16"

    @model_validator(mode="after")
    def _one(self) -> PlanGallery:
        if (self.rows is None) == (self.uri is None):
            raise ValueError("give exactly one of gallery.rows and gallery.uri")
        return self


class PlanPrices(StrictModel):
    """What an hour of a worker costs (not measured: the user's prices). A worker is one as the
    bench measured it (its num_cpus, num_gpus); a figure measured on GPU workers takes the GPU price."""

    cpu_worker_hour: float = Field(gt=0, description="price of one CPU worker for an hour")
    gpu_worker_hour: float = Field(default=1.0, gt=0, description="price of one GPU worker for an hour")
    currency: str = Field(default="USD", min_length=1)


class PlanCluster(StrictModel):
    """The cluster the plan runs on: a number of workers (wall time follows), or a deadline (the
    workers needed follow)."""

    workers: int | None = Field(default=None, gt=0)
    deadline_hours: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> PlanCluster:
        if (self.workers is None) == (self.deadline_hours is None):
            raise ValueError("give exactly one of cluster.workers and cluster.deadline_hours")
        return self


class PlanTraining(StrictModel):
    """Training the new model with a compatibility loss (when it is not off the shelf): its
    cost is added to every path that uses the new model."""

    images: int = Field(gt=0, description="training images per epoch")
    epochs: float = Field(gt=0)


class PlanEvidence(StrictModel):
    """The quality evidence already produced; a path without evidence says which command gives it."""

    eval: Annotated[str, LOCATION] | None = Field(default=None, description="eval.json of dmu-ray evaluate")
    eval_model: str | None = Field(
        default=None,
        description="which new model of a several-model eval.json (default: the bench's new model)",
    )
    gates: list[Annotated[str, LOCATION]] = Field(
        default=[], description="gate.json files of dmu-ray adapter fit (gallery or query side)"
    )
    backfill_curve: Annotated[str, LOCATION] | None = Field(
        default=None, description="backfill_curve.json of dmu-ray backfill-curve"
    )


class PlanConfig(StrictModel):
    """``dmu-ray plan``: for every upgrade path, worker-hours, wall time, money and measured
    quality, from a bench JSON and the evaluations already run."""

    kind: Literal["plan"] = "plan"
    bench: Annotated[str, LOCATION] = Field(description="bench.json of dmu-ray bench (or its folder)")
    gallery: PlanGallery
    prices: PlanPrices
    cluster: PlanCluster
    output: Annotated[str, LOCATION] = Field(description="folder: plan.json, plan.md, plan.png")
    evidence: PlanEvidence = Field(default_factory=PlanEvidence)
    training: PlanTraining | None = None
    queries: int = Field(
        default=0, ge=0, description="queries mapped through a query-side adapter over the plan's horizon"
    )
    floor: float | None = Field(
        default=None, gt=0, le=1, description="quality floor: share of a full re-embedding's quality"
    )
    budget: float | None = Field(default=None, gt=0, description="money available (in prices.currency)")
    metric: str = Field(
        default="mAP@100", description="the labelled metric whose ratio to new/new is the quality"
    )
    new_model: Annotated[str, LOCATION] | None = Field(
        default=None, description="the new model the plan is for (checked against the bench's)"
    )
    upgrade: Annotated[str, LOCATION] | None = Field(
        default=None, description="the upgrade module / adapter the plan is for (checked against the bench's)"
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
