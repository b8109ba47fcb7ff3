"""Sufficient statistics of paired vectors and the closed-form adapters fitted from them.

For pairs ``(x_i, y_i)`` (x in the source space, y in the target space) the orthogonal Procrustes
map and the affine least-squares map need only ``n``, the sums of x and y, ``X^T X``, ``X^T Y``
and the sum of squares of y (for the residual). These add up over any split of the pairs, so
workers accumulate them over their share of the pairs (memory O(d^2)) and the driver merges them:
the fit is exact for any number of pairs, in one pass over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PairStats", "procrustes", "affine", "affine_path", "residual"]

#: rows per chunk of the products: numpy on a CPU (one chunk's float32 copy stays small), torch on
#: a device (larger, so that each copy to the device and each product is worth its launch)
CPU_CHUNK, DEVICE_CHUNK = 8192, 65536


@dataclass
class PairStats:
    """Running sums over pairs, in float64."""

    n: int
    sx: np.ndarray  # (dx,)
    sy: np.ndarray  # (dy,)
    xx: np.ndarray  # (dx, dx)
    xy: np.ndarray  # (dx, dy)
    yy: float  # sum of squared entries of y
    #: machine epsilon of the products summed (float32's unless the inputs were float64): the
    #: relative rounding the statistics carry, below which a direction of X^T X is not data
    eps: float = float(np.finfo(np.float32).eps)
    #: the statistics of two disjoint folds of the same pairs (when :meth:`of` was given ``fold``):
    #: the adapter job chooses the ridge on one fold's pairs with the map fitted on the other
    folds: tuple[PairStats, PairStats] | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        chunk: int | None = None,
        rows: np.ndarray | None = None,
        device: str | None = None,
        fold: np.ndarray | None = None,
    ) -> PairStats:
        """The statistics of the pairs ``(x[i], y[i])`` (only those where the boolean ``rows`` is
        true, when given: the selection is made a chunk at a time, so no copy of the inputs is
        made). Products are computed at float32 for inputs of float32 or less (gallery vectors,
        float16 included, hold no more; float64 inputs stay float64) over ``chunk`` rows at a
        time and summed in float64, so memory is one chunk's and the rounding that of ``chunk``
        products, whatever the number of pairs.

        ``device`` (a torch device, e.g. ``"cuda"``) computes the same products with torch there,
        chunks of :data:`DEVICE_CHUNK` rows by default, with TF32 only where it is exact (float16
        inputs), summed in float64 on the device: a GPU does a file's products in milliseconds, where a
        CPU core's BLAS takes longer than reading the file (docs/benchmarks.md). None: numpy's
        BLAS on the CPU, :data:`CPU_CHUNK` rows at a time.

        ``fold`` (a boolean mask of the rows) also keeps the statistics of the two folds it splits
        the pairs into (``folds``: its true rows, its false rows); the totals are their merge, so
        the work is the same."""
        if fold is not None:
            if fold.dtype != bool or fold.shape != (len(x),):
                raise ValueError(
                    f"fold must be a boolean mask of {len(x)} rows, got {fold.dtype} {fold.shape}"
                )
            keep = np.ones(len(x), bool) if rows is None else rows
            a = cls.of(x, y, chunk, keep & fold, device)
            b = cls.of(x, y, chunk, keep & ~fold, device)
            return a.merge(b, keep_folds=False)._with_folds((a, b))
        if len(x) != len(y):
            raise ValueError(f"{len(x)} source rows but {len(y)} target rows")
        if rows is not None and (rows.dtype != bool or rows.shape != (len(x),)):
            raise ValueError(f"rows must be a boolean mask of {len(x)} rows, got {rows.dtype} {rows.shape}")
        dt = np.float64 if np.float64 in (np.asarray(x[:0]).dtype, np.asarray(y[:0]).dtype) else np.float32
        if device is not None:
            return cls._of_torch(x, y, chunk or DEVICE_CHUNK, rows, device, dt)
        chunk = chunk or CPU_CHUNK
        dx, dy = np.shape(x)[1], np.shape(y)[1]
        eps = float(np.finfo(dt).eps)
        out = cls(0, np.zeros(dx), np.zeros(dy), np.zeros((dx, dx)), np.zeros((dx, dy)), 0.0, eps)
        for start in range(0, len(x), chunk):
            part = slice(start, start + chunk)
            keep = slice(None) if rows is None else rows[part]
            xs = np.asarray(x[part][keep], dt)
            ys = np.asarray(y[part][keep], dt)
            out.n += len(xs)
            out.sx += xs.sum(0, dtype=np.float64)
            out.sy += ys.sum(0, dtype=np.float64)
            out.xx += xs.T @ xs  # numpy's BLAS takes a product of an array with its own transpose as
            out.xy += xs.T @ ys  # a symmetric rank-k update: half the multiply-adds of a general one
            out.yy += float(np.einsum("ij,ij->", ys, ys, dtype=np.float64))
        return out

    @classmethod
    def _of_torch(
        cls, x: np.ndarray, y: np.ndarray, chunk: int, rows: np.ndarray | None, device: str, dt: type
    ) -> PairStats:
        """:meth:`of` with torch on ``device`` (see there)."""
        import warnings

        import torch

        dev, f64 = torch.device(device), torch.float64
        tdt = torch.float64 if dt == np.float64 else torch.float32
        dx, dy = np.shape(x)[1], np.shape(y)[1]
        sx, sy = torch.zeros(dx, dtype=f64, device=dev), torch.zeros(dy, dtype=f64, device=dev)
        xx, xy = torch.zeros((dx, dx), dtype=f64, device=dev), torch.zeros((dx, dy), dtype=f64, device=dev)
        yy, n = torch.zeros((), dtype=f64, device=dev), 0

        def on_device(a: np.ndarray) -> torch.Tensor:
            with warnings.catch_warnings():  # a read-only Arrow buffer is only read (copied to the device)
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.ascontiguousarray(a)).to(dev).to(tdt)

        # TF32 keeps 10 bits of an input's mantissa: exact for float16 vectors (10 bits), a rounding
        # of float32 ones; its products of exact inputs are exact and its sums float32, as without
        exact = all(np.dtype(a.dtype).kind == "f" and np.dtype(a.dtype).itemsize <= 2 for a in (x, y))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = exact
        try:
            with torch.inference_mode():
                for start in range(0, len(x), chunk):
                    part = slice(start, start + chunk)
                    keep = slice(None) if rows is None else rows[part]
                    xs, ys = on_device(x[part][keep]), on_device(y[part][keep])
                    n += len(xs)
                    sx += xs.sum(0, dtype=f64)
                    sy += ys.sum(0, dtype=f64)
                    xx += (xs.T @ xs).to(f64)
                    xy += (xs.T @ ys).to(f64)
                    yy += ys.to(f64).square().sum()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

        def host(t: torch.Tensor) -> np.ndarray:
            return t.cpu().numpy()

        return cls(n, host(sx), host(sy), host(xx), host(xy), float(yy), float(np.finfo(dt).eps))

    def merge(self, other: PairStats, keep_folds: bool = True) -> PairStats:
        """The statistics of both sets of pairs (their folds merged fold by fold, when both
        have them)."""
        out = PairStats(
            self.n + other.n,
            self.sx + other.sx,
            self.sy + other.sy,
            self.xx + other.xx,
            self.xy + other.xy,
            self.yy + other.yy,
            max(self.eps, other.eps),
        )
        if keep_folds and self.folds is not None and other.folds is not None:
            out.folds = (
                self.folds[0].merge(other.folds[0], False),
                self.folds[1].merge(other.folds[1], False),
            )
        return out

    def _with_folds(self, folds: tuple[PairStats, PairStats]) -> PairStats:
        self.folds = folds
        return self

    def to_dict(self) -> dict:
        return {
            "n": self.n, "sx": self.sx, "sy": self.sy, "xx": self.xx, "xy": self.xy, "yy": self.yy, "eps": self.eps
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> PairStats:
        eps = float(d.get("eps", np.finfo(np.float32).eps))
        return cls(int(d["n"]), d["sx"], d["sy"], d["xx"], d["xy"], float(d["yy"]), eps)


def _need(stats: PairStats, k: int) -> None:
    if stats.n < k:
        raise ValueError(f"{stats.n} pair(s) to fit on; need at least {k}")


def procrustes(stats: PairStats, *, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)``: the map with orthonormal columns (dx >= dy) or rows (dx < dy) that maximises the
    alignment ``sum <x W, y>`` of the pairs, ``W = U V^T`` from the SVD of ``X^T Y`` (centred when
    ``center``; then ``b = mean(y) - mean(x) W``, else b = 0). For equal dims this is also the
    least-squares rotation; for unequal dims it is the alignment-optimal semi-orthogonal map (not
    the least-squares one, whose norm the inputs' covariance would weigh): what a cosine search
    needs."""
    _need(stats, 1)
    m = stats.xy
    b = np.zeros(stats.xy.shape[1])
    if center:
        mx, my = stats.sx / stats.n, stats.sy / stats.n
        m = stats.xy - stats.n * np.outer(mx, my)
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    w = u @ vt
    if center:
        b = my - mx @ w
    return w, b


def _centred(stats: PairStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Means and centred (co)variances of the pairs: ``mx, my, C_xx, C_xy``."""
    n = stats.n
    mx, my = stats.sx / n, stats.sy / n
    return mx, my, stats.xx / n - np.outer(mx, mx), stats.xy / n - np.outer(mx, my)


def _resolved_eig(stats: PairStats, cxx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of ``C_xx`` for the directions the pairs resolve: at most
    ``n - 1`` (the rank of ``n`` centred pairs), each above the rounding the statistics carry.
    That rounding is estimated as ``4 eps sqrt(dx)`` times the largest raw second moment of a
    source dim (``eps`` of the products summed; centring a sum of raw products inherits their
    rounding, which is what a large mean against a small spread costs)."""
    vals, vecs = np.linalg.eigh((cxx + cxx.T) / 2)  # ascending
    raw = float(np.max(np.diag(stats.xx))) / stats.n
    keep = vals > 4 * stats.eps * np.sqrt(len(vals)) * raw
    keep[: max(0, len(vals) - (stats.n - 1))] = False
    return vals[keep], vecs[:, keep]


def affine(stats: PairStats, *, ridge: float = 0.0, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of ordinary (``ridge`` = 0) or ridge least squares ``min sum ||x W + b - y||^2 +
    ridge n ||W||^2`` on centred data; with ``rank``, the reduced-rank solution (the least-squares
    fit projected on the ``rank`` leading directions of its fitted values).

    Where the pairs do not determine the map (fewer pairs than source dims, or source dims that
    are combinations of others) this is the minimum-norm solution, like ``numpy.linalg.lstsq``'s:
    the map is solved in the eigenbasis of the inputs' covariance over the directions the pairs
    resolve (:func:`_resolved_eig`); the rest get no weight. An ordinary solve would divide by
    rounding-level eigenvalues there and return a map fitted to rounding (docs/decisions.md).
    Few pairs still over-fit a minimum-norm map: ``ridge`` is what keeps it general (the adapter
    job chooses it on a share of the pairs, ``ridge: auto``)."""
    ((w, b),) = affine_path(stats, [ridge])
    if rank is not None and rank < min(w.shape):
        mx, my, cxx, _ = _centred(stats)
        fitted = w.T @ cxx @ w  # covariance of the fitted values x W
        vals, vecs = np.linalg.eigh((fitted + fitted.T) / 2)
        top = vecs[:, np.argsort(vals)[::-1][:rank]]
        w = w @ top @ top.T
        b = my - mx @ w
    return w, b


def affine_path(stats: PairStats, ridges: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`affine` (full rank) for each of ``ridges``, from one eigendecomposition."""
    _need(stats, 2)
    mx, my, cxx, cxy = _centred(stats)
    vals, basis = _resolved_eig(stats, cxx)
    proj = basis.T @ cxy
    out = []
    for ridge in ridges:
        w = basis @ (proj / (vals + ridge)[:, None])
        out.append((w, my - mx @ w))
    return out


def residual(stats: PairStats, w: np.ndarray, b: np.ndarray) -> float:
    """Mean of ``||x W + b - y||^2`` over the pairs, from the statistics alone."""
    _need(stats, 1)
    n = stats.n
    fit = np.einsum("ij,ij->", w, stats.xx @ w) + 2 * stats.sx @ w @ b + n * (b @ b)
    cross = np.einsum("ij,ij->", w, stats.xy) + stats.sy @ b
    return float(max(0.0, (stats.yy - 2 * cross + fit) / n))
