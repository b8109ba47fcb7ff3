"""Training/evaluation images as Parquet: ``image`` (PNG bytes), ``label`` (int64), ``id`` (int64),
optional ``group`` (the instance source: typeface, writer...) and passthrough columns.

A data set is a folder with one sub-folder per part (``train/``, ``query/``, ``gallery/``) of
Parquet files and ``_dataset.json`` (classes, image size, channels, rows per part, provenance).
Ray Data reads the parts; :class:`DecodeBatch` turns a batch into model inputs inside
``map_batches`` (embedding); training decodes to pixels there and augments on the worker
(:class:`TrainTransform`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from dmu_ray.gallery import GalleryError, write_parquet_atomic
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import (
    Location,
    create_exclusive,
    read_bytes,
    release_if_alone,
    resolve,
    write_bytes_atomic,
)

if TYPE_CHECKING:
    import torch

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


#: the claim of a data set folder by the import writing it (created only if absent: one import a folder)
IMPORT_CLAIM = "_import.json"


@contextlib.contextmanager
def claimed_folder(root: Location, source: str) -> Iterator[Location]:
    """Claim ``root`` for one data set import, exclusively: it must hold no file, and
    ``_import.json`` is created only if absent (a hard link on disk, a conditional PUT on S3), so of
    two imports started into one folder exactly one writes and the other fails before touching
    anything. The claim stays with the committed data set; an import that fails before writing
    anything else releases it."""
    if root.missing_bucket():
        raise GalleryError(root.describe_missing())
    claim = root.join(IMPORT_CLAIM)
    held = root.all_files()
    if held:
        if root.join(DATASET_META).is_file():
            what = "a committed data set"
        elif claim.is_file():
            what = "files of another import (running, or one that failed)"
        else:
            what = f"{len(held)} file(s)"
        raise GalleryError(
            f"{root.uri} already holds files ({what}): an import writes to an empty or new folder "
            "(nothing was changed); choose another destination, or delete it first"
        )
    record = {
        "source": source,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
    }
    if not create_exclusive(claim, json.dumps(record).encode()):
        raise GalleryError(
            f"{root.uri} was claimed by another import that started at the same time (nothing was changed); "
            "choose another destination"
        )
    try:
        yield root
    except BaseException:
        release_if_alone(root, IMPORT_CLAIM)
        raise


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


def decode_images(
    blobs: list[bytes] | np.ndarray, size: int, channels: int, dtype: type = np.float32
) -> np.ndarray:
    """Encoded images (any format PIL reads) -> (N, C, size, size): float32 in [0, 1], or the
    pixels themselves with ``dtype=np.uint8`` (a quarter of the memory: what training caches). An
    image of another size is fitted with :func:`fit_square` (a square one is simply resized)."""
    out = np.empty((len(blobs), channels, size, size), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, b in enumerate(blobs):
        a = np.asarray(fit_square(Image.open(io.BytesIO(b)).convert(mode), size))
        out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    if dtype == np.uint8:
        return out
    return out.astype(np.float32) / np.float32(255.0)


def decode_split_batch(
    batch: pa.Table,
    *,
    protocol: str,
    role: str,
    old_fraction: float,
    seed: int,
    size: int,
    channels: int,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: keep this run's side of the split and decode its images to uint8 pixels
    (augmentation and normalisation happen on the training worker, :class:`TrainTransform`)."""
    from dmu_ray.data.splits import split_mask

    m = split_mask(
        protocol, role, batch.column("id").to_numpy(), batch.column("label").to_numpy(), old_fraction, seed
    )
    batch = batch.filter(pa.array(m))
    return {
        "image": decode_images(batch.column("image").to_pylist(), size, channels, dtype=np.uint8),
        "label": batch.column("label").to_numpy().astype(np.int64),
        "id": batch.column("id").to_numpy().astype(np.int64),
    }


def epoch_file_order(num_files: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch of a decoded-every-epoch stream reads the training files: a
    permutation drawn from (seed, epoch), the same wherever it is computed."""
    return np.random.default_rng([seed, epoch]).permutation(num_files)


def decode_epoch_stream(
    batch: dict[str, np.ndarray],
    *,
    files: list[str],
    filesystem: Any,
    order_seed: int,
    rows_per_batch: int = 256,
    **split: Any,
):
    """Ray Data UDF over positions of a stream of epochs (``id`` = epoch x files + position):
    read the file at that position of its epoch's order (:func:`epoch_file_order`) in record
    batches, keep this run's side of the split and decode (:func:`decode_split_batch`); yields
    one batch of pixels per record batch. One continuous execution covers every epoch, so an
    epoch's first batches are decoded while the previous epoch's last ones train."""
    import pyarrow.parquet as pq

    n = len(files)
    orders: dict[int, np.ndarray] = {}
    for pos in batch["id"].tolist():
        epoch, k = divmod(int(pos), n)
        if epoch not in orders:
            orders[epoch] = epoch_file_order(n, order_seed, epoch)
        with filesystem.open_input_file(files[orders[epoch][k]]) as f:
            reader = pq.ParquetFile(f)
            for rb in reader.iter_batches(batch_size=rows_per_batch, columns=["id", "image", "label"]):
                out = decode_split_batch(pa.Table.from_batches([rb]), **split)
                if len(out["id"]):
                    yield out


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (0.8, 1.25),
) -> torch.Tensor:
    """Per-image random resized crop of a float (N, C, H, W) batch, bilinear, as one batched op on
    the batch's device (each crop box becomes an affine sampling grid); ``generator`` lives on that
    device."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=x.device)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = torch.sqrt(area * aspect).clamp(0.05, 1.0)  # crop size as a fraction of the image
    ch = torch.sqrt(area / aspect).clamp(0.05, 1.0)
    cx = (1 - cw) * (2 * torch.rand(n, generator=generator, device=x.device) - 1)  # centre in [-1, 1]
    cy = (1 - ch) * (2 * torch.rand(n, generator=generator, device=x.device) - 1)
    theta = torch.zeros((n, 2, 3), dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


class TrainTransform:
    """On the training worker, per batch: uint8 pixels (N, C, H, W) -> float in [0, 1] -> random
    resized crop (and a horizontal flip when ``flip``: off by default because it changes the class
    of characters such as b/d) -> ``(x - mean) / std``. Each is one batched op on the batch's device
    (the GPU on GPU workers), so the data pipeline only decodes, and decoded images can be cached
    between epochs. Seeded: the same seed gives the same crops."""

    def __init__(
        self,
        augment: bool,
        flip: bool = False,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        seed: int = 0,
    ) -> None:
        self.augment, self.flip, self.crop_scale, self.seed = augment, flip, tuple(crop_scale), seed
        self.mean, self.std = list(mean), list(std)
        self.generator: torch.Generator | None = None
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std on the batches' device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        x = pixels.float().div_(255.0)
        if self.augment:
            if self.generator is None or self.generator.device != x.device:
                self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
            x = random_resized_crop(x, self.generator, self.crop_scale)
            if self.flip:
                m = torch.rand(len(x), generator=self.generator, device=x.device) < 0.5
                x = torch.where(m[:, None, None, None], x.flip(-1), x)
        if self._norm is None or self._norm[0].device != x.device:  # made once, not a copy per step
            self._norm = (
                torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1),
                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1),
            )
        mean, std = self._norm
        return (x - mean) / std


class DecodeBatch:
    """``map_batches`` callable for embedding: Arrow batch of images -> {"image": (N,C,S,S) float32,
    "label", "id": int64}, pixels in [0, 1] resized to ``out_size`` when given (the model's input
    size) and normalised per channel, ``(x - mean) / std`` (a model card's preprocessing; dmu-ray's
    models use 0.5/0.5). Training decodes to pixels and transforms on the worker
    (:class:`TrainTransform`)."""

    def __init__(
        self,
        size: int,
        channels: int,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        out_size: int | None = None,
    ) -> None:
        self.out_size = out_size if out_size != size else None
        self.size, self.channels = size, channels
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        x = decode_images(batch.column("image").to_pylist(), self.size, self.channels)
        if self.out_size is not None:  # the model's input size (its card), e.g. 224 for ImageNet models
            import torch

            xt = torch.nn.functional.interpolate(
                torch.from_numpy(x),
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
