"""``dmu-ray embed`` has the shape of its siblings (issue 17): a description, ``--config`` (flags
override it), ``--ray-address``, ``--quiet`` and the pool options, with config errors naming the
field; and it is a submittable job."""

import pyarrow.parquet as pq
import yaml
from test_train import digits  # noqa: F401  (the fixture)

from dmu_ray.cli import build_parser, main
from dmu_ray.gallery import Gallery
from dmu_ray.models.artifact import save_embedding_model
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.submit import JOBS


def test_embed_help_and_job():
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "embed" in a.choices)
    emb = sub.choices["embed"]
    assert emb.description and "flags override" in emb.description
    flags = {o for a in emb._actions for o in a.option_strings}
    assert {"--config", "--ray-address", "--quiet", "--min-actors", "--max-actors", "--num-gpus"} <= flags
    assert JOBS["embed"][0] == "jobs/embed.py"


def test_embed_from_config_and_flags(ray_local, tmp_path, digits, capsys):  # noqa: F811
    model = str(tmp_path / "m.pt")
    save_embedding_model(model, EmbeddingModel("small", 8, 1), MarginHead(8, 10), {"id": "m"})
    cfg = tmp_path / "embed.yaml"
    out = tmp_path / "g16"
    cfg.write_text(
        yaml.safe_dump(
            {"images": f"{digits}/gallery", "model": model, "output": str(out), "pool": {"max_actors": 1}}
        )
    )
    assert main(["embed", "--config", str(cfg), "--quiet"]) == 0
    got = capsys.readouterr()
    rows = pq.read_table(f"{digits}/gallery", columns=["id"]).num_rows
    assert f"committed {out}: {rows:,} rows, dim 8 float16, model m" in got.out
    assert "embedding" not in got.err  # --quiet: no progress line
    # flags override the config's values
    assert main(["embed", "--config", str(cfg), "--output", str(tmp_path / "g32"), "--dtype", "float32"]) == 0
    assert Gallery.open(str(tmp_path / "g32")).model.dtype == "float32"
    assert "embedding " in capsys.readouterr().err
    # errors name the field, before any Ray work
    assert main(["embed", "--images", f"{digits}/gallery", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "invalid config (command line):\n  model: required field is missing" in err
    assert main(["embed", "--config", str(cfg), "--min-actors", "3", "--max-actors", "2"]) == 2
    assert "pool.max_actors: Value error, must be >= min_actors (3)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_pool_that_leaves_no_cpu_for_its_reads_is_refused(ray_local, tmp_path, digits):  # noqa: F811
    """2 actors x 1 CPU on the 2-CPU cluster hold every CPU: Ray Data's Parquet reads that feed
    them could never run, and the job waited forever (it did, in benchmarks/backfill_throughput.py).
    Refused at once, naming the fields; half a CPU each runs; a refresh, whose input is file names
    read inside its actors, keeps 2 x 1 CPU."""
    import threading

    from test_refresh import make_module, make_source

    from dmu_ray.config import RefreshConfig
    from dmu_ray.models.inference import embed_images
    from dmu_ray.ray_session import RayUnavailableError
    from dmu_ray.refresh import run_refresh
    from dmu_ray.settings import ActorPoolConfig

    model = str(tmp_path / "m.pt")
    save_embedding_model(model, EmbeddingModel("small", 8, 1), MarginHead(8, 10), {"id": "m"})
    full = ActorPoolConfig(min_actors=2, max_actors=2, num_cpus=1.0, batch_size=256)
    got: dict = {}

    def embed() -> None:
        try:
            got["ids"] = embed_images(f"{digits}/gallery", model, pool=full)[0]
        except Exception as err:  # noqa: BLE001  (the assertions below say which)
            got["err"] = err

    t = threading.Thread(target=embed, daemon=True)
    t.start()
    t.join(300)  # a safety net: the refusal comes before any Ray Data work
    assert not t.is_alive(), "the embedding hung: its actors hold every CPU its reads need"
    assert isinstance(got.get("err"), RayUnavailableError), got
    msg = str(got["err"])
    assert "pool.min_actors 2 x pool.num_cpus 1" in msg and "fractional pool.num_cpus" in msg, msg

    half = full.model_copy(update={"num_cpus": 0.5})
    ids = embed_images(f"{digits}/gallery", model, pool=half)[0]
    assert len(ids) == pq.read_table(f"{digits}/gallery", columns=["id"]).num_rows

    src = make_source(str(tmp_path / "old"), None, files=2, rows=50)
    make_module(str(tmp_path / "psi.pt"), None)
    cfg = RefreshConfig(source=src, output=str(tmp_path / "new"), module=str(tmp_path / "psi.pt"), pool=full)
    assert run_refresh(cfg, progress=False).manifest.rows == 100


def test_an_actor_pool_shares_a_small_part_between_its_actors(ray_local, tmp_path):
    """Ray Data reads a data set part of a few small Parquet files as one block and hands an actor
    whole blocks: two actors embedding a 2-file part left one idle (the backfill benchmark's two
    actors were no faster than one). :func:`map_on_pool`, through which embedding and backfill's
    scoring run, cuts the input into blocks of a few batches, so every actor gets rows; none is
    lost or repeated."""
    import collections
    import os
    import time

    import numpy as np
    import pyarrow as pa
    import ray.data

    from dmu_ray.ray_session import collect_batches, map_on_pool
    from dmu_ray.settings import ActorPoolConfig

    part = tmp_path / "part"
    part.mkdir()
    for i, (lo, hi) in enumerate([(0, 700), (700, 1000)]):
        pq.write_table(pa.table({"id": np.arange(lo, hi)}), part / f"part-{i:05d}.parquet")

    class WhoEmbeds:
        def __call__(self, batch: pa.Table) -> dict:
            time.sleep(0.02)  # a forward pass's worth of work, so the second actor is up in time
            return {"id": batch.column("id").to_numpy(), "pid": np.full(batch.num_rows, os.getpid())}

    pool = ActorPoolConfig(min_actors=2, max_actors=2, num_cpus=0.5, batch_size=50)
    ds = map_on_pool(ray.data.read_parquet(str(part)), WhoEmbeds, pool, {})
    ids, by_actor = [], collections.Counter()
    for b in collect_batches(ds, "numpy"):
        ids.extend(b["id"].tolist())
        by_actor.update(b["pid"].tolist())
    assert sorted(ids) == list(range(1000))
    assert len(by_actor) == 2, f"rows per actor process: {dict(by_actor)} (one actor did all the work)"
