"""A linear map between two embedding spaces, ``y = x W + b``: what the closed-form adapters
(orthogonal Procrustes, affine least squares) fit between two frozen models. It serves where an
upgrade module does (refresh, backfill scoring, evaluation's upgraded galleries): one matmul per
batch."""

from __future__ import annotations

import torch
from torch import nn


class LinearMap(nn.Module):
    """``forward(x) = x @ weight + bias`` with ``weight`` (in_dim, out_dim) and ``bias`` (out_dim,)."""

    uncertainty = False  # no per-row variance: a backfill by uncertainty needs the MLP's head

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if min(in_dim, out_dim) < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim, out_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = nn.Parameter(torch.zeros(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    @classmethod
    def from_arrays(cls, weight, bias=None) -> LinearMap:
        """A map with the given ``weight`` (in_dim, out_dim) and ``bias`` (numpy or torch)."""
        w = torch.as_tensor(weight, dtype=torch.float32)
        m = cls(w.shape[0], w.shape[1])
        with torch.no_grad():
            m.weight.copy_(w)
            if bias is not None:
                m.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return m.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)

    def fused_for_inference(self) -> nn.Module:
        """Already one matmul: the module itself (a copy, so ``self`` is untouched by ``.to()``)."""
        import copy

        return copy.deepcopy(self).eval()

    def config(self) -> dict[str, int | bool | str]:
        return {"form": "linear", "in_dim": self.in_dim, "out_dim": self.out_dim, "width": 1, "depth": 1}
