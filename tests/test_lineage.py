"""Lineage across generations (issue 14): chains in the gallery contract, refreshes that route
each row along its own chain, refusal of rows with no path, inspect's chains and row counts."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from dmu_ray.config import ActorPoolConfig, RefreshConfig
from dmu_ray.gallery import Gallery, GalleryWriter, ModelInfo, embedding_array, embedding_matrix
from dmu_ray.gallery_ops import inspect_gallery, validate_gallery
from dmu_ray.lineage import (
    LINEAGE_COLUMN,
    Hop,
    LineageError,
    chain_key,
    embed_step,
    plan_routes,
    upgrade_step,
)
from dmu_ray.models.artifact import load_artifact, save_upgrade_module
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.refresh import run_refresh
from dmu_ray.refresh.job import RefreshError
from dmu_ray.storage import resolve

DIM = 16
V1, V2, V3 = "v1@" + "1" * 12, "v2@" + "2" * 12, "v3@" + "3" * 12


def test_routes_follow_the_modules_from_each_space_to_the_target():
    hops = [Hop("psi12", V1, V2), Hop("psi23", V2, V3)]
    chains = {
        "a": [embed_step(V1, None)],
        "b": [embed_step(V2, None)],
        "c": [embed_step(V1, None), upgrade_step("psi12", None, V1, V2)],
        "d": [embed_step(V3, None)],
    }
    assert plan_routes(chains, hops, V3) == {"a": [0, 1], "b": [1], "c": [1], "d": []}
    with pytest.raises(LineageError, match=r"from: e \(in space v0@"):
        plan_routes({**chains, "e": [embed_step("v0@" + "0" * 12, None)]}, hops, V3)
    # another artefact of the same model id is another space when both are sha-exact
    with pytest.raises(LineageError, match="v1@999999999999"):
        plan_routes({"x": [embed_step("v1@999999999999", None)]}, hops, V3)
    # a bare (imported) id is taken for the model of that id
    assert plan_routes({"i": [{"op": "import", "artifact": None, "space": "v1"}]}, hops, V3) == {"i": [0, 1]}
    # modules that record nothing apply in the given order to a one-chain gallery (on trust)
    legacy = [Hop("p", None, "x"), Hop("q", None, "y")]
    assert plan_routes({"a": chains["a"]}, legacy, "y") == {"a": [0, 1]}
    with pytest.raises(LineageError):
        plan_routes({"a": chains["a"], "b": chains["b"]}, legacy, "y")


def _module(uri: str, seed: int, source: str, target: str) -> UpgradeModule:
    torch.manual_seed(seed)
    m = UpgradeModule(DIM, DIM, width=32, depth=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.eval()
    save_upgrade_module(
        uri,
        m,
        {
            "id": f"psi-{seed}",
            "new_model_id": target.split("@")[0],
            "old_model": {"uri": "elsewhere", "id": source},
            "new_model": {"uri": "elsewhere", "id": target},
        },
    )
    return m


def _vectors(n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(start)
    m = rng.standard_normal((n, DIM)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return np.arange(start, start + n, dtype=np.int64), m.astype(np.float16)


def _gallery(uri: str, spaces: list[str], rows_per_space: int = 300) -> dict[str, np.ndarray]:
    """A gallery with ``rows_per_space`` rows embedded by each model in ``spaces`` (a per-row
    lineage column when there are several), 250 rows a file; returns each row's chain key by id."""
    chains = [[embed_step(s, None)] for s in spaces]
    model = ModelInfo(model_id=spaces[-1].split("@")[0], dim=DIM, dtype="float16", normalized=True)
    model = model.with_chains(chains)
    by_id: dict[str, np.ndarray] = {}
    parts = []
    for i, chain in enumerate(chains):
        ids, vecs = _vectors(rows_per_space, 10_000 * i)
        t = pa.table({"id": ids, "embedding": embedding_array(vecs)})
        if len(chains) > 1:
            t = t.append_column(LINEAGE_COLUMN, pa.array([chain_key(chain)] * len(ids)))
        parts.append(t)
        by_id[chain_key(chain)] = ids
    rng = np.random.default_rng(0)
    table = pa.concat_tables(parts)
    table = table.take(pa.array(rng.permutation(table.num_rows)))  # spaces interleaved in files
    with GalleryWriter(resolve(uri), model, rows_per_file=250) as w:
        w.write(table)
    return by_id


def _through(mods: list[UpgradeModule], x: np.ndarray) -> np.ndarray:
    y = torch.from_numpy(x.astype(np.float32))
    with torch.no_grad():
        for m in mods:
            y = torch.nn.functional.normalize(m(y), dim=1)
    return y.numpy()


def _rows(uri: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    t = Gallery.open(uri).read()
    order = np.argsort(t.column("id").to_numpy())
    lineage = None
    if LINEAGE_COLUMN in t.column_names:
        lineage = [pc.cast(t.column(LINEAGE_COLUMN), pa.string()).to_pylist()[i] for i in order]
    return t.column("id").to_numpy()[order], embedding_matrix(t.column("embedding"))[order], lineage


def test_a_gallery_of_two_generations_is_routed_row_by_row(ray_local, tmp_path):
    """v1 rows go through psi_12 then psi_23, v2 rows through psi_23 only; the output records
    each row's new chain; the refresh resumes after a crash and writes every row exactly once."""
    p12, p23 = str(tmp_path / "psi12.pt"), str(tmp_path / "psi23.pt")
    m12, m23 = _module(p12, 1, V1, V2), _module(p23, 2, V2, V3)
    src = str(tmp_path / "mixed")
    by_id = _gallery(src, [V1, V2])
    out = str(tmp_path / "v3")
    cfg = RefreshConfig(
        source=src, output=out, module=[p12, p23], dtype="float32", pool=ActorPoolConfig(max_actors=1)
    )
    with pytest.raises(Exception, match="injected failure"):
        run_refresh(cfg, progress=False, fail_after_files=1)
    res = run_refresh(cfg, progress=False)
    assert res.manifest.rows == 600 and res.files_done_now == len(res.manifest.files) - 1

    ids, got, lineage = _rows(out)
    _, before, _ = _rows(src)
    a12, a23 = (load_artifact(p).ident for p in (p12, p23))
    k1, k2 = chain_key([embed_step(V1, None)]), chain_key([embed_step(V2, None)])
    want_key = {k1: f"{V1}>{a12}>{a23}", k2: f"{V2}>{a23}"}
    from_v1 = np.isin(ids, by_id[k1])
    expected = np.where(from_v1[:, None], _through([m12, m23], before), _through([m23], before))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert lineage == [want_key[k1] if v1 else want_key[k2] for v1 in from_v1]

    g = Gallery.open(out)
    chains = g.model.chains()
    assert set(chains) == set(want_key.values())
    assert [s["op"] for s in chains[want_key[k1]]] == ["embed", "upgrade", "upgrade"]
    assert chains[want_key[k1]][1]["from"] == V1 and chains[want_key[k1]][2]["space"] == V3
    info = inspect_gallery(g)
    assert {c["chain"]: c["rows"] for c in info["lineage"]} == {want_key[k1]: 300, want_key[k2]: 300}
    assert validate_gallery(g).ok


def test_one_space_refreshed_twice_records_the_whole_chain(ray_local, tmp_path):
    """A v1 gallery through psi_12 then psi_23: one chain (no per-row column), and the same
    vectors and chain as two refreshes one after the other."""
    p12, p23 = str(tmp_path / "psi12.pt"), str(tmp_path / "psi23.pt")
    _module(p12, 1, V1, V2), _module(p23, 2, V2, V3)
    src = str(tmp_path / "v1")
    _gallery(src, [V1])
    pool = ActorPoolConfig(max_actors=1)
    run_refresh(
        RefreshConfig(source=src, output=str(tmp_path / "both"), module=[p12, p23], pool=pool), progress=False
    )
    run_refresh(RefreshConfig(source=src, output=str(tmp_path / "v2"), module=p12, pool=pool), progress=False)
    run_refresh(
        RefreshConfig(source=str(tmp_path / "v2"), output=str(tmp_path / "v2v3"), module=p23, pool=pool),
        progress=False,
    )
    a, b = Gallery.open(str(tmp_path / "both")), Gallery.open(str(tmp_path / "v2v3"))
    assert LINEAGE_COLUMN not in a.schema().names
    assert a.model.lineage == b.model.lineage and len(a.model.lineage) == 1
    (chain,) = a.model.lineage.values()
    assert [s["space"] for s in chain] == [V1, V2, V3]
    # the same up to the float16 rounding of the stored intermediate gallery
    np.testing.assert_allclose(_rows(str(tmp_path / "both"))[1], _rows(str(tmp_path / "v2v3"))[1], atol=2e-3)
    assert inspect_gallery(a)["lineage"][0]["rows"] == 300


def test_rows_without_a_path_are_refused_before_any_work(tmp_path):
    p12, p23 = str(tmp_path / "psi12.pt"), str(tmp_path / "psi23.pt")
    _module(p12, 1, V1, V2), _module(p23, 2, V2, V3)
    v0 = "v0@" + "0" * 12
    src = str(tmp_path / "mixed")
    _gallery(src, [v0, V2])
    out = tmp_path / "out"
    with pytest.raises(
        RefreshError, match=r"no chain of the given upgrade modules leads to v3@.*v0@0+ \(in space v0@"
    ):
        run_refresh(RefreshConfig(source=src, output=str(out), module=[p12, p23]), progress=False)
    assert not out.exists()
    # psi_23 alone on a v1 gallery: the rows are in the wrong space
    _gallery(str(tmp_path / "v1"), [V1])
    with pytest.raises(RefreshError, match=r"from: .*\(in space v1@1+\)"):
        run_refresh(RefreshConfig(source=str(tmp_path / "v1"), output=str(out), module=p23), progress=False)
    assert not out.exists()


def test_validate_and_import_guard_the_lineage_column(tmp_path):
    """A row naming a chain its dmu.model does not declare fails validation; a gallery declaring
    several chains without the column fails too; an imported Parquet may not bring the column."""
    from dmu_ray.gallery import GalleryError
    from dmu_ray.gallery_ops import import_vectors

    ids, vecs = _vectors(10, 0)
    k1 = chain_key([embed_step(V1, None)])
    model = ModelInfo(model_id="v1", dim=DIM, dtype="float16", normalized=True).with_chains(
        [[embed_step(V1, None)], [embed_step(V2, None)]]
    )
    t = pa.table({"id": ids, "embedding": embedding_array(vecs)})
    with GalleryWriter(resolve(str(tmp_path / "stray")), model) as w:
        w.write(t.append_column(LINEAGE_COLUMN, pa.array([k1] * 9 + ["v9@999999999999"])))
    rep = validate_gallery(Gallery.open(str(tmp_path / "stray")))
    assert any("1 row(s) name lineage chains that dmu.model does not declare" in p for p in rep.problems)
    with GalleryWriter(resolve(str(tmp_path / "nocol")), model) as w:
        w.write(t)
    rep = validate_gallery(Gallery.open(str(tmp_path / "nocol")))
    assert any("declares 2 lineage chains but the files have no" in p for p in rep.problems)
    import pyarrow.parquet as pq

    pq.write_table(t.append_column(LINEAGE_COLUMN, pa.array([k1] * 10)), tmp_path / "foreign.parquet")
    with pytest.raises(GalleryError, match="_dmu_lineage"):
        import_vectors(str(tmp_path / "foreign.parquet"), str(tmp_path / "imported"), model_id="x")
    assert not (tmp_path / "imported").exists()
    # an import declares its one chain: the id it was imported under
    np.save(tmp_path / "v.npy", vecs.astype(np.float32))
    import_vectors(str(tmp_path / "v.npy"), str(tmp_path / "ok"), model_id="prod")
    info = inspect_gallery(Gallery.open(str(tmp_path / "ok")))
    assert info["lineage"] == [{"chain": "prod", "space": "prod", "rows": 10, "steps": "import prod"}]


def test_generations_count_from_the_old_models_card():
    from types import SimpleNamespace

    from dmu_ray.train.job import generations

    assert generations(None) == {"generation": 1, "ancestry": []}
    imported = SimpleNamespace(card=SimpleNamespace(model_extra={}), ident="prod@aaaaaaaaaaaa")
    assert generations(imported) == {"generation": 2, "ancestry": ["prod@aaaaaaaaaaaa"]}
    v2 = SimpleNamespace(
        card=SimpleNamespace(model_extra={"generation": 2, "ancestry": ["v1@x"]}), ident="v2@y"
    )
    assert generations(v2) == {"generation": 3, "ancestry": ["v1@x", "v2@y"]}


def test_a_matrix_config_names_what_is_wrong():
    from dmu_ray.config import ConfigError, MatrixConfig, parse_config

    ok = {
        "data": "d",
        "query_models": {"v1": "m.pt"},
        "gallery_states": {"v1": {"model": "v1"}},
        "output": "o",
    }
    assert parse_config(MatrixConfig, ok, "c").gallery_states["v1"].upgrade == []
    bad = [
        ({"gallery_states": {"v1": {"model": "v1", "gallery": "g"}}}, "give model"),
        ({"gallery_states": {"v1": {"gallery": "g", "upgrade": ["p.pt"]}}}, "refresh a stored gallery"),
        ({"metric": "mAP@10"}, "is not computed"),
        ({"metric": "NDCG@5"}, "is not mAP@K or R@K"),
        ({"query_models": {}}, "query_models"),
        ({"query_models": {"a/b": "m.pt"}}, "not a usable name"),
    ]
    for change, words in bad:
        with pytest.raises(ConfigError, match=words):
            parse_config(MatrixConfig, {**ok, **change}, "c")
