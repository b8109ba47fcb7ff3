"""An evaluation's fingerprint: a digest of everything its figures depend on."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dmu_ray.evaluate.config import EvaluateConfig
from dmu_ray.schema import comparable_dump
from dmu_ray.storage import read_bytes, resolve

__all__ = ["fingerprint"]


def fingerprint(cfg: EvaluateConfig, checked: dict[str, Any]) -> str:
    """A digest of what an evaluation's figures depend on: its config (less where it writes and how
    it runs), every artefact's sha256, each gallery's commit (URI, created_at, rows) and the data
    set's ``_dataset.json``. Equal digests give equal figures: the demo reuses an evaluation by it.
    ``checked``: :func:`~dmu_ray.evaluate.job.check_inputs`' result for ``cfg``."""
    arts = checked["arts"]
    shas = {"old": arts["old"].sha256, "independent": getattr(arts.get("independent"), "sha256", None)}
    shas["models"] = {
        n: {k: getattr(a, "sha256", None) for k, a in m.items()} for n, m in arts["models"].items()
    }
    galleries = {
        k: [g.loc.uri, g.manifest.created_at, g.manifest.rows]
        for k, g in sorted(checked["galleries"].items())
    }
    data = hashlib.sha256(read_bytes(resolve(cfg.data, cfg.storage).join("_dataset.json"))).hexdigest()
    conf = comparable_dump(cfg, exclude={"tracking", "storage", "pool", "ray_address", "output", "title"})
    blob = json.dumps([conf, shas, galleries, data], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
