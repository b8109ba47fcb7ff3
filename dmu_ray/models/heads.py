"""Cosine classifiers with margins: ArcFace, CosFace, and a plain scaled-cosine softmax."""

from __future__ import annotations

import math

import torch
from torch import nn

HEADS = ("arcface", "cosface", "softmax")


class MarginHead(nn.Module):
    """Logits ``s * cos(theta + m)`` (ArcFace), ``s * (cos(theta) - m)`` (CosFace) or ``s * cos``
    (softmax) for the target class; ``s * cos(theta)`` for the others. Inputs are unit-norm.
    Without labels (inference, or the frozen old head scoring old features) no margin is applied."""

    def __init__(
        self, dim: int, num_classes: int, kind: str = "arcface", s: float = 30.0, m: float = 0.3
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r} (choose from {', '.join(HEADS)})")
        self.kind, self.s, self.m = kind, s, m
        self.dim, self.num_classes = dim, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, f: torch.Tensor, detach_weight: bool = False) -> torch.Tensor:
        """Cosine similarity of features to every class weight; ``detach_weight`` stops gradients
        into the class weights (for losses that must not move the classifier)."""
        w = self.weight.detach() if detach_weight else self.weight
        # fp32 even under autocast: the margin's acos near +-1 needs it, and the logits must share a dtype
        with torch.autocast(f.device.type, enabled=False):
            return nn.functional.linear(
                nn.functional.normalize(f.float(), dim=1), nn.functional.normalize(w.float(), dim=1)
            )

    def apply_margin(self, cos: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Scaled logits from cosines, with this head's margin on each sample's target class."""
        if labels is None or self.kind == "softmax" or self.m == 0:
            return self.s * cos
        target = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
        if self.kind == "arcface":
            theta = torch.acos(target)
            # past pi - m the margin would decrease the logit; fall back to CosFace-like penalty there
            moved = torch.where(
                theta + self.m < math.pi, torch.cos(theta + self.m), target - self.m * math.sin(self.m)
            )
        else:
            moved = target - self.m
        return self.s * cos.scatter(1, labels[:, None], moved)

    def forward(self, f: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.apply_margin(self.cosine(f), labels)
