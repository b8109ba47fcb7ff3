"""Importers build real image data sets from what packages ship; decoding and augmentation."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dmu_ray.data.images import (
    DecodeBatch,
    TrainTransform,
    decode_images,
    random_resized_crop,
    read_dataset_info,
)
from dmu_ray.data.importers import DEFAULT_CHARS, import_digits, import_glyphs, import_mnist


@pytest.mark.parametrize("importer, classes", [(import_digits, 10), (import_mnist, 10)])
def test_array_importers(tmp_path, importer, classes):
    info = importer(str(tmp_path / "d"), image_size=16)
    assert info.num_classes == classes and info.channels == 1 and info.image_size == 16
    got = read_dataset_info(str(tmp_path / "d"))
    assert got.rows == info.rows and sum(info.rows.values()) in (1797, 5000)
    ids = np.concatenate([pq.read_table(tmp_path / "d" / p).column("id").to_numpy() for p in info.rows])
    assert len(np.unique(ids)) == len(ids)  # the parts do not overlap
    batch = DecodeBatch(16, 1)(pq.read_table(tmp_path / "d" / "query"))
    assert (
        batch["image"].shape == (info.rows["query"], 1, 16, 16)
        and -1 <= batch["image"].min() < batch["image"].max() <= 1
    )


def test_glyphs_hold_out_typefaces(tmp_path):
    info = import_glyphs(
        str(tmp_path / "g"), chars="abcXYZ", train_instances=2, eval_instances=2, eval_fonts=3
    )
    assert info.num_classes == 6 and len(DEFAULT_CHARS) == 96
    train = pq.read_table(tmp_path / "g" / "train")
    query = pq.read_table(tmp_path / "g" / "query")
    assert set(train.column("group").to_pylist()).isdisjoint(query.column("group").to_pylist())
    assert set(query.column("label").to_pylist()) == set(range(6))


def test_random_resized_crop_is_identity_at_full_scale():
    x = torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(random_resized_crop(x, g, (1.0, 1.0), (1.0, 1.0)), x, atol=1e-6, rtol=0)
    y = random_resized_crop(x, g)
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_train_transform_on_the_worker():
    """Pixels -> [0, 1] -> crop (+ flip) -> normalised, in batched torch ops; seeded."""
    pixels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    plain = TrainTransform(False, mean=mean, std=std)(pixels)
    expect = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, expect)
    a = TrainTransform(True, crop_scale=(0.5, 0.9), mean=mean, std=std, seed=3)
    b = TrainTransform(True, crop_scale=(0.5, 0.9), mean=mean, std=std, seed=3)
    first = a(pixels)
    torch.testing.assert_close(first, b(pixels))  # same seed, same crops
    assert not torch.allclose(first, plain) and not torch.allclose(first, a(pixels))  # a new draw each batch
    # flip only: a full-scale crop is the identity, so every image is itself or its mirror
    f = TrainTransform(True, flip=True, crop_scale=(1.0, 1.0), mean=(0.0,), std=(1.0,), seed=0)
    x = pixels.float() / 255
    flipped = 0
    for _ in range(5):
        y = f(pixels)
        for i in range(len(x)):
            same = torch.allclose(y[i], x[i], atol=0.05)  # the crop's aspect ratio still varies a little
            mirror = torch.allclose(y[i], x[i].flip(-1), atol=0.05)
            flipped += mirror and not same
    assert flipped > 0


def test_decode_to_pixels_matches_the_float_decode(tmp_path):
    import_digits(str(tmp_path / "d"), image_size=16)
    blobs = pq.read_table(tmp_path / "d" / "query").column("image").to_pylist()[:20]
    px = decode_images(blobs, 16, 1, dtype=np.uint8)
    assert px.dtype == np.uint8 and px.shape == (20, 1, 16, 16)
    np.testing.assert_array_equal(px.astype(np.float32) / 255, decode_images(blobs, 16, 1))


def test_fonts_set_prunes_classes_no_typeface_renders(tmp_path):
    """The many-class benchmark set from whatever typefaces a machine has: with matplotlib's only
    (no Hangul among them) the Hangul classes are dropped and the rest relabelled densely, every
    kept class with training and held-out images."""
    import matplotlib
    import pyarrow.parquet as pq

    from dmu_ray.data.importers import hangul_syllables, import_fonts

    assert len(hangul_syllables(10, 0)) == 10 and hangul_syllables(10, 0) == hangul_syllables(10, 0)
    fonts_dir = str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf")
    info = import_fonts(
        str(tmp_path / "fonts"), hangul=10, image_size=16, font_dir=fonts_dir, train_instances=1
    )
    assert not any("\uac00" <= c <= "\ud7a3" for c in info.class_names)
    assert "A" in info.class_names and "\u0416" in info.class_names  # Latin and Cyrillic (Zhe)
    for part in ("train", "query"):
        labels = pq.read_table(str(tmp_path / "fonts" / part), columns=["label"]).column("label").to_numpy()
        assert set(labels.tolist()) == set(range(info.num_classes))
