"""Method fidelity at a scale where the methods' effects can show (issue 13), on the many-class
font set (``dmu-ray data import fonts``: Hangul syllables plus Latin/Greek/Cyrillic letters in
every installed typeface, held-out typefaces for query/gallery).

    sudo apt-get install -y $(python -c "from dmu_ray.data.importers import FONT_PACKAGES; print(FONT_PACKAGES)")
    python benchmarks/fidelity.py --root out/fidelity                  # every protocol, seeds 0 1 2
    python benchmarks/fidelity.py --protocols extended-data --seeds 0 --epochs-old 2 --epochs-new 2 \\
        --hangul 100 --root out/fidelity-smoke                          # a quick look

Protocols (one lifecycle each, per seed, under ``<root>/<protocol>``):

- ``extended-data``: the old model sees 30% of the images of every class (so the old classifier
  knows every class and DMU's discriminativeness is meaningful), the new model all of them;
- ``extended-class``: the old model sees 30% of the classes;
- ``architecture``: extended-data with the old model ``small`` and the new ones ``resnet18``;
- ``open-class``: UniBCT (graph refinement) against plain prototypes and BCT's extension.

For every protocol with a DMU run, the FastFill transformation is trained towards the independent
new model and the backfill curve drawn for uncertainty, random and oracle order. Prints Markdown
tables (mean +- std over seeds) of every pairing, BCT's new/new degradation against independent
and DMU's share of it, and the curve areas; writes the raw numbers to ``<root>/fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dmu_ray.lifecycle import LifecycleConfig, run_lifecycle

PAIRINGS = ["old/old", "new/old", "new/upgraded", "new/new"]
PROTOCOLS = {
    "extended-data": {
        "split": "extended-data",
        "methods": ["independent", "bct", "dmu", "dmu-no-selection", "dmu-no-adaptation"],
    },
    "extended-class": {
        "split": "extended-class",
        "methods": ["independent", "bct", "dmu", "dmu-no-selection", "dmu-no-adaptation"],
    },
    "architecture": {
        "split": "extended-data",
        "new_backbone": "resnet18",
        "methods": ["independent", "bct", "dmu", "dmu-no-selection", "dmu-no-adaptation"],
    },
    "open-class": {
        "split": "open-class",
        "methods": ["independent", "bct", "unibct", "unibct-plain", "unibct-vote"],
    },
}


def fastfill_curve(root: str, seed: int, lc: LifecycleConfig, epochs: int) -> dict[str, Any]:
    """Train FastFill's transformation towards the independent new model, then its backfill
    curve over the old gallery (uncertainty, random, oracle)."""
    from dmu_ray.config import BackfillConfig, TrainConfig
    from dmu_ray.evaluate.backfill_curve import backfill_curve
    from dmu_ray.train.job import run_training

    data = f"{root}/data/{lc.dataset}"
    new = f"{root}/runs/independent-s{seed}/export/model.pt"
    ff = run_training(
        TrainConfig(
            name=f"fastfill-s{seed}",
            storage_path=f"{root}/runs",
            data={
                "uri": data,
                "split": lc.split,
                "role": "new",
                "old_fraction": lc.old_fraction,
                "split_seed": seed,
            },
            model={"backbone": lc.new_backbone or lc.backbone, "dim": lc.dim},
            method={
                "name": "fastfill",
                "old_model": f"{root}/runs/old-s{seed}/export/model.pt",
                "new_model": new,
                "upgrade_width": lc.upgrade_width,
            },
            optim={"epochs": epochs, "batch_size": lc.batch_size, "lr": lc.lr, "warmup_epochs": 1},
            scaling={"num_workers": lc.workers, "cpus_per_worker": lc.cpus_per_worker},
            seed=seed,
        )
    )
    return backfill_curve(
        BackfillConfig(
            source=f"{root}/galleries/old-s{seed}",
            images=f"{data}/gallery",
            module=ff["upgrade_module"],
            new_model=new,
            output=f"{root}/galleries/unused-mixed-s{seed}",
            curve={
                "queries": f"{data}/query",
                "policies": ["uncertainty", "random", "oracle"],
                "output": f"{root}/eval/backfill-curve-s{seed}",
            },
        )
    )


D_KEYS = ("constrained", "old_d", "d_q10", "d_q50", "d_q90", "d_near0", "d_near1", "w_max")


def add_d_stats(out: dict[str, Any], root: str) -> None:
    """DMU's discriminativeness over the new training images in its last epoch, from the run
    card's history (the lifecycle summary lacks it), for every protocol and seed without it."""
    from dmu_ray.models.artifact import load_artifact

    for name, by_seed in out.items():
        for seed, res in by_seed.items():
            model = Path(root) / name / "runs" / f"dmu-s{seed}" / "export" / "model.pt"
            if "dmu" in res and "dmu_d" not in res and model.exists():
                last = load_artifact(str(model)).card.history[-1]
                res["dmu_d"] = {k: last[k] for k in D_KEYS if k in last}


def mean_std(vals: list[float]) -> str:
    return f"{np.mean(vals):.2f} +- {np.std(vals):.2f}" if vals else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="out/fidelity")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hangul", type=int, default=1000, help="Hangul syllable classes (plus ~170 letters)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs-old", type=int, default=12)
    ap.add_argument("--epochs-new", type=int, default=12)
    ap.add_argument("--methods", nargs="+", help="only these variants (default: each protocol's list)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--report", action="store_true", help="only print the tables of <root>/fidelity.json")
    args = ap.parse_args()

    # Results accumulate: each run adds its protocols and seeds to what earlier runs measured.
    path = Path(args.root) / "fidelity.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        add_d_stats(out, args.root)
        report(out)
        return

    from dmu_ray.data.importers import import_fonts
    from dmu_ray.storage import resolve

    for name in args.protocols:
        proto = PROTOCOLS[name]
        root = f"{args.root}/{name}"
        data = f"{root}/data/fonts"
        if not resolve(data).join("_dataset.json").exists():
            info = import_fonts(data, hangul=args.hangul, image_size=args.image_size, seed=0)
            print(f"{name}: {info.num_classes} classes, rows {info.rows}", flush=True)
        out.setdefault(name, {})
        for seed in args.seeds:
            lc = LifecycleConfig(
                root=root,
                dataset="fonts",
                image_size=args.image_size,
                split=proto["split"],
                methods=[m for m in proto["methods"] if not args.methods or m in args.methods],
                new_backbone=proto.get("new_backbone"),
                epochs_old=args.epochs_old,
                epochs_new=args.epochs_new,
                workers=args.workers,
                cpus_per_worker=args.cpus_per_worker,
                seed=seed,
            )
            res = run_lifecycle(lc, progress=True)
            if "dmu" in lc.methods and "independent" in lc.methods:
                curve = fastfill_curve(root, seed, lc, args.epochs_new)
                keep = ("area", "uncertainty_error_spearman", "fractions", "curves")
                res["fastfill"] = {k: curve[k] for k in keep}
            out[name][str(seed)] = res
            add_d_stats(out, args.root)
            path.write_text(json.dumps(out, indent=2))
    report(out)


def report(out: dict[str, Any]) -> None:
    for name, by_seed in out.items():
        seeds = sorted(by_seed, key=int)
        methods = [m for m in PROTOCOLS[name]["methods"] if any(m in by_seed[s] for s in seeds)]
        print(f"\n### {name}: mAP@100 (%), mean +- std over seeds {', '.join(seeds)}\n")
        print("| method | seeds | " + " | ".join(PAIRINGS) + " |")
        print("| --- | --- |" + " ---: |" * len(PAIRINGS))
        for m in methods:
            have = [s for s in seeds if m in by_seed[s]]
            cells = [
                mean_std(
                    [
                        100 * by_seed[s][m]["pairings"][p]["mAP@100"]
                        for s in have
                        if p in by_seed[s][m]["pairings"]
                    ]
                )
                for p in PAIRINGS
            ]
            print(f"| {m} | {', '.join(have)} | " + " | ".join(cells) + " |")
        print("\nPer seed, new/old and new/new (mAP@100, %):\n")
        print("| method | " + " | ".join(f"seed {s} new/old | seed {s} new/new" for s in seeds) + " |")
        print("| --- |" + " ---: |" * (2 * len(seeds)))
        for m in methods:
            cells = [
                f"{100 * by_seed[s][m]['pairings'][p]['mAP@100']:.2f}" if m in by_seed[s] else "-"
                for s in seeds
                for p in ("new/old", "new/new")
            ]
            print(f"| {m} | " + " | ".join(cells) + " |")
        both = [s for s in seeds if {"independent", "bct", "dmu"} <= set(by_seed[s])]
        if both:
            nn = {
                m: [100 * by_seed[s][m]["pairings"]["new/new"]["mAP@100"] for s in both]
                for m in ("independent", "bct", "dmu")
            }
            bct_loss = np.subtract(nn["independent"], nn["bct"])
            dmu_loss = np.subtract(nn["independent"], nn["dmu"])
            print(
                f"\nBCT's new/new degradation vs independent: {mean_std(list(bct_loss))}; "
                f"DMU's: {mean_std(list(dmu_loss))} (per seed BCT {np.round(bct_loss, 2).tolist()}, "
                f"DMU {np.round(dmu_loss, 2).tolist()})"
            )
        ff = [by_seed[s]["fastfill"] for s in seeds if "curves" in by_seed[s].get("fastfill", {})]
        if ff:
            fr = ff[0]["fractions"]
            print(
                f"\nFastFill backfill curve, mAP@100 (%) of new queries vs the mixed gallery, mean over {len(ff)} seed(s)\n"
            )
            print("| order | " + " | ".join(f"{100 * f:.0f}%" for f in fr) + " |")
            print("| --- |" + " ---: |" * len(fr))
            for pol in ff[0]["curves"]:
                vals = np.mean([x["curves"][pol] for x in ff], axis=0)
                print(f"| {pol} | " + " | ".join(f"{100 * v:.2f}" for v in vals) + " |")
            print()
            for pol in ff[0]["curves"]:
                areas = [100 * x["area"][pol] for x in ff]
                print(
                    f"FastFill curve area, {pol}: {mean_std(areas)} (per seed {np.round(areas, 2).tolist()})"
                )
            rho = [x["uncertainty_error_spearman"] for x in ff]
            print(f"rank correlation of uncertainty with realised error: {np.round(rho, 3).tolist()}")
        d = [by_seed[s]["dmu_d"] for s in seeds if "dmu_d" in by_seed[s]]
        if d:
            print(
                "DMU's d in its last epoch (mean over seeds): "
                + ", ".join(f"{k} {np.mean([x[k] for x in d]):.3f}" for k in D_KEYS if k in d[0])
            )


if __name__ == "__main__":
    main()
