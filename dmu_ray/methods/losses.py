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
    old_head: MarginHead,
    f_o: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "prob",
    temperature: float = 1.0,
) -> torch.Tensor:
    """How discriminative each old feature is, in [0, 1], measured with the frozen old classifier
    (no margin) at softmax ``temperature`` (logits ``s * cos / temperature``; above 1 spreads d out
    where the old head's scale s saturates it): ``prob`` = softmax probability of the true class;
    ``entropy`` = 1 - H(p)/log(C)."""
    with torch.no_grad():
        p = F.softmax(old_head(f_o).float() / temperature, dim=1)
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


def capped_mean_one(w: torch.Tensor, mask: torch.Tensor, cap: float, iters: int = 32) -> torch.Tensor:
    """Weights of mean 1 over ``mask`` (zero outside) in proportion to ``w`` except that none
    exceeds ``cap``: the capped ones are fixed at ``cap`` and the rest scaled up to keep the mean
    (water-filling). When the uncapped weights are all zero the mean stays below 1."""
    w = mean_one(w, mask)
    n = mask.sum().float()
    at_cap = torch.zeros_like(mask)
    for _ in range(iters):
        over = mask & ~at_cap & (w > cap)
        if not bool(over.any()):
            break
        at_cap = at_cap | over
        rest = mask & ~at_cap
        room = n - cap * at_cap.sum()
        total = torch.where(rest, w, torch.zeros_like(w)).sum()
        scale = room / total if float(total) > 0 else torch.zeros((), device=w.device)
        w = torch.where(at_cap, torch.full_like(w, cap), torch.where(rest, w * scale, w))
    return w


def compatibility_loss(
    f_n: torch.Tensor,
    labels: torch.Tensor,
    old_head: MarginHead,
    weights: torch.Tensor,
    applies: torch.Tensor,
) -> torch.Tensor:
    """BCT's influence loss: new features through the frozen old classifier (with its margin),
    per-sample cross-entropy, weighted and averaged over the samples it ``applies`` to (those of
    classes the old classifier covers), as BCT averages it: lambda then means lambda whatever the
    share of such samples in the batch. 0 when it applies to none."""
    ce = F.cross_entropy(old_head(f_n, labels), labels, reduction="none")
    return (weights * ce).sum() / applies.sum().clamp_min(1)


def constraint_stats(applies: torch.Tensor) -> dict[str, torch.Tensor]:
    """``constrained``: the share of the batch under the compatibility constraint."""
    return {"constrained": applies.float().mean().detach()}


def d_stats(d: torch.Tensor, applies: torch.Tensor, w: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The distribution of DMU's discriminativeness over the samples it weighs: mean, 10/50/90%
    quantiles, share near 0 (< 0.05) and near 1 (> 0.95); with ``w``, the largest compatibility
    weight (mean 1: a large one means few samples carry the constraint)."""
    x = d[applies].float()
    if x.numel() == 0:
        return {}
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], device=x.device))
    out = {
        "old_d": x.mean(),
        "d_q10": q[0],
        "d_q50": q[1],
        "d_q90": q[2],
        "d_near0": (x < 0.05).float().mean(),
        "d_near1": (x > 0.95).float().mean(),
    }
    if w is not None:
        out["w_max"] = w[applies].max().float()
    return {k: v.detach() for k, v in out.items()}


@dataclass
class DMUWeights:
    """Per-sample weights of DMU: inheritance (compatibility) and variation (upgrade)."""

    d: torch.Tensor
    compat: torch.Tensor
    upgrade: torch.Tensor


def dmu_weights(
    d: torch.Tensor,
    old_mask: torch.Tensor,
    *,
    selective: bool = True,
    adapt_weighting: bool = True,
    floor: float = 0.0,
    clip: float | None = None,
) -> DMUWeights:
    """Compatibility weight grows with the old feature's discriminativeness d (batch mean 1 over
    samples of known classes); upgrade weight grows with 1 - d (batch mean 1 over all samples).
    Samples of classes unknown to the old model count as d = 0. The switches turn either
    weighting into uniform weights (selective=False is BCT's undifferentiated constraint).
    ``floor`` raises every known sample's compatibility weight to at least ``floor`` before the
    normalisation (so no sample drops out of the constraint); ``clip`` caps the normalised weights
    at ``clip`` (:func:`capped_mean_one`: few samples cannot carry the whole constraint)."""
    d = torch.where(old_mask, d, torch.zeros_like(d))
    ones = torch.ones_like(d)
    raw = d.clamp_min(floor) if floor > 0 else d
    compat = mean_one(raw if selective else ones, old_mask)
    if clip is not None and selective:
        compat = capped_mean_one(compat, old_mask, clip)
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
