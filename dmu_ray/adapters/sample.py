"""Pairs made by dmu-ray: a seeded sample of an image set embedded by both frozen models.

``dmu-ray adapter pairs`` picks ``sample`` ids of an image data set part or an ``id,uri[,label]``
table (the lowest values of a seeded hash of the id, so the same seed picks the same items in any
order of the rows), embeds only those images with each model on Ray Data, and commits two
galleries that share those ids, ``<output>/old`` and ``<output>/new``: what ``adapter fit``
joins. The driver reads the ids alone (8 bytes a row) to draw the sample; the images are read
by the embedding actors.
"""

from __future__ import annotations

import sys

import numpy as np

from dmu_ray.adapters.pairs import id_keys
from dmu_ray.data.splits import unit_hash
from dmu_ray.evaluate.embed import embed_to_gallery
from dmu_ray.gallery import GalleryError, Manifest
from dmu_ray.models.artifact import EMBEDDING_MODEL, load_artifact
from dmu_ray.models.inference import image_source
from dmu_ray.settings import ActorPoolConfig, StorageConfig
from dmu_ray.storage import resolve

__all__ = ["SAMPLE_SALT", "image_ids", "sample_ids", "make_pairs"]

SAMPLE_SALT = 0x5A4D_91E5


def image_ids(images_uri: str, card, storage: StorageConfig | None = None) -> np.ndarray:
    """Every id of an image data set part (its Parquet files' ``id`` column) or table."""
    import pyarrow.dataset as pds

    _, _, table = image_source(images_uri, card, storage)
    if table is not None:
        return table.column("id").to_numpy(zero_copy_only=False)
    loc = resolve(images_uri, storage)
    files = [loc.join(n).path for n in loc.list_files(".parquet", data_only=True)]
    if not files:
        raise GalleryError(f"{loc.uri}: no image Parquet files")
    return (
        pds.dataset(files, filesystem=loc.fs, format="parquet")
        .to_table(columns=["id"])
        .column("id")
        .to_numpy()
    )


def sample_ids(ids: np.ndarray, sample: int | None, seed: int) -> np.ndarray:
    """The ``sample`` ids with the lowest seeded hash (all ids for None), sorted."""
    if len(np.unique(ids)) != len(ids):
        raise GalleryError("the image set has repeated ids: a pair needs one image per id")
    if sample is None or sample >= len(ids):
        return np.sort(ids)
    order = np.argsort(unit_hash(id_keys(ids), SAMPLE_SALT + seed), kind="stable")
    return np.sort(ids[order[:sample]])


def make_pairs(
    images: str,
    old_model: str,
    new_model: str,
    output: str,
    *,
    sample: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    storage: StorageConfig | None = None,
    pool: ActorPoolConfig | None = None,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Embed the seeded sample of ``images`` with both models into ``<output>/old`` and
    ``<output>/new`` (two committed galleries sharing ids); returns their manifests."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    out = resolve(output, storage)
    if out.list_files(recursive=True):
        raise GalleryError(f"output {out.uri} already holds files; pairs are written to a new folder")
    arts = {
        side: load_artifact(uri, storage, kind=EMBEDDING_MODEL)
        for side, uri in (("old", old_model), ("new", new_model))
    }
    if arts["old"].sha256 == arts["new"].sha256:
        raise GalleryError(
            f"old_model and new_model are the same artefact ({arts['old'].uri}): pairs need two models"
        )
    ids = image_ids(images, arts["old"].card, storage)
    chosen = sample_ids(ids, sample, seed)
    if len(chosen) == 0:
        raise GalleryError(f"{images}: no images")
    say(
        f"adapter pairs: {len(chosen):,} of {len(ids):,} images (seed {seed}) embedded by both models -> {out.uri}"
    )
    made = {}
    for side in ("old", "new"):
        say(f"  {side}: {arts[side].ident}")
        made[side] = embed_to_gallery(
            images,
            arts[side].uri,
            out.join(side).uri,
            dtype=dtype,
            storage=storage,
            pool=pool,
            only_ids=chosen,
        )
        if made[side].rows != len(chosen):
            raise GalleryError(
                f"{side} model embedded {made[side].rows:,} of the {len(chosen):,} sampled images; "
                "every sampled id needs its image"
            )
    return made
