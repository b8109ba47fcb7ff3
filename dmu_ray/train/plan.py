"""Every check of a training run that can fail before a worker starts: the data set, its labels and
split, the old (and frozen new) model against the data, the backbone and its weights."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dmu_ray.data.images import DatasetInfo, read_dataset_info
from dmu_ray.data.splits import split_mask
from dmu_ray.methods.base import UpgradeModuleFields
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    Artifact,
    load_artifact,
)
from dmu_ray.models.card import CardError, check_compatible
from dmu_ray.schema import ConfigError
from dmu_ray.storage import Location, resolve
from dmu_ray.train.config import TrainConfig

EXPORT_DIR = "export"


@dataclass
class TrainPlan:
    cfg: TrainConfig
    data: DatasetInfo
    train_loc: Location
    rows: int
    trained_classes: list[bool]
    old: Artifact | None
    run_uri: str
    new: Artifact | None = None  # fastfill: the frozen new model the transformation targets
    ids: np.ndarray | None = None  # of every row of the training part (both sides of the split)
    labels: np.ndarray | None = None
    mean: list[float] | None = None  # the new model's input normalisation
    std: list[float] | None = None

    def info(self) -> dict[str, Any]:
        """What every worker (and the export) needs to build the trainee, before the method's
        :meth:`~dmu_ray.methods.base.Method.prepare` adds its part."""
        return {
            "num_classes": self.data.num_classes,
            "channels": self.data.channels,
            "rows": self.rows,
            "mean": self.mean,
            "std": self.std,
            "image_size": self.data.image_size,
        }

    @property
    def export_uri(self) -> str:
        return f"{self.run_uri}/{EXPORT_DIR}"


def plan_training(cfg: TrainConfig) -> TrainPlan:
    """Every check that can fail before workers start; raises ConfigError naming the field."""
    data = read_dataset_info(cfg.data.uri, cfg.storage)
    train_loc = resolve(cfg.data.uri, cfg.storage).join("train")
    t = pq.read_table(train_loc.path, filesystem=train_loc.fs, columns=["id", "label"])
    _check_labels(t, data, train_loc.uri)
    ids, labels = t.column("id").to_numpy(), t.column("label").to_numpy()
    mask = split_mask(cfg.data.split, cfg.data.role, ids, labels, cfg.data.old_fraction, cfg.data.split_seed)
    rows = int(mask.sum())
    if rows < cfg.optim.batch_size * cfg.scaling.num_workers:
        raise ConfigError(
            f"data: the {cfg.data.role} side of split {cfg.data.split!r} has {rows} rows, fewer than one batch "
            f"per worker (optim.batch_size {cfg.optim.batch_size} x scaling.num_workers {cfg.scaling.num_workers})"
        )
    seen = np.zeros(data.num_classes, dtype=bool)
    seen[np.unique(labels[mask])] = True
    old = None
    method = cfg.method
    if method.needs_old_model:
        try:
            old = load_artifact(method.old_model, cfg.storage, kind=EMBEDDING_MODEL)
        except ValueError as err:
            raise ConfigError(f"method.old_model: {err}") from None
        c = old.card
        if method.same_dim_as_old and c.dim != cfg.model.dim:
            raise ConfigError(
                f"model.dim is {cfg.model.dim} but the old model {old.uri} embeds in {c.dim} dims; "
                f"{method.name} compares new and old vectors directly, so they must match"
            )
        in_dim = method.upgrade_in_dim if isinstance(method, UpgradeModuleFields) else None
        if in_dim is not None and in_dim != c.dim:
            raise ConfigError(
                f"method.upgrade_in_dim is {in_dim} but the old model {old.uri} "
                f"produces {c.dim}-d features for the upgrade module"
            )
        _fits_data("old", old, data)
    new = _check_new_model(cfg, data) if method.needs_new_model else None
    if new is not None:  # the frozen new model sees images as it was trained to
        mean, std = new.card.preprocessing.mean, new.card.preprocessing.std
    else:
        mean, std = _check_backbone(cfg, data)
    run_uri = resolve(cfg.storage_path, cfg.storage).join(cfg.name).uri
    return TrainPlan(cfg, data, train_loc, rows, seen.tolist(), old, run_uri, new, ids, labels, mean, std)


def _check_labels(t, data: DatasetInfo, where: str) -> None:
    """Every training label is a class the data set declares (``0 <= label < num_classes``)."""
    import pyarrow.compute as pc

    col = t.column("label")
    if col.null_count:
        raise ConfigError(f"data: {where} has {col.null_count} rows without a label")
    lo, hi = (pc.min_max(col).as_py() or {}).values() if t.num_rows else (0, -1)
    if t.num_rows and (lo < 0 or hi >= data.num_classes):
        bad = pc.sum(pc.or_(pc.less(col, 0), pc.greater_equal(col, data.num_classes))).as_py()
        raise ConfigError(
            f"data: {where} has {bad} rows with labels outside 0..{data.num_classes - 1} (labels "
            f"{lo}..{hi}), but its _dataset.json declares {data.num_classes} classes; re-import the data "
            "set (dmu-ray data import) or correct num_classes"
        )


def _check_backbone(cfg: TrainConfig, data: DatasetInfo) -> tuple[list[float], list[float]]:
    """The backbone builds, runs on the data's images, and takes the ``model.weights`` file (a
    library's named weights are checked by name only: they are fetched on the workers); returns
    the input normalisation (``model.mean``/``std``, else the backbone's own)."""
    import torch

    from dmu_ray.models.backbones import (
        check_library_weights,
        default_preprocessing,
        initial_backbone_state,
        load_backbone_weights,
    )
    from dmu_ray.models.embedding import EmbeddingModel

    m = cfg.model
    try:
        model = EmbeddingModel(m.backbone, m.dim, data.channels).eval()
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"model.backbone: {err}") from None
    try:
        with torch.no_grad():
            model(torch.zeros(2, data.channels, data.image_size, data.image_size))
    except Exception as err:  # an architecture that cannot take this input size
        raise ConfigError(
            f"model.backbone: {m.backbone} does not run on the data's {data.image_size}x{data.image_size} "
            f"images ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    try:
        if m.pretrained:
            check_library_weights(m.backbone, m.pretrained)
        elif m.weights:
            load_backbone_weights(model.backbone, m.backbone, *initial_backbone_state(m, cfg.storage))
    except ValueError as err:
        raise ConfigError(str(err) if str(err).startswith("model.") else f"model.pretrained: {err}") from None
    if m.mean is not None:
        if any(len(v) not in (1, data.channels) for v in (m.mean, m.std)):
            raise ConfigError(
                f"model.mean/std: need 1 or {data.channels} values for {data.channels}-channel images"
            )
        return m.mean, m.std
    return default_preprocessing(m.backbone, model.backbone, data.channels)


def _check_new_model(cfg: TrainConfig, data: DatasetInfo) -> Artifact:
    """fastfill: the frozen new model must load and be the model the config's ``model`` section
    describes (it is what the transformation is trained to reach)."""
    try:
        new = load_artifact(cfg.method.new_model, cfg.storage, kind=EMBEDDING_MODEL)
    except ValueError as err:
        raise ConfigError(f"method.new_model: {err}") from None
    c = new.card
    for field, want in (("dim", cfg.model.dim), ("backbone", cfg.model.backbone)):
        if getattr(c, field) != want:
            raise ConfigError(
                f"model.{field} is {want!r} but method.new_model {new.uri} has {getattr(c, field)!r}; "
                f"for {cfg.method.name} the model section describes the frozen new model"
            )
    _fits_data("new", new, data)
    return new


def _fits_data(role: str, art: Artifact, data: DatasetInfo) -> None:
    """The ``method.<role>_model`` artefact takes the data's channels and knows its classes."""
    try:
        check_compatible(
            **{role: art.card},
            channels=data.channels,
            num_classes=data.num_classes,
            names={role: f"method.{role}_model {art.uri}"},
        )
    except CardError as err:
        raise ConfigError(str(err)) from None
