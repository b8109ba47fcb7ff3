"""A fitted adapter as a TorchScript file a serving team can put behind its encoder: the artefact's
map, scripted, checked to give the artefact's outputs, written atomically."""

from __future__ import annotations

import io
import warnings

import torch

from dmu_ray.models.artifact import UPGRADE_MODULE, build_upgrade_module, load_artifact
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import resolve, write_bytes_atomic

__all__ = ["export_torchscript"]


def export_torchscript(uri: str, dest: str, storage: StorageConfig | None = None) -> dict:
    """Write the adapter (or upgrade module) at ``uri`` as TorchScript to ``dest``; returns its
    direction, dims and the sha256 of the file written. The file maps a batch ``(n, in_dim)`` to
    ``(n, out_dim)``; normalise its output as the search expects (dmu-ray normalises to unit length)."""
    art = load_artifact(uri, storage, kind=UPGRADE_MODULE)
    module = build_upgrade_module(art)
    module = module.fused_for_inference() if hasattr(module, "fused_for_inference") else module
    probe = torch.randn(4, art.card.in_dim)
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript with a FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module.eval())
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        again = torch.jit.load(io.BytesIO(buf.getvalue()))
    with torch.inference_mode():
        want, got = module(probe), again(probe)
    if not torch.allclose(want, got, atol=1e-5):  # pragma: no cover - scripting is exact for these
        raise ValueError(f"{uri}: the scripted adapter does not reproduce the artefact's outputs")
    sha = write_bytes_atomic(resolve(dest, storage), buf.getvalue())
    c = art.card
    return {
        "direction": c.direction,
        "in_dim": c.in_dim,
        "out_dim": c.out_dim,
        "sha256": sha,
        "of": art.ident,
    }
