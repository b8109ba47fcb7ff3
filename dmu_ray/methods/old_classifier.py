"""An old classifier built from class prototypes, where the old model has none or lacks classes.

BCT and DMU train the new model against the old model's classifier. A deployed model usually ships
without one; and BCT's paper extends the old classifier to classes the old model never saw, with
the old model's mean feature of each such class as its weight row. Both are one computation: the
old model embeds training images on a Ray Data actor pool
(:func:`dmu_ray.models.inference.embed_images`), and each class's mean old feature, normalised,
becomes that class's row.

A model without classifier gets a scaled-cosine softmax head over those rows, without margin,
its scale fitted to the old features themselves (:func:`calibrated_scale`): the head the old
features are best classified by. The new model's ArcFace margin (0.3 rad) on such rows asked for
more than the old features give: on ImageNet features of glyphs, whose class means sit 0.4-0.7
rad apart, the old features' own cross-entropy under it was worse than a uniform guess (7.6
against log(242) = 5.5), so BCT's term could not approach it (docs/results.md, issue 37).

The result is an ordinary embedding-model artefact: the old network unchanged, that classifier,
and in its card the classes the classifier covers (``classifier_classes``), the rows that are
prototypes (``prototype_classes``) and the artefact it was derived from (``derived_from``), so a
resumed run can reuse it and anyone can see what it holds.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from dmu_ray.methods.prototypes import refine_prototypes
from dmu_ray.models.artifact import EMBEDDING_MODEL, Artifact, load_artifact, save_artifact

__all__ = ["covered_classes", "build_old_classifier", "reusable_old_classifier", "calibrated_scale"]


def covered_classes(art: Artifact, num_classes: int) -> np.ndarray:
    """Boolean (num_classes,): the classes whose rows of the artefact's classifier are meaningful
    (none when it has no classifier)."""
    c = art.card
    if not c.has_classifier:
        return np.zeros(num_classes, dtype=bool)
    for known in (c.classifier_classes, c.trained_classes):
        if known is not None:
            return np.asarray(known, dtype=bool)
    return np.ones(num_classes, dtype=bool)


def reusable_old_classifier(uri: str, old: Artifact, build: np.ndarray, storage: Any) -> Artifact | None:
    """The artefact at ``uri`` when it was derived from ``old`` with prototypes for exactly the
    classes ``build`` (a run resuming), else None."""
    from dmu_ray.storage import resolve

    if not resolve(uri, storage).exists():
        return None
    try:
        art = load_artifact(uri, storage, kind=EMBEDDING_MODEL)
    except ValueError:
        return None
    c = art.card
    if c.derived_from != old.ident or c.prototype_classes != build.tolist():
        return None
    if not old.card.has_classifier and (c.head != "softmax" or c.m != 0):
        return None  # built with a margin head before the calibrated one (issue 37)
    return art


#: the scales :func:`calibrated_scale` tries (log-spaced)
SCALES = np.geomspace(1.0, 512.0, 46)


def calibrated_scale(
    feats: np.ndarray, labels: np.ndarray, protos: np.ndarray, *, max_rows: int = 20_000, seed: int = 0
) -> tuple[float, float, float]:
    """``(s, cross-entropy, top-1)``: the scale of the cosine softmax ``s * cos(f, prototype)``
    that gives the old features ``feats`` (rows, labels ``labels``) their lowest mean
    cross-entropy over the rows ``protos`` (unit-norm, one per class), with that cross-entropy and
    the prototypes' top-1 accuracy; a seeded sample of ``max_rows`` rows when there are more."""
    if len(feats) > max_rows:
        pick = np.random.default_rng(seed).choice(len(feats), max_rows, replace=False)
        feats, labels = feats[pick], labels[pick]
    from scipy.special import logsumexp

    x = feats.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    cos = x @ protos.astype(np.float64).T
    own = cos[np.arange(len(labels)), labels].mean()
    ce, s = min((float(logsumexp(s * cos, axis=1).mean() - s * own), float(s)) for s in SCALES)
    return s, ce, float(np.mean(cos.argmax(1) == labels))


def build_old_classifier(
    old: Artifact,
    images_uri: str,
    dest: str,
    *,
    build: np.ndarray,
    only_ids: np.ndarray | None = None,
    storage: Any = None,
    pool: Any = None,
    pool_field: str = "pool",
    progress: bool = True,
) -> Artifact:
    """Write to ``dest`` the old model with a classifier whose rows for the classes in ``build``
    (bool, one per class) are the class means of the old model's features of the images under
    ``images_uri`` (a data set part; only rows whose id is in ``only_ids`` when given). Rows the old
    classifier already had are kept (with its head); a model without classifier gets a
    scaled-cosine softmax head, its scale fitted to these features (:func:`calibrated_scale`).
    A class in ``build`` without any image is an error naming it."""
    import torch

    from dmu_ray.models.inference import embed_images

    num_classes = len(build)
    ids, labels, feats = embed_images(
        images_uri,
        old.uri,
        storage=storage,
        pool=pool,
        pool_field=pool_field,
        only_ids=only_ids,
        sha256=old.sha256,
    )
    keep = build[labels] if len(labels) else np.zeros(0, dtype=bool)
    protos, present = refine_prototypes(feats[keep], labels[keep], num_classes, refine=False)
    lacking = np.flatnonzero(build & ~present)
    if len(lacking):
        raise ValueError(
            f"{images_uri}: no image of class(es) {lacking[:10].tolist()} to build their old-classifier rows from"
        )
    c = old.card
    covered = covered_classes(old, num_classes)
    state = dict(old.state_dict)
    if c.has_classifier:
        weight = state["classifier.weight"].clone().float()
        kind, s, m, fitted = c.head, c.s, c.m, ""
    else:
        weight = torch.zeros(num_classes, c.dim)
        s, ce, top1 = calibrated_scale(feats[keep], labels[keep], protos)
        kind, m = "softmax", 0.0
        fitted = (
            f"; cosine softmax, scale {s:.3g} fitted to them: their own cross-entropy {ce:.3f} "
            f"(uniform {np.log(num_classes):.3f}), top-1 {top1:.0%}"
        )
    weight[torch.from_numpy(build)] = torch.from_numpy(protos[build])
    state["classifier.weight"] = weight
    card = c.to_dict() | {
        "num_classes": num_classes,
        "head": kind,
        "s": s,
        "m": m,
        "classifier_classes": (covered | build).tolist(),
        "prototype_classes": build.tolist(),
        "derived_from": old.ident,
    }
    save_artifact(dest, EMBEDDING_MODEL, state, card, storage)
    if progress:
        print(
            f"  old classifier: {int(build.sum())} class prototype(s) from {int(keep.sum()):,} old features "
            f"({int(covered.sum())} row(s) kept from {old.uri}){fitted} -> {dest}",
            file=sys.stderr,
            flush=True,
        )
    return load_artifact(dest, storage, kind=EMBEDDING_MODEL)
