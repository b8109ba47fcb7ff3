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

    With ``uncertainty`` (FastFill), a separate branch ``log_var`` (Linear -> ReLU -> Linear) predicts
    each input's log variance: how far from the new model's feature psi(x) is expected to land.
    ``forward`` returns the feature alone, so every consumer of psi works unchanged.
    """

    def __init__(
        self, in_dim: int, out_dim: int, width: int = 512, depth: int = 2, uncertainty: bool = False
    ) -> None:
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
        self.uncertainty = uncertainty
        self.log_var: nn.Module | None = None
        if uncertainty:
            self.log_var = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(inplace=True), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.mlp(x)

    def forward_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(psi(x), log variance (n,))``; raises if the module has no uncertainty branch."""
        if self.log_var is None:
            raise ValueError("this upgrade module was built without an uncertainty branch")
        return self(x), self.log_var(x).squeeze(1)

    def config(self) -> dict[str, int | bool]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "width": self.width,
            "depth": self.depth,
            "uncertainty": self.uncertainty,
        }
