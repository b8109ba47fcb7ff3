"""FastFill (Jaeckle et al., ICLR 2023, arXiv 2303.04766): an old-to-new feature transformation
trained with uncertainty, and the orders in which a partial backfill re-embeds gallery items.

The transformation is an :class:`~dmu_ray.models.upgrade.UpgradeModule` with its uncertainty
branch: ``psi(f_o)`` estimates the new model's feature of the same image and ``s = log sigma^2``
how far off that estimate is expected to be. Trained against the frozen new model (see
docs/methods.md), ``s`` tracks the expected alignment loss of each item, so backfilling in
decreasing ``s`` replaces the worst transformed vectors first.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dmu_ray.data.splits import unit_hash
from dmu_ray.methods.backfill_policies import BACKFILL_POLICIES
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule, compute_rows_for, in_row_slices

POLICIES = BACKFILL_POLICIES  # one list: the config's
LOG_VAR_CLAMP = 15.0  # exp(+-15) keeps fp32 finite whatever an untrained branch outputs
TIE_SEED = 0x5EED  # ties in a policy's score are broken by a hash of the id, not by file order


def uncertainty_loss(per_sample: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic loss ``mean(exp(-s) * l + s)``: its minimum over ``s`` is at ``s = log l``,
    so the learned ``s`` is the log of each sample's expected loss ``l``."""
    s = log_var.float().clamp(-LOG_VAR_CLAMP, LOG_VAR_CLAMP)
    return (torch.exp(-s) * per_sample.float() + s).mean()


def fastfill_loss(
    psi: UpgradeModule,
    f_o: torch.Tensor,
    f_n: torch.Tensor,
    labels: torch.Tensor,
    new_head: MarginHead,
    ce_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FastFill's objective on one batch: per sample, the squared distance of the normalised
    ``psi(f_o)`` to the new feature (point to point) plus ``ce_weight`` times the new classifier's
    cross-entropy on it (point to cluster; the classifier is not moved), under the uncertainty loss."""
    u_raw, log_var = psi.forward_with_uncertainty(f_o.float())
    u = F.normalize(u_raw.float(), dim=1)
    target = F.normalize(f_n.detach().float(), dim=1)
    align = ((u - target) ** 2).sum(1)
    logits = new_head.apply_margin(new_head.cosine(u, detach_weight=True), labels)
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss = uncertainty_loss(align + ce_weight * ce, log_var)
    stats = {
        "align": align.mean().detach(),
        "transform_ce": ce.mean().detach(),
        "log_var": log_var.float().mean().detach(),
        "psi_cos": (u * target).sum(1).mean().detach(),
    }
    return loss, stats


class BackfillScorer:
    """Transforms old vectors with psi and scores them for backfill policies (higher score =
    re-embed sooner): ``uncertainty`` = psi's log variance; ``random`` = a hash of the id;
    ``old-discriminativeness`` = 1 - the old classifier's top softmax probability (the items the
    old model separates worst first; needs ``old_head``)."""

    def __init__(
        self,
        policies: list[str],
        psi: UpgradeModule,
        old_head: MarginHead | None = None,
        *,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        for policy in policies:
            if policy not in POLICIES:
                raise ValueError(f"unknown backfill policy {policy!r} (choose from {', '.join(POLICIES)})")
        if "uncertainty" in policies and not psi.uncertainty:
            raise ValueError(
                "policy 'uncertainty' needs a transformation trained with uncertainty (fastfill)"
            )
        if "old-discriminativeness" in policies and old_head is None:
            raise ValueError("policy 'old-discriminativeness' needs the old model's classifier")
        self.policies, self.seed = list(policies), seed
        self.device = torch.device(device)
        self.psi = psi.to(self.device).eval()
        self.old_head = old_head.to(self.device).eval() if old_head is not None else None

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, mat: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(unit-norm psi(mat) as float32 (n, d), {policy: scores float64 (n,)})``."""
        x = torch.as_tensor(np.asarray(mat, dtype=np.float32))
        want_unc = "uncertainty" in self.policies
        want_disc = "old-discriminativeness" in self.policies

        def rows(part: torch.Tensor) -> tuple[torch.Tensor, ...]:
            part = part.to(self.device)
            if want_unc:
                y, log_var = self.psi.forward_with_uncertainty(part)
            else:
                y, log_var = self.psi(part), None
            out = [F.normalize(y.float(), dim=1)]
            if want_unc:
                out.append(log_var.float().reshape(-1))
            if want_disc:
                out.append(1.0 - F.softmax(self.old_head(part).float(), dim=1).max(1).values)
            return tuple(out)

        results = list(in_row_slices(rows, x, compute_rows_for(self.device)))
        y = results.pop(0)
        unc = results.pop(0) if want_unc else None
        disc = results.pop(0) if want_disc else None
        scores: dict[str, np.ndarray] = {}
        for policy in self.policies:
            if policy == "uncertainty":
                scores[policy] = unc.numpy().astype(np.float64)
            elif policy == "random":
                scores[policy] = unit_hash(np.asarray(ids), self.seed)
            else:
                scores[policy] = disc.numpy().astype(np.float64)
        return y.numpy(), scores


def select_top(ids: np.ndarray, scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``round(fraction * n)`` rows with the highest scores (ties broken by a
    hash of the id, so the choice does not depend on how the gallery is split into files)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = len(ids)
    k = int(round(fraction * n))
    order = np.lexsort((unit_hash(np.asarray(ids), TIE_SEED), -np.asarray(scores, dtype=np.float64)))
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


def curve_area(fractions: list[float] | np.ndarray, values: list[float] | np.ndarray) -> float:
    """Area under a backfill curve (trapezoids over the fraction axis, which spans [0, 1])."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
