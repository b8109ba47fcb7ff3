"""``fastfill`` (seed 003): only an old-to-new transformation psi is trained, with an uncertainty
branch, against the frozen, already trained new model (``new_model``); the new model and its
classifier do not move. The transformation's uncertainty orders a partial backfill
(``dmu-ray backfill``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from dmu_ray.methods.base import Method, UpgradeModuleFields, register_method
from dmu_ray.schema import LOCATION


@register_method
class FastFill(Method, UpgradeModuleFields):
    """Transformation with uncertainty; the model section describes the frozen new model."""

    name: Literal["fastfill"] = "fastfill"
    new_model: Annotated[str | None, LOCATION] = Field(
        default=None, description="URI of the trained new model the transformation targets"
    )
    transform_ce_weight: float = Field(
        default=1.0, ge=0, description="weight of the new classifier's loss on psi(f_o)"
    )
    same_dim_as_old = False
    needs_new_model = True

    @model_validator(mode="after")
    def _new_model_given(self) -> FastFill:
        if not self.new_model:
            raise ValueError("method 'fastfill' needs method.new_model (the trained new model artefact URI)")
        return self

    def build(self, cfg: Any, info: dict[str, Any]):
        from dmu_ray.methods.base import pinned_sha256
        from dmu_ray.methods.trainee import Trainee
        from dmu_ray.models.artifact import EMBEDDING_MODEL, build_embedding_model, load_artifact
        from dmu_ray.models.upgrade import UpgradeModule

        _, old_model, _ = self.frozen_old(cfg, info)
        new_model, new_head = build_embedding_model(
            load_artifact(
                self.new_model, cfg.storage, kind=EMBEDDING_MODEL, sha256=pinned_sha256(info, self.new_model)
            )
        )
        psi = UpgradeModule(
            old_model.dim, new_model.dim, self.upgrade_width, self.upgrade_depth, uncertainty=True
        )
        return Trainee(new_model, new_head, self, psi=psi, frozen_model=True), old_model

    def loss(self, t, x, labels, f_o):
        import torch

        from dmu_ray.methods.fastfill import fastfill_loss

        with torch.no_grad():
            f_n = t.model(x)
        return fastfill_loss(t.psi, f_o, f_n, labels, t.head, self.transform_ce_weight)
