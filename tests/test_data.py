"""Importers build real image data sets from what packages ship; decoding and augmentation."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dmu_ray.data.images import DecodeBatch, random_resized_crop, read_dataset_info
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
    x = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        random_resized_crop(x, np.random.default_rng(1), (1.0, 1.0), (1.0, 1.0)), x, atol=1e-6
    )
    y = random_resized_crop(x, np.random.default_rng(1))
    assert y.shape == x.shape and not np.allclose(y, x)


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
