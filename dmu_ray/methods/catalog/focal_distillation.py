"""``focal-distillation`` (Yan et al., "Positive-Congruent Training", CVPR 2021): distillation of
the old classifier's outputs weighted towards the samples the old model got right,
L = CE_margin(W_n, f_n) + lambda * mean_i (alpha + beta * [argmax W_o f_o_i = y_i]) * D_i,
D = T^2 KL (``kl``) or logit matching (``logits``), student logits = the old classifier on f_n, so
the new features keep the old model's correct decisions (no negative flips) without inheriting its
mistakes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dmu_ray.methods.base import CompatibilityMethod, register_method


@register_method
class FocalDistillation(CompatibilityMethod):
    """Distillation focused on the old model's correct predictions."""

    name: Literal["focal-distillation"] = "focal-distillation"
    needs_old_classifier = True
    alpha: float = Field(default=1.0, ge=0, description="weight of every sample's distillation")
    beta: float = Field(default=5.0, ge=0, description="extra weight where the old model is right")
    temperature: float = Field(default=1.0, gt=0, description="distillation temperature T")
    distance: Literal["kl", "logits"] = Field(
        default="kl", description="kl: T^2 KL of softened outputs (FD-KL); logits: logit matching (FD-LM)"
    )

    def loss(self, t, x, labels, f_o):
        import torch

        from dmu_ray.methods.losses import distillation, old_logits

        f_n, loss, stats = self.classify_new(t, x, labels)
        known = t.old_classes
        teacher = old_logits(t.old_head, f_o, known)
        d = distillation(old_logits(t.old_head, f_n, known), teacher, self.temperature, self.distance)
        # the old prediction, as a class index of the full label space
        old_pred = torch.nonzero(known).squeeze(1)[teacher.argmax(1)]
        right = (old_pred == labels).float()
        compat = ((self.alpha + self.beta * right) * d).mean()
        stats["compat"], stats["old_correct"] = compat.detach(), right.mean().detach()
        self.cosine_stat(stats, f_n, f_o)
        return loss + self.compat_weight * compat, stats
