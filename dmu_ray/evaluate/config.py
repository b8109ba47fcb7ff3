"""Configs of ``dmu-ray embed`` and ``dmu-ray evaluate`` (the pairing report and the
generations matrix)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dmu_ray.schema import StrictModel
from dmu_ray.settings import (
    ActorPoolConfig,
    StorageConfig,
    TrackingConfig,
    all_at_least_one,
    all_in_unit,
    parse_config,
    read_config_data,
)

__all__ = [
    "EmbedConfig",
    "EvaluateConfig",
    "NewModelSpec",
    "RevisitedSection",
    "TemplatesSection",
    "GalleryStateSpec",
    "MatrixConfig",
    "NEW_GALLERY_ROLES",
    "load_evaluate_config",
]


class EmbedConfig(StrictModel):
    """``dmu-ray embed``: embed an image set with a model into a new gallery prefix (Ray Data)."""

    kind: Literal["embed"] = "embed"
    images: str = Field(
        description="image data set part (e.g. out/data/glyphs/gallery) or an id,uri[,label] table"
    )
    model: str = Field(description="embedding model artefact (e.g. export/model.pt)")
    query_adapter: str | None = Field(
        default=None,
        description="query-side adapter (adapter fit, direction: query) fitted from this model's vectors: "
        "the vectors are mapped into the old model's space (queries for the old gallery)",
    )
    output: str = Field(description="new gallery prefix (local or s3://); never inside the inputs")
    dtype: Literal["float16", "float32"] = "float16"
    overwrite: bool = Field(default=False, description="replace what the output prefix holds")
    rows_per_file: int = Field(default=1_000_000, ge=1, description="rows per Parquet file of the gallery")
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: auto/local")


class RevisitedSection(StrictModel):
    """Options of the ``revisited`` protocol (Revisited Oxford/Paris)."""

    ground_truth: str = Field(
        description="the protocol's ground-truth file: gnd_roxford5k.pkl / gnd_rparis6k.pkl or the same as .json"
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1, description="k of mP@k")

    @field_validator("ks")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        return all_at_least_one(v, "k")


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
        return all_in_unit(v, "rate")

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, v: list[int]) -> list[int]:
        return all_at_least_one(v, "rank")


NEW_GALLERY_ROLES = ("new", "upgraded", "mixed")


class NewModelSpec(StrictModel):
    """One new model of a several-model evaluation (``new_models:``), with what belongs to it."""

    model: str = Field(description="new model artefact URI")
    upgrade_module: str | None = Field(default=None, description="its upgrade module: adds new/upgraded")
    query_adapter: str | None = Field(
        default=None, description="a query-side adapter (new -> old space): adds adapted/old"
    )
    galleries: dict[Literal["new", "upgraded", "mixed"], str] = Field(
        default_factory=dict,
        description="already-embedded galleries of this model (its own, upgraded into its space, backfilled)",
    )


class ReadChecks(StrictModel):
    """What an evaluation checks of the vectors it computes figures from (the pairing report and the
    generations matrix alike)."""

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


class EvaluateConfig(ReadChecks):
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
    query_adapter: str | None = Field(
        default=None,
        description="query-side adapter (adapter fit, direction: query): adds adapted/old, new-model "
        "queries mapped into the old space against the old gallery",
    )
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
            for key in ("upgrade_module", "query_adapter"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: with new_models, give each model's {key} in its entry")
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
                query_adapter=self.query_adapter,
                galleries={r: u for r, u in self.galleries.items() if r in NEW_GALLERY_ROLES},
            )
        }

    @property
    def several(self) -> bool:
        """Whether new models are given by name (``new_models``), so pairings carry the name."""
        return bool(self.new_models)

    output: str = Field(description="folder for eval.json, eval.md and plots (local or s3://)")
    title: str = "retrieval by query/gallery model pairing"
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
        return all_at_least_one(v, "k")

    @field_validator("tar_fars")
    @classmethod
    def _fars_in_unit(cls, v: list[float]) -> list[float]:
        return all_in_unit(v, "FAR")

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


class MatrixConfig(ReadChecks):
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
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray_address: str | None = None

    @field_validator("ks")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        return all_at_least_one(v, "k")

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


def load_evaluate_config(path: str | Path) -> EvaluateConfig | MatrixConfig:
    """An evaluate job's config: ``kind: evaluate-matrix`` (generations) is a :class:`MatrixConfig`,
    anything else an :class:`EvaluateConfig`."""
    data = read_config_data(path)
    cls = MatrixConfig if isinstance(data, dict) and data.get("kind") == "evaluate-matrix" else EvaluateConfig
    return parse_config(cls, data, str(path))
