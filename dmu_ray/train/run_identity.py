"""A run's identity: the config it was claimed with (``_config.json``), which changes may resume it,
and the export of a run that already finished with the same config."""

import json
from typing import Any

from dmu_ray.methods.registry import method_from_saved
from dmu_ray.models.artifact import (
    EMBEDDING_MODEL,
    load_artifact,
)
from dmu_ray.schema import ConfigError, comparable_dump, with_canonical_locations
from dmu_ray.storage import resolve
from dmu_ray.train.config import TrainConfig
from dmu_ray.train.plan import TrainPlan


def finished_export(plan: TrainPlan) -> dict[str, Any] | None:
    """The export of a run that already finished with this same config, else None."""
    from dmu_ray.models.artifact import ArtifactError

    model_uri = f"{plan.export_uri}/model.pt"
    if not resolve(model_uri, plan.cfg.storage).exists():
        return None
    try:
        card = load_artifact(model_uri, plan.cfg.storage, kind=EMBEDDING_MODEL).card
    except ArtifactError:
        return None
    if not _same_config(card.config, plan.cfg) or card.epochs != plan.cfg.optim.epochs:
        return None
    if getattr(card, "method_revision", 1) != METHOD_REVISION:  # trained by other loss code
        return None
    out = {"model": model_uri, "metrics": card.metrics, "epochs": card.epochs, "history": card.history}
    up_uri = f"{plan.export_uri}/upgrade.pt"
    if resolve(up_uri, plan.cfg.storage).exists():
        out["upgrade_module"] = up_uri
    return out


RUN_CONFIG = "_config.json"
#: bumped when what a config trains changes (2: BCT's loss averaged over constrained samples, FastFill's
#: uncertainty on the trunk, UniBCT's graph refinement); an export of another revision is not reused
METHOD_REVISION = 2


OPERATIONAL = {
    "storage",
    "ray_address",
    "scaling",
    "embed_pool",
    "max_failures",
    "failure_drill_epoch",
    "tracking",  # where metrics are logged: a run trained before MLflow tracking (or with another store) resumes
}


def _resumable_view(cfg: TrainConfig) -> dict[str, Any]:
    """What must not change between a run and its resumption: what is trained and how. Where it
    runs (storage, cluster, workers, failure handling) and the epoch count (more epochs is how a
    finished run is continued) may change."""
    d = comparable_dump(cfg, exclude=OPERATIONAL)
    d.get("optim", {}).pop("epochs", None)
    for k in ("decode_cpus", "cache"):
        d.get("data", {}).pop(k, None)
    return d


def _claim_run(plan: TrainPlan) -> None:
    """Ray Train resumes any run with this name and storage path; refuse when the run folder holds
    a run of a different config (its checkpoint would be resumed as if it were this one)."""
    from dmu_ray.storage import read_bytes, write_bytes_atomic

    loc = resolve(plan.run_uri, plan.cfg.storage).join(RUN_CONFIG)
    if loc.exists():
        try:
            theirs = _resumable_view(_saved_config(json.loads(read_bytes(loc))))
        except ValueError:
            theirs = None
        mine = _resumable_view(plan.cfg)
        if theirs != mine:
            raise ConfigError(
                f"name: {plan.run_uri} holds a run of a different config (see its {RUN_CONFIG}); "
                "use another name, or the same config to resume it"
            )
        return
    write_bytes_atomic(loc, json.dumps(_saved_view(plan.cfg)).encode())


def _saved_config(saved: dict[str, Any]) -> TrainConfig:
    """A config saved by a run or an export, read back (a method section written before methods
    had their own configs is reduced to its method's fields)."""
    if isinstance(saved, dict) and isinstance(saved.get("method"), dict):
        saved = {**saved, "method": method_from_saved(saved["method"])}
    return TrainConfig.model_validate(saved)


def _same_config(saved: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """Whether an export's saved config means ``cfg`` (storage aside). Compared without defaults,
    so an export written before a new option existed still matches a config leaving it at its default."""
    from pydantic import ValidationError

    if not isinstance(saved, dict):
        return False
    try:
        then = _saved_config(saved)
    except ValidationError:
        return False
    where = {"storage", "tracking"}  # where it is stored and logged is not what was trained
    return comparable_dump(then, exclude=where) == comparable_dump(cfg, exclude=where)


def _saved_view(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a run and its export record it: without credentials, local paths absolute
    (so a resumption from another working directory compares the locations, not their spelling)."""
    return with_canonical_locations(cfg, cfg.model_dump(mode="json", exclude={"storage"}))
