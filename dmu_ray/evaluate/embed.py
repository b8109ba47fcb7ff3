"""Embedding images with a model artefact into a committed gallery prefix."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa

from dmu_ray.evaluate.config import EmbedConfig
from dmu_ray.gallery import GalleryError, GalleryWriter, Manifest, ModelInfo, embedding_array, refuse_overlap
from dmu_ray.lineage import embed_step, space_id, upgrade_step
from dmu_ray.models.artifact import EMBEDDING_MODEL, UPGRADE_MODULE, Artifact, load_artifact
from dmu_ray.models.card import CardError, check_adapter_source
from dmu_ray.models.inference import embed_images
from dmu_ray.settings import ActorPoolConfig, StorageConfig
from dmu_ray.storage import resolve


def embed_to_gallery(
    images_uri: str,
    model_uri: str,
    output_uri: str,
    *,
    dtype: str = "float16",
    storage: StorageConfig | None = None,
    pool: ActorPoolConfig | None = None,
    rows_per_file: int = 1_000_000,
    overwrite: bool = False,
    only_ids: np.ndarray | None = None,
    query_adapter: str | None = None,
) -> Manifest:
    """Embed images into a committed gallery prefix (id, embedding, label) with the model's id;
    only the images whose id is in ``only_ids`` when given. With ``query_adapter`` (a query-side
    adapter fitted from this model's vectors), each vector is then mapped into the adapter's
    target space (the old model's): new-model queries an old gallery can be searched with."""
    out = resolve(output_uri, storage)
    inputs = [resolve(images_uri, storage), resolve(model_uri, storage)]
    if query_adapter:
        inputs.append(resolve(query_adapter, storage))
    refuse_overlap(out, inputs)  # before any embedding work
    art = load_artifact(model_uri, storage, kind=EMBEDDING_MODEL)  # the lineage names these bytes
    phi = None if query_adapter is None else _query_adapter(query_adapter, art, storage)
    ids, labels, emb = embed_images(
        images_uri, art.uri, storage=storage, pool=pool, sha256=art.sha256, only_ids=only_ids
    )
    chain = [embed_step(art.ident, art.sha256)]
    model = ModelInfo(
        model_id=art.card.id,
        dim=emb.shape[1],
        dtype=dtype,
        normalized=True,
        version=art.card.version,
        extra={"artifact": art.ident},
    )
    if phi is not None:
        emb, target = _map_queries(phi, emb), _target(phi)
        chain.append(upgrade_step(phi.ident, phi.sha256, art.ident, target))
        model = ModelInfo(
            model_id=space_id(target),
            dim=emb.shape[1],
            dtype=dtype,
            normalized=True,
            version=phi.card.new_model_version,
            upgrade_module=phi.ident,
            extra={"artifact": art.ident, "query_adapter": phi.ident},
        )
    model = model.with_chains([chain])
    table = pa.table({"id": ids, "embedding": embedding_array(emb.astype(dtype)), "label": labels})
    writer = GalleryWriter(
        out,
        model,
        rows_per_file=rows_per_file,
        overwrite=overwrite,
        extra={"embedded_from": images_uri},
        inputs=inputs,
    )
    writer.write(table, source=images_uri)
    return writer.close()


def _query_adapter(uri: str, model: Artifact, storage: StorageConfig | None) -> Artifact:
    """The query-side adapter at ``uri``, checked to map this model's vectors."""
    phi = load_artifact(uri, storage, kind=UPGRADE_MODULE)
    c, where = phi.card, f"query_adapter {phi.uri}"
    if c.direction != "query":
        raise GalleryError(
            f"{where} is a gallery-side module (old vectors -> the new space); embed maps new-model "
            "queries with a query-side adapter (adapter fit with direction: query)"
        )
    if c.in_dim != model.card.dim:
        raise GalleryError(
            f"{where} takes {c.in_dim}-d vectors, but {model.uri} embeds in {model.card.dim} dims"
        )
    try:
        check_adapter_source(c, model.ident, where, f"model {model.uri}")
    except CardError as err:
        raise GalleryError(str(err)) from None
    return phi


def _target(phi: Artifact) -> str:
    c = phi.card
    return str((c.new_model or {}).get("id") or c.new_model_id or phi.ident)


def _map_queries(phi: Artifact, emb: np.ndarray) -> np.ndarray:
    """``emb`` through the adapter, L2-normalised (unit vectors, as every gallery holds)."""
    import torch

    from dmu_ray.models.artifact import build_upgrade_module
    from dmu_ray.models.upgrade import CPU_COMPUTE_ROWS, in_row_slices, through_chain

    module = build_upgrade_module(phi)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(emb, np.float32))
        return in_row_slices(lambda rows: through_chain([module], rows), x, CPU_COMPUTE_ROWS).numpy()


def run_embed(cfg: EmbedConfig, *, progress: bool = True) -> Manifest:
    """``dmu-ray embed``: :func:`embed_to_gallery` from a config, on ``cfg.ray_address``'s cluster."""
    from dmu_ray.ray_session import ensure_ray

    refuse_overlap(
        resolve(cfg.output, cfg.storage), [resolve(cfg.images, cfg.storage), resolve(cfg.model, cfg.storage)]
    )
    if cfg.query_adapter:  # refused before any cluster work
        _query_adapter(
            cfg.query_adapter, load_artifact(cfg.model, cfg.storage, kind=EMBEDDING_MODEL), cfg.storage
        )
    ensure_ray(cfg.ray_address)
    if progress:
        then = f", mapped by query adapter {cfg.query_adapter}" if cfg.query_adapter else ""
        print(f"embedding {cfg.images} with {cfg.model}{then} -> {cfg.output}", file=sys.stderr, flush=True)
    return embed_to_gallery(
        cfg.images,
        cfg.model,
        cfg.output,
        dtype=cfg.dtype,
        storage=cfg.storage,
        pool=cfg.pool,
        rows_per_file=cfg.rows_per_file,
        overwrite=cfg.overwrite,
        query_adapter=cfg.query_adapter,
    )
