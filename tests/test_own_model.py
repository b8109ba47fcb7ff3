"""docs/own-model.md, run as written (issue 12): a TorchScript model, an image folder, an image
table and old vectors on (loopback) S3 -> model import, data import, gallery import, DMU training
with an old classifier built from prototypes, refresh, evaluate, backfill from the table. Every
command and config of the page is taken from the page itself; only the bucket differs. The
commands join one cluster started once with `ray start --head`, as the page says they can."""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_multinode import LocalCluster
from torch import nn

from dmu_ray.data.images import DecodeBatch
from dmu_ray.evaluate.matrix import MetricsConfig, evaluate_pairing

DOC = Path(__file__).parent.parent / "docs" / "own-model.md"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = ("anchor", "bell", "crown", "drum")


class Deployed(nn.Module):
    """The 'production' model: RGB in, 32-d embeddings out, no classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def doc_blocks() -> tuple[dict[str, str], list[str]]:
    """The page's configs (yaml blocks whose first line is ``# NAME.yaml``) and its commands."""
    text = DOC.read_text()
    configs, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S):
        if lang == "yaml":
            name = body.splitlines()[0].removeprefix("# ").strip()
            configs[name] = body
        elif lang == "bash":
            commands += [ln for ln in body.splitlines() if ln.startswith("dmu-ray ")]
    return configs, commands


def png(rng, label: int) -> bytes:
    """A 36 x 28 image whose class shows in its colour balance, with noise."""
    base = np.zeros((28, 36, 3), np.float32)
    base[..., label % 3] = 160
    base[:, : 9 * (label + 1)] += 60
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG" if rng.random() < 0.5 else "PNG")
    return buf.getvalue()


def embed(net, blobs: list[bytes]) -> np.ndarray:
    """What production computed: the model on the images prepared as its card says."""
    t = pa.table({"id": list(range(len(blobs))), "image": blobs, "label": [0] * len(blobs)})
    x = DecodeBatch(32, 3, mean=MEAN, std=STD)(t)["image"]
    with torch.no_grad():
        return nn.functional.normalize(net(torch.from_numpy(x)), dim=1).numpy()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_own_model_walkthrough_runs_as_written(s3, tmp_path):
    configs, commands = doc_blocks()
    assert set(configs) == {"train.yaml", "refresh.yaml", "evaluate.yaml", "backfill.yaml"}
    assert len(commands) == 11
    c, bucket = s3.client(), s3.bucket
    root = f"{uuid.uuid4().hex[:8]}"
    put = lambda key, body: c.put_object(Bucket=bucket, Key=f"{root}/{key}", Body=body)  # noqa: E731
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = Deployed().eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    put("deployed/prod-v1.torchscript", buf.getvalue())
    for label, name in enumerate(CLASSES):
        for i in range(20):
            put(f"photos/{name}/{i}.jpg", png(rng, label))
    put("photos/drum/broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    rows, gallery, queries = ["id,uri,label,part"], {}, {}
    for label, name in enumerate(CLASSES):
        for i in range(9):
            id_ = 7000 + 10 * label + i
            blob = png(rng, label)
            uri = f"imgs/{id_}.png" if i % 2 else f"s3://{bucket}/{root}/eval/imgs/{id_}.png"
            put(f"eval/imgs/{id_}.png", blob)
            part = "query" if i < 3 else "gallery"
            rows.append(f"{id_},{uri},{name},{part}")
            (queries if part == "query" else gallery)[id_] = (label, blob)
    put("eval/images.csv", "\n".join(rows).encode())
    g_ids = sorted(gallery)
    old_vecs = embed(net, [gallery[i][1] for i in g_ids])
    out = io.BytesIO()
    pq.write_table(
        pa.table(
            {
                "image_id": pa.array(g_ids, pa.int64()),
                "vector": pa.array(list(old_vecs), pa.list_(pa.float32())),
            }
        ),
        out,
    )
    put("old-vectors/part-0.parquet", out.getvalue())

    prefix = f"s3://{bucket}/{root}"
    for name, body in configs.items():
        (tmp_path / name).write_text(body.replace("s3://acme", prefix))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "DMU_RAY_HOME": str(tmp_path / "home"),
        "RAY_AUTH_MODE": "disabled",  # a loopback cluster: no token to hand around (test_multinode)
    }
    exe = shutil.which("dmu-ray")
    assert exe, "the dmu-ray console script is not installed (pip install -e '.[dev]')"
    # the page's way to skip a cluster start per command: `ray start --head` once, with the same
    # environment, and every command joins it through $RAY_ADDRESS
    cluster = LocalCluster(f"/tmp/dmu-own-{uuid.uuid4().hex[:8]}", cwd=str(tmp_path))
    cluster.env.update(env)
    printed = {}
    try:
        cluster.start_head(cpus=2)
        env["RAY_ADDRESS"] = f"127.0.0.1:{cluster.port}"
        for cmd in commands:
            args = shlex.split(cmd.replace("s3://acme", prefix))
            r = subprocess.run(
                [exe, *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
            )
            assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
            printed[" ".join(args[1:4])] = r.stdout
            printed["stderr " + args[1]] = r.stderr
    finally:
        cluster.stop()
    assert "32-d embeddings" in printed["model import " + prefix + "/deployed/prod-v1.torchscript"]
    assert "4 classes" in printed["data import folder"] and "quarantined 1" in printed["data import folder"]
    assert "rows {'train': 0, 'query': 12, 'gallery': 24}, quarantined 0" in printed["data import table"]
    # the runs on S3 were tracked in the embedded store on this machine, and the command said where
    assert (tmp_path / "home" / "mlflow" / "mlflow.db").exists()
    assert "runs are recorded on this machine in" in printed["stderr train"]
    keys = s3.keys(f"{root}/dmu/")
    assert f"{root}/dmu/runs/dmu-v2/old_classifier.pt" in keys
    assert f"{root}/dmu/data/train/_quarantine.parquet" in keys
    report = json.loads(c.get_object(Bucket=bucket, Key=f"{root}/dmu/eval/dmu-v2/eval.json")["Body"].read())
    assert {"old/old", "new/old", "new/upgraded", "new/new"} <= set(report["pairings"])
    # old/old is the production system: the same number from the vectors and queries computed here
    q_ids = sorted(queries)
    q = embed(net, [queries[i][1] for i in q_ids])
    want = evaluate_pairing(
        "old/old",
        q,
        np.array([queries[i][0] for i in q_ids]),
        old_vecs,
        np.array([gallery[i][0] for i in g_ids]),
        MetricsConfig(tar_fars=[]),
    )
    assert report["pairings"]["old/old"]["mAP@100"] == pytest.approx(want["mAP@100"], abs=1e-3)
    mixed = json.loads(
        c.get_object(Bucket=bucket, Key=f"{root}/dmu/galleries/mixed/_manifest.json")["Body"].read()
    )
    assert mixed["extra"]["backfill"]["rows_new"] == round(0.2 * len(g_ids))
