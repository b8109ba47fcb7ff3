"""``ridge: auto``: the affine map's ridge chosen by the share of a full re-embedding's neighbours
it keeps on a seeded share of the fitted pairs (the tune pairs), with the map fitted on the rest.

Why not the squared error: a ridge shrinks the mapped vectors towards the target's mean, which
lowers their squared error more than it helps their neighbours under cosine; on the fonts set
the ridge that minimised a two-fold cross-validated squared error was ten times the one that kept
most neighbours, and lost up to 13% of the share (docs/decisions.md). The tune pairs are fitted
pairs, never the gate's held-out ones, so the gate still scores pairs no choice has seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmu_ray.adapters.pairs import read_holdout
from dmu_ray.adapters.stats import PairStats, affine_path
from dmu_ray.evaluate.gate import shares_per_query
from dmu_ray.storage import Location

__all__ = ["RIDGE_GRID", "MAX_TUNE_PAIRS", "MAX_TUNE_QUERIES", "choose_ridge", "tune_k", "tune_share"]

#: the ridges tried, as multiples of the source vectors' mean variance (so the choice does not
#: depend on the vectors' scale), and 0
RIDGE_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


#: about the most tune pairs a choice uses: the driver reads them all (20,000 pairs of 1280-d
#: vectors: 200 MB) and searches them once per candidate
MAX_TUNE_PAIRS = 20_000

#: the most tune pairs used as queries (each against all the other tune pairs): the search's cost
MAX_TUNE_QUERIES = 5_000


def tune_k(k: int, items: int) -> int:
    """The neighbours a tune query is scored on: ``k``, or fewer where the tune pairs are few, so
    that they stay at most 5% of the ``items`` searched (but at least 3, or ``k`` where it is
    smaller, so that one query's share is not a coin toss). The adapter serves galleries far
    larger than the tune pairs; at k = 10 among 90 items the neighbourhoods are coarse, and coarse
    neighbourhoods favour a larger ridge than the fine ones of a real gallery (docs/decisions.md)."""
    return max(1, min(k, max(3, items // 20)))


def tune_share(tune: float, pairs: int) -> float:
    """The share of about ``pairs`` fitted pairs set apart as tune pairs: ``tune``, or less, so that
    about :data:`MAX_TUNE_PAIRS` are (a billion pairs must not put a tenth of them on the driver)."""
    return min(tune, MAX_TUNE_PAIRS / max(pairs, 1))


def choose_ridge(
    stats: PairStats, tune_loc: Location, direction: str, k: int
) -> tuple[float, dict[str, Any]]:
    """The ridge of :data:`RIDGE_GRID` whose affine map, fitted on the pairs outside the tune
    share (``stats.folds``: tune, rest), keeps most of new/new's top neighbours on the tune
    pairs (each one, up to :data:`MAX_TUNE_QUERIES`, a query against all the others; the
    neighbours: :func:`tune_k` of ``k``): the smallest ridge whose share is within one standard
    error of the best one's (the error of their difference, query by query).
    Returns it and the record the fit card keeps (per candidate its share). With fewer than 3
    tune pairs, or fewer than 2 other pairs, there is nothing to choose on: ridge 0.

    Why the smallest within the error: the tune pairs come from the same sample as the fitted
    ones, and a ridge shrinks the map towards that sample's mean, the part that carries least
    to items unlike the sample (on the fonts set, to typefaces no pair came from); where the tune
    pairs cannot tell two ridges apart, the smaller one is kept."""
    ids, old, new = read_holdout(tune_loc)
    _, rest = stats.folds or (None, None)  # (tune pairs, the rest)
    k = tune_k(k, len(ids) - 1)
    record: dict[str, Any] = {"by": "tune share", "tune_pairs": int(len(ids)), "k": k, "candidates": []}
    if rest is None or rest.n < 2 or len(ids) < 3:
        return 0.0, {**record, "chosen": 0.0, "note": "too few tune pairs to choose on; ridge 0"}
    n = stats.n
    scale = float(np.sum(np.diag(stats.xx) / n - (stats.sx / n) ** 2)) / stats.xx.shape[0]
    ridges = [m * scale for m in RIDGE_GRID]
    q = slice(0, MAX_TUNE_QUERIES)  # the tune pairs come in a seeded random order
    own = np.arange(len(ids))[q]
    strategies = {}
    for i, (w, b) in enumerate(affine_path(rest, ridges)):
        if direction == "gallery":  # new queries against the old tune items mapped
            strategies[str(i)] = (new[q], old @ w + b)
        else:  # mapped new queries against the old tune items
            strategies[str(i)] = (new[q] @ w + b, old)
    per = list(shares_per_query((new[q], new), strategies, k=k, own=own).values())  # in ridge order
    means = [float(v.mean()) for v in per]
    best = int(np.argmax(means))
    errors = [float(np.std(per[best] - v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for v in per]
    chosen = next(i for i in range(len(ridges)) if means[best] - means[i] <= errors[i])
    record["candidates"] = [
        {"ridge": r, "share": means[i], "error_to_best": errors[i]} for i, r in enumerate(ridges)
    ]
    record["mean_variance"] = scale
    return ridges[chosen], {**record, "chosen": ridges[chosen], "best_ridge": ridges[best]}
