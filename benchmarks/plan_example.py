"""The plan of docs/plan.md: bench this machine for a 512-d upgrade, then plan a 1B x 512 float16
gallery.

Builds, under --root: the glyph images at 64 px, a torchvision ResNet-18 artefact (512-d; weights
written by this script: throughput does not depend on their values), a 512-d float16 gallery of
--rows random unit vectors in 2 files, a 512 -> 512 upgrade module (width 1024) and a 512-d
query-side linear adapter; then runs ``dmu-ray bench`` (2 CPU workers of 1 CPU each) and
``dmu-ray plan`` for --plan-rows rows on --workers workers at the given prices. No quality
evidence exists for these stand-in artefacts, so the plan says which command measures it.

    python benchmarks/plan_example.py --root out/plan-example
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml


def sh(*args: str) -> None:
    print("+ dmu-ray " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dmu_ray.cli", *args], check=True)


def _grey_module():
    import torch

    class Grey(torch.nn.Module):
        """Grey images to the three channels the network takes."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.expand(-1, 3, -1, -1)

    return Grey()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="out/plan-example")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the benched gallery")
    p.add_argument("--plan-rows", type=int, default=1_000_000_000)
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--cpu-price", type=float, default=0.05, help="per CPU worker-hour (an example price)")
    p.add_argument(
        "--queries", type=int, default=1_000_000_000, help="queries mapped over the plan's horizon"
    )
    a = p.parse_args()
    import torch
    import torchvision

    from dmu_ray.models.artifact import save_upgrade_module
    from dmu_ray.models.linear_map import LinearMap
    from dmu_ray.models.upgrade import UpgradeModule

    root = Path(a.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "glyphs/_dataset.json").exists():
        sh("data", "import", "glyphs", str(root / "glyphs"), "--image-size", "64")
    if not (root / "r18.pt").exists():  # a deployed 512-d model on grey images, as TorchScript
        net = torchvision.models.resnet18()
        net.fc = torch.nn.Identity()
        grey = torch.nn.Sequential(_grey_module(), net).eval()
        torch.jit.save(torch.jit.trace(grey, torch.zeros(2, 1, 64, 64)), str(root / "r18.torchscript"))
        sh(
            "model",
            "import",
            str(root / "r18.torchscript"),
            str(root / "r18.pt"),
            "--id",
            "r18",
            "--size",
            "64",
            "--channels",
            "1",
            "--mean",
            "0.5",
            "--std",
            "0.5",
        )
    if not (root / "gallery/_manifest.json").exists():
        rng = np.random.default_rng(0)
        v = rng.standard_normal((a.rows, 512)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        np.save(root / "v.npy", v)
        sh(
            "gallery",
            "import",
            str(root / "v.npy"),
            str(root / "gallery"),
            "--model-id",
            "old-512",
            "--dtype",
            "float16",
            "--rows-per-file",
            str(-(-a.rows // 2)),
        )
    torch.manual_seed(0)
    save_upgrade_module(str(root / "psi.pt"), UpgradeModule(512, 512, 1024), {"id": "psi-512"})
    eye = LinearMap.from_arrays(np.eye(512, dtype=np.float32), np.zeros(512, np.float32))
    save_upgrade_module(str(root / "qa.pt"), eye, {"id": "qa-512", "form": "linear", "direction": "query"})
    bench = {
        "kind": "bench",
        "output": str(root / "bench"),
        "workers": {"count": 2, "num_cpus": 1},
        "embed": {"model": str(root / "r18.pt"), "images": str(root / "glyphs/gallery"), "sample": 256},
        "refresh": {"module": str(root / "psi.pt"), "gallery": str(root / "gallery"), "rows": a.rows},
        "query": {"adapter": str(root / "qa.pt")},
        "train": {
            "model": str(root / "r18.pt"),
            "images": str(root / "glyphs/train"),
            "batch_size": 64,
            "steps": 5,
        },
    }
    (root / "bench.yaml").write_text(yaml.safe_dump(bench))
    if not (root / "bench/bench.json").exists():
        sh("bench", "--config", str(root / "bench.yaml"))
    plan = {
        "kind": "plan",
        "bench": str(root / "bench"),
        "gallery": {"rows": a.plan_rows, "dim": 512, "dtype": "float16"},
        "prices": {"cpu_worker_hour": a.cpu_price},
        "cluster": {"workers": a.workers},
        "queries": a.queries,
        "floor": 0.9,
        "output": str(root / "plan"),
    }
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    sh("plan", "--config", str(root / "plan.yaml"))


if __name__ == "__main__":
    main()
