"""Embedding images with a model artefact on a Ray Data actor pool."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dmu_ray.config import ActorPoolConfig, StorageConfig
from dmu_ray.data.images import DecodeBatch, read_dataset_info
from dmu_ray.gallery import GalleryWriter, Manifest, ModelInfo, embedding_array
from dmu_ray.models.artifact import EMBEDDING_MODEL, load_artifact
from dmu_ray.storage import resolve


class _EmbedActor:
    def __init__(
        self, model_uri: str, storage: StorageConfig, size: int, channels: int, threads: int, gpu: bool
    ) -> None:
        import torch

        from dmu_ray.models.artifact import build_embedding_model

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.model = build_embedding_model(load_artifact(model_uri, storage, kind=EMBEDDING_MODEL))[0].to(
            self.device
        )
        self.decode = DecodeBatch(size, channels, augment=False)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        d = self.decode(batch)
        with torch.inference_mode():
            f = self.model(torch.from_numpy(d["image"]).to(self.device)).float().cpu().numpy()
        return {"id": d["id"], "label": d["label"], "embedding": f}


def embed_images(
    images_uri: str,
    model_uri: str,
    *,
    storage: StorageConfig | None = None,
    pool: ActorPoolConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, labels, embeddings)`` of every image under ``images_uri`` (a data set part such as
    ``<data>/query``), sorted by id. The images' size and channels come from the data set's
    ``_dataset.json`` one folder up; the model must take that many channels."""
    import ray.data

    from dmu_ray.ray_session import ensure_ray

    storage = storage or StorageConfig()
    pool = pool or ActorPoolConfig(batch_size=256)
    loc = resolve(images_uri, storage)
    info = read_dataset_info(loc.uri.rsplit("/", 1)[0], storage)
    card = load_artifact(model_uri, storage, kind=EMBEDDING_MODEL).card
    if int(card["in_channels"]) != info.channels:
        raise ValueError(
            f"{model_uri} takes {card['in_channels']}-channel images but {images_uri} has {info.channels}"
        )
    ensure_ray()
    ds = ray.data.read_parquet(loc.path, filesystem=loc.fs, file_extensions=["parquet"]).select_columns(
        ["id", "image", "label"]
    )
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs=dict(
            model_uri=model_uri,
            storage=storage,
            size=info.image_size,
            channels=info.channels,
            threads=max(1, int(pool.num_cpus)),
            gpu=pool.num_gpus > 0,
        ),
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        raise ValueError(f"{images_uri}: no images")
    ids = np.concatenate([p["id"] for p in parts])
    order = np.argsort(ids, kind="stable")
    labels = np.concatenate([p["label"] for p in parts])[order]
    emb = np.concatenate([np.asarray(p["embedding"], dtype=np.float32) for p in parts])[order]
    return ids[order], labels, emb


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
    ids, labels, emb = embed_images(images_uri, model_uri, storage=storage, pool=pool)
    art = load_artifact(model_uri, storage, kind=EMBEDDING_MODEL)
    model = ModelInfo(
        model_id=str(art.card.get("id", "model")),
        dim=emb.shape[1],
        dtype=dtype,
        normalized=True,
        version=str(art.card.get("epochs", "1")),
        extra={"artifact": art.ident},
    )
    table = pa.table({"id": ids, "embedding": embedding_array(emb.astype(dtype)), "label": labels})
    writer = GalleryWriter(
        resolve(output_uri, storage),
        model,
        rows_per_file=rows_per_file,
        overwrite=overwrite,
        extra={"embedded_from": images_uri},
    )
    writer.write(table, source=images_uri)
    return writer.close()
