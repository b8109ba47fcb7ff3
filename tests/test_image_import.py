"""Importing a user's own images (issue 12 part 4): an ImageFolder-style folder and a uri/label
table, local and on the loopback S3 server, on Ray Data. Real JPEG/PNG files written here, some
corrupt; every file is either imported or quarantined with its reason."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_cli_gallery import run as cli

from dmu_ray.data.image_import import ImportOptions, import_images, list_folder, read_quarantine, read_table
from dmu_ray.data.images import DecodeBatch, decode_images, read_dataset_info
from dmu_ray.data.inspect import inspect_dataset, validate_dataset
from dmu_ray.gallery import GalleryError


def image_bytes(seed: int, fmt: str, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root, classes=("cat", "dog", "eel"), per_class=8, parts=False):
    """ROOT/<class>/<image> (or ROOT/<part>/<class>/<image>), PNG and JPEG of several sizes, and
    the bad files a real folder holds. Returns {relative path: expected reason or None}."""
    expect = {}
    for part in ("train", "query", "gallery") if parts else (None,):
        for c, name in enumerate(classes):
            d = root / part / name if part else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if part in (None, "train") else 2):
                fmt = "JPEG" if i % 2 else "PNG"
                path = d / f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
                path.write_bytes(image_bytes(100 * c + i + len(expect), fmt, size=(40 + i, 30 + 2 * i)))
                expect[str(path.relative_to(root))] = None
    base = root / "train" if parts else root
    good = image_bytes(7, "JPEG")
    (base / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (base / "dog" / "text.jpg").write_bytes(b"this is not an image")
    (base / "dog" / "empty.png").write_bytes(b"")
    (base / "eel" / "notes.txt").write_text("labelling notes")
    (root / "stray.png").write_bytes(image_bytes(8, "PNG"))
    for rel, why in (
        ("cat/truncated.jpg", "truncated or corrupt image"),
        ("dog/text.jpg", "not an image"),
        ("dog/empty.png", "empty file"),
        ("eel/notes.txt", "not an image file name"),
    ):
        expect[f"train/{rel}" if parts else rel] = why
    expect["stray.png"] = "not in a class folder"
    return expect


def test_folder_import_quarantines_every_bad_file_and_keeps_bytes(ray_local, tmp_path):
    expect = make_folder(tmp_path / "photos")
    info = import_images(
        list_folder(str(tmp_path / "photos")),
        str(tmp_path / "ds"),
        ImportOptions(size=32, rows_per_file=5),
        progress=False,
    )
    assert info.class_names == ["cat", "dog", "eel"] and info.num_classes == 3 and info.image_size == 32
    imp = info.extra["import"]
    bad = {k: v for k, v in expect.items() if v}
    assert imp["found"] == len(expect) and imp["quarantined"] == len(bad)
    assert imp["found"] == imp["imported"] + imp["quarantined"] == sum(info.rows.values()) + len(bad)
    q = read_quarantine(str(tmp_path / "ds"))
    got = {
        u.split("/photos/")[1]: r
        for u, r in zip(q.column("uri").to_pylist(), q.column("reason").to_pylist(), strict=True)
    }
    assert set(got) == set(bad)
    for rel, why in bad.items():
        assert got[rel].startswith(why), (rel, got[rel])
    # every good file is stored once, byte for byte, with its class; parts from the seeded split
    t = pa.concat_tables(
        [pq.read_table(str(tmp_path / "ds" / p)) for p in ("train", "query", "gallery") if info.rows[p]]
    )
    listing = list_folder(str(tmp_path / "photos")).table
    by_id = dict(zip(listing.column("id").to_pylist(), listing.column("uri").to_pylist(), strict=True))
    assert sorted(t.column("id").to_pylist()) == sorted(
        i for i, u in by_id.items() if not expect[u.split("/photos/")[1]]
    )
    for id_, img, label in zip(*(t.column(c).to_pylist() for c in ("id", "image", "label")), strict=True):
        path = by_id[id_].split("/photos/")[1]
        assert img == (tmp_path / "photos" / path).read_bytes()
        assert info.class_names[label] == path.split("/")[0]
    assert info.rows["query"] > 0 and info.rows["gallery"] > 0 and info.rows["train"] > info.rows["gallery"]
    # a second import with the same seed splits the same way
    again = import_images(
        list_folder(str(tmp_path / "photos")), str(tmp_path / "ds2"), ImportOptions(size=32), progress=False
    )
    assert again.rows == info.rows
    # the images decode at the data set's size (non-square ones fitted by shorter side + centre crop)
    batch = DecodeBatch(32, 3)(pq.read_table(str(tmp_path / "ds" / "train")))
    assert batch["image"].shape[1:] == (3, 32, 32)
    assert validate_dataset(str(tmp_path / "ds"), decode=True) == []
    summary = inspect_dataset(str(tmp_path / "ds"))
    assert summary["import"]["quarantined"] == len(bad) and summary["parts"]["train"]["classes_present"] == 3
    assert summary["import"]["reasons"]["empty file"] == 1


def test_table_import_from_s3_with_ids_parts_and_reencoding(ray_local, s3, tmp_path):
    """Images on S3, listed by a CSV beside them (relative and absolute uris, string labels, the
    user's ids and parts), re-encoded to 24 x 24 grey PNGs."""
    c = s3.client()
    rows = []
    for i in range(12):
        key = f"own/imgs/{i}.jpg"
        c.put_object(Bucket=s3.bucket, Key=key, Body=image_bytes(i, "JPEG", size=(50, 20)))
        uri = f"imgs/{i}.jpg" if i % 2 else f"s3://{s3.bucket}/{key}"
        part = "train" if i < 8 else ("query" if i < 10 else "gallery")
        rows.append(f"{uri},{'zebra' if i % 3 else 'ant'},{1000 + i},{part}")
    rows.append("imgs/missing.jpg,ant,2000,train")
    c.put_object(
        Bucket=s3.bucket, Key="own/list.csv", Body=("uri,label,id,part\n" + "\n".join(rows)).encode()
    )
    storage = s3.storage
    dest = f"s3://{s3.bucket}/own/ds"
    info = import_images(
        read_table(f"s3://{s3.bucket}/own/list.csv", storage),
        dest,
        ImportOptions(size=24, channels=1, reencode=True, rows_per_file=4),
        storage,
        progress=False,
    )
    assert info.class_names == ["ant", "zebra"] and info.rows == {"train": 8, "query": 2, "gallery": 2}
    assert info.extra["import"] == info.extra["import"] | {"found": 13, "imported": 12, "quarantined": 1}
    q = read_quarantine(dest, storage)
    assert q.column("id").to_pylist() == [2000] and q.column("reason")[0].as_py().startswith("unreadable")
    from dmu_ray.storage import resolve

    loc = resolve(f"{dest}/train", storage)
    t = pq.read_table(loc.path, filesystem=loc.fs)
    assert sorted(t.column("id").to_pylist()) == list(range(1000, 1008))
    img = Image.open(io.BytesIO(t.column("image")[0].as_py()))
    assert img.format == "PNG" and img.size == (24, 24) and img.mode == "L"
    assert validate_dataset(dest, storage) == []
    assert read_dataset_info(dest, storage).channels == 1


def test_part_folders_and_bad_inputs(ray_local, tmp_path):
    expect = make_folder(tmp_path / "split", parts=True)
    info = import_images(
        list_folder(str(tmp_path / "split")), str(tmp_path / "ds"), ImportOptions(size=16), progress=False
    )
    assert info.rows == {"train": 24, "query": 6, "gallery": 6}
    assert info.extra["import"]["layout"] == "parts/classes"
    assert info.extra["import"]["quarantined"] == sum(1 for v in expect.values() if v)
    # a destination that holds files, or lies inside the source, is refused before anything is written
    with pytest.raises(GalleryError, match="already holds files"):
        import_images(
            list_folder(str(tmp_path / "split")), str(tmp_path / "ds"), ImportOptions(), progress=False
        )
    with pytest.raises(GalleryError, match="overlap"):
        import_images(
            list_folder(str(tmp_path / "split")),
            str(tmp_path / "split" / "out"),
            ImportOptions(),
            progress=False,
        )
    bad_tables = {
        "nolabel.csv": ("uri\na.png\n", r"missing column\(s\) \['label'\]"),
        "dup.csv": ("uri,label,id\na.png,x,1\nb.png,y,1\n", r"duplicate id\(s\) \[1\]"),
        "part.csv": ("uri,label,part\na.png,x,test\n", r"column part has \['test'\]"),
        "neg.csv": ("uri,label\na.png,-1\n", "negative"),
    }
    for name, (text, msg) in bad_tables.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(GalleryError, match=msg):
            read_table(str(tmp_path / name))
    with pytest.raises(GalleryError, match="leave room for training"):
        ImportOptions(query_fraction=0.5, gallery_fraction=0.5).check()


def test_cli_folder_import_inspect_and_validate(tmp_path):
    make_folder(tmp_path / "photos", per_class=4)
    r = cli(
        "data", "import", "folder", str(tmp_path / "photos"), str(tmp_path / "ds"), "--size", "32", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    assert "3 classes, 32px x 3 channel(s)" in r.stdout and "quarantined 5" in r.stdout
    r = cli("data", "inspect", str(tmp_path / "ds"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["import"]["found"] == 17
    assert cli("data", "validate", str(tmp_path / "ds")).returncode == 0
    # a label outside the classes and a row count that no longer matches are found
    pq.write_table(
        pa.table(
            {
                "id": pa.array([99999], pa.int64()),
                "image": pa.array([image_bytes(1, "PNG")]),
                "label": pa.array([7], pa.int64()),
            }
        ),
        str(tmp_path / "ds" / "train" / "extra.parquet"),
    )
    r = cli("data", "validate", str(tmp_path / "ds"))
    assert r.returncode == 1
    assert "label(s) outside [0, 3)" in r.stdout and "_dataset.json says" in r.stdout
    r = cli("data", "import", "folder", str(tmp_path / "photos"), str(tmp_path / "ds"), "--quiet")
    assert r.returncode == 2 and "already holds files" in r.stderr
    # a folder without a bad file: the progress says so instead of naming an empty reasons file
    for c in ("cat", "dog"):
        for i in range(3):
            (tmp_path / "clean" / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "clean" / c / f"{i}.png").write_bytes(image_bytes(10 * len(c) + i, "PNG"))
    r = cli("data", "import", "folder", str(tmp_path / "clean"), str(tmp_path / "ds2"), "--size", "16")
    assert r.returncode == 0, r.stderr
    assert "nothing quarantined" in r.stderr and "reasons in" not in r.stderr, r.stderr


def test_decode_fits_non_square_images_by_centre_crop():
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # a white centre third: after the centre crop the image is all white
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    x = decode_images([buf.getvalue()], 10, 1)
    assert x.shape == (1, 1, 10, 10) and x.min() > 0.9
