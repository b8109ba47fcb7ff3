"""What evaluation reads besides models: galleries' vectors and labels, the data set's gallery
labels by id, and the check that the report's output folder can be written. Shared by the
pairing report (:mod:`dmu_ray.evaluate.job`) and the generations matrix
(:mod:`dmu_ray.evaluate.generations`)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from dmu_ray.evaluate.matrix import EvaluationError
from dmu_ray.gallery import EMB, LABEL, Gallery, embedding_matrix, finite_rows
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import resolve

Embedded = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ids, labels, vectors)


def check_output(output: str, storage: StorageConfig) -> None:
    """The output folder can be written (checked, nothing created): not a file, its bucket exists,
    and on local disk its nearest existing ancestor is a folder this process may write into."""
    try:
        out = resolve(output, storage)
    except ValueError as err:
        raise EvaluationError(f"output: {err}") from None
    if out.missing_bucket():
        raise EvaluationError(f"output: {out.describe_missing()}")
    if out.is_file():
        raise EvaluationError(f"output: {out.uri} is a file; give a folder for the report")
    if not out.is_s3:
        path = out.path
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
            raise EvaluationError(f"output: cannot create {out.uri} ({path} is not a writable folder)")


def data_labels(data: str, storage: StorageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and their labels of the data set's gallery part (no image bytes read)."""
    loc = resolve(data, storage).join("gallery")
    try:
        t = pq.read_table(loc.path, filesystem=loc.fs, columns=["id", LABEL])
    except (OSError, ValueError) as err:
        raise EvaluationError(f"data: cannot read the labels of {loc.uri} ({err})") from None
    ids, labels = t.column("id").to_numpy(), t.column(LABEL).to_numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order], labels[order]


def labels_by_id(g: Gallery, data: tuple[np.ndarray, np.ndarray], what: str) -> np.ndarray:
    """Labels of a gallery without a label column: those of the data set's gallery images with the
    same ids (a production gallery keyed by its images' ids); every id must have one."""
    ids = g.read(columns=["id"]).column("id").to_numpy(zero_copy_only=False)
    data_ids, data_labels = data
    if ids.dtype.kind not in "iu":
        raise EvaluationError(
            f"{what}: {g.loc.uri} has no 'label' column and {ids.dtype} ids; its labels come from the data set's "
            "gallery images by id, which are integers"
        )
    pos = np.clip(np.searchsorted(data_ids, ids), 0, max(0, len(data_ids) - 1))
    found = (pos < len(data_ids)) & (data_ids[pos] == ids) if len(data_ids) else np.zeros(len(ids), bool)
    if not found.all():
        raise EvaluationError(
            f"{what}: {g.loc.uri} has no 'label' column and {int((~found).sum())} of its {len(ids)} ids have no "
            f"image in the data set's gallery part (e.g. {ids[~found][:5].tolist()}), so they cannot be labelled"
        )
    return data_labels[pos]


def gallery_vectors(g: Gallery, labels: np.ndarray | None = None) -> Embedded:
    """Ids, labels and vectors of a gallery: its label column, or ``labels`` (row order) when it
    has none."""
    if labels is None:
        t = g.read(columns=["id", LABEL, EMB])
        labels = t.column(LABEL).to_numpy()
    else:
        t = g.read(columns=["id", EMB])
    ids = t.column("id").to_numpy(zero_copy_only=False)
    return ids, labels, embedding_matrix(t.column(EMB)).astype(np.float32)


def check_quarantine(g: Gallery, what: str, max_share: float) -> None:
    """Refuse a stored gallery that lost more than ``max_share`` of its rows to quarantine when it
    was written (its figures would describe a fraction of it), naming its model and the reasons."""
    m = g.manifest
    if m is None or m.rows_in == 0:
        return
    share = m.quarantined_rows / m.rows_in
    if share > max_share:
        reasons = ", ".join(
            f"{r}: {n:,}" for r, n in sorted(m.quarantine_reasons.items(), key=lambda kv: -kv[1])
        )
        raise EvaluationError(
            f"{what}: {g.loc.uri} lost {m.quarantined_rows:,} of its {m.rows_in:,} rows ({share:.1%}) to "
            f"quarantine when model {m.model.model_id!r} wrote it ({reasons or 'no reasons recorded'}); above "
            f"max_quarantined_share {max_share:g}, so its figures would not describe the gallery. Fix the "
            "model or its input and write the gallery again"
        )


def keep_finite(vectors: Embedded, what: str, model: str, max_share: float) -> tuple[Embedded, int]:
    """``vectors`` without the rows whose vector is not finite (NaN/Inf), and how many were dropped;
    more than ``max_share`` of them stops the evaluation naming the model."""
    ids, labels, x = vectors
    bad = ~finite_rows(x)
    n = int(bad.sum())
    if n == 0:
        return vectors, 0
    if n / max(1, len(ids)) > max_share:
        raise EvaluationError(
            f"model {model} gave NaN/Inf vectors for {n:,} of the {len(ids):,} images of the {what} "
            f"({n / len(ids):.1%}, above max_quarantined_share {max_share:g}); its figures would be "
            "meaningless. Check the model (e.g. its preprocessing, or a numerically broken export)"
        )
    return (ids[~bad], labels[~bad], x[~bad]), n
