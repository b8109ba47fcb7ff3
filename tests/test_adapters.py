"""Adapters between two frozen models (issue 36): closed forms against numpy, statistics merged
from parts equal to one pass, the join of two galleries on a real Ray cluster with counts and a
held-out share, the gate's label-free share and exit code, and a refresh that applies a fitted
adapter and records it in the lineage; bad input refused before work."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from test_cli_gallery import run as cli

from dmu_ray.adapters.config import AdapterFitConfig
from dmu_ray.adapters.job import AdapterError, run_adapter_fit
from dmu_ray.adapters.stats import PairStats, affine, procrustes, residual
from dmu_ray.evaluate.gate import share_of_reembedding
from dmu_ray.gallery import Gallery, GalleryError, GalleryWriter, ModelInfo, embedding_array, embedding_matrix
from dmu_ray.models.artifact import build_upgrade_module, load_artifact
from dmu_ray.models.linear_map import LinearMap
from dmu_ray.refresh import run_refresh
from dmu_ray.refresh.config import RefreshConfig
from dmu_ray.refresh.job import RefreshError
from dmu_ray.settings import ActorPoolConfig
from dmu_ray.storage import resolve


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_procrustes_recovers_a_rotation_and_unequal_dims_are_semi_orthogonal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16))
    r = rotation(16, 1)
    w, b = procrustes(PairStats.of(x, x @ r))
    np.testing.assert_allclose(w, r, atol=1e-5)
    assert np.abs(b).max() == 0
    # a centred fit also recovers a shift
    w, b = procrustes(PairStats.of(x, x @ r + 3.0), center=True)
    np.testing.assert_allclose(w, r, atol=1e-5)
    np.testing.assert_allclose(b, np.full(16, 3.0) @ np.eye(16), atol=1e-5)
    # 16 -> 8: orthonormal columns, and the best such map by the alignment it maximises
    y = x @ r[:, :8] + 0.05 * rng.standard_normal((500, 8))
    stats = PairStats.of(x, y)
    w, _ = procrustes(stats)
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-8)
    best = np.trace(w.T @ stats.xy)
    for seed in range(20):  # no other semi-orthogonal map aligns the pairs better
        other = rotation(16, 100 + seed)[:, :8] if seed else r[:, :8]
        assert best >= np.trace(other.T @ stats.xy) - 1e-9
    # isotropic inputs (X^T X = n I): the map behind the pairs itself
    iso = np.linalg.qr(rng.standard_normal((500, 16)))[0] * np.sqrt(500)
    w, _ = procrustes(PairStats.of(iso, iso @ r[:, :8]))
    np.testing.assert_allclose(w, r[:, :8], atol=1e-5)


def test_affine_is_least_squares_with_ridge_and_rank():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 12))
    y = x @ rng.standard_normal((12, 6)) + 0.5 + 0.1 * rng.standard_normal((400, 6))
    w, b = affine(PairStats.of(x, y))
    a = np.linalg.lstsq(np.hstack([x, np.ones((400, 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(w, a[:12], atol=1e-8)
    np.testing.assert_allclose(b, a[12], atol=1e-8)
    assert residual(PairStats.of(x, y), w, b) == pytest.approx(((x @ w + b - y) ** 2).sum(1).mean(), rel=1e-9)
    wr, _ = affine(PairStats.of(x, y), ridge=10.0)
    assert np.linalg.norm(wr) < np.linalg.norm(w)  # the penalty shrinks the map
    w2, _ = affine(PairStats.of(x, y), rank=2)
    assert np.linalg.matrix_rank(w2, tol=1e-8) == 2


def test_affine_of_an_underdetermined_map_is_the_minimum_norm_least_squares():
    """Fewer pairs than dims (1,000 pairs of 1280-d vectors, as an off-the-shelf sample can be),
    or source dims that repeat others: the pairs do not determine the map, and the fit must be
    lstsq's minimum-norm solution, not a solve that divides by rounding-level eigenvalues."""
    rng = np.random.default_rng(12)

    def lstsq(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = x.astype(np.float64), y.astype(np.float64)
        w = np.linalg.lstsq(x - x.mean(0), y - y.mean(0), rcond=None)[0]
        return w, y.mean(0) - x.mean(0) @ w

    # float16 vectors, 60 pairs of 100-d (statistics in float32 products)
    x = rng.standard_normal((60, 100)).astype(np.float16)
    y = (x.astype(np.float32) @ rng.standard_normal((100, 40)).astype(np.float32) / 10).astype(np.float16)
    w, b = affine(PairStats.of(x, y))
    w0, b0 = lstsq(x, y)
    np.testing.assert_allclose(w, w0, atol=1e-4 * np.abs(w0).max())
    np.testing.assert_allclose(b, b0, atol=1e-4 * np.abs(b0).max() + 1e-6)
    # float64, more pairs than dims but two dims copies of others
    x = rng.standard_normal((400, 12))
    x[:, 10], x[:, 11] = x[:, 0], 2 * x[:, 1]
    y = x @ rng.standard_normal((12, 6)) + 0.1 * rng.standard_normal((400, 6))
    w, b = affine(PairStats.of(x, y))
    w0, b0 = lstsq(x, y)
    np.testing.assert_allclose(w, w0, atol=1e-8)
    np.testing.assert_allclose(b, b0, atol=1e-8)
    # the reduced-rank fit starts from it
    w2, _ = affine(PairStats.of(x, y), rank=2)
    assert np.linalg.matrix_rank(w2, tol=1e-8) == 2 and np.abs(w2).max() < 10 * np.abs(w0).max()


def test_statistics_merged_from_parts_equal_one_pass():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((301, 8)), rng.standard_normal((301, 5))
    whole = PairStats.of(x, y)
    parts = [PairStats.of(x[i : i + 77], y[i : i + 77]) for i in range(0, 301, 77)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert merged.n == whole.n
    for k in ("sx", "sy", "xx", "xy"):
        np.testing.assert_allclose(getattr(merged, k), getattr(whole, k), atol=1e-10)
    assert merged.yy == pytest.approx(whole.yy)
    # chunked accumulation: the same sums; float32 inputs (gallery vectors) to float32's precision
    small = PairStats.of(x, y, chunk=7)
    f32 = PairStats.of(x.astype(np.float32), y.astype(np.float32), chunk=100)
    for k in ("sx", "sy", "xx", "xy"):
        np.testing.assert_allclose(getattr(small, k), getattr(whole, k), atol=1e-10)
        np.testing.assert_allclose(getattr(f32, k), getattr(whole, k), rtol=1e-5, atol=1e-4)
    assert f32.yy == pytest.approx(whole.yy, rel=1e-6) and f32.n == 301


def test_folds_of_the_statistics_are_their_rows_and_merge_fold_by_fold():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((300, 6)).astype(np.float32), rng.standard_normal((300, 4)).astype(np.float32)
    fold, rows = rng.random(300) < 0.3, rng.random(300) < 0.8
    s = PairStats.of(x, y, rows=rows, fold=fold)
    a, b = s.folds
    assert (a.n, b.n, s.n) == ((rows & fold).sum(), (rows & ~fold).sum(), rows.sum())
    np.testing.assert_allclose(a.xy, PairStats.of(x[rows & fold], y[rows & fold]).xy, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.xx, PairStats.of(x[rows], y[rows]).xx, rtol=1e-5, atol=1e-4)
    half = PairStats.of(x[:150], y[:150], fold=fold[:150]).merge(
        PairStats.of(x[150:], y[150:], fold=fold[150:])
    )
    np.testing.assert_allclose(
        half.folds[0].xx, PairStats.of(x, y, fold=fold).folds[0].xx, rtol=1e-5, atol=1e-4
    )
    assert s.eps == np.finfo(np.float32).eps and PairStats.of(x.astype(np.float64), y).eps < 1e-15
    with pytest.raises(ValueError, match="fold must be a boolean mask of 300 rows"):
        PairStats.of(x, y, fold=np.ones(3, bool))


def test_ridge_auto_picks_the_ridge_that_keeps_most_neighbours_on_the_tune_pairs(tmp_path):
    """About as many pairs as dims and noisy targets: the least-squares map (ridge 0) fits the
    noise. The ridge chosen by the share of new/new's neighbours on a tune share of the pairs
    (each a query against the others), with the map fitted on the rest, keeps more of new/new's
    top-10 on 2,000 items no fit saw (by 0.013-0.041 over seeds 0-9 of this data)."""
    from dmu_ray.adapters.pairs import _write_pairs
    from dmu_ray.adapters.ridge import RIDGE_GRID, choose_ridge

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 192))
    a = rng.standard_normal((192, 64)) / np.sqrt(192)

    def items(n: int) -> tuple[np.ndarray, np.ndarray]:
        old = centres[rng.integers(0, 30, n)] + 0.7 * rng.standard_normal((n, 192))
        return old.astype(np.float32), (old @ a + 0.5 * rng.standard_normal((n, 64))).astype(np.float32)

    old, new = items(320)
    eval_old, eval_new = items(2000)
    tune = np.zeros(320, bool)
    tune[::4] = True
    stats = PairStats.of(old, new, fold=tune)
    loc = resolve(str(tmp_path / "tune"))
    _write_pairs(loc, 0, np.arange(320), old, new, None, tune)
    ridge, record = choose_ridge(stats, loc, "gallery", 10)
    shares = [c["share"] for c in record["candidates"]]
    assert (
        len(shares) == len(RIDGE_GRID)
        and record["tune_pairs"] == 80
        and record["k"] == 3
        and record["chosen"] == ridge
    )
    # the smallest ridge within one standard error (query by query) of the best share
    cands = record["candidates"]
    i = [c["ridge"] for c in cands].index(ridge)
    assert ridge > 0 and max(shares) - shares[i] <= cands[i]["error_to_best"]
    assert all(max(shares) - c["share"] > c["error_to_best"] for c in cands[:i])

    def share(r: float) -> float:
        w, b = affine(stats, ridge=r)
        q, g = slice(0, 500), slice(500, None)
        return share_of_reembedding((eval_new[q], eval_new[g]), {"s": (eval_new[q], eval_old[g] @ w + b)})[
            "s"
        ]

    assert share(ridge) > share(0.0) + 0.01
    # the query side maps new-model queries into the old space: with new = old R (R orthogonal)
    # that map is exact, keeps all of new/new's neighbours, and ridge 0 is kept
    rot = np.linalg.qr(rng.standard_normal((192, 192)))[0].astype(np.float32)
    rotated = old @ rot
    _write_pairs(resolve(str(tmp_path / "q")), 0, np.arange(320), old, rotated, None, tune)
    rq, recq = choose_ridge(PairStats.of(rotated, old, fold=tune), resolve(str(tmp_path / "q")), "query", 10)
    assert rq == 0.0 and recq["candidates"][0]["share"] == 1.0
    # targets a linear map of the sources exactly: every small ridge keeps all of new/new's
    # neighbours, and the smallest, 0, is kept
    exact = PairStats.of(old, old[:, :64] * 2 + 1, fold=tune)
    _write_pairs(resolve(str(tmp_path / "exact")), 0, np.arange(320), old, old[:, :64] * 2 + 1, None, tune)
    r0, rec0 = choose_ridge(exact, resolve(str(tmp_path / "exact")), "gallery", 10)
    assert r0 == 0.0 and rec0["candidates"][0]["share"] == 1.0
    # the tune share is capped so that the driver never holds more than about MAX_TUNE_PAIRS
    from dmu_ray.adapters.ridge import MAX_TUNE_PAIRS, tune_share

    assert tune_share(0.1, 5_000) == 0.1 and tune_share(0.1, 10**9) * 10**9 == pytest.approx(MAX_TUNE_PAIRS)
    # nothing to choose on without tune pairs: ridge 0
    empty = resolve(str(tmp_path / "none"))
    assert choose_ridge(PairStats.of(old, new), empty, "gallery", 10)[0] == 0.0


def test_the_two_pass_join_gives_every_cpu_a_bucket_where_the_rows_allow():
    """A million pairs with room for all of them in one bucket still make one bucket per CPU (one
    join task each, not one task joining everything), never buckets below MIN_BUCKET_ROWS, and
    never more rows in a bucket than bucket_rows."""
    from dmu_ray.adapters.pairs import MIN_BUCKET_ROWS, bucket_count

    assert bucket_count(1_000_000, 1_000_000, slots=2) == 2
    assert bucket_count(1_000_000, 1_000_000, slots=64) == 1_000_000 // MIN_BUCKET_ROWS
    assert bucket_count(10_000, 1_000_000, slots=64) == 1  # too few rows to share out
    assert bucket_count(10_000_000, 1_000_000, slots=2) == 10  # memory decides
    assert bucket_count(2_500, 1_000, slots=1) == 3


def test_statistics_of_selected_rows_equal_those_of_the_selection():
    """The join passes the fitted rows as a mask (no copy of the vectors): the statistics are
    those of the selected rows, float16 vectors included, whatever the chunking."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((301, 8)).astype(np.float16)
    y = rng.standard_normal((301, 5)).astype(np.float16)
    rows = rng.random(301) < 0.7
    want = PairStats.of(x[rows].astype(np.float32), y[rows].astype(np.float32))
    for chunk in (7, 100, 8192):
        got = PairStats.of(x, y, chunk=chunk, rows=rows)
        assert got.n == int(rows.sum())
        for k in ("sx", "sy", "xx", "xy"):
            np.testing.assert_allclose(getattr(got, k), getattr(want, k), rtol=1e-5, atol=1e-5)
        assert got.yy == pytest.approx(want.yy, rel=1e-5)
    with pytest.raises(ValueError, match="boolean mask of 301 rows"):
        PairStats.of(x, y, rows=np.flatnonzero(rows))


def test_statistics_on_a_torch_device_equal_numpys():
    """The join's GPU path (``device``; here torch on the CPU, the same code as on CUDA) gives
    numpy's statistics: float16 gallery vectors with a row mask, chunked, and float64 inputs."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1001, 12)).astype(np.float16)
    y = rng.standard_normal((1001, 9)).astype(np.float16)
    rows = rng.random(1001) < 0.8
    for chunk in (None, 100):
        want, got = PairStats.of(x, y, rows=rows), PairStats.of(x, y, chunk=chunk, rows=rows, device="cpu")
        assert got.n == want.n == int(rows.sum())
        for k in ("sx", "sy", "xx", "xy"):
            assert getattr(got, k).dtype == np.float64
            np.testing.assert_allclose(getattr(got, k), getattr(want, k), rtol=1e-5, atol=1e-4)
        assert got.yy == pytest.approx(want.yy, rel=1e-6)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    got, want = PairStats.of(x64, y64, device="cpu"), PairStats.of(x64, y64)
    np.testing.assert_allclose(got.xy, want.xy, rtol=1e-12, atol=1e-10)


def test_share_of_reembedding_counts_new_news_neighbours():
    rng = np.random.default_rng(4)
    q, g = rng.standard_normal((50, 8)), rng.standard_normal((300, 8))
    shares = share_of_reembedding((q, g), {"same": (q, g), "noise": (q, rng.standard_normal((300, 8)))}, k=10)
    assert shares["same"] == 1.0 and shares["noise"] < 0.2
    # queries drawn from the gallery's items: each one's own row is left out of its neighbours,
    # in the reference's search and in every strategy's (a map that sends every item onto its own
    # target, and nothing else right, would otherwise score on its own row)
    from dmu_ray.evaluate.gate import shares_per_query

    own = np.arange(0, 300, 6)
    per = shares_per_query(
        (g[own], g), {"same": (g[own], g), "noise": (g[own], rng.standard_normal((300, 8)))}, 10, own=own
    )
    assert (per["same"] == 1.0).all() and per["noise"].mean() < 0.2
    noisy = rng.standard_normal((300, 8))
    noisy[own] = g[own]  # every query's own row right, the rest noise
    got = shares_per_query((g[own], g), {"own only": (g[own], noisy)}, 10, own=own)["own only"]

    def top(q: np.ndarray, x: np.ndarray) -> np.ndarray:  # brute force, the own row left out
        return np.argsort(-_cos_without_own(q, x, own), 1)[:, :10]

    ref, mine = top(g[own], g), top(g[own], noisy)
    np.testing.assert_allclose(got, [len(np.intersect1d(a, b)) / 10 for a, b in zip(ref, mine, strict=True)])
    # the labelled figures the same way: the own row is neither a result nor counted as relevant
    from dmu_ray.evaluate.gate import labelled_metrics

    labels = rng.integers(0, 5, 300)
    lab = labelled_metrics({"noisy": (g[own], noisy)}, labels[own], labels, map_at=20, own=own)["noisy"]
    ranked = labels[np.argsort(-_cos_without_own(g[own], noisy, own), 1)[:, :20]]
    rel = ranked == labels[own][:, None]
    n_rel = (labels[None, :] == labels[own][:, None]).sum(1) - 1
    ap = (np.cumsum(rel, 1) / np.arange(1, 21) * rel).sum(1) / np.minimum(n_rel, 20)
    assert lab["R@1"] == pytest.approx(rel[:, 0].mean()) and lab["mAP@20"] == pytest.approx(ap.mean())
    assert lab["R@1"] < 1  # with its own row (the query's own vector) among the results: 1


def _cos_without_own(q: np.ndarray, x: np.ndarray, own: np.ndarray) -> np.ndarray:
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    sim[np.arange(len(own)), own] = -np.inf
    return sim


def gallery(uri: str, ids: np.ndarray, vecs: np.ndarray, model: str, files: int = 3) -> str:
    rows = -(-len(ids) // files)
    with GalleryWriter(resolve(uri), ModelInfo(model_id=model, dim=vecs.shape[1]), rows_per_file=rows) as w:
        w.write(pa.table({"id": ids, "embedding": embedding_array(vecs.astype(np.float32))}))
    return uri


def two_models(tmp_path, n: int = 3000, d_old: int = 24, d_new: int = 32, noise: float = 0.02):
    """Old vectors of n items, and a new model's vectors of 90% of them (plus 50 items the old
    gallery lacks): the new space is a fixed semi-orthogonal map of the old one, with noise."""
    rng = np.random.default_rng(5)
    old = rng.standard_normal((n, d_old))
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    r = rotation(d_new, 6)[:d_old]  # (d_old, d_new), orthonormal rows
    ids = np.arange(n, dtype=np.int64)
    keep = ids[: int(n * 0.9)]
    extra = np.arange(n, n + 50, dtype=np.int64)
    new = np.vstack([old[keep] @ r, rng.standard_normal((50, d_old)) @ r])
    new += noise * rng.standard_normal(new.shape)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    g_old = gallery(str(tmp_path / "old"), ids, old, "old-m")
    g_new = gallery(str(tmp_path / "new"), np.concatenate([keep, extra]), new, "new-m")
    return g_old, g_new, old, r


def test_the_gate_takes_a_seeded_sample_of_the_held_out_items_not_the_first_ids(tmp_path):
    """Ids that follow the classes (a folder listing, a data set written class by class): the
    gate's first items span the classes, the rows stay paired, a ``limit`` takes the first rows
    of the same order, and the seed changes it."""
    import pyarrow.parquet as pq

    from dmu_ray.adapters.pairs import read_holdout_labelled

    classes, per = 20, 50
    ids = np.arange(classes * per)
    labels = ids // per  # ids in class blocks
    vec = np.stack([ids, -ids], 1).astype(np.float32)
    (tmp_path / "h").mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(ids)), 3)):
        pq.write_table(
            pa.table(
                {
                    "id": ids[part],
                    "old": embedding_array(vec[part]),
                    "new": embedding_array(2 * vec[part]),
                    "label": labels[part],
                }
            ),
            tmp_path / "h" / f"part-{k:05d}.parquet",
        )
    loc = resolve(str(tmp_path / "h"))
    all_ids, old, new, lab = read_holdout_labelled(loc)
    assert sorted(all_ids.tolist()) == ids.tolist()
    np.testing.assert_array_equal(old[:, 0], all_ids)
    np.testing.assert_array_equal(new[:, 1], -2 * all_ids)
    np.testing.assert_array_equal(lab, all_ids // per)
    assert len(set(lab[:50].tolist())) >= 15  # the first 50 by id would be one class
    some = read_holdout_labelled(loc, limit=60)
    np.testing.assert_array_equal(some[0], all_ids[:60])
    np.testing.assert_array_equal(some[1], old[:60])
    np.testing.assert_array_equal(some[3], lab[:60])
    assert read_holdout_labelled(loc, limit=60, seed=1)[0].tolist() != some[0].tolist()


def test_fit_a_gallery_side_adapter_gate_it_and_refresh_with_it(ray_local, tmp_path):
    g_old, g_new, old, r = two_models(tmp_path)
    cfg = AdapterFitConfig(
        old_gallery=g_old,
        new_gallery=g_new,
        output=str(tmp_path / "ad"),
        bucket_rows=1000,  # 3 buckets: the join runs on several tasks
        holdout=0.2,
        gate={"queries": 100, "k": 10, "min_share": 0.8},
    )
    out = run_adapter_fit(cfg, progress=False)
    p = out["pairs"]
    assert p["matched"] == 2700 and p["old_only"] == 300 and p["new_only"] == 50
    assert p["fitted"] + p["held_out"] == 2700 and 400 < p["held_out"] < 700  # a seeded ~20%
    gate = out["gate"]
    assert gate["strategy"] == "new/upgraded" and gate["passed"] is True
    assert gate["labelled"] is None  # vectors without labels: the label-free share alone
    assert gate["share"]["new/upgraded"] > 0.8 and "old/old" in gate["share"]
    assert "new/old" not in gate["share"]  # 24-d old vectors cannot be searched with 32-d queries
    saved = json.loads((tmp_path / "ad" / "gate.json").read_text())
    assert saved["gate"]["share"] == gate["share"] and (tmp_path / "ad" / "gate.md").exists()
    assert (tmp_path / "ad" / "gate.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "ad" / "_pairs").exists()  # the join's buckets are removed
    art = load_artifact(out["adapter"]["uri"])
    assert (
        art.card.form == "linear" and art.card.direction == "gallery" and art.card.fit["kind"] == "procrustes"
    )
    m = build_upgrade_module(art)
    assert isinstance(m, LinearMap)
    np.testing.assert_allclose(m.weight.detach().numpy(), r, atol=0.02)  # the map behind the pairs
    # the refresh applies it: upgraded old vectors land on the new ones, lineage names the adapter
    res = run_refresh(
        RefreshConfig(
            source=g_old,
            output=str(tmp_path / "up"),
            module=out["adapter"]["uri"],
            dtype="float32",
            pool=ActorPoolConfig(max_actors=1, num_cpus=0.5),
        ),
        progress=False,
    )
    up = Gallery.open(str(tmp_path / "up"))
    assert res.manifest.rows == 3000 and up.model.upgrade_module == art.ident
    t = up.read(columns=["id", "embedding"]).sort_by("id")
    got = embedding_matrix(t.column("embedding"))
    want = old @ r
    cos = (got * want).sum(1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.97
    assert any(art.sha256 in json.dumps(c) for c in up.model.chains().values())
    # the same pairs with a gate set above what the adapter reaches: the command exits 1
    cfg2 = tmp_path / "a.yaml"
    cfg2.write_text(
        yaml.safe_dump(
            {
                "old_gallery": g_old,
                "new_gallery": g_new,
                "output": str(tmp_path / "ad2"),
                "holdout": 0.2,
                "gate": {"queries": 100, "min_share": 1.0},
            }
        )
    )
    r2 = cli("adapter", "fit", "--config", str(cfg2), "--quiet")
    assert r2.returncode == 1, r2.stderr
    assert "gate FAILED (min 1.0)" in r2.stdout and "new/upgraded retrieves" in r2.stdout
    # about 440 gate items for a top-10: coarse neighbourhoods, said in gate.json, gate.md and on stderr
    from dmu_ray.adapters.job import coarse_gate

    caution = json.loads((tmp_path / "ad2" / "gate.json").read_text())["gate"]["caution"]
    assert caution and caution in (tmp_path / "ad2" / "gate.md").read_text() and caution in r2.stderr
    assert "at least 1,000 items" in caution and coarse_gate(1000, 10) is None and coarse_gate(999, 10)


def test_a_query_side_adapter_maps_new_queries_to_the_old_space_and_refresh_refuses_it(ray_local, tmp_path):
    g_old, g_new, old, r = two_models(tmp_path, noise=0.0)
    out = run_adapter_fit(
        AdapterFitConfig(
            old_gallery=g_old,
            new_gallery=g_new,
            output=str(tmp_path / "q"),
            direction="query",
            adapter="affine",
            holdout=0.2,
            gate={"queries": 100},
        ),
        progress=False,
    )
    assert out["gate"]["strategy"] == "adapted/old" and out["gate"]["passed"] is None
    assert out["gate"]["share"]["adapted/old"] > 0.95
    m = build_upgrade_module(load_artifact(out["adapter"]["uri"]))
    assert (m.in_dim, m.out_dim) == (32, 24)
    with torch.inference_mode():
        back = m(torch.from_numpy((old[:5] @ r).astype(np.float32))).numpy()
    np.testing.assert_allclose(back, old[:5], atol=1e-3)  # new -> old undoes the map
    with pytest.raises(RefreshError, match="is a query-side adapter"):
        run_refresh(RefreshConfig(source=g_old, output=str(tmp_path / "x"), module=out["adapter"]["uri"]))
    assert not (tmp_path / "x").exists()


def test_ridge_auto_in_the_job_records_its_choice_and_fits_every_fitted_pair_with_it(ray_local, tmp_path):
    g_old, g_new, *_ = two_models(tmp_path, n=600, noise=0.3)
    base = {
        "old_gallery": g_old,
        "new_gallery": g_new,
        "adapter": "affine",
        "holdout": 0.2,
        "tune": 0.3,
        "gate": {"queries": 40},
    }
    auto = run_adapter_fit(AdapterFitConfig(output=str(tmp_path / "auto"), **base), progress=False)
    rec = auto["fit"]["ridge"]
    assert rec["by"] == "tune share" and len(rec["candidates"]) == 8 and rec["tune_pairs"] > 50
    assert rec["chosen"] in [c["ridge"] for c in rec["candidates"]]
    assert not (tmp_path / "auto" / "_tune").exists()  # the tune pairs are scratch
    assert (
        f"Ridge auto: {rec['chosen']:.4g}, its share of new/new's top-{rec['k']} on {rec['tune_pairs']:,} tune pairs"
        in (tmp_path / "auto" / "gate.md").read_text()
    )
    card = load_artifact(auto["adapter"]["uri"]).card
    assert card.fit["ridge"] == rec and card.fit["options"]["ridge"] is None
    # the chosen ridge given as the config's: the same map (the tune pairs are fitted on too)
    fixed = run_adapter_fit(
        AdapterFitConfig(output=str(tmp_path / "fixed"), ridge=rec["chosen"], **base), progress=False
    )
    assert fixed["fit"]["ridge"] == {"by": "config", "chosen": rec["chosen"]}
    assert "(from the config)" in (tmp_path / "fixed" / "gate.md").read_text()
    w = [
        build_upgrade_module(load_artifact(r["adapter"]["uri"])).weight.detach().numpy()
        for r in (auto, fixed)
    ]
    np.testing.assert_allclose(w[0], w[1], rtol=1e-5, atol=1e-6)
    assert auto["gate"]["share"] == fixed["gate"]["share"]


def test_bad_pairs_are_refused_naming_what_is_wrong(ray_local, tmp_path):
    g_old, g_new, *_ = two_models(tmp_path, n=400)
    other = gallery(str(tmp_path / "other"), np.arange(10_000, 10_400), np.eye(400, 32), "new-m")
    with pytest.raises(AdapterError, match=r"only 0 of the smaller gallery's 400 ids \(0.0%\) have a pair"):
        run_adapter_fit(AdapterFitConfig(old_gallery=g_old, new_gallery=other, output=str(tmp_path / "o1")))
    assert [p for p in (tmp_path / "o1").rglob("*") if p.is_file()] == []  # claim and holdout removed
    # too few held-out pairs for the gate: refused after the join, before anything is fitted, and
    # the same output then takes the fixed config
    few = {"old_gallery": g_old, "new_gallery": g_new, "output": str(tmp_path / "o3")}
    with pytest.raises(
        AdapterError, match=r"gate: \d+ held-out pairs \(holdout 0.05 of 360 matched\), but each"
    ):
        run_adapter_fit(
            AdapterFitConfig(holdout=0.05, gate={"k": 30}, adapter="mlp", mlp={"batch_size": 16}, **few)
        )
    assert [p for p in (tmp_path / "o3").rglob("*") if p.is_file()] == []
    ok = run_adapter_fit(AdapterFitConfig(holdout=0.05, gate={"k": 5}, **few), progress=False)
    assert (tmp_path / "o3" / "adapter.pt").exists()
    assert ok["gate"]["queries"] == ok["pairs"]["held_out"] == ok["gate"]["gallery"] + 1  # all, < 1,000
    same = gallery(str(tmp_path / "same"), np.arange(400), np.eye(400, 24), "old-m")
    with pytest.raises(AdapterError, match="both embedded by model 'old-m'"):
        run_adapter_fit(AdapterFitConfig(old_gallery=g_old, new_gallery=same, output=str(tmp_path / "o2")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(AdapterError, match="already holds files; an adapter job"):
        run_adapter_fit(AdapterFitConfig(old_gallery=g_old, new_gallery=g_new, output=str(tmp_path / "full")))
    (tmp_path / "full" / "_adapter.json").write_text("{}")  # a job that failed after its join
    with pytest.raises(AdapterError, match=r"already holds files \(an adapter job that did not finish"):
        run_adapter_fit(AdapterFitConfig(old_gallery=g_old, new_gallery=g_new, output=str(tmp_path / "full")))
    r = cli("adapter", "fit", "--config", str(_cfg(tmp_path, adapter="procrustes", ridge=1.0)))
    assert r.returncode == 2 and "ridge and rank are options of adapter: affine" in r.stderr
    with pytest.raises(ValueError, match=r"gate.max_gallery \(10\) must exceed gate.k \(10\)"):
        AdapterFitConfig(old_gallery=g_old, new_gallery=g_new, output="x", gate={"max_gallery": 10})
    # an MLP that cannot get one batch per worker, or its workers, is refused before any work
    for mlp, words in (
        ({"batch_size": 512, "num_workers": 2}, "fewer than one batch per worker"),
        ({"batch_size": 16, "use_gpu": True}, "an adapter training worker"),
    ):
        out = tmp_path / f"o-{len(words)}"
        with pytest.raises(Exception, match=words):
            run_adapter_fit(
                AdapterFitConfig(
                    old_gallery=g_old, new_gallery=g_new, output=str(out), adapter="mlp", mlp=mlp
                )
            )
        assert not out.exists()
    # join tasks that no node can hold (here a GPU) are refused before anything is claimed
    out = tmp_path / "o-gpu"
    with pytest.raises(Exception, match=r"the pair join's tasks \(num_cpus 1, num_gpus 1\) needs"):
        run_adapter_fit(AdapterFitConfig(old_gallery=g_old, new_gallery=g_new, output=str(out), num_gpus=1))
    assert not out.exists()
    with pytest.raises(ValueError, match="mlp-uncertainty orders a backfill of gallery rows"):
        AdapterFitConfig(
            old_gallery="a", new_gallery="b", output="c", adapter="mlp-uncertainty", direction="query"
        )


def _cfg(tmp_path, **over) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"old_gallery": "a", "new_gallery": "b", "output": "c", **over}))
    return str(p)


def test_a_query_adapter_in_evaluate_and_exported_as_torchscript(ray_local, tmp_path):
    """Two frozen models embed the digits gallery; a query adapter fitted on those pairs adds the
    adapted/old pairing to an evaluation, and its TorchScript file maps queries as the artefact does."""
    from dmu_ray.data.importers import import_digits
    from dmu_ray.evaluate.config import EvaluateConfig
    from dmu_ray.evaluate.embed import embed_to_gallery
    from dmu_ray.evaluate.job import run_evaluation
    from dmu_ray.evaluate.matrix import EvaluationError
    from dmu_ray.models.artifact import save_embedding_model
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead

    data = str(tmp_path / "digits")
    import_digits(data, image_size=16)
    torch.manual_seed(0)
    save_embedding_model(
        str(tmp_path / "old.pt"), EmbeddingModel("small", 8, 1), MarginHead(8, 10), {"id": "o"}
    )
    save_embedding_model(
        str(tmp_path / "new.pt"), EmbeddingModel("small", 12, 1), MarginHead(12, 10), {"id": "n"}
    )
    for side in ("old", "new"):
        embed_to_gallery(
            f"{data}/gallery", str(tmp_path / f"{side}.pt"), str(tmp_path / f"g-{side}"), dtype="float32"
        )
    fit = run_adapter_fit(
        AdapterFitConfig(
            old_gallery=str(tmp_path / "g-old"),
            new_gallery=str(tmp_path / "g-new"),
            output=str(tmp_path / "qa"),
            direction="query",
            adapter="affine",
            holdout=0.3,
            gate={"queries": 50},
        ),
        progress=False,
    )
    phi = fit["adapter"]["uri"]
    cfg = EvaluateConfig(
        data=data,
        old_model=str(tmp_path / "old.pt"),
        new_model=str(tmp_path / "new.pt"),
        query_adapter=phi,
        galleries={"old": str(tmp_path / "g-old")},
        output=str(tmp_path / "eval"),
        protocols=["retrieval"],
        tracking={"enabled": False},
    )
    res = run_evaluation(cfg, progress=False)
    assert {"old/old", "adapted/old", "new/new"} <= set(res["pairings"])
    assert 0 <= res["pairings"]["adapted/old"]["R@1"] <= 1
    assert "adapted/old" in (tmp_path / "eval" / "eval.md").read_text()
    # a gallery-side module given as the query adapter is refused before any work
    gal = run_adapter_fit(
        AdapterFitConfig(
            old_gallery=str(tmp_path / "g-old"),
            new_gallery=str(tmp_path / "g-new"),
            output=str(tmp_path / "ga"),
            holdout=0.5,
            gate={"queries": 50},
        ),
        progress=False,
    )
    cfg.query_adapter = gal["adapter"]["uri"]
    with pytest.raises(EvaluationError, match="is a gallery-side module"):
        run_evaluation(cfg, progress=False)
    # the TorchScript export maps a batch as the artefact does
    r = cli("adapter", "export", phi, str(tmp_path / "q.ts"))
    assert r.returncode == 0, r.stderr
    assert "new-model queries -> the old space" in r.stdout and "FutureWarning" not in r.stderr
    ts = torch.jit.load(str(tmp_path / "q.ts"))
    x = torch.randn(3, 12)
    with torch.inference_mode():
        np.testing.assert_allclose(
            ts(x).numpy(), build_upgrade_module(load_artifact(phi))(x).numpy(), atol=1e-5
        )


def test_mlp_uncertainty_adapter_learns_what_a_linear_map_cannot_and_orders_a_backfill(ray_local, tmp_path):
    """New vectors that are a non-linear function of the old ones, with noise on a known part of
    the items: the MLP trained on Ray Train (from the affine start) beats the affine map on the gate,
    and its uncertainty head puts the noisy items first, so its partial backfill beats a random one."""
    rng = np.random.default_rng(11)
    n, d_old, d_new = 6000, 16, 24
    old = rng.standard_normal((n, d_old))
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    a, r = rng.standard_normal((d_old, d_new)), rotation(d_new, 12)[:d_old]
    noisy = old[:, 0] > 0.25
    new = old @ r + 2.0 * np.tanh(old @ a) / np.sqrt(d_new)
    new += np.where(noisy, 0.25, 0.005)[:, None] * rng.standard_normal(new.shape)
    ids = np.arange(n, dtype=np.int64)
    g_old = gallery(str(tmp_path / "old"), ids, old, "old-m")
    g_new = gallery(str(tmp_path / "new"), ids, new / np.linalg.norm(new, axis=1, keepdims=True), "new-m")
    # through the command: its Ray Train run lives and ends with the command's own Ray cluster
    # (an in-process run left the session cluster's resource coordinator holding its CPUs for
    # the trainings of later tests; see the notes)
    cfg = tmp_path / "mlp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "old_gallery": g_old,
                "new_gallery": g_new,
                "output": str(tmp_path / "mlp"),
                "adapter": "mlp-uncertainty",
                "mlp": {
                    "width": 128,
                    "epochs": 20,
                    "batch_size": 32,
                    "lr": 1e-2,
                    "num_workers": 2,
                    "cpus_per_worker": 0.5,
                },
                "holdout": 0.25,
                "gate": {"queries": 200, "backfill": [0.25]},
            }
        )
    )
    r = cli("adapter", "fit", "--config", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "mlp" / "gate.json").read_text())
    fit = out["fit"]
    assert len(fit["history"]) == 20 and fit["history"][-1]["loss"] < fit["history"][0]["loss"]
    share = out["gate"]["share"]
    art = load_artifact(out["adapter"]["uri"])
    assert art.card.form == "mlp" and art.card.uncertainty and art.card.skip_linear
    assert art.card.fit["kind"] == "mlp-uncertainty" and art.card.fit["init"] == "affine"
    assert not (tmp_path / "mlp" / "_fit").exists() and not (tmp_path / "mlp" / "_train").exists()
    # the affine map of the same pairs, scored on the same held-out split
    from dmu_ray.adapters.pairs import read_holdout

    h_ids, h_old, h_new = read_holdout(resolve(str(tmp_path / "mlp" / "holdout")))
    hold = set(h_ids.tolist())
    fit_rows = np.array([i not in hold for i in ids])
    w, b = affine(PairStats.of(old[fit_rows], new[fit_rows]))
    q, g = slice(0, 200), slice(200, None)
    lin = share_of_reembedding((h_new[q], h_new[g]), {"affine": (h_new[q], h_old[g] @ w + b)}, k=10)["affine"]
    assert share["new/upgraded"] > lin + 0.03, (share, lin)
    assert share["backfill 25% (uncertainty)"] > share["backfill 25% (random)"] + 0.02, share
    # the head ranks the noisy items highest
    m = build_upgrade_module(art)
    with torch.inference_mode():
        _, log_var = m.forward_with_uncertainty(torch.from_numpy(old.astype(np.float32)))
    top = np.argsort(-log_var.numpy())[: int(noisy.sum())]
    assert noisy[top].mean() > 0.8


@pytest.mark.slow
def test_pairs_from_images_an_mlp_uncertainty_backfill_and_queries_embedded_through_an_adapter(
    ray_local, tmp_path
):
    """Off-the-shelf end to end through the CLI on the digits set: dmu-ray samples and embeds the
    pairs with two frozen models, fits mlp-uncertainty (gallery side) and affine (query side);
    backfill --policy uncertainty applies the first to the old gallery, embed --query-adapter maps
    the new model's queries into the old space with the second; wrong models are refused."""
    from dmu_ray.data.importers import import_digits
    from dmu_ray.evaluate.embed import embed_to_gallery
    from dmu_ray.models.artifact import save_embedding_model
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead

    data = str(tmp_path / "digits")
    import_digits(data, image_size=16)
    torch.manual_seed(0)
    m = {k: str(tmp_path / f"{k}.pt") for k in ("old", "new", "other", "other8")}
    for k, dim in (("old", 8), ("new", 12), ("other", 12), ("other8", 8)):
        save_embedding_model(m[k], EmbeddingModel("small", dim, 1), MarginHead(dim, 10), {"id": k})
    r = cli(
        "adapter", "pairs", "--images", f"{data}/train", "--old-model", m["old"], "--new-model", m["new"],
        "--output", str(tmp_path / "pairs"), "--sample", "600", "--seed", "3", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "600 rows, 8-d" in r.stdout and "600 rows, 12-d" in r.stdout
    po, pn = Gallery.open(str(tmp_path / "pairs" / "old")), Gallery.open(str(tmp_path / "pairs" / "new"))
    ids = po.read(columns=["id"]).column("id").to_numpy()
    assert po.num_rows == pn.num_rows == 600
    assert set(ids) == set(pn.read(columns=["id"]).column("id").to_numpy())
    from dmu_ray.adapters.sample import sample_ids

    # the same seed draws the same ids whatever the order of the rows
    all_ids = np.arange(ids.max() + 1000)
    assert len(sample_ids(all_ids, 600, 3)) == 600
    np.testing.assert_array_equal(sample_ids(all_ids[::-1].copy(), 600, 3), sample_ids(all_ids, 600, 3))

    def fit(name: str, **over) -> dict:
        cfg = {
            "old_gallery": str(tmp_path / "pairs" / "old"),
            "new_gallery": str(tmp_path / "pairs" / "new"),
            "output": str(tmp_path / name),
            "holdout": 0.3,
            "gate": {"queries": 50, "backfill": [0.5]},
            **over,
        }
        if "mlp" in over:  # Ray Train: in the command's own cluster (see the mlp-uncertainty test)
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            r = cli("adapter", "fit", "--config", str(tmp_path / f"{name}.yaml"), "--quiet")
            assert r.returncode == 0, r.stderr
        else:
            run_adapter_fit(AdapterFitConfig.model_validate(cfg), progress=False)
        return json.loads((tmp_path / name / "gate.json").read_text())

    up = fit("up", adapter="mlp-uncertainty", mlp={"width": 32, "epochs": 2, "batch_size": 64})
    assert {"backfill 50% (uncertainty)", "backfill 50% (random)"} <= set(up["gate"]["share"])
    # the digits have labels: the gate adds labelled figures; new/new's R@1 recomputed by brute force
    from dmu_ray.adapters.pairs import read_holdout_labelled

    lab = up["gate"]["labelled"]
    assert set(lab) == set(up["gate"]["share"]) | {"new/new"}
    _, _, h_new, h_lab = read_holdout_labelled(resolve(str(tmp_path / "up" / "holdout")))
    unit = h_new / np.linalg.norm(h_new, axis=1, keepdims=True)
    sim = unit[:50] @ unit.T  # each query among all the other held-out items
    sim[np.arange(50), np.arange(50)] = -np.inf
    assert lab["new/new"]["R@1"] == pytest.approx((h_lab[sim.argmax(1)] == h_lab[:50]).mean())
    assert 0 < lab["new/new"]["mAP@100"] <= 1 and "mAP@100" in (tmp_path / "up" / "gate.md").read_text()
    # backfill by the adapter's uncertainty: the old gallery (all digits) in the new space
    embed_to_gallery(f"{data}/gallery", m["old"], str(tmp_path / "g-old"), rows_per_file=300)
    from dmu_ray.refresh.backfill import run_backfill
    from dmu_ray.refresh.config import BackfillConfig

    run_backfill(
        BackfillConfig(
            source=str(tmp_path / "g-old"),
            images=f"{data}/gallery",
            module=up["adapter"]["uri"],
            new_model=m["new"],
            output=str(tmp_path / "mixed"),
            policy="uncertainty",
            fraction=0.2,
            pool={"max_actors": 1, "batch_size": 256},
        ),
        progress=False,
    )
    mixed = Gallery.open(str(tmp_path / "mixed"))
    b = mixed.manifest.extra["backfill"]
    assert b["policy"] == "uncertainty" and b["rows_new"] == round(0.2 * mixed.num_rows)
    assert mixed.model.dim == 12
    # a gallery of another model is refused by its lineage before any work
    embed_to_gallery(f"{data}/gallery", m["other8"], str(tmp_path / "g-other"))
    with pytest.raises(RefreshError) as err:
        run_refresh(
            RefreshConfig(
                source=str(tmp_path / "g-other"), output=str(tmp_path / "x"), module=up["adapter"]["uri"]
            )
        )
    assert "other8@" in str(err.value) and "old@" in str(err.value), err.value
    assert not (tmp_path / "x").exists()
    # the query side: new-model queries embedded straight into the old space
    qa = fit("qa", direction="query", adapter="affine")
    r = cli(
        "embed", "--images", f"{data}/query", "--model", m["new"], "--query-adapter", qa["adapter"]["uri"],
        "--output", str(tmp_path / "q-adapted"), "--dtype", "float32", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    q = Gallery.open(str(tmp_path / "q-adapted"))
    assert q.model.dim == 8 and q.model.upgrade_module == qa["adapter"]["ident"]
    assert "old@" in q.model.model_id or q.model.model_id == "old"
    qv = embedding_matrix(q.read(columns=["id", "embedding"]).sort_by("id").column("embedding"))
    from dmu_ray.models.inference import embed_images

    _, _, raw = embed_images(f"{data}/query", m["new"])
    phi = build_upgrade_module(load_artifact(qa["adapter"]["uri"]))
    with torch.inference_mode():
        want = torch.nn.functional.normalize(phi(torch.from_numpy(raw)), dim=1).numpy()
    np.testing.assert_allclose(qv, want, atol=1e-5)
    from dmu_ray.evaluate.config import EmbedConfig
    from dmu_ray.evaluate.embed import run_embed

    with pytest.raises(GalleryError, match="maps vectors of new@"):
        run_embed(
            EmbedConfig(
                images=f"{data}/query",
                model=m["other"],
                query_adapter=qa["adapter"]["uri"],
                output=str(tmp_path / "q-other"),
            ),
            progress=False,
        )
    assert not (tmp_path / "q-other").exists()


def test_co_partitioned_galleries_join_in_one_pass_with_the_two_pass_joins_result(ray_local, tmp_path):
    """Galleries holding the same ids file for file are joined file pair by file pair; the counts,
    statistics and held-out pairs equal those of the two-pass hash join of the same vectors."""
    from dmu_ray.adapters.pairs import join_pairs, read_holdout

    rng = np.random.default_rng(21)
    ids = np.arange(900, dtype=np.int64)
    x, y = rng.standard_normal((900, 6)), rng.standard_normal((900, 4))
    o = Gallery.open(gallery(str(tmp_path / "o"), ids, x, "o", files=3))
    n3 = Gallery.open(gallery(str(tmp_path / "n3"), ids, y, "n", files=3))  # same files: one pass
    n2 = Gallery.open(gallery(str(tmp_path / "n2"), ids, y, "n", files=2))  # other files: two passes
    said: dict[str, list[str]] = {"n3": [], "n2": []}
    got = {}
    for name, g in (("n3", n3), ("n2", n2)):
        got[name] = join_pairs(
            o,
            g,
            resolve(str(tmp_path / f"w-{name}")),
            resolve(str(tmp_path / f"h-{name}")),
            direction="gallery",
            holdout=0.2,
            seed=0,
            bucket_rows=400,
            progress=said[name].append,
        )
    assert any("one pass" in m for m in said["n3"]) and not any("one pass" in m for m in said["n2"])
    (c3, s3), (c2, s2) = got["n3"], got["n2"]
    assert c3 == c2 and c3.matched == 900
    for key in ("sx", "sy", "xx", "xy"):
        np.testing.assert_allclose(getattr(s3, key), getattr(s2, key), rtol=1e-6, atol=1e-4)
    h3, h2 = read_holdout(resolve(str(tmp_path / "h-n3"))), read_holdout(resolve(str(tmp_path / "h-n2")))
    np.testing.assert_array_equal(h3[0], h2[0])
    np.testing.assert_allclose(h3[2], h2[2])


def test_a_reduced_rank_adapter_is_stored_factored_and_loads_and_scripts_as_the_full_map(tmp_path):
    """affine with rank: r is two thin matrices (r (in + out) numbers a row, not in x out); the
    artefact loads as the same map, and its TorchScript export gives the same outputs."""
    from dmu_ray.adapters.export import export_torchscript
    from dmu_ray.models.artifact import save_upgrade_module
    from dmu_ray.models.linear_map import LowRankMap

    rng = np.random.default_rng(31)
    x = rng.standard_normal((500, 40))
    y = x @ rng.standard_normal((40, 4)) @ rng.standard_normal((4, 30)) + 0.01 * rng.standard_normal(
        (500, 30)
    )
    w, b = affine(PairStats.of(x, y), rank=4)
    m = LinearMap.from_arrays(w, b, rank=4)
    assert isinstance(m, LowRankMap) and m.config()["rank"] == 4
    assert sum(p.numel() for p in m.parameters()) == 4 * (40 + 30) + 30
    xt = torch.from_numpy(x[:7].astype(np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(m(xt).numpy(), x[:7] @ w + b, rtol=1e-4, atol=1e-4)
        save_upgrade_module(str(tmp_path / "a.pt"), m, {"id": "lr", "form": "linear"})
        back = build_upgrade_module(load_artifact(str(tmp_path / "a.pt")))
        assert isinstance(back, LowRankMap)
        np.testing.assert_allclose(back(xt).numpy(), m(xt).numpy(), atol=1e-6)
    export_torchscript(str(tmp_path / "a.pt"), str(tmp_path / "a.ts"))
    with torch.inference_mode():
        np.testing.assert_allclose(
            torch.jit.load(str(tmp_path / "a.ts"))(xt).numpy(), m(xt).numpy(), atol=1e-5
        )
    assert type(LinearMap.from_arrays(w, b, rank=30)) is LinearMap  # no saving at full rank: the matrix


def test_a_linear_adapter_exports_as_arrays_and_an_mlp_is_refused(tmp_path):
    """``adapter export --format npz``: a linear adapter's float32 arrays (a reduced-rank map's two
    factors, a full map's matrix) that numpy applies as the artefact does; a module that is not
    one linear map is refused, naming it, and nothing is written."""
    from dmu_ray.models.artifact import save_upgrade_module
    from dmu_ray.models.upgrade import UpgradeModule

    rng = np.random.default_rng(8)
    x = rng.standard_normal((9, 40)).astype(np.float32)
    w, b = rng.standard_normal((40, 30)), rng.standard_normal(30)
    low = LinearMap.from_arrays(w[:, :4] @ w[:4, :30] / 10, b, rank=4)
    for name, m, keys in (
        ("low", low, {"left", "right", "bias"}),
        ("full", LinearMap.from_arrays(w, b), {"weight", "bias"}),
    ):
        save_upgrade_module(str(tmp_path / f"{name}.pt"), m, {"id": name, "form": "linear"})
        r = cli(
            "adapter",
            "export",
            str(tmp_path / f"{name}.pt"),
            str(tmp_path / f"{name}.npz"),
            "--format",
            "npz",
        )
        assert r.returncode == 0 and "the arrays (npz)" in r.stdout, r.stderr
        with np.load(tmp_path / f"{name}.npz") as a:
            assert keys | {"direction", "of"} == set(a.files) and a["bias"].dtype == np.float32
            got = (x @ a["left"] @ a["right"] if "left" in a.files else x @ a["weight"]) + a["bias"]
        with torch.inference_mode():
            np.testing.assert_allclose(got, m(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    save_upgrade_module(str(tmp_path / "mlp.pt"), UpgradeModule(40, 30, width=16), {"id": "mlp"})
    r = cli("adapter", "export", str(tmp_path / "mlp.pt"), str(tmp_path / "mlp.npz"), "--format", "npz")
    assert r.returncode == 2 and "UpgradeModule is not one linear map" in r.stderr, r.stderr
    assert not (tmp_path / "mlp.npz").exists()
