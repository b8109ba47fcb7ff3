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

from pydantic import Field, model_validator

from dmu_ray.evaluate.config import EvaluateConfig
from dmu_ray.methods.registry import METHODS
from dmu_ray.plan.config import PlanPrices
from dmu_ray.refresh.config import RefreshConfig
from dmu_ray.schema import StrictModel
from dmu_ray.settings import ActorPoolConfig, StorageConfig, TrackingConfig
from dmu_ray.storage import resolve
from dmu_ray.tracking import Tracker, flatten, parent
from dmu_ray.train.config import TrainConfig

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
    generations: int = Field(
        default=1,
        ge=1,
        le=8,
        description="1: old vs new models (the methods above); N > 1: a line of N generations, v1 on "
        "old_fraction of the classes, v_g on min(1, g x old_fraction), the last on all, each trained with "
        "generation_method against the one before; galleries refreshed along the chain; one matrix",
    )
    generation_method: Variant = Field(
        default="dmu", description="how generations after the first are trained against the one before"
    )
    plan_rows: int = Field(
        default=1_000_000_000,
        ge=0,
        description="the last stage benches this cluster and plans the upgrade of a gallery of this many "
        "rows (0: no plan stage)",
    )
    plan_workers: int = Field(
        default=100, gt=0, description="the stated cluster the plan spreads the work over"
    )
    plan_prices: PlanPrices = Field(
        default_factory=lambda: PlanPrices(cpu_worker_hour=0.05, gpu_worker_hour=2.5),
        description="example prices per worker-hour for the plan (yours are not known: set them)",
    )
    plan_floor: float = Field(
        default=0.9, gt=0, le=1, description="the plan's quality floor (share of re-embedding)"
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="MLflow: default store <root>/mlflow.db, every stage a child run",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _generations_fit(self) -> LifecycleConfig:
        if self.generations > 1 and not self.split.startswith("extended"):
            raise ValueError(
                f"generations: a line of generations grows its training data; split {self.split!r} gives "
                "the new model other data than the old one (use extended-class or extended-data)"
            )
        return self

    def generation_fractions(self) -> list[float]:
        """The share of the classes (or rows) each generation trains on: g x old_fraction, capped at
        1, and 1 for the last."""
        n = self.generations
        return [min(1.0, round(self.old_fraction * g, 6)) for g in range(1, n)] + [1.0]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _StageHeaders:
    """Numbered stage headers (``[i/steps] msg  (elapsed s)``) and the seconds since the first."""

    def __init__(self, say, steps: int) -> None:
        self.say, self.steps, self.t0 = say, steps, time.perf_counter()
        self._step = iter(range(1, steps + 1))

    def __call__(self, msg: str) -> None:
        self.say(f"\n[{next(self._step)}/{self.steps}] {msg}  ({self.elapsed():.0f}s)")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _train_cfg(
    lc: LifecycleConfig,
    name: str,
    role: str,
    method: dict[str, Any],
    epochs: int,
    fraction: float | None = None,
    backbone: str | None = None,
) -> TrainConfig:
    """A stage's training config; ``backbone`` defaults by ``role`` (the old model's, else the new
    models'), ``fraction`` to ``lc.old_fraction``."""
    return TrainConfig(
        name=name,
        storage_path=f"{lc.root}/runs",
        data={
            "uri": f"{lc.root}/data/{lc.dataset}",
            "split": lc.split,
            "role": role,
            "old_fraction": lc.old_fraction if fraction is None else fraction,
            "split_seed": lc.seed,
        },
        model={
            "backbone": backbone or (lc.backbone if role == "old" else (lc.new_backbone or lc.backbone)),
            "dim": lc.dim,
        },
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
            stages = _stages if lc.generations == 1 else _generation_stages
            summary = stages(lc, root, progress, run)
    except BaseException:
        if run is not None:
            run.finish(False)
        raise
    if run is not None:
        run.finish(True)
    return summary


def _import_data(lc: LifecycleConfig, data_uri: str, say) -> None:
    from dmu_ray.data.importers import IMPORTERS

    if not resolve(data_uri, lc.storage).join("_dataset.json").exists():
        info = IMPORTERS[lc.dataset](data_uri, image_size=lc.image_size, seed=lc.seed, storage=lc.storage)
        say(f"  {info.num_classes} classes, rows {info.rows}")
    else:
        say("  already there")


def _stages(lc: LifecycleConfig, root: Any, progress: bool, run: Any) -> dict[str, Any]:
    """The stages of :func:`run_lifecycle`, in order (each one reused when already done)."""
    from dmu_ray.evaluate.embed import embed_to_gallery
    from dmu_ray.evaluate.job import run_evaluation
    from dmu_ray.gallery import read_manifest
    from dmu_ray.refresh import run_refresh
    from dmu_ray.train.job import run_training

    say = _say if progress else (lambda _m: None)
    stage = _StageHeaders(say, 5 + len(lc.methods) + (lc.plan_rows > 0))
    data_uri = f"{lc.root}/data/{lc.dataset}"
    old_name = f"old-s{lc.seed}"
    old_gallery = f"{lc.root}/galleries/{old_name}"
    # the evaluation's config, checked first with the models' planned paths: an error stops the
    # run here, not after the import and every model's training
    evaluate_config(
        lc,
        data_uri,
        old_gallery,
        f"{lc.root}/runs/{old_name}/export/model.pt",
        {m: f"{lc.root}/runs/{m}-s{lc.seed}/export/model.pt" for m in lc.methods},
        {},
    )
    stage(f"data: {lc.dataset} -> {data_uri}")
    _import_data(lc, data_uri, say)

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
    cfg = evaluate_config(
        lc, data_uri, old_gallery, old["model"], {m: out["model"] for m, out in new.items()}, refreshed
    )
    evaluated = _reused_evaluation(cfg, say) or run_evaluation(cfg, progress=progress)
    results: dict[str, Any] = evaluated["models"]
    from dmu_ray.evaluate.verdict import verdict, verdict_markdown
    from dmu_ray.storage import write_bytes_atomic

    summary: dict[str, Any] = {
        m: {"pairings": r["pairings"], "headline": r["headline"], "files": evaluated["files"]}
        for m, r in results.items()
    }
    summary["verdict"] = verdict(results)
    if lc.plan_rows > 0:
        stage(f"plan: bench this cluster, then price every path for a {lc.plan_rows:,}-row gallery")
        from dmu_ray.plan.demo import demo_plan

        summary["plan"] = demo_plan(
            root=lc.root,
            seed=lc.seed,
            data_uri=data_uri,
            old_model=old["model"],
            new=new,
            old_gallery=old_gallery,
            eval_json=evaluated["files"]["json"],
            rows=lc.plan_rows,
            workers=lc.plan_workers,
            prices=lc.plan_prices,
            floor=lc.plan_floor,
            epochs=lc.epochs_new,
            storage=lc.storage,
            progress=progress,
        )
    summary["seconds"] = round(stage.elapsed(), 1)
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


def _reused_evaluation(cfg: EvaluateConfig, say) -> dict[str, Any] | None:
    """The evaluation already at ``cfg.output`` when its fingerprint is this one's (same config,
    artefacts, galleries and data), else None."""
    from dmu_ray.evaluate.fingerprint import fingerprint
    from dmu_ray.evaluate.job import check_inputs
    from dmu_ray.storage import read_bytes

    out = resolve(cfg.output, cfg.storage)
    try:
        prev = json.loads(read_bytes(out.join("eval.json")))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(prev, dict) or prev.get("fingerprint") != fingerprint(cfg, check_inputs(cfg)):
        return None
    say("  already evaluated (same config, models, galleries and data): " + out.join("eval.json").uri)
    return prev | {
        "files": {
            k: out.join(n).uri for k, n in (("json", "eval.json"), ("md", "eval.md"), ("png", "pairings.png"))
        }
    }


def evaluate_config(
    lc: LifecycleConfig,
    data: str,
    old_gallery: str,
    old_model: str,
    models: dict[str, str],
    refreshed: dict[str, str],
) -> EvaluateConfig:
    """The lifecycle's evaluation of ``data``: every new model (by variant name) against the old
    model and its gallery, each with the old gallery refreshed by its upgrade module where it has one."""
    new_models: dict[str, dict[str, Any]] = {}
    for method, model in models.items():
        spec: dict[str, Any] = {"model": model}
        if method in refreshed:
            spec["galleries"] = {"upgraded": refreshed[method]}
        new_models[method] = spec
    return EvaluateConfig(
        data=data,
        old_model=old_model,
        new_models=new_models,
        independent_model=models.get("independent"),
        galleries={"old": old_gallery},
        output=f"{lc.root}/eval/matrix-s{lc.seed}",
        title=f"{', '.join(models)} vs old ({lc.dataset}, {lc.split} {lc.old_fraction:.0%})",
        tracking=lc.tracking,
        storage=lc.storage,
    )


def _generation_stages(lc: LifecycleConfig, root: Any, progress: bool, run: Any) -> dict[str, Any]:
    """A line of generations (``lc.generations`` > 1): train v1 .. vN, each against the one before;
    embed the gallery with each; refresh each generation's gallery along the chain of upgrade
    modules to every later space (v1 -> v2 -> v3: a refresh of a refreshed gallery); evaluate every
    query model against every gallery state in one matrix with a heat map."""
    from dmu_ray.evaluate.config import GalleryStateSpec, MatrixConfig
    from dmu_ray.evaluate.embed import embed_to_gallery
    from dmu_ray.evaluate.generations import matrix_markdown, run_matrix
    from dmu_ray.gallery import read_manifest
    from dmu_ray.refresh import run_refresh
    from dmu_ray.storage import write_bytes_atomic
    from dmu_ray.train.job import run_training

    say = _say if progress else (lambda _m: None)
    n = lc.generations
    fractions = lc.generation_fractions()
    stage = _StageHeaders(say, 4 + n)
    data_uri = f"{lc.root}/data/{lc.dataset}"
    stage(f"data: {lc.dataset} -> {data_uri}")
    _import_data(lc, data_uri, say)

    gens: list[dict[str, Any]] = []
    for g, frac in enumerate(fractions, start=1):
        name = f"v{g}-s{lc.seed}"
        last = frac >= 1.0
        how = "independent" if g == 1 else f"{lc.generation_method} against v{g - 1}"
        stage(f"generation v{g}: {how}, {'all' if last else f'{frac:.0%} of the'} {lc.split.split('-')[1]}es")
        method = (
            {"name": "independent"} if g == 1 else variant_method(lc, lc.generation_method, gens[-1]["model"])
        )
        epochs, backbone = (lc.epochs_old, lc.backbone) if g == 1 else (lc.epochs_new, lc.new_backbone)
        role, fraction = ("new", None) if last else ("old", frac)  # the data side; "old" takes `fraction`
        cfg = _train_cfg(lc, name, role, method, epochs, fraction, backbone)
        gens.append(run_training(cfg, progress=progress))

    stage("embed the gallery with every generation")
    states: dict[str, str] = {}  # gallery state name -> committed prefix
    for g, out in enumerate(gens, start=1):
        prefix = f"{lc.root}/galleries/v{g}-s{lc.seed}"
        if read_manifest(resolve(prefix, lc.storage)) is None:
            embed_to_gallery(f"{data_uri}/gallery", out["model"], prefix, storage=lc.storage, overwrite=True)
        states[f"v{g}"] = prefix

    stage("refresh each generation's gallery along the chain of upgrade modules")
    pool = ActorPoolConfig(min_actors=1, max_actors=2)
    for g in range(1, n):
        name, prefix = f"v{g}", states[f"v{g}"]
        for h in range(g + 1, n + 1):
            psi = gens[h - 1].get("upgrade_module")
            if psi is None:
                say(f"  v{h} has no upgrade module ({lc.generation_method}): {name} stays in its space")
                break
            name = f"{name}>v{h}"
            dest = f"{lc.root}/galleries/{name.replace('>', '-to-')}-s{lc.seed}"
            res = run_refresh(
                RefreshConfig(source=prefix, output=dest, module=psi, pool=pool, storage=lc.storage),
                progress=progress,
            )
            say(f"  {name}: " + res.summary())
            states[name], prefix = dest, dest

    stage("evaluate every generation's queries against every gallery state (faiss)")
    # columns grouped by the space they end in: v1 | v1>v2, v2 | v1>v2>v3, v2>v3, v3 ...
    order = sorted(states, key=lambda s: (int(s.rsplit(">v", 1)[-1].lstrip("v")), -s.count(">")))
    mcfg = MatrixConfig(
        data=data_uri,
        query_models={f"v{g}": out["model"] for g, out in enumerate(gens, start=1)},
        gallery_states={s: GalleryStateSpec(gallery=states[s]) for s in order},
        output=f"{lc.root}/eval/generations-s{lc.seed}",
        title=f"{n} generations ({lc.dataset}, {lc.split}, {lc.generation_method})",
        tracking=lc.tracking,
        storage=lc.storage,
    )
    matrix = run_matrix(mcfg, progress=progress)
    summary = {
        "generations": n,
        "fractions": fractions,
        "method": lc.generation_method,
        "metric": matrix["metric"],
        "cells": {
            q: {g: r.get(matrix["metric"]) for g, r in row.items()} for q, row in matrix["cells"].items()
        },
        "lineage": matrix["lineage"],
        "files": matrix["files"],
        "seconds": round(stage.elapsed(), 1),
    }
    markdown = matrix_markdown(matrix)
    files = {
        f"generations-s{lc.seed}.json": json.dumps(summary, indent=2).encode(),
        f"generations-s{lc.seed}.md": markdown.encode(),
    }
    for fname, data in files.items():
        write_bytes_atomic(root.join("eval", fname), data)
    if run is not None:
        run.metrics(
            {f"{q}/{g}": v for q, row in summary["cells"].items() for g, v in row.items() if v is not None}
            | {"seconds": summary["seconds"]}
        )
        run.files(files)
    return summary | {"markdown": markdown}
