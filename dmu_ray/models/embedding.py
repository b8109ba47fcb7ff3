"""The embedding model: backbone -> Linear -> BatchNorm -> L2 normalisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmu_ray.models.backbones import build_backbone


class EmbeddingModel(nn.Module):
    """phi(x): images (N, C, H, W) -> unit-norm embeddings (N, dim)."""

    def __init__(self, backbone: str, dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone_name, self.dim, self.in_channels = backbone, dim, in_channels
        self.backbone, feat = build_backbone(backbone, in_channels)
        self.head = nn.Sequential(nn.Linear(feat, dim, bias=False), nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.backbone(x)).float(), dim=1)

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone_name, "dim": self.dim, "in_channels": self.in_channels}


class Renormalized(nn.Module):
    """A frozen model fed batches normalised as ``(x - in_mean) / in_std`` (the new model's
    preprocessing) that expects its own ``(x - mean) / std`` (and input side ``size``): the input
    is mapped back to [0, 1], resized and normalised its way."""

    def __init__(
        self,
        model: nn.Module,
        mean: list[float],
        std: list[float],
        size: int | None = None,
        in_mean: list[float] = (0.5,),
        in_std: list[float] = (0.5,),
    ) -> None:
        super().__init__()
        self.model, self.dim, self.size = model, model.dim, size
        for name, v in (("mean", mean), ("std", std), ("in_mean", in_mean), ("in_std", in_std)):
            self.register_buffer(name, torch.tensor(list(v), dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_std + self.in_mean
        if self.size is not None and x.shape[-1] != self.size:
            x = nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        return self.model((x - self.mean) / self.std)
