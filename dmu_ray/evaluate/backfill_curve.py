"""The backfill curve (``dmu-ray backfill-curve``): new-model queries against the mixed gallery at
each backfill fraction, for each policy, and the area under each curve.

One pass of each model is enough: the transformed gallery and the policies' scores come from the
backfill's own scoring pass, the fully re-embedded gallery from one pass of the new model over the
images; each point of a curve is then the mixed gallery ``where(selected, new, transformed)``
with the same selection rule as ``dmu-ray backfill``, searched with faiss.

Having every new vector, the curve also draws the ``oracle`` order (the realised transformation
error ``|psi(f_o) - f_n|^2``, worst first: what no real backfill can know, the reference any order
is measured against) and reports how well the predicted uncertainty ranks that error (Spearman's
rank correlation, ``uncertainty_error_spearman``).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from typing import Any

import numpy as np

from dmu_ray.evaluate.matrix import EvaluationError, MetricsConfig, evaluate_pairing
from dmu_ray.evaluate.report import figure_png
from dmu_ray.methods.fastfill import curve_area, select_top
from dmu_ray.models.inference import embed_images
from dmu_ray.refresh.backfill import plan_backfill, score_gallery
from dmu_ray.refresh.config import BackfillConfig
from dmu_ray.storage import resolve, write_bytes_atomic

FORMAT = "dmu-ray.backfill-curve/1"


def _metrics_config(metric: str) -> MetricsConfig:
    """Only what the curve's metric needs: mAP@K and R@K rank K items per query (not the whole
    gallery, which the pairing report ranks for its full mAP: 11 points x 3 orders of full rankings
    took minutes on a 15k gallery); ``mAP`` ranks the whole gallery, however large."""
    one = {"protocols": ["retrieval"], "tar_fars": []}
    if metric.startswith("mAP@") and metric[4:].isdigit():
        return MetricsConfig(map_at=int(metric[4:]), ks=[1], full_map_max=0, **one)
    if metric.startswith("R@") and metric[2:].isdigit():
        k = int(metric[2:])
        return MetricsConfig(map_at=k, ks=[k], full_map_max=0, **one)
    if metric == "mAP":
        return MetricsConfig(full_map_max=2**62, **one)
    raise EvaluationError(f"curve.metric {metric!r}: use mAP, mAP@K or R@K")


def backfill_curve(cfg: BackfillConfig, *, progress: bool = True) -> dict[str, Any]:
    """Compute the curves of ``cfg.curve``; write ``backfill_curve.json`` and ``.png``."""
    if cfg.curve is None:
        raise EvaluationError("the config has no 'curve' section")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    c = cfg.curve
    mcfg = _metrics_config(c.metric)
    scored = [p for p in c.policies if p != "oracle"]  # the oracle needs the new vectors, below
    plan = plan_backfill(cfg, scored)
    say(f"backfill curve: scoring the gallery by {', '.join(c.policies)}")
    ids, scores, transformed = score_gallery(plan, scored, keep_vectors=True)
    say("backfill curve: embedding the gallery images and the queries with the new model")
    new_at = dict(storage=cfg.storage, pool=cfg.embed_pool, sha256=plan.new.sha256)
    g_ids, g_labels, new = embed_images(cfg.images, plan.new.uri, **new_at)
    if not np.array_equal(g_ids, ids):
        raise EvaluationError(
            f"images {cfg.images} hold {len(g_ids)} ids, the gallery's valid rows {len(ids)}; "
            "the curve needs the images of exactly the gallery's rows"
        )
    if (g_labels < 0).any():
        raise EvaluationError(
            f"images {cfg.images}: {int((g_labels < 0).sum())} gallery images have no label; the curve "
            "measures retrieval, so its images need labels (a label column in the table)"
        )
    _, q_labels, q = embed_images(c.queries, plan.new.uri, **new_at)
    error = ((transformed.astype(np.float64) - new) ** 2).sum(1)  # realised transformation error
    if "oracle" in c.policies:
        scores["oracle"] = error
    calibration = None
    if "uncertainty" in scores:
        from scipy.stats import spearmanr

        calibration = float(spearmanr(scores["uncertainty"], error).statistic)
        say(f"  rank correlation of predicted uncertainty with realised error: {calibration:+.3f}")
    curves: dict[str, list[float]] = {}
    for policy in c.policies:
        values = []
        for f in c.fractions:
            mask = select_top(ids, scores[policy], f)
            mixed = np.where(mask[:, None], new, transformed)
            res = evaluate_pairing(f"new/mixed {policy} {f:.0%}", q, q_labels, mixed, g_labels, mcfg)
            values.append(float(res[c.metric]))
        curves[policy] = values
        say(f"  {policy}: area {curve_area(c.fractions, values):.4f}")
    result: dict[str, Any] = {
        "format": FORMAT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metric": c.metric,
        "fractions": list(c.fractions),
        "curves": curves,
        "area": {p: curve_area(c.fractions, v) for p, v in curves.items()},
        "uncertainty_error_spearman": calibration,
        "mean_transform_error": float(error.mean()),
        "inputs": {
            "source": plan.source.loc.uri,
            "module": plan.module.ident,
            "new_model": plan.new.ident,
            "old_model": plan.old.ident if plan.old else None,
            "images": cfg.images,
            "queries": c.queries,
            "gallery_rows": int(len(ids)),
            "queries_rows": int(len(q)),
        },
    }
    out = resolve(c.output, cfg.storage)
    write_bytes_atomic(out.join("backfill_curve.json"), json.dumps(result, indent=2).encode())
    write_bytes_atomic(out.join("backfill_curve.png"), plot_curves(result))
    result["files"] = {"json": out.join("backfill_curve.json").uri, "png": out.join("backfill_curve.png").uri}
    return result


def plot_curves(result: dict[str, Any]) -> bytes:
    """The curves (metric in % against fraction backfilled), areas in the legend, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = 100 * np.asarray(result["fractions"])
    for policy, values in result["curves"].items():
        ax.plot(
            x,
            100 * np.asarray(values),
            marker="o",
            ms=3,
            label=f"{policy} (area {result['area'][policy]:.3f})",
        )
    ax.set_xlabel("gallery backfilled with the new model (%)")
    ax.set_ylabel(f"{result['metric']} (%)")
    ax.set_title("backfill curve: new queries vs the mixed gallery")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig)
