"""Every cluster definition parses, has what its tool requires, and names entrypoints that exist."""

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from dmu_ray.config import load_config, load_evaluate_config
from dmu_ray.submit import JOBS

ROOT = Path(__file__).resolve().parents[1]
CONFIG_CLASSES = {job: cls for job, (_, cls) in JOBS.items() if cls is not None}


def test_aws_launcher_config_matches_rays_schema():
    cfg = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the schema `ray up` itself checks against
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] <= t["max_workers"] for t in gpu)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu)
    assert "AccessKey" not in json.dumps(cfg) and "aws_secret" not in json.dumps(cfg).lower()


def kuberay_docs():
    for p in sorted((ROOT / "cluster/kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            yield p.name, doc


def check_cluster_spec(name, spec):
    assert spec["enableInTreeAutoscaling"] is True, name
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"], name
    groups = spec["workerGroupSpecs"]
    assert any(
        "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups
    ), name
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, g["groupName"])
    assert spec["rayVersion"] == ray.__version__, f"{name}: rayVersion differs from the pinned ray"


@pytest.mark.parametrize("name, doc", list(kuberay_docs()), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_manifests(name, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        check_cluster_spec(name, doc["spec"])
    else:
        assert doc["kind"] == "RayJob"
        check_cluster_spec(name, doc["spec"]["rayClusterSpec"])
        m = re.fullmatch(r"python (jobs/\S+\.py) --config (\S+)", doc["spec"]["entrypoint"])
        assert m, doc["spec"]["entrypoint"]
        script, config = m.groups()
        assert (ROOT / script).exists(), script
        job = next(j for j, (s, _) in JOBS.items() if s == script)
        load_config(CONFIG_CLASSES[job], ROOT / config)  # the config it names validates


def test_job_entrypoints_and_example_configs():
    for script, _cls in JOBS.values():
        assert (ROOT / script).exists(), script
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        kind = p.name.split("_")[0]
        load_evaluate_config(p) if kind == "evaluate" else load_config(CONFIG_CLASSES[kind], p)
    for p in (ROOT / "jobs").glob("*.py"):
        assert "dmu_ray.cli import main" in p.read_text() and len(p.read_text().splitlines()) < 20, p
    assert os.access(ROOT / ".ci/run", os.R_OK)


def test_dockerfile_matches_the_pinned_ray_and_the_manifests():
    """The image the KubeRay manifests run is built by the repository's Dockerfile, on Ray's own
    GPU image of the pinned Ray, and every manifest's rayVersion is that Ray (issue 17)."""
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(
        re.fullmatch(r"ray\[.*\]==(.+)", d).group(1) for d in pins["dependencies"] if d.startswith("ray[")
    )
    assert ray.__version__ == ray_pin  # what the tests run is what the image carries
    base = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-gpu", base)
    assert m, f"Dockerfile base {base!r} is not one of Ray's GPU images"
    assert m["ray"] == ray_pin
    py = (int(m["py"]), int(m["minor"]))
    assert py >= tuple(int(x) for x in pins["requires-python"].lstrip(">=").split("."))
    images, versions = set(), set()
    for _, doc in kuberay_docs():
        text = json.dumps(doc)
        versions |= set(re.findall(r'"rayVersion": "([^"]+)"', text))
        images |= set(re.findall(r'"image": "([^"]+)"', text))
    assert versions == {ray_pin}
    assert images == {f"my-registry/dmu-ray:{pins['version']}"}
    cluster_md = (ROOT / "docs/cluster.md").read_text()
    assert f"docker build -t my-registry/dmu-ray:{pins['version']} ." in cluster_md
