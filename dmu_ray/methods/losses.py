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


def old_logits(old_head: MarginHead, f: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Logits of the frozen old classifier (``s * cos``, no margin) over the classes it knows
    (``known``, a boolean mask over its rows): the outputs LwF and focal distillation match."""
    return old_head(f.float())[:, known]


def distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "kl"
) -> torch.Tensor:
    """Per-sample distillation of ``teacher`` logits into ``student`` logits: ``kl`` =
    T^2 * KL(softmax(teacher/T) || softmax(student/T)) (Hinton's scaling, so the gradient's size
    does not shrink with T); ``logits`` = mean squared difference of the logits (logit matching)."""
    if kind == "kl":
        t = F.log_softmax(teacher.detach() / temperature, dim=1)
        s = F.log_softmax(student / temperature, dim=1)
        return temperature**2 * (t.exp() * (t - s)).sum(1)
    if kind == "logits":
        return (student - teacher.detach()).pow(2).mean(1)
    raise ValueError(f"unknown distillation {kind!r} (kl or logits)")


def gather_batches(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over every training worker's batch (rank order; this worker's own
    rows at their rank's place), without gradient: in-batch negatives from the whole global batch.
    Outside a process group (one worker) the tensors come back as they are. Every worker's batch
    has the same size (the training loop drops the last, partial batch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tuple(t.detach() for t in tensors)
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.detach().contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def old_contrastive_loss(
    f_n: torch.Tensor,
    labels: torch.Tensor,
    old_all: torch.Tensor,
    labels_all: torch.Tensor,
    temperature: float,
    new_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-model contrastive loss per sample: each new feature is pulled to every old feature of
    its class and pushed from the old features of other classes in the gathered batch
    (``old_all``/``labels_all``); with ``new_all`` (the gathered new features, detached) also from
    the new features of other classes (RACT: a new feature must be closer to its class's old
    features than to other classes in either space). For each positive p the term is
    -log(e^{s_p} / (e^{s_p} + sum over negatives e^{s_n})), s = cos / temperature, averaged over
    the positives (the sample's own old feature is always one)."""
    s_old = f_n @ old_all.to(f_n.dtype).T / temperature
    pos = labels[:, None] == labels_all[None, :]
    # not a negative: a finite stand-in for -inf (exp underflows to 0; gradients stay finite
    # where a row has no negative at all, whose terms then vanish)
    off = torch.full_like(s_old, -1e4)
    negatives = [torch.where(pos, off, s_old)]
    if new_all is not None:  # same-class new features (the sample's own included) are no negatives
        negatives.append(torch.where(pos, off, f_n @ new_all.to(f_n.dtype).T / temperature))
    log_neg = torch.logsumexp(torch.cat(negatives, dim=1), dim=1, keepdim=True)
    # -log(e^sp / (e^sp + N)) = log(e^sp + N) - sp = softplus(log N - sp)
    per_pos = F.softplus(log_neg - s_old)
    return (per_pos * pos).sum(1) / pos.sum(1).clamp_min(1)
