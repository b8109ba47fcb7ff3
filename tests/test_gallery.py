import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmu_ray.gallery import (
    MANIFEST_NAME,
    MODEL_META_KEY,
    REASON_COLUMN,
    SOURCE_ROW_COLUMN,
    Gallery,
    GalleryError,
    GalleryWriter,
    IdSet,
    Manifest,
    ModelInfo,
    UncommittedGalleryError,
    conform_batch,
    embedding_array,
    embedding_matrix,
    first_occurrences,
    write_manifest,
    write_parquet_atomic,
)
from dmu_ray.gallery_ops import import_vectors, inspect_gallery, validate_gallery
from dmu_ray.storage import resolve


def make_table(n: int, dim: int, *, start: int = 0, seed: int = 0, dtype=np.float32) -> pa.Table:
    rng = np.random.default_rng(seed)
    mat = rng.standard_normal((n, dim)).astype(dtype)
    return pa.table(
        {
            "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "embedding": embedding_array(mat),
            "label": pa.array(rng.integers(0, 10, n)),
            "url": pa.array([f"img/{i}.jpg" for i in range(start, start + n)]),
        }
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_roundtrip_and_sharding(root, dtype):
    uri = root.uri("gal")
    src = make_table(2500, 32)
    model = ModelInfo(model_id="old", dim=32, dtype=dtype, normalized=False)
    with GalleryWriter(resolve(uri, root.storage), model, rows_per_file=1000) as w:
        w.write(src.slice(0, 1700))
        w.write(src.slice(1700))
    g = Gallery.open(uri, root.storage)
    assert [f.rows for f in g.manifest.files] == [1000, 1000, 500]
    assert g.manifest.rows_in == 2500 and g.manifest.quarantined_rows == 0
    out = g.read()
    assert out.column("id").to_pylist() == src.column("id").to_pylist()
    assert out.column("url").to_pylist() == src.column("url").to_pylist()  # passthrough untouched
    assert out.schema.field("embedding").type == pa.list_(
        pa.float16() if dtype == "float16" else pa.float32(), 32
    )
    got = embedding_matrix(out.column("embedding"))
    assert got.dtype == np.dtype(dtype) and got.shape == (2500, 32)
    np.testing.assert_allclose(
        got.astype(np.float32), embedding_matrix(src.column("embedding")), rtol=1e-3, atol=1e-3
    )
    meta = json.loads(out.schema.metadata[MODEL_META_KEY])
    assert meta["model_id"] == "old" and meta["dtype"] == dtype and meta["dim"] == 32
    assert validate_gallery(g).ok
    if root.s3 is not None:
        keys = root.s3.keys(uri.split("/", 3)[3])
        assert any(k.endswith(MANIFEST_NAME) for k in keys)
        assert sum(k.endswith(".parquet") for k in keys) == 3


def test_embedding_matrix_is_zero_copy_and_honours_slices():
    t = make_table(100, 8)
    col = t.column("embedding")
    m = embedding_matrix(col)
    assert m.base is not None  # a view, not a copy
    assert np.shares_memory(m, embedding_matrix(col.slice(10, 5)))
    np.testing.assert_array_equal(embedding_matrix(col.slice(10, 5)), m[10:15])


def test_uncommitted_prefix_is_refused(root):
    uri = root.uri("half")
    w = GalleryWriter(resolve(uri, root.storage), ModelInfo(model_id="m", dim=8), rows_per_file=10)
    w.write(make_table(25, 8))  # two files written, no manifest yet (the writer "crashed")
    with pytest.raises(UncommittedGalleryError, match="no _manifest.json"):
        Gallery.open(uri, root.storage)
    # a partial upload beside the files (hidden name) is not read as gallery rows
    loc = resolve(uri, root.storage)
    pq.write_table(make_table(7, 8, start=500), loc.join(".part-9.parquet").path, filesystem=loc.fs)
    g = Gallery.open(uri, root.storage, allow_uncommitted=True)
    assert g.num_rows == 20 and g.manifest is None and not any("/." in "/" + f for f in g.files)
    with pytest.raises(UncommittedGalleryError, match="does not exist"):
        Gallery.open(root.uri("never-written"), root.storage)
    # a new writer will not silently mix with leftovers
    with pytest.raises(GalleryError, match="already holds 3 file"):
        GalleryWriter(resolve(uri, root.storage), ModelInfo(model_id="m", dim=8))


def test_bad_rows_are_quarantined_with_reasons(root):
    dim = 4
    emb = pa.array(
        [
            [1, 2, 3, 4],
            [1, 2, 3],
            None,
            [1, float("nan"), 3, 4],
            [1, 2, 3, float("inf")],
            [5, 6, 7, 8],
            [1, None, 3, 4],
            [0, 0, 0, 1],
        ],
        type=pa.list_(pa.float64()),
    )
    ids = pa.array([1, 2, 3, 4, 5, None, 7, 1], pa.int64())
    t = pa.table({"id": ids, "embedding": emb, "note": pa.array(list("abcdefgh"))})
    uri = root.uri("q")
    with GalleryWriter(resolve(uri, root.storage), ModelInfo(model_id="m", dim=dim)) as w:
        w.write(t)
    g = Gallery.open(uri, root.storage)
    m = g.manifest
    assert m.rows == 1 and m.quarantined_rows == 7 and m.rows_in == 8
    assert m.rows + m.quarantined_rows == m.rows_in
    assert m.quarantine_reasons == {
        "wrong dimension 3 (expected 4)": 1,
        "null embedding": 1,
        "NaN/Inf or null value in embedding": 3,
        "null id": 1,
        "duplicate id": 1,
    }
    q = pq.read_table(resolve(root.uri("q/" + m.quarantine[0].path), root.storage).path, filesystem=g.loc.fs)
    assert sorted(q.column(SOURCE_ROW_COLUMN).to_pylist()) == [1, 2, 3, 4, 5, 6, 7]
    by_row = dict(
        zip(q.column(SOURCE_ROW_COLUMN).to_pylist(), q.column(REASON_COLUMN).to_pylist(), strict=True)
    )
    assert by_row[7] == "duplicate id" and by_row[5] == "null id" and by_row[1].startswith("wrong dimension")
    assert q.column("note").to_pylist() == [n for i, n in enumerate("abcdefgh") if i != 0]  # nothing lost
    assert q.column("embedding").to_pylist()[0] == [1, 2, 3]  # the bad vector itself is kept
    rep = validate_gallery(g)
    assert rep.ok, rep.problems


def test_bad_schema_is_a_clear_error(root):
    w = GalleryWriter(resolve(root.uri("s"), root.storage), ModelInfo(model_id="m", dim=4))
    with pytest.raises(GalleryError, match="missing column 'embedding'"):
        w.write(pa.table({"id": [1], "vec": [[1.0, 2.0, 3.0, 4.0]]}), source="shard-7.parquet")
    with pytest.raises(GalleryError, match="shard-7.parquet: column 'embedding' must be a list of numbers"):
        w.write(pa.table({"id": [1], "embedding": ["x"]}), source="shard-7.parquet")


def test_validate_catches_corruption_and_missing_files(root):
    uri = root.uri("v")
    with GalleryWriter(
        resolve(uri, root.storage), ModelInfo(model_id="m", dim=8, normalized=False), rows_per_file=10
    ) as w:
        w.write(make_table(30, 8))
    g = Gallery.open(uri, root.storage)
    assert validate_gallery(g).ok
    # overwrite one committed file with a different (valid) Parquet file, and delete another
    f0 = g.loc.join(g.files[0])
    pq.write_table(make_table(10, 8, seed=9), f0.path, filesystem=f0.fs)
    g.loc.fs.delete_file(g.loc.join(g.files[1]).path)
    rep = validate_gallery(Gallery.open(uri, root.storage))
    assert not rep.ok
    text = "\n".join(rep.problems)
    assert "part-00000.parquet" in text and ("sha256" in text or "bytes" in text)
    assert "part-00001.parquet: listed in the manifest but missing" in text
    assert "no dmu.model metadata" in text


def test_validate_catches_unnormalised_and_duplicates(tmp_path):
    uri = str(tmp_path / "n")
    # a foreign writer: the model claims normalized vectors but the rows are not (the GalleryWriter
    # quarantines such rows, so the file is written by hand)
    model = ModelInfo(model_id="m", dim=8, normalized=True)
    entry = write_parquet_atomic(resolve(uri).join("a.parquet"), conform_batch(make_table(20, 8), model))
    write_manifest(resolve(uri), Manifest(model=model, files=[entry], rows_in=20))
    rep = validate_gallery(Gallery.open(uri))
    assert any("not unit-norm" in p for p in rep.problems)
    uri2 = str(tmp_path / "d")
    with GalleryWriter(
        resolve(uri2), ModelInfo(model_id="m", dim=8, normalized=False), rows_per_file=10
    ) as w:
        w.write(make_table(20, 8))
    g = Gallery.open(uri2)
    # forge a duplicate: copy file 0 over file 1 and patch the manifest entry to match
    a, b = (g.loc.join(f) for f in g.files)
    Path(b.path).write_bytes(Path(a.path).read_bytes())
    mpath = Path(g.loc.join(MANIFEST_NAME).path)
    man = json.loads(mpath.read_text())
    man["files"][1].update(bytes=man["files"][0]["bytes"], sha256=man["files"][0]["sha256"])
    mpath.write_text(json.dumps(man))
    rep = validate_gallery(Gallery.open(uri2))
    assert any("already seen" in p for p in rep.problems), rep.problems


def test_idset_matches_python_set():
    rng = np.random.default_rng(1)
    seen, ref = IdSet(), set()
    for _ in range(40):
        ids = rng.integers(0, 3000, 100)
        keep = first_occurrences(ids, seen)
        expect = []
        local = set()
        for x in ids:
            expect.append(x not in ref and x not in local)
            local.add(x)
        assert keep.tolist() == expect
        seen.add(ids[keep])
        ref |= set(ids.tolist())
    assert len(seen) == len(ref)


def test_import_npy_and_parquet(root, tmp_path):
    vecs = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    vecs[7, 0] = np.nan
    np.save(tmp_path / "v.npy", vecs)
    np.save(tmp_path / "ids.npy", np.arange(1000, 1300))
    np.save(tmp_path / "lab.npy", np.arange(300) % 5)
    m = import_vectors(
        str(tmp_path / "v.npy"),
        root.uri("from-npy"),
        model_id="old",
        dtype="float16",
        normalize=True,
        ids=str(tmp_path / "ids.npy"),
        labels=str(tmp_path / "lab.npy"),
        rows_per_file=128,
        storage=root.storage,
    )
    assert m.rows == 299 and m.quarantined_rows == 1 and len(m.files) == 3
    g = Gallery.open(root.uri("from-npy"), root.storage)
    info = inspect_gallery(g)
    assert (
        info["rows"] == 299
        and info["dim"] == 16
        and info["dtype"] == "float16"
        and info["model"]["normalized"]
    )
    assert validate_gallery(g).ok
    t = g.read()
    assert 1007 not in t.column("id").to_pylist() and t.column("label").to_pylist()[:3] == [0, 1, 2]
    norms = np.linalg.norm(embedding_matrix(t.column("embedding")).astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1, atol=2e-2)

    # Parquet source with other column names and a variable-length list column
    src = pa.table(
        {
            "key": pa.array(["a", "b", "c"]),
            "vec": pa.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0, 1.0]]),
            "extra": [1, 2, 3],
        }
    )
    pq.write_table(src, tmp_path / "src.parquet")
    m2 = import_vectors(
        str(tmp_path / "src.parquet"),
        root.uri("from-pq"),
        model_id="x",
        id_column="key",
        embedding_column="vec",
        dim=2,  # a variable-length list: the dimension is given, not guessed
        storage=root.storage,
    )
    assert m2.rows == 2 and m2.quarantine_reasons == {"wrong dimension 3 (expected 2)": 1}
    t2 = Gallery.open(root.uri("from-pq"), root.storage).read()
    assert t2.column("id").to_pylist() == ["a", "b"] and t2.column("extra").to_pylist() == [1, 2]


def test_import_from_a_folder_reads_data_files_only(root, tmp_path):
    """A Parquet folder's hidden and ``_`` files (a partial upload, a sidecar) are not imported as
    vectors: the same files pyarrow's dataset discovery would read."""
    src = tmp_path / "export"
    (src / "day=1").mkdir(parents=True)
    pq.write_table(make_table(30, 4, start=0), src / "day=1" / "a.parquet")
    pq.write_table(make_table(20, 4, start=100), src / "b.parquet")
    pq.write_table(make_table(5, 4, start=900), src / ".b.parquet.partial.parquet")
    pq.write_table(make_table(6, 4, start=950), src / "_unfinished.parquet")
    m = import_vectors(str(src), root.uri("from-folder"), model_id="old", storage=root.storage)
    ids = sorted(Gallery.open(root.uri("from-folder"), root.storage).read().column("id").to_pylist())
    assert m.rows == 50 and ids == list(range(30)) + list(range(100, 120))


def test_chunked_writer_publishes_one_file_on_commit_only(tmp_path):
    """Chunks encoded on a background thread become one Parquet file, published whole on commit
    with the metadata and an entry that matches the bytes; leaving without commit writes nothing."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmu_ray.gallery import ChunkedParquetWriter, embedding_array
    from dmu_ray.storage import resolve

    loc = resolve(str(tmp_path / "out" / "part-0.parquet"))
    chunks = [
        pa.table(
            {
                "id": np.arange(k * 10, k * 10 + 10),
                "embedding": embedding_array(np.full((10, 4), k, np.float16)),
            }
        )
        for k in range(3)
    ]
    with ChunkedParquetWriter(loc, source="src.parquet", metadata={b"dmu.model": b"{}"}) as w:
        for c in chunks:
            w.write(c)
    assert not (tmp_path / "out" / "part-0.parquet").exists()  # no commit: nothing published
    with ChunkedParquetWriter(
        loc, source="src.parquet", row_group_rows=10, metadata={b"dmu.model": b"{}"}
    ) as w:
        for c in chunks:
            w.write(c)
        entry = w.commit(chunks[0].schema)
    data = (tmp_path / "out" / "part-0.parquet").read_bytes()
    assert entry.rows == 30 and entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    t = pq.read_table(loc.path)
    assert t["id"].to_pylist() == list(range(30)) and t.schema.metadata[b"dmu.model"] == b"{}"
    assert pq.ParquetFile(loc.path).metadata.num_row_groups == 3
    empty = resolve(str(tmp_path / "out" / "empty.parquet"))
    with ChunkedParquetWriter(empty) as w:
        assert w.commit(chunks[0].schema).rows == 0
    assert pq.read_table(empty.path).schema.names == ["id", "embedding"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_unstorable_rows_names_each_kind(dtype):
    """The output check of a refresh: non-finite values, zero vectors and rows off unit norm are
    found and worded, whichever the row's norm says (a float32 row whose sum of squares
    overflows is finite but not unit-norm); an unnormalised gallery only refuses non-finite rows."""
    from dmu_ray.gallery import unstorable_rows

    m = np.zeros((7, 4), dtype=dtype)
    m[0] = [1, 0, 0, 0]
    m[1] = [0.6, 0.8, 0, 0]
    m[2] = 0  # zero vector
    m[3] = [np.nan, 0, 0, 0]
    m[4] = [np.inf, 0, 0, 0]
    m[5] = [0.5, 0, 0, 0]  # not unit-norm
    m[6] = [3e38, 3e38, 0, 0] if dtype == "float32" else [60000, 60000, 0, 0]
    lost, words = unstorable_rows(m, ModelInfo(model_id="m", dim=4, dtype=dtype, normalized=True))
    assert np.flatnonzero(lost).tolist() == [2, 3, 4, 5, 6]
    out_of_range = f"value out of {dtype} range (NaN/Inf once stored)"
    off = "not unit-norm but the gallery is declared normalized"
    assert words == ["zero vector (cannot be L2-normalised)", out_of_range, out_of_range, off, off]
    lost, words = unstorable_rows(m, ModelInfo(model_id="m", dim=4, dtype=dtype, normalized=False))
    assert np.flatnonzero(lost).tolist() == [3, 4] and words == [out_of_range] * 2


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_row_scans_match_numpy_on_every_kind_of_value(dtype):
    """The row checks read finiteness from the bits and norms a slice at a time: the same answers
    as numpy's isfinite and one whole-matrix norm, over random bit patterns (NaNs, infinities,
    subnormals of both signs), more rows than a slice, another byte order and a strided view."""
    import torch

    from dmu_ray.gallery.contract import SCAN_ROWS, _row_norms, finite_rows

    uint = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}[dtype]
    rng = np.random.default_rng(0)
    bits = rng.integers(0, np.iinfo(uint).max, size=(2 * SCAN_ROWS + 5, 6), dtype=uint, endpoint=True)
    m = bits.view(dtype)
    want = np.isfinite(m).all(axis=1)
    assert 0 < want.sum() < len(m)  # both kinds of row are there
    assert (finite_rows(m) == want).all()
    assert (finite_rows(m.astype(m.dtype.newbyteorder(">"))) == want).all()
    assert (finite_rows(m[:, ::2]) == np.isfinite(m[:, ::2]).all(axis=1)).all()
    if dtype != "float64":
        v = rng.standard_normal((2 * SCAN_ROWS + 5, 16)).astype(dtype)
        whole = torch.linalg.vector_norm(torch.from_numpy(v), dim=1, dtype=torch.float32).numpy()
        assert np.array_equal(_row_norms(v), whole)
