"""The feature-upgrade module psi: old gallery features -> the new embedding space."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Rows per call of psi on a CPU: a few thousand rows keep its activations in cache and off fresh
# pages (1.5x faster than 65k-row calls for the default psi, docs/benchmarks.md); and memory stays
# bounded whatever the number of rows. A GPU takes a whole batch per call.
CPU_COMPUTE_ROWS = 4096


def compute_rows_for(device: torch.device | str) -> int | None:
    """Rows per call of psi on ``device``: :data:`CPU_COMPUTE_ROWS` on a CPU, None (all) otherwise."""
    return CPU_COMPUTE_ROWS if torch.device(device).type == "cpu" else None


def through_chain(modules: list[nn.Module], x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``x`` through each upgrade module in turn, each output L2-normalised when ``normalize``
    (an empty chain only normalises): what a gallery's vectors go through to the newest space."""
    for m in modules:
        x = m(x)
        if normalize:
            x = nn.functional.normalize(x, dim=1)
    if not modules and normalize:
        x = nn.functional.normalize(x, dim=1)
    return x


def in_row_slices(
    fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    x: torch.Tensor,
    rows: int | None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(x)`` computed on ``rows`` rows of ``x`` at a time (all at once for None), for a
    row-wise ``fn`` returning one tensor or a tuple of them. The results are written into outputs
    allocated once on the CPU with the dtype and trailing shape of the first slice's results, so
    the peak memory is the output plus one slice's work, whatever the number of rows."""
    if rows is None or rows >= len(x):
        out = fn(x)
        return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()
    outs: list[torch.Tensor] = []
    for start in range(0, len(x), rows):
        part = fn(x[start : start + rows])
        parts = part if isinstance(part, tuple) else (part,)
        if not outs:
            outs = [torch.empty((len(x), *t.shape[1:]), dtype=t.dtype) for t in parts]
        for o, t in zip(outs, parts, strict=True):
            o[start : start + len(t)].copy_(t)
    return tuple(outs) if isinstance(part, tuple) else outs[0]


class UpgradeModule(nn.Module):
    """Residual MLP ``psi(x) = skip(x) + mlp(x)``.

    ``mlp`` is ``depth`` blocks of Linear -> BatchNorm -> ReLU at ``width``, then a Linear to
    ``out_dim``; ``skip`` is the identity when ``in_dim == out_dim`` and a bias-free Linear
    otherwise, or always with ``skip_linear`` (an adapter between two frozen models starts from
    the closed-form linear map there and learns the residual). The last layer starts at zero, so an untrained module with equal dims is the identity
    (old features are already compatible after BCT-style training; the MLP learns the correction).

    With ``uncertainty`` (FastFill), a head ``log_var`` predicts each input's log variance: how far
    from the new model's feature psi(x) is expected to land. As in FastFill's published code it
    reads the transformation's trunk (the last hidden layer, ``uncertainty_from="trunk"``), so the
    estimate shares what the transformation learned; ``"input"`` is the separate branch on x
    (Linear -> ReLU -> Linear) that modules exported before keep. ``forward`` returns the feature
    alone, so every consumer of psi works unchanged.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 512,
        depth: int = 2,
        uncertainty: bool = False,
        uncertainty_from: str = "trunk",
        skip_linear: bool = False,
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
        self.skip_linear = skip_linear
        self.skip: nn.Module = (
            nn.Identity() if in_dim == out_dim and not skip_linear else nn.Linear(in_dim, out_dim, bias=False)
        )
        if uncertainty_from not in ("trunk", "input"):
            raise ValueError(f"uncertainty_from must be 'trunk' or 'input', got {uncertainty_from!r}")
        self.uncertainty, self.uncertainty_from = uncertainty, uncertainty_from
        self.log_var: nn.Module | None = None
        if uncertainty and uncertainty_from == "trunk":
            self.log_var = nn.Linear(width, 1)
        elif uncertainty:
            self.log_var = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(inplace=True), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.mlp(x)

    def forward_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(psi(x), log variance (n,))``; raises if the module has no uncertainty head."""
        if self.log_var is None:
            raise ValueError("this upgrade module was built without an uncertainty branch")
        if self.uncertainty_from == "input":
            return self(x), self.log_var(x).squeeze(1)
        h = self.mlp[:-1](x)  # the trunk: every hidden block
        return self.skip(x) + self.mlp[-1](h), self.log_var(h).squeeze(1)

    def fused_for_inference(self) -> nn.Module:
        """A copy for inference with each Linear -> BatchNorm pair folded into one Linear (eval
        statistics, torch's ``fuse_linear_bn_eval``): the same function as ``self.eval()`` up to
        float rounding, one matmul per block. The refresh runs this; ``self`` is untouched."""
        import copy

        from torch.nn.utils.fusion import fuse_linear_bn_eval

        mods, layers, i = [copy.deepcopy(m).eval() for m in self.mlp], [], 0
        while i < len(mods):
            if (
                isinstance(mods[i], nn.Linear)
                and i + 1 < len(mods)
                and isinstance(mods[i + 1], nn.BatchNorm1d)
            ):
                layers.append(fuse_linear_bn_eval(mods[i], mods[i + 1]))
                i += 2
            else:
                layers.append(mods[i])
                i += 1
        return _Residual(copy.deepcopy(self.skip), nn.Sequential(*layers)).eval()

    def config(self) -> dict[str, int | bool | str]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "width": self.width,
            "depth": self.depth,
            "uncertainty": self.uncertainty,
            "uncertainty_from": self.uncertainty_from,
            "skip_linear": self.skip_linear,
        }


class _Residual(nn.Module):
    """``skip(x) + mlp(x)``: the forward of an :class:`UpgradeModule` over other layers."""

    def __init__(self, skip: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.skip, self.mlp = skip, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.mlp(x)
