"""Evaluation outputs: a versioned JSON result, a Markdown table, PNG plots (local or S3)."""

from __future__ import annotations

import io
import json
from typing import Any

from dmu_ray.storage import Location, write_bytes_atomic

FORMAT = "dmu-ray.eval/1"
ORDER = [
    "old/old",
    "new/old",
    "adapted/old",
    "new/upgraded",
    "new/mixed",
    "new/new",
    "independent/independent",
]


#: per-pairing figures that are not rates (not shown as percentages)
NOT_RATES = {"search_recall_vs_exact", "seconds"}


def pairing_order(pairings: dict[str, Any]) -> list[str]:
    """Pairing names in reading order: shared pairings, then each new model's (``<name>:new/old``
    ...) in the order models were given, each group in :data:`ORDER`."""
    groups = list(dict.fromkeys(p.rpartition(":")[0] for p in pairings))

    def key(p: str) -> tuple[int, int, str]:
        group, _, base = p.rpartition(":")
        return (groups.index(group), ORDER.index(base) if base in ORDER else len(ORDER), p)

    return sorted(pairings, key=key)


def markdown_table(result: dict[str, Any]) -> str:
    """The compatibility matrix as a Markdown table (one row per pairing, with the seconds its
    search and metrics took), then the headline figures (per new model when there are several)."""
    pairings = result["pairings"]
    names = pairing_order(pairings)
    cols = [
        c
        for c in ("mAP@100", "mAP", "R@1", "R@5", "R@10", "TAR@FAR=0.001", "TAR@FAR=0.01")
        if any(c in pairings[p] for p in names)
    ]
    lines = _table(pairings, names, cols, seconds=any("seconds" in pairings[p] for p in names))
    other = [  # rates of the other protocols (revisited, templates, ...), in first-seen order
        c
        for c in dict.fromkeys(k for p in names for k in pairings[p])
        if c not in cols and c not in NOT_RATES and isinstance(pairings[names[0]].get(c), float)
    ]
    if other:
        lines += ["", "Protocol metrics (%):", ""] + _table(pairings, names, other)
    h = result.get("headline", {})
    metric = result.get("headline_metric", "mAP@100")
    per_model = {"": h} if h and not isinstance(next(iter(h.values())), dict) else h
    models = result.get("models") or {}
    for model, figures in per_model.items():
        if figures:
            own = models.get(model, {}).get("pairings") or pairings
            lines += ["", *headline_sentences(own, figures, metric, model or "the new model")]
    return "\n".join(lines) + "\n"


def headline_sentences(
    pairings: dict[str, Any], figures: dict[str, float], metric: str, model: str
) -> list[str]:
    """The headline figures as the plain sentences the demo prints (figures in percent), in the
    vocabulary of :data:`~dmu_ray.evaluate.matrix.HEADLINES`."""

    def pct(p: str) -> str:
        return f"{100 * pairings[p][metric]:.2f}"

    out = []
    if "gain_without_backfill" in figures:
        out.append(
            f"Without re-embedding a single item, {model}'s upgrade module takes the old gallery from "
            f"{pct('old/old')} (old/old) to {pct('new/upgraded')} {metric} for new-model queries (new/upgraded): "
            f"{100 * figures['gain_without_backfill']:+.2f}."
        )
    if "new_old_vs_old_old" in figures:
        out.append(
            f"{model}'s queries on the untouched old gallery score {pct('new/old')} {metric} (new/old), against "
            f"{pct('old/old')} for the old model itself: {100 * figures['new_old_vs_old_old']:+.2f}."
        )
    if "compatibility_cost" in figures:
        cost = 100 * figures["compatibility_cost"]
        head = (
            f"Compatibility costs {model} {cost:.2f}" if cost > 0 else f"Compatibility costs {model} nothing"
        )
        out.append(
            f"{head} {metric} on new/new: {pct('new/new')} against {pct('independent/independent')} for a new "
            "model trained without it (independent)."
        )
    if "gain_with_full_backfill" in figures:
        out.append(
            f"Re-embedding every item with {model} (new/new) gives {pct('new/new')} {metric}: "
            f"{100 * figures['gain_with_full_backfill']:+.2f} over old/old."
        )
    return out


def _table(pairings: dict[str, Any], names: list[str], cols: list[str], seconds: bool = False) -> list[str]:
    def cell(v: Any) -> str:
        return "" if v is None else ("n/a" if v != v else f"{100 * v:.2f}")  # v != v: NaN

    head = "| query/gallery | " + " | ".join(cols) + (" | seconds |" if seconds else " |")
    lines = [head, "| --- |" + " ---: |" * (len(cols) + seconds)]
    for p in names:
        row = " | ".join(cell(pairings[p].get(c)) for c in cols)
        if seconds:
            sec = pairings[p].get("seconds")
            row += " | " + ("" if sec is None else f"{sec:.2f}")
        lines.append(f"| {p} | {row} |")
    return lines


def plot_pairings(result: dict[str, Any]) -> bytes:
    """Grouped bars (mAP@100, R@1) per pairing, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairings = result["pairings"]
    names = pairing_order(pairings)
    metrics = [m for m in ("mAP@100", "R@1") if all(m in pairings[p] for p in names)]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    x = np.arange(len(names))
    w = 0.8 / max(1, len(metrics))
    for i, m in enumerate(metrics):
        vals = [100 * pairings[p][m] for p in names]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * w, vals, w, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("%")
    ax.set_title(result.get("title", "retrieval by query/gallery model pairing"))
    ax.legend()
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (laid out, 110 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render_report(result: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """The report's files, ``{key: (name, bytes)}``: ``eval.json``, ``eval.md``, ``pairings.png``."""
    result = {"format": FORMAT, **result}
    return {
        "json": ("eval.json", json.dumps(result, indent=2, sort_keys=False).encode()),
        "markdown": ("eval.md", markdown_table(result).encode()),
        "plot": ("pairings.png", plot_pairings(result)),
    }


def write_report(
    out: Location, result: dict[str, Any], rendered: dict[str, tuple[str, bytes]] | None = None
) -> dict[str, str]:
    """Write ``eval.json``, ``eval.md`` and ``pairings.png`` under ``out`` (``rendered``: those of
    :func:`render_report`, made by the caller); returns their URIs."""
    uris = {}
    for key, (name, data) in (rendered or render_report(result)).items():
        write_bytes_atomic(out.join(name), data)
        uris[key] = out.join(name).uri
    return uris
