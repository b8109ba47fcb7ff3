"""``lwf`` (Li & Hoiem, "Learning without Forgetting", 2016): L = CE_margin(W_n, f_n) +
lambda * T^2 * KL(softmax(W_o f_o / T) || softmax(W_o f_n / T)): the frozen old classifier's
outputs on the new features are distilled from its outputs on the old features, over the classes
the old classifier knows, for every sample (distillation needs no label)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dmu_ray.methods.base import CompatibilityMethod, register_method


@register_method
class LwF(CompatibilityMethod):
    """Old-head outputs kept: the new features must score the old classes as the old ones did."""

    name: Literal["lwf"] = "lwf"
    needs_old_classifier = True
    temperature: float = Field(default=2.0, gt=0, description="distillation temperature T (LwF uses 2)")

    def loss(self, t, x, labels, f_o):
        from dmu_ray.methods.losses import distillation, old_logits

        f_n, loss, stats = self.classify_new(t, x, labels)
        known = t.old_classes
        kd = distillation(
            old_logits(t.old_head, f_n, known), old_logits(t.old_head, f_o, known), self.temperature
        )
        compat = kd.mean()
        stats["compat"] = compat.detach()
        self.cosine_stat(stats, f_n, f_o)
        return loss + self.compat_weight * compat, stats
