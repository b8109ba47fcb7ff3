"""``unibct`` (seed 004): the compatibility target is not the old classifier but class prototypes
of old features, refined over a neighbour graph, computed before training (a Ray Data pass of the
old model over this run's training images); new classes the old model never saw get prototypes
too. The old model does not run during training."""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field

from dmu_ray.methods.base import CompatibilityMethod, register_method


@register_method
class UniBCT(CompatibilityMethod):
    """Compatibility against refined old-feature prototypes (open-set upgrades)."""

    name: Literal["unibct"] = "unibct"
    prototype_k: int = Field(default=10, ge=1, description="neighbours in the old-feature graph")
    prototype_alpha: float = Field(
        default=0.5, ge=0, le=1, description="pull of same-class neighbours per refinement step"
    )
    prototype_iters: int = Field(default=2, ge=0, description="refinement steps")
    prototype_refine: bool = Field(default=True, description="false gives plain class means (ablation)")
    old_features = False

    def prepare(self, plan: Any, progress: bool = True) -> dict[str, Any]:
        """The old model embeds this run's training images; their features become prototypes."""
        from dmu_ray.data.splits import split_mask
        from dmu_ray.methods.prototypes import refine_prototypes
        from dmu_ray.models.inference import embed_images

        cfg = plan.cfg
        d = cfg.data
        ids, labels, feats = embed_images(
            plan.train_loc.uri, self.old_model, storage=cfg.storage, pool=cfg.embed_pool
        )
        mask = split_mask(d.split, d.role, ids, labels, d.old_fraction, d.split_seed)
        protos, present = refine_prototypes(
            feats[mask],
            labels[mask],
            plan.data.num_classes,
            k=self.prototype_k,
            alpha=self.prototype_alpha,
            iters=self.prototype_iters,
            refine=self.prototype_refine,
        )
        if progress:
            print(
                f"  unibct: {int(present.sum())} class prototypes from {int(mask.sum()):,} old features",
                file=sys.stderr,
                flush=True,
            )
        return {"prototypes": protos.tolist(), "prototype_present": present.tolist()}

    def build(self, cfg: Any, info: dict[str, Any]):
        """``info["prototypes"]`` may be absent when a checkpoint will supply them."""
        import torch

        from dmu_ray.models.artifact import EMBEDDING_MODEL, build_embedding_model, load_artifact
        from dmu_ray.models.heads import MarginHead
        from dmu_ray.train.trainee import Trainee

        old_model, old_head = build_embedding_model(
            load_artifact(self.old_model, cfg.storage, kind=EMBEDDING_MODEL)
        )
        model, head = self.fresh_model(cfg, info)
        like = old_head if old_head is not None else head  # an imported old model may have no classifier
        proto_head = MarginHead(old_model.dim, info["num_classes"], like.kind, like.s, like.m)
        present = torch.zeros(info["num_classes"], dtype=torch.bool)
        if info.get("prototypes") is not None:
            with torch.no_grad():
                proto_head.weight.copy_(torch.tensor(info["prototypes"], dtype=torch.float32))
            present = torch.tensor(info["prototype_present"], dtype=torch.bool)
        return Trainee(model, head, self, old_head=proto_head, old_classes=present), None

    def loss(self, t, x, labels, f_o):
        import torch

        from dmu_ray.methods.losses import compatibility_loss, constraint_stats, mean_one

        f_n, loss, stats = self.classify_new(t, x, labels)
        applies = t.old_classes[labels]
        w = mean_one(torch.ones_like(f_n[:, 0]), applies)
        compat = compatibility_loss(f_n, labels, t.old_head, w, applies)
        stats["compat"] = compat.detach()
        stats.update(constraint_stats(applies))
        return loss + self.compat_weight * compat, stats
