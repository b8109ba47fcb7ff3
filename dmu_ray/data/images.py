"""Training/evaluation images as Parquet: ``image`` (PNG bytes), ``label`` (int64), ``id`` (int64),
optional ``group`` (the instance source: typeface, writer...) and passthrough columns.

A data set is a folder with one sub-folder per part (``train/``, ``query/``, ``gallery/``) of
Parquet files and ``_dataset.json`` (classes, image size, channels, rows per part, provenance).
Ray Data reads the parts; :func:`decode_batch` turns a batch into float tensors (with the
augmentation of the training config) inside ``map_batches``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from dmu_ray.config import StorageConfig
from dmu_ray.gallery import GalleryError, write_parquet_atomic
from dmu_ray.storage import Location, read_bytes, resolve, write_bytes_atomic

DATASET_META = "_dataset.json"
PARTS = ("train", "query", "gallery")


@dataclass
class DatasetInfo:
    """``_dataset.json``: what a folder of image Parquet holds."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    rows: dict[str, int]
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def write_image_part(
    loc: Location,
    images: list[bytes],
    labels: np.ndarray,
    ids: np.ndarray,
    groups: np.ndarray | None = None,
    rows_per_file: int = 4096,
) -> int:
    """Write one part (e.g. ``train``) as Parquet files of ``rows_per_file`` rows; returns rows."""
    n = len(images)
    if not (len(labels) == len(ids) == n):
        raise GalleryError(
            f"{loc.uri}: images, labels and ids differ in length ({n}, {len(labels)}, {len(ids)})"
        )
    for k, start in enumerate(range(0, n, rows_per_file)):
        sl = slice(start, start + rows_per_file)
        cols: dict[str, pa.Array] = {
            "id": pa.array(ids[sl], pa.int64()),
            "image": pa.array(images[sl], pa.binary()),
            "label": pa.array(labels[sl], pa.int64()),
        }
        if groups is not None:
            cols["group"] = pa.array(groups[sl], pa.int64())
        write_parquet_atomic(loc.join(f"part-{k:05d}.parquet"), pa.table(cols), row_group_rows=1024)
    return n


def write_dataset_info(loc: Location, info: DatasetInfo) -> None:
    write_bytes_atomic(loc.join(DATASET_META), json.dumps(asdict(info), indent=2).encode())


def read_dataset_info(uri: str, storage: StorageConfig | None = None) -> DatasetInfo:
    """The ``_dataset.json`` of an image data set; a clear error when it is missing."""
    loc = resolve(uri, storage).join(DATASET_META)
    try:
        d = json.loads(read_bytes(loc))
    except FileNotFoundError:
        raise GalleryError(
            f"{loc.uri} not found: not an image data set (make one with `dmu-ray data import`)"
        ) from None
    return DatasetInfo(**d)


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """``size`` x ``size``: the shorter side resized to ``size`` (bilinear, antialiased when
    shrinking) and the centre cropped, as torchvision's ``Resize(size)`` + ``CenterCrop(size)``."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    k = size / min(w, h)
    nw, nh = max(size, round(w * k)), max(size, round(h * k))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_images(blobs: list[bytes] | np.ndarray, size: int, channels: int) -> np.ndarray:
    """Encoded images (any format PIL reads) -> float32 (N, C, size, size) in [0, 1]; an image of
    another size is fitted with :func:`fit_square` (a square one is simply resized)."""
    out = np.empty((len(blobs), channels, size, size), dtype=np.float32)
    mode = "L" if channels == 1 else "RGB"
    for i, b in enumerate(blobs):
        img = fit_square(Image.open(io.BytesIO(b)).convert(mode), size)
        a = np.asarray(img, dtype=np.float32) / 255.0
        out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return out


def random_resized_crop(
    x: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (0.8, 1.25),
) -> np.ndarray:
    """Per-image random resized crop of a (N, C, H, W) batch, bilinear, in one vectorised call
    (each crop box becomes an affine sampling grid)."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    area = rng.uniform(*scale, n)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), n))
    cw = np.clip(np.sqrt(area * aspect), 0.05, 1.0)  # crop size as a fraction of the image
    ch = np.clip(np.sqrt(area / aspect), 0.05, 1.0)
    cx = rng.uniform(-(1 - cw), 1 - cw)  # crop centre in [-1, 1] coordinates
    cy = rng.uniform(-(1 - ch), 1 - ch)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
    grid = F.affine_grid(torch.from_numpy(theta), [n, c, h, w], align_corners=False)
    return F.grid_sample(torch.from_numpy(x), grid, mode="bilinear", align_corners=False).numpy()


class DecodeBatch:
    """``map_batches`` callable: Arrow batch of images -> {"image": (N,C,S,S) float32, "label": int64}.

    Training batches get a random resized crop (and a horizontal flip when ``flip``: off by default
    because it changes the class of characters such as b/d). Pixels in [0, 1] are then normalised
    per channel, ``(x - mean) / std`` (a model card's preprocessing; dmu-ray's models use 0.5/0.5).
    """

    def __init__(
        self,
        size: int,
        channels: int,
        augment: bool = False,
        flip: bool = False,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        seed: int | None = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        out_size: int | None = None,
    ) -> None:
        self.out_size = out_size if out_size != size else None
        self.size, self.channels, self.augment, self.flip = size, channels, augment, flip
        self.crop_scale = crop_scale
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        x = decode_images(batch.column("image").to_pylist(), self.size, self.channels)
        if self.augment:
            x = random_resized_crop(x, self.rng, self.crop_scale)
            if self.flip:
                m = self.rng.random(len(x)) < 0.5
                x[m] = x[m][..., ::-1]
        if self.out_size is not None:  # the model's input size (its card), e.g. 224 for ImageNet models
            import torch

            xt = torch.nn.functional.interpolate(
                torch.from_numpy(np.ascontiguousarray(x)),
                size=(self.out_size, self.out_size),
                mode="bilinear",
                align_corners=False,
                antialias=self.out_size < x.shape[-1],
            )
            x = xt.numpy()
        x = (x - self.mean) / self.std
        return {
            "image": x,
            "label": batch.column("label").to_numpy().astype(np.int64),
            "id": batch.column("id").to_numpy().astype(np.int64),
        }
