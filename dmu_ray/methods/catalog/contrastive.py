"""``contrastive`` (cross-model contrastive compatibility; with ``new_negatives``, RACT: Zhang et
al., "Hot-Refresh Model Upgrades with Regression-Free Compatible Training", ICLR 2022):
L = CE_margin(W_n, f_n) + lambda * mean_i mean_{p in P(i)} -log(e^{s_ip} / (e^{s_ip} + sum_{n in N(i)} e^{s_in})),
s = cos / tau, P(i) = old features of i's class, N(i) = old features of other classes (and, with
``new_negatives``, their new features), over the global batch gathered from every worker."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dmu_ray.methods.base import CompatibilityMethod, register_method


@register_method
class Contrastive(CompatibilityMethod):
    """New features pulled to their class's old features, pushed from other classes'."""

    name: Literal["contrastive"] = "contrastive"
    temperature: float = Field(default=0.05, gt=0, description="tau of the contrastive logits")
    new_negatives: bool = Field(
        default=True,
        description="also push from other classes' new features (RACT's regression-alleviating "
        "negatives); false: old-feature negatives only",
    )

    def loss(self, t, x, labels, f_o):
        import torch.nn.functional as F

        from dmu_ray.methods.losses import gather_batches, old_contrastive_loss

        f_n, loss, stats = self.classify_new(t, x, labels)
        old = F.normalize(f_o.float(), dim=1)
        if self.new_negatives:
            old_all, labels_all, new_all = gather_batches(old, labels, f_n)
        else:
            (old_all, labels_all), new_all = gather_batches(old, labels), None
        compat = old_contrastive_loss(f_n, labels, old_all, labels_all, self.temperature, new_all).mean()
        stats["compat"] = compat.detach()
        stats["negatives"] = (labels_all[None, :] != labels[:, None]).float().sum(1).mean().detach()
        self.cosine_stat(stats, f_n, f_o)
        return loss + self.compat_weight * compat, stats
