"""Running an embedding-model artefact over an image data set part on a Ray Data actor pool.

Evaluation embeds query and gallery images with it, UniBCT the training images (old features for
its prototypes), and a FastFill backfill the images of the rows it re-embeds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmu_ray.data.images import DecodeBatch, read_dataset_info
from dmu_ray.models.artifact import EMBEDDING_MODEL, load_artifact
from dmu_ray.models.card import EmbeddingCard, check_compatible
from dmu_ray.settings import ActorPoolConfig, StorageConfig
from dmu_ray.storage import resolve


class EmbeddingOutputError(ValueError):
    """A model whose output does not match its card: another dimension, another number of rows
    than images, or vectors that are not finite."""


def check_output(out: object, rows: int, dim: int, what: str) -> None:
    """Refuse a model output that is not ``(rows, dim)`` (``what`` names the artefact)."""
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) != 2 or shape[0] != rows or shape[1] != dim:
        raise EmbeddingOutputError(
            f"model {what}: returned an output of shape {shape} for {rows} image(s); its card says "
            f"{dim}-d embeddings, one per image (is the card's dim right, and does the model embed "
            "each image of a batch?)"
        )


class _EmbedActor:
    def __init__(
        self,
        model_uri: str,
        sha256: str,
        storage: StorageConfig,
        size: int,
        channels: int,
        threads: int,
        gpu: bool,
        only_ids: np.ndarray | None = None,
    ) -> None:
        import torch

        from dmu_ray.models.artifact import build_embedding_model

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        art = load_artifact(model_uri, storage, kind=EMBEDDING_MODEL, sha256=sha256)
        self.model = build_embedding_model(art)[0].to(self.device)
        self.dim, self.what = art.card.dim, art.ident
        pre = art.card.preprocessing  # the model embeds as it does in production
        self.decode = DecodeBatch(size, channels, mean=pre.mean, std=pre.std, out_size=pre.size)
        self.only_ids = pa.array(only_ids) if only_ids is not None else None
        side = pre.size or size  # probe: the dimension the card states is the one the model gives
        with torch.inference_mode():
            probe = self.model(torch.zeros(2, channels, side, side, device=self.device))
        check_output(probe, 2, self.dim, self.what)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc
        import torch

        if self.only_ids is not None:  # before decoding: skipped images cost no decode work
            batch = batch.filter(pc.is_in(batch.column("id"), value_set=self.only_ids))
        if batch.num_rows == 0:
            return {
                "id": np.empty(0, np.int64),
                "label": np.empty(0, np.int64),
                "embedding": np.empty((0, self.model.dim), np.float32),
            }
        d = self.decode(batch)
        with torch.inference_mode():
            f = self.model(torch.from_numpy(d["image"]).to(self.device))
        check_output(f, len(d["id"]), self.dim, self.what)
        return {"id": d["id"], "label": d["label"], "embedding": f.float().cpu().numpy()}


def image_source(
    images_uri: str, card: EmbeddingCard, storage: StorageConfig | None = None
) -> tuple[int, int, pa.Table | None]:
    """``(decode size, channels, table or None)`` of the images a model embeds: a data set part
    (``<data>/gallery``: size and channels from its ``_dataset.json``, checked against the model),
    or a table of ``id,uri[,label]`` (a ``.csv``/``.parquet`` file: images anywhere, decoded at the
    model's input size and channels, as in production)."""
    from dmu_ray.data.image_import import is_table, read_table

    where = {"new": f"{card.id} ({images_uri})"}
    if not is_table(images_uri):
        info = read_dataset_info(resolve(images_uri, storage).uri.rsplit("/", 1)[0], storage)
        check_compatible(new=card, channels=info.channels, names=where)
        return info.image_size, info.channels, None
    if card.preprocessing.size is None:
        raise ValueError(
            f"model {card.id}: its card does not record an input size, needed to embed the images that "
            f"{images_uri} lists (re-export it, or import it with --size)"
        )
    listing = read_table(images_uri, storage, need_label=False, need_id=True)
    t = listing.table
    bad = t.filter(pc.is_valid(t.column("reason")))
    if bad.num_rows:
        raise ValueError(f"{images_uri}: row id {bad.column('id')[0]}: {bad.column('reason')[0]}")
    return card.preprocessing.size, card.in_channels, t.select(["id", "uri", "label"])


def fetch_images(batch: pa.Table, storage: StorageConfig | None) -> pa.Table:
    """Ray Data UDF: the table's ``uri`` column read into an ``image`` column of bytes (an
    unreadable image is an error naming its uri and id: the caller needs every one)."""
    from dmu_ray.data.image_import import UriReader

    read, images = UriReader(storage), []
    for id_, uri in zip(batch.column("id").to_pylist(), batch.column("uri").to_pylist(), strict=True):
        try:
            images.append(read(uri))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"image of id {id_} at {uri}: unreadable ({type(err).__name__}: {err})"
            ) from None
    labels = pc.fill_null(batch.column("label"), -1)
    return pa.table({"id": batch.column("id"), "image": pa.array(images, pa.binary()), "label": labels})


def embed_images(
    images_uri: str,
    model_uri: str,
    *,
    storage: StorageConfig | None = None,
    pool: ActorPoolConfig | None = None,
    only_ids: np.ndarray | None = None,
    sha256: str | None = None,
    pool_field: str = "pool",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, labels, embeddings)`` of every image of ``images_uri``, or of those whose id is in
    ``only_ids``, sorted by id. ``images_uri`` is a data set part such as ``<data>/query`` (size
    and channels from the data set's ``_dataset.json`` one folder up; the model must take that
    many channels) or a table of ``id,uri[,label]`` (:func:`image_source`; label -1 when absent).
    The actors load the artefact by its absolute location and check its bytes against the sha256
    the driver read (``sha256``, when given, is what the caller recorded and must match too).
    ``pool_field`` names ``pool`` in the caller's config, for errors about it."""
    import ray.data

    from dmu_ray.ray_session import collect_batches, ensure_ray, map_on_pool, require_pool

    storage = storage or StorageConfig()
    pool = pool or ActorPoolConfig(batch_size=256)
    art = load_artifact(
        model_uri, storage, kind=EMBEDDING_MODEL, sha256=sha256
    )  # the actors check these bytes
    card = art.card
    size, channels, table = image_source(images_uri, card, storage)
    ensure_ray()
    require_pool(pool, "an embedding actor", field=pool_field)
    if table is None:
        loc = resolve(images_uri, storage)
        ds = ray.data.read_parquet(loc.path, filesystem=loc.fs, file_extensions=["parquet"])
        ds = ds.select_columns(["id", "image", "label"])
    else:
        if only_ids is not None:  # before any image is fetched
            table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(only_ids)))
        blocks = max(1, -(-table.num_rows // pool.batch_size))
        ds = ray.data.from_arrow(table).repartition(blocks)
        ds = ds.map_batches(
            fetch_images, fn_kwargs={"storage": storage}, batch_size=None, batch_format="pyarrow"
        )
    ds = map_on_pool(
        ds,
        _EmbedActor,
        pool,
        dict(
            model_uri=art.uri,  # absolute: actors may run in another folder
            sha256=art.sha256,
            storage=storage,
            size=size,
            channels=channels,
            threads=max(1, int(pool.num_cpus)),
            gpu=pool.num_gpus > 0,
            only_ids=only_ids,
        ),
    )
    parts = [p for p in collect_batches(ds, "numpy") if len(p["id"])]
    if not parts and only_ids is not None:  # no id has an image: the caller says what that means
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, card.dim), np.float32)
    if not parts:
        raise ValueError(f"{images_uri}: no images")
    ids = np.concatenate([p["id"] for p in parts])
    order = np.argsort(ids, kind="stable")
    labels = np.concatenate([p["label"] for p in parts])[order]
    emb = np.concatenate([np.asarray(p["embedding"], dtype=np.float32) for p in parts])[order]
    return ids[order], labels, emb
