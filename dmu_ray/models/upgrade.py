"""The feature-upgrade module psi: old gallery features -> the new embedding space."""

from __future__ import annotations

import torch
from torch import nn


class UpgradeModule(nn.Module):
    """Residual MLP ``psi(x) = skip(x) + mlp(x)``.

    ``mlp`` is ``depth`` blocks of Linear -> BatchNorm -> ReLU at ``width``, then a Linear to
    ``out_dim``; ``skip`` is the identity when ``in_dim == out_dim`` and a bias-free Linear
    otherwise. The last layer starts at zero, so an untrained module with equal dims is the identity
    (old features are already compatible after BCT-style training; the MLP learns the correction).
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 512, depth: int = 2) -> None:
        super().__init__()
        if min(in_dim, out_dim, width, depth) < 1:
            raise ValueError(
                f"in_dim, out_dim, width, depth must be >= 1, got {in_dim, out_dim, width, depth}"
            )
        self.in_dim, self.out_dim, self.width, self.depth = in_dim, out_dim, width, depth
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            d = width
        last = nn.Linear(d, out_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)
        self.skip: nn.Module = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.mlp(x)

    def config(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "width": self.width, "depth": self.depth}
