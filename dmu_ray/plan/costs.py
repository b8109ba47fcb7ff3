"""The arithmetic of a plan: work measured in items and items/s per worker, priced per worker-hour,
spread over a cluster; the Pareto front of money against quality; the floor and budget choices.
Nothing here reads a file: :mod:`dmu_ray.plan.job` gathers the figures and the evidence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Work", "Path", "costed", "pareto_front", "cheapest_reaching", "best_within"]


@dataclass
class Work:
    """``items`` done at ``rate`` items/s per worker of kind ``kind`` (as the bench measured)."""

    what: str
    items: float
    rate: float
    kind: Literal["cpu", "gpu"] = "cpu"

    @property
    def worker_hours(self) -> float:
        return self.items / self.rate / 3600.0


@dataclass
class Path:
    """An upgrade path: its work, and the quality it is measured to reach (share of a full
    re-embedding's; None: no evidence, ``evidence`` then says which command produces it).
    ``missing`` names a bench figure the path's cost needs and the bench lacks."""

    name: str
    description: str
    work: list[Work] = field(default_factory=list)
    quality: float | None = None
    metric_value: float | None = None
    evidence: str = ""
    missing: list[str] = field(default_factory=list)
    fraction: float | None = None  # a partial backfill's share of the gallery re-embedded


def costed(
    path: Path, prices: dict[str, float], *, workers: int | None, deadline_hours: float | None
) -> dict[str, Any]:
    """A path's worker-hours, money and wall time on ``workers`` workers, or the workers a
    ``deadline_hours`` needs (the work spread evenly: figures are per worker)."""
    row: dict[str, Any] = {
        "name": path.name,
        "description": path.description,
        "quality": path.quality,
        "metric_value": path.metric_value,
        "evidence": path.evidence,
        "fraction": path.fraction,
        "work": [
            {
                "what": w.what,
                "items": w.items,
                "rate_per_worker": w.rate,
                "kind": w.kind,
                "worker_hours": w.worker_hours,
            }
            for w in path.work
        ],
    }
    if path.missing:
        return row | {
            "worker_hours": None,
            "money": None,
            "wall_hours": None,
            "workers": None,
            "missing": path.missing,
        }
    wh = sum(w.worker_hours for w in path.work)
    money = sum(w.worker_hours * prices[w.kind] for w in path.work)
    if wh == 0:  # nothing to run
        n, wall = 0, 0.0
    elif workers is not None:
        n, wall = workers, wh / workers
    else:
        assert deadline_hours is not None
        n = max(1, math.ceil(wh / deadline_hours))
        wall = wh / n
    return row | {"worker_hours": wh, "money": money, "wall_hours": wall, "workers": n, "missing": []}


def _priced(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["money"] is not None and r["quality"] is not None]


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the paths no other path beats on both money (lower) and quality (higher), cheapest
    first; among equal money and quality the first listed."""
    front, best = [], -math.inf
    for r in sorted(_priced(rows), key=lambda r: (r["money"], -r["quality"])):
        if r["quality"] > best:
            front.append(r["name"])
            best = r["quality"]
    return front


def cheapest_reaching(rows: list[dict[str, Any]], floor: float) -> str | None:
    """The cheapest path whose quality is at least ``floor`` (None: none does)."""
    ok = [r for r in _priced(rows) if r["quality"] >= floor]
    return min(ok, key=lambda r: (r["money"], -r["quality"]))["name"] if ok else None


def best_within(rows: list[dict[str, Any]], budget: float) -> str | None:
    """The best-quality path that costs at most ``budget`` (cheapest among equals; None: none fits)."""
    ok = [r for r in _priced(rows) if r["money"] <= budget]
    return max(ok, key=lambda r: (r["quality"], -r["money"]))["name"] if ok else None
