"""``dmu`` (Darwinian Model Upgrades): BCT's compatibility weighted per sample by how
discriminative its old feature is (inheritance), plus an upgrade module psi trained jointly that
maps old features into the new space, weighted towards poor old features (variation). Every
weighting is a switch, so the ablations are configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dmu_ray.methods.base import (
    CompatibilityMethod,
    OldClassifierFields,
    UpgradeModuleFields,
    register_method,
)


@register_method
class DMU(CompatibilityMethod, OldClassifierFields, UpgradeModuleFields):
    """Selective backward compatibility + forward adaptation."""

    name: Literal["dmu"] = "dmu"
    needs_old_classifier = True
    discriminativeness: Literal["prob", "entropy"] = Field(
        default="prob", description="how d is measured with the old classifier"
    )
    selective: bool = Field(default=True, description="weight compatibility by old discriminativeness")
    adapt: bool = Field(default=True, description="train the upgrade module psi jointly")
    adapt_weighting: bool = Field(default=True, description="weight psi's loss towards poor old features")
    d_temperature: float = Field(
        default=1.0,
        gt=0,
        description="softmax temperature of the old classifier when measuring d (logits s*cos/T; "
        "above 1 keeps d informative where the old head's scale saturates it)",
    )
    weight_floor: float = Field(
        default=0.0, ge=0, le=1, description="lowest compatibility weight (before normalisation)"
    )
    weight_clip: float | None = Field(
        default=None, gt=1, description="cap on a normalised compatibility weight (mean 1); None: no cap"
    )
    upgrade_weight: float = Field(default=1.0, ge=0, description="weight of psi's loss")
    align_weight: float = Field(default=1.0, ge=0, description="weight of psi's alignment to f_n")

    def make_psi(self, old_dim: int, new_dim: int):
        from dmu_ray.models.upgrade import UpgradeModule

        return UpgradeModule(old_dim, new_dim, self.upgrade_width, self.upgrade_depth) if self.adapt else None

    def loss(self, t, x, labels, f_o):
        from dmu_ray.methods.losses import (
            compatibility_loss,
            constraint_stats,
            d_stats,
            discriminativeness,
            dmu_weights,
            upgrade_loss,
        )

        f_n, loss, stats = self.classify_new(t, x, labels)
        known = t.old_classes[labels]
        d = discriminativeness(t.old_head, f_o, labels, self.discriminativeness, self.d_temperature)
        w = dmu_weights(
            d,
            known,
            selective=self.selective,
            adapt_weighting=self.adapt_weighting,
            floor=self.weight_floor,
            clip=self.weight_clip,
        )
        stats.update(d_stats(d, known, w.compat))
        stats.update(constraint_stats(known))
        compat = compatibility_loss(f_n, labels, t.old_head, w.compat, known)
        loss = loss + self.compat_weight * compat
        stats["compat"] = compat.detach()
        if t.psi is not None:
            up, cos = upgrade_loss(t.psi, f_o, f_n, labels, t.head, w.upgrade, self.align_weight)
            loss = loss + self.upgrade_weight * up
            stats["upgrade"], stats["psi_cos"] = up.detach(), cos
        self.cosine_stat(stats, f_n, f_o)
        return loss, stats
