"""``bct`` (Shen et al. 2020): L = CE_margin(W_n, f_n) + lambda * CE(W_o, f_n), the influence loss
of the frozen old classifier on the new features, over the samples of classes it knows."""

from __future__ import annotations

from typing import Literal

from dmu_ray.methods.base import CompatibilityMethod, OldClassifierFields, register_method


@register_method
class BCT(CompatibilityMethod, OldClassifierFields):
    """Backward-compatible training: every sample of a known class constrained alike."""

    name: Literal["bct"] = "bct"
    needs_old_classifier = True

    def loss(self, t, x, labels, f_o):
        import torch

        from dmu_ray.methods.losses import compatibility_loss, constraint_stats, mean_one

        f_n, loss, stats = self.classify_new(t, x, labels)
        applies = t.old_classes[labels]
        w = mean_one(torch.ones_like(f_n[:, 0]), applies)
        compat = compatibility_loss(f_n, labels, t.old_head, w, applies)
        stats["compat"] = compat.detach()
        stats.update(constraint_stats(applies))
        self.cosine_stat(stats, f_n, f_o)
        return loss + self.compat_weight * compat, stats
