"""The loss terms the registered methods (``dmu_ray/methods/catalog/``) combine: BCT's influence
loss, DMU's discriminativeness and weights, the upgrade module's loss (docs/methods.md).

All functions take unit-norm features. ``old_mask`` marks samples whose class the old classifier
knows (BCT's influence loss is only defined for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule


def discriminativeness(
    old_head: MarginHead, f_o: torch.Tensor, labels: torch.Tensor, kind: str = "prob"
) -> torch.Tensor:
    """How discriminative each old feature is, in [0, 1], measured with the frozen old classifier
    (no margin): ``prob`` = softmax probability of the true class; ``entropy`` = 1 - H(p)/log(C)."""
    with torch.no_grad():
        p = F.softmax(old_head(f_o).float(), dim=1)
        if kind == "prob":
            return p.gather(1, labels[:, None]).squeeze(1)
        if kind == "entropy":
            h = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
            return 1.0 - h / torch.log(torch.tensor(float(p.shape[1]), device=p.device))
        raise ValueError(f"unknown discriminativeness {kind!r} (prob or entropy)")


def mean_one(w: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weights rescaled so their mean over ``mask`` is 1; zero outside ``mask``."""
    w = torch.where(mask, w, torch.zeros_like(w))
    n = mask.sum().clamp_min(1)
    return w * (n / w.sum().clamp_min(eps))


def compatibility_loss(
    f_n: torch.Tensor, labels: torch.Tensor, old_head: MarginHead, weights: torch.Tensor
) -> torch.Tensor:
    """BCT's influence loss: new features through the frozen old classifier (with its margin),
    per-sample cross-entropy, weighted and averaged over the batch (weight 0 = excluded)."""
    ce = F.cross_entropy(old_head(f_n, labels), labels, reduction="none")
    return (weights * ce).sum() / weights.numel()


@dataclass
class DMUWeights:
    """Per-sample weights of DMU: inheritance (compatibility) and variation (upgrade)."""

    d: torch.Tensor
    compat: torch.Tensor
    upgrade: torch.Tensor


def dmu_weights(
    d: torch.Tensor, old_mask: torch.Tensor, *, selective: bool = True, adapt_weighting: bool = True
) -> DMUWeights:
    """Compatibility weight grows with the old feature's discriminativeness d (batch mean 1 over
    samples of known classes); upgrade weight grows with 1 - d (batch mean 1 over all samples).
    Samples of classes unknown to the old model count as d = 0. The switches turn either
    weighting into uniform weights (selective=False is BCT's undifferentiated constraint)."""
    d = torch.where(old_mask, d, torch.zeros_like(d))
    ones = torch.ones_like(d)
    compat = mean_one(d if selective else ones, old_mask)
    upgrade = mean_one((1.0 - d) if adapt_weighting else ones, torch.ones_like(old_mask))
    return DMUWeights(d, compat, upgrade)


def upgrade_loss(
    psi: UpgradeModule,
    f_o: torch.Tensor,
    f_n: torch.Tensor,
    labels: torch.Tensor,
    new_head: MarginHead,
    weights: torch.Tensor,
    align_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward adaptation: psi(f_o) is classified by the new classifier (its weights detached, so
    old features do not pull the new space) and aligned to the detached new feature. Returns the
    weighted loss and the mean cosine between psi(f_o) and f_n."""
    u = F.normalize(psi(f_o.float()), dim=1)
    logits = new_head.apply_margin(new_head.cosine(u, detach_weight=True), labels)
    ce = F.cross_entropy(logits, labels, reduction="none")
    align = 1.0 - (u * f_n.detach()).sum(1)
    per_sample = ce + align_weight * align
    return (weights * per_sample).mean(), (u * f_n.detach()).sum(1).mean().detach()
