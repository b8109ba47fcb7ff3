"""A fitted adapter for a serving team to put behind its encoder: the artefact's map as a TorchScript
file, or (a linear adapter) as its plain arrays in an ``.npz`` for any BLAS; either is checked to
give the artefact's outputs and written atomically.

The arrays are for the query side's latency: at batch 1 a torch call costs a few microseconds
before any arithmetic, so a rank-32 adapter at 1280-d takes ~13 us through torch and ~6 us as the
same two products in numpy on one CPU core (docs/benchmarks.md)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from dmu_ray.models.artifact import UPGRADE_MODULE, Artifact, build_upgrade_module, load_artifact
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import resolve, write_bytes_atomic

__all__ = ["export_arrays", "export_torchscript"]


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
    return _summary(art, write_bytes_atomic(resolve(dest, storage), buf.getvalue()))


def export_arrays(uri: str, dest: str, storage: StorageConfig | None = None) -> dict:
    """Write the linear adapter at ``uri`` as an uncompressed ``.npz`` to ``dest``: ``weight``
    (in_dim, out_dim) and ``bias`` (out_dim,), or for a reduced-rank map its factors ``left``
    (in_dim, rank) and ``right`` (rank, out_dim) with ``bias``; float32, plus ``direction`` and
    ``of`` (the artefact's id) as strings. A row ``x`` maps to ``x @ weight + bias`` (``x @ left @
    right + bias``); normalise it as the search expects. Refuses a module that is not one linear
    map (an MLP: export it as TorchScript). Returns what :func:`export_torchscript` does."""
    from dmu_ray.models.linear_map import LinearMap, LowRankMap

    art = load_artifact(uri, storage, kind=UPGRADE_MODULE)
    module = build_upgrade_module(art)
    if not isinstance(module, LinearMap):
        raise ValueError(
            f"{uri}: a {type(module).__name__} is not one linear map and has no arrays to export; "
            "export it as TorchScript"
        )
    names = ("left", "right", "bias") if isinstance(module, LowRankMap) else ("weight", "bias")
    arrays = {n: getattr(module, n).detach().cpu().numpy().astype(np.float32) for n in names}
    c = art.card
    buf = io.BytesIO()
    np.savez(buf, **arrays, direction=np.array(c.direction or ""), of=np.array(art.ident))
    probe = torch.randn(4, c.in_dim)
    with np.load(io.BytesIO(buf.getvalue())) as back, torch.inference_mode():
        x = probe.numpy()
        got = (x @ back["left"] @ back["right"] if "left" in back else x @ back["weight"]) + back["bias"]
        if not np.allclose(got, module(probe).numpy(), atol=1e-5):  # pragma: no cover - the same products
            raise ValueError(f"{uri}: the exported arrays do not reproduce the artefact's outputs")
    return _summary(art, write_bytes_atomic(resolve(dest, storage), buf.getvalue()))


def _summary(art: Artifact, sha256: str) -> dict:
    """What an export returns: the artefact's direction and dims, the written file's sha256."""
    c = art.card
    return {
        "direction": c.direction,
        "in_dim": c.in_dim,
        "out_dim": c.out_dim,
        "sha256": sha256,
        "of": art.ident,
    }
