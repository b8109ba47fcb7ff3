"""A linear map between two embedding spaces, ``y = x W + b``: what the closed-form adapters
(orthogonal Procrustes, affine least squares) fit between two frozen models. It serves where an
upgrade module does (refresh, backfill scoring, evaluation's upgraded galleries): one matmul per
batch. A reduced-rank map (affine with ``rank: r``) is stored as its two factors, ``W = A B``
with ``A`` (in_dim, r) and ``B`` (r, out_dim): two thin matmuls, ``r (in_dim + out_dim)``
multiply-adds a row instead of ``in_dim x out_dim``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LinearMap(nn.Module):
    """``forward(x) = x @ weight + bias`` with ``weight`` (in_dim, out_dim) and ``bias`` (out_dim,);
    with ``rank``, ``x @ left @ right + bias`` (``left`` (in_dim, rank), ``right`` (rank, out_dim))."""

    uncertainty = False  # no per-row variance: a backfill by uncertainty needs the MLP's head

    rank = None  # LowRankMap: the factors' rank

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if min(in_dim, out_dim) < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim, out_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = nn.Parameter(torch.zeros(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    @staticmethod
    def of_rank(in_dim: int, out_dim: int, rank: int | None) -> LinearMap | LowRankMap:
        """An empty map of these dims: factored (:class:`LowRankMap`) when ``rank`` is given."""
        return LinearMap(in_dim, out_dim) if rank is None else LowRankMap(in_dim, out_dim, rank)

    @staticmethod
    def from_arrays(weight, bias=None, rank: int | None = None) -> LinearMap | LowRankMap:
        """A map with the given ``weight`` (in_dim, out_dim) and ``bias`` (numpy or torch); with
        ``rank`` below both dims, stored as the factors of ``weight``'s leading ``rank`` singular
        directions (exact when ``weight`` has that rank, as a reduced-rank fit does)."""
        w = np.asarray(weight.detach().numpy() if isinstance(weight, torch.Tensor) else weight, np.float64)
        if rank is not None and rank >= min(w.shape):
            rank = None  # no saving: the full matrix
        m = LinearMap.of_rank(w.shape[0], w.shape[1], rank)
        with torch.no_grad():
            if rank is None:
                m.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
            else:
                u, s, vt = np.linalg.svd(w, full_matrices=False)
                root = np.sqrt(s[:rank])
                m.left.copy_(torch.as_tensor(u[:, :rank] * root, dtype=torch.float32))
                m.right.copy_(torch.as_tensor(root[:, None] * vt[:rank], dtype=torch.float32))
            if bias is not None:
                m.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return m.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)

    def fused_for_inference(self) -> nn.Module:
        """Already one matmul (two thin ones when factored): a copy, so ``self`` is untouched by ``.to()``."""
        import copy

        return copy.deepcopy(self).eval()

    def config(self) -> dict[str, int | bool | str | None]:
        return {
            "form": "linear",
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "width": 1,
            "depth": 1,
            "rank": self.rank,
        }


class LowRankMap(LinearMap):
    """``forward(x) = x @ left @ right + bias``: a rank-``rank`` linear map stored factored."""

    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        nn.Module.__init__(self)
        if not 1 <= rank < min(in_dim, out_dim):
            raise ValueError(f"rank must be in [1, {min(in_dim, out_dim)}) to be stored factored, got {rank}")
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, rank
        self.left = nn.Parameter(torch.zeros(in_dim, rank))
        self.right = nn.Parameter(torch.zeros(rank, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x @ self.left, self.right)
