"""``l2``: the simplest compatibility loss, L = CE_margin(W_n, f_n) + lambda * ||f_n - f_o||^2 with
both features unit-norm, over every sample (the old model embeds any image, whatever its class).
Added through the registry as the proof that a method is one file (docs/decisions.md)."""

from __future__ import annotations

from typing import Literal

from dmu_ray.methods.base import CompatibilityMethod, register_method


@register_method
class L2(CompatibilityMethod):
    """New features pulled onto the old features of the same images."""

    name: Literal["l2"] = "l2"

    def loss(self, t, x, labels, f_o):
        import torch.nn.functional as F

        f_n, loss, stats = self.classify_new(t, x, labels)
        l2 = (f_n - F.normalize(f_o.float(), dim=1)).pow(2).sum(1).mean()
        stats["compat"] = l2.detach()
        self.cosine_stat(stats, f_n, f_o)
        return loss + self.compat_weight * l2, stats
