"""Embedding images with a model artefact into a committed gallery prefix."""

from __future__ import annotations

import sys

import pyarrow as pa

from dmu_ray.evaluate.config import EmbedConfig
from dmu_ray.gallery import GalleryWriter, Manifest, ModelInfo, embedding_array, refuse_overlap
from dmu_ray.lineage import embed_step
from dmu_ray.models.artifact import EMBEDDING_MODEL, load_artifact
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
) -> Manifest:
    """Embed images into a committed gallery prefix (id, embedding, label) with the model's id."""
    out = resolve(output_uri, storage)
    inputs = [resolve(images_uri, storage), resolve(model_uri, storage)]
    refuse_overlap(out, inputs)  # before any embedding work
    art = load_artifact(model_uri, storage, kind=EMBEDDING_MODEL)  # the lineage names these bytes
    ids, labels, emb = embed_images(images_uri, art.uri, storage=storage, pool=pool, sha256=art.sha256)
    model = ModelInfo(
        model_id=art.card.id,
        dim=emb.shape[1],
        dtype=dtype,
        normalized=True,
        version=art.card.version,
        extra={"artifact": art.ident},
    ).with_chains([[embed_step(art.ident, art.sha256)]])
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


def run_embed(cfg: EmbedConfig, *, progress: bool = True) -> Manifest:
    """``dmu-ray embed``: :func:`embed_to_gallery` from a config, on ``cfg.ray_address``'s cluster."""
    from dmu_ray.ray_session import ensure_ray

    refuse_overlap(
        resolve(cfg.output, cfg.storage), [resolve(cfg.images, cfg.storage), resolve(cfg.model, cfg.storage)]
    )
    ensure_ray(cfg.ray_address)
    if progress:
        print(f"embedding {cfg.images} with {cfg.model} -> {cfg.output}", file=sys.stderr, flush=True)
    return embed_to_gallery(
        cfg.images,
        cfg.model,
        cfg.output,
        dtype=cfg.dtype,
        storage=cfg.storage,
        pool=cfg.pool,
        rows_per_file=cfg.rows_per_file,
        overwrite=cfg.overwrite,
    )
