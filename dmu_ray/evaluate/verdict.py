"""The demo's verdict: a few plain sentences, with the numbers, about what an upgrade bought and
what compatibility cost, from the evaluation results of one or more new-model variants."""

from __future__ import annotations

from typing import Any

__all__ = ["verdict", "verdict_markdown"]


def _get(results: dict[str, Any], method: str, pairing: str, metric: str) -> float | None:
    v = results.get(method, {}).get("pairings", {}).get(pairing, {}).get(metric)
    return None if v is None else 100.0 * float(v)


def verdict(results: dict[str, dict[str, Any]], metric: str = "mAP@100") -> list[dict[str, Any]]:
    """Sentences with the figures they quote (``{"text", "figures"}``), from ``results`` (variant
    name -> an evaluation result with ``pairings``): the gain without re-embedding (new/upgraded
    vs old/old) per variant with an upgrade module; what compatibility costs (new/new vs the
    independent model's) per compatible variant, when an independent model was trained; DMU vs
    BCT on new/old when both were trained. Figures are percentages of ``metric``."""
    out: list[dict[str, Any]] = []

    def say(text: str, **figures: float) -> None:
        out.append({"text": text, "figures": {k: round(v, 2) for k, v in figures.items()}})

    methods = [m for m in results if not m.startswith("independent")]
    for m in methods:
        up, oo = _get(results, m, "new/upgraded", metric), _get(results, m, "old/old", metric)
        if up is not None and oo is not None:
            say(
                f"Without re-embedding a single image, {m}'s upgrade module lifts the old gallery from "
                f"{oo:.2f} (old/old) to {up:.2f} {metric} for new-model queries (new/upgraded): "
                f"{up - oo:+.2f}.",
                old_old=oo,
                new_upgraded=up,
                gain=up - oo,
            )
        no = _get(results, m, "new/old", metric)
        if no is not None and oo is not None and up is None:
            say(
                f"{m}'s new model queries the untouched old gallery at {no:.2f} {metric} (new/old), "
                f"against {oo:.2f} for the old model itself: {no - oo:+.2f}.",
                old_old=oo,
                new_old=no,
                change=no - oo,
            )
    ind = _get(results, "independent", "new/new", metric)
    for m in methods:
        nn = _get(results, m, "new/new", metric)
        if ind is not None and nn is not None:
            cost = ind - nn
            head = f"Compatibility costs {m} {cost:.2f}" if cost > 0 else f"Compatibility costs {m} nothing"
            say(
                f"{head} {metric} on new/new: its new model scores {nn:.2f} against {ind:.2f} for a new "
                f"model trained without it (independent, {nn - ind:+.2f}).",
                new_new=nn,
                independent=ind,
                cost=cost,
            )
    dmu, bct = _get(results, "dmu", "new/old", metric), _get(results, "bct", "new/old", metric)
    if dmu is not None and bct is not None:
        lead = "ahead of" if dmu > bct else "behind" if dmu < bct else "level with"
        say(
            f"On new/old (new queries, old gallery untouched), DMU scores {dmu:.2f} and BCT {bct:.2f} "
            f"{metric}: DMU is {lead} BCT by {abs(dmu - bct):.2f}.",
            dmu_new_old=dmu,
            bct_new_old=bct,
            difference=dmu - bct,
        )
    return out


def verdict_markdown(results: dict[str, dict[str, Any]], lines: list[dict[str, Any]]) -> str:
    """The lifecycle report: each variant's matrix (as ``eval.md`` has it), then the verdict."""
    from dmu_ray.evaluate.report import markdown_table

    parts = []
    for m, r in results.items():
        parts.append(f"## {m}\n\n" + markdown_table(r))
    parts.append("## Verdict\n\n" + "\n".join(f"- {v['text']}" for v in lines) + "\n")
    return "\n".join(parts)
