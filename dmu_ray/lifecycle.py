"""The whole upgrade lifecycle in one call (``dmu-ray demo``, ``jobs/lifecycle.py``):

1. import a real data set that ships in a package (glyphs from matplotlib's typefaces, or digits);
2. train the old model on the old side of the split (default: 30% of the classes);
3. train the new model with DMU against the frozen old model (and, on request, independent and BCT);
4. embed the gallery images with the old model into a committed gallery prefix (Ray Data);
5. refresh that gallery with DMU's upgrade module (Ray Data) into a new prefix;
6. evaluate every pairing with faiss, all new models in one run (each set embedded once per model),
   and write the compatibility matrix, JSON and plots.

Everything lands under one root (local folder or ``s3://``): ``data/``, ``runs/``, ``galleries/``,
``eval/``. Re-running reuses what is already there (data set, finished runs, committed galleries).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Literal

from pydantic import Field

from dmu_ray.config import (
    ActorPoolConfig,
    EvaluateConfig,
    RefreshConfig,
    StorageConfig,
    StrictModel,
    TrackingConfig,
    TrainConfig,
)
from dmu_ray.methods.registry import METHODS
from dmu_ray.storage import resolve
from dmu_ray.tracking import Tracker, flatten, parent

# New-model variants by name: every registered method that trains a new model from scratch against
# the old one (fastfill, which needs a trained new model, is its own stage), and the ablations
# (each is just a method config).
VARIANTS: dict[str, dict[str, Any]] = {
    name: {"name": name} for name, cls in METHODS.items() if not cls.needs_new_model
} | {
    "dmu-no-selection": {"name": "dmu", "selective": False},
    "dmu-no-adaptation": {"name": "dmu", "adapt": False},
    "unibct-plain": {"name": "unibct", "refinement": "none"},
    "unibct-vote": {"name": "unibct", "refinement": "vote"},
}
Variant = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]


class LifecycleConfig(StrictModel):
    """Defaults finish in under 10 minutes on 2 CPU cores."""

    root: str = Field(default="out/demo", description="where everything goes (local or s3://)")
    dataset: Literal["glyphs", "digits", "fonts"] = "glyphs"
    image_size: int = 32
    split: Literal["extended-class", "extended-data", "open-class", "open-data"] = "extended-class"
    old_fraction: float = Field(default=0.3, gt=0, lt=1)
    methods: list[Variant] = Field(
        default_factory=lambda: ["bct", "dmu"],
        description="new-model variants (see VARIANTS); default BCT and DMU side by side",
    )
    backbone: Literal["small", "resnet18", "resnet34", "resnet50"] = "small"
    new_backbone: Literal["small", "resnet18", "resnet34", "resnet50"] | None = Field(
        default=None, description="the new models' backbone (an architecture upgrade); None: the old one's"
    )
    dim: int = 128
    epochs_old: int = 6
    epochs_new: int = 6
    batch_size: int = 64
    lr: float = 0.1
    workers: int = 2
    cpus_per_worker: float = 0.5
    upgrade_width: int = 256
    seed: int = 0
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="MLflow: default store <root>/mlflow.db, every stage a child run",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train_cfg(lc: LifecycleConfig, name: str, role: str, method: dict[str, Any], epochs: int) -> TrainConfig:
    return TrainConfig(
        name=name,
        storage_path=f"{lc.root}/runs",
        data={
            "uri": f"{lc.root}/data/{lc.dataset}",
            "split": lc.split,
            "role": role,
            "old_fraction": lc.old_fraction,
            "split_seed": lc.seed,
        },
        model={"backbone": lc.backbone if role == "old" else (lc.new_backbone or lc.backbone), "dim": lc.dim},
        method=method,
        optim={"epochs": epochs, "batch_size": lc.batch_size, "lr": lc.lr, "warmup_epochs": 1},
        scaling={"num_workers": lc.workers, "cpus_per_worker": lc.cpus_per_worker},
        seed=lc.seed,
        tracking=lc.tracking,
        storage=lc.storage,
    )


def variant_method(lc: LifecycleConfig, variant: str, old_model: str) -> dict[str, Any]:
    """The method section of a new-model variant: the old model where the method needs one, and
    the demo's upgrade-module width where the method trains one."""
    m: dict[str, Any] = dict(VARIANTS[variant])
    cls = METHODS[m["name"]]
    if cls.needs_old_model:
        m["old_model"] = old_model
    if "upgrade_width" in cls.model_fields:
        m["upgrade_width"] = lc.upgrade_width
    return m


def run_lifecycle(lc: LifecycleConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage; returns the evaluation results per method."""
    from dmu_ray.ray_session import ensure_ray

    say = _say if progress else (lambda _m: None)
    root = resolve(lc.root, lc.storage)
    tracker = Tracker.open(lc.tracking, root, say=say)  # a bad tracking.uri fails before any work
    # every stage logs into the demo's store, as a child of its run (or, when off, says nothing again)
    stages_tracking = {"uri": tracker.uri} if tracker is not None else {"enabled": False}
    lc = lc.model_copy(update={"tracking": lc.tracking.model_copy(update=stages_tracking)})
    ensure_ray()
    run = None
    if tracker is not None:
        run = tracker.start(
            f"demo s{lc.seed}",
            key=f"{root.uri}#demo-s{lc.seed}",
            tags={"dmu.kind": "demo", "dmu.root": lc.root},
        )
        run.params(flatten(lc.model_dump(mode="json", exclude={"storage", "tracking"})))
    try:
        with parent(run):
            summary = _stages(lc, root, progress, run)
    except BaseException:
        if run is not None:
            run.finish(False)
        raise
    if run is not None:
        run.finish(True)
    return summary


def _stages(lc: LifecycleConfig, root: Any, progress: bool, run: Any) -> dict[str, Any]:
    """The stages of :func:`run_lifecycle`, in order (each one reused when already done)."""
    from dmu_ray.data.importers import IMPORTERS
    from dmu_ray.evaluate.embed import embed_to_gallery
    from dmu_ray.evaluate.job import run_evaluation
    from dmu_ray.gallery import read_manifest
    from dmu_ray.refresh import run_refresh
    from dmu_ray.train.job import run_training

    say = _say if progress else (lambda _m: None)
    t_start = time.perf_counter()
    steps = 5 + len(lc.methods)
    step = iter(range(1, steps + 1))

    def stage(msg: str) -> None:
        say(f"\n[{next(step)}/{steps}] {msg}  ({time.perf_counter() - t_start:.0f}s)")

    data_uri = f"{lc.root}/data/{lc.dataset}"
    stage(f"data: {lc.dataset} -> {data_uri}")
    if not resolve(data_uri, lc.storage).join("_dataset.json").exists():
        info = IMPORTERS[lc.dataset](data_uri, image_size=lc.image_size, seed=lc.seed, storage=lc.storage)
        say(f"  {info.num_classes} classes, rows {info.rows}")
    else:
        say("  already there")

    old_name = f"old-s{lc.seed}"
    stage(
        f"old model: {lc.backbone}, {lc.split} split, {lc.old_fraction:.0%} old side, {lc.epochs_old} epochs"
    )
    old = run_training(
        _train_cfg(lc, old_name, "old", {"name": "independent"}, lc.epochs_old), progress=progress
    )

    new: dict[str, dict[str, Any]] = {}
    for method in lc.methods:
        stage(f"new model: {method}, {lc.epochs_new} epochs")
        m = variant_method(lc, method, old["model"])
        new[method] = run_training(
            _train_cfg(lc, f"{method}-s{lc.seed}", "new", m, lc.epochs_new), progress=progress
        )

    old_gallery = f"{lc.root}/galleries/{old_name}"
    stage(f"embed the gallery with the old model -> {old_gallery}")
    if read_manifest(resolve(old_gallery, lc.storage)) is None:
        embed_to_gallery(f"{data_uri}/gallery", old["model"], old_gallery, storage=lc.storage, overwrite=True)
    else:
        say("  already committed")

    refreshed: dict[str, str] = {}
    stage("refresh the old gallery with the upgrade module (Ray Data)")
    for method, out in new.items():
        if "upgrade_module" not in out:
            continue
        dest = f"{lc.root}/galleries/{old_name}-upgraded-by-{method}-s{lc.seed}"
        res = run_refresh(
            RefreshConfig(
                source=old_gallery,
                output=dest,
                module=out["upgrade_module"],
                dtype="float16",
                pool=ActorPoolConfig(min_actors=1, max_actors=2),
                storage=lc.storage,
            ),
            progress=progress,
        )
        say("  " + res.summary())
        refreshed[method] = dest

    stage("evaluate every pairing (faiss), every new model in one run")
    new_models: dict[str, dict[str, Any]] = {}
    for method, out in new.items():
        spec: dict[str, Any] = {"model": out["model"]}
        if method in refreshed:
            spec["galleries"] = {"upgraded": refreshed[method]}
        new_models[method] = spec
    cfg = EvaluateConfig(
        data=data_uri,
        old_model=old["model"],
        new_models=new_models,
        independent_model=new["independent"]["model"] if "independent" in new else None,
        galleries={"old": old_gallery},
        output=f"{lc.root}/eval/matrix-s{lc.seed}",
        title=f"{', '.join(new)} vs old ({lc.dataset}, {lc.split} {lc.old_fraction:.0%})",
        tracking=lc.tracking,
        storage=lc.storage,
    )
    evaluated = run_evaluation(cfg, progress=progress)
    results: dict[str, Any] = evaluated["models"]
    from dmu_ray.evaluate.verdict import verdict, verdict_markdown
    from dmu_ray.storage import write_bytes_atomic

    summary: dict[str, Any] = {
        m: {"pairings": r["pairings"], "headline": r["headline"], "files": evaluated["files"]}
        for m, r in results.items()
    }
    summary["verdict"] = verdict(results)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    files = {
        f"lifecycle-s{lc.seed}.json": json.dumps(summary, indent=2).encode(),
        f"lifecycle-s{lc.seed}.md": verdict_markdown(results, summary["verdict"]).encode(),
    }
    for name, data in files.items():
        write_bytes_atomic(root.join("eval", name), data)
    if run is not None:
        headlines = {f"{m}/{k}": v for m, r in results.items() for k, v in r["headline"].items()}
        run.metrics(headlines | {"seconds": summary["seconds"]})
        run.files(files)
    return summary
