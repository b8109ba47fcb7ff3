"""The demo's last stage: bench this cluster with the demo's own models and gallery, then the plan
for a stated gallery size (docs/plan.md, "The demo's plan")."""

from __future__ import annotations

from typing import Any

from dmu_ray.plan.config import PlanPrices
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import resolve

__all__ = ["demo_plan"]


def demo_plan(
    *,
    root: str,
    seed: int,
    data_uri: str,
    old_model: str,
    new: dict[str, dict[str, Any]],
    old_gallery: str,
    eval_json: str,
    rows: int,
    workers: int,
    prices: PlanPrices,
    floor: float,
    epochs: int,
    storage: StorageConfig,
    progress: bool,
) -> dict[str, Any]:
    """Bench (reused when its bench.json exists) and plan ``rows`` rows on ``workers`` such workers
    for the last new model with an upgrade module (DMU in the default demo), with the demo's
    evaluation ``eval_json`` as the evidence; returns the method, the plan's sentences and files."""
    from dmu_ray.data.images import read_dataset_info
    from dmu_ray.gallery import Gallery
    from dmu_ray.plan.bench import run_bench
    from dmu_ray.plan.config import BenchConfig, PlanConfig
    from dmu_ray.plan.job import run_plan

    with_psi = [m for m, out in new.items() if "upgrade_module" in out]
    method = with_psi[-1] if with_psi else list(new)[-1]
    chosen = new[method]
    bench_dir = f"{root}/plan/bench-{method}-s{seed}"
    if not resolve(bench_dir, storage).join("bench.json").is_file():
        run_bench(
            BenchConfig(
                output=bench_dir,
                workers={"count": 2, "num_cpus": 1},
                embed={"model": chosen["model"], "images": f"{data_uri}/gallery", "sample": 64},
                refresh={"module": chosen["upgrade_module"], "gallery": old_gallery} if with_psi else None,
                train={
                    "model": chosen["model"],
                    "old_model": old_model,
                    "images": f"{data_uri}/train",
                    "steps": 5,
                },
                repeats=2,
                storage=storage,
            ),
            progress=progress,
        )
    info = read_dataset_info(data_uri, storage)
    plan = run_plan(
        PlanConfig(
            bench=bench_dir,
            gallery={"rows": rows, "dim": Gallery.open(old_gallery, storage).model.dim},
            prices=prices,
            cluster={"workers": workers},
            training={"images": info.rows.get("train", 1) or 1, "epochs": epochs},
            evidence={"eval": eval_json, "eval_model": method},
            floor=floor,
            output=f"{root}/plan/plan-{method}-s{seed}",
            storage=storage,
        )
    )
    return {"method": method, "sentences": plan["sentences"], "files": plan["files"]}
