"""Training on a real local Ray cluster (2 CPU workers, gloo), checkpoints on the loopback S3 server."""

import pytest
import torch
import yaml

from dmu_ray.config import ConfigError, TrainConfig, load_config
from dmu_ray.data.importers import import_digits
from dmu_ray.models.artifact import build_embedding_model, build_upgrade_module, load_artifact
from dmu_ray.train.job import plan_training, run_training


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits"
    import_digits(str(path), image_size=16)
    return str(path)


def config(name, storage_path, data_uri, storage=None, **over) -> TrainConfig:
    base = {
        "name": name,
        "storage_path": storage_path,
        "data": {"uri": data_uri, "augment": True},
        "model": {"backbone": "small", "dim": 32},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "storage": storage or {},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return TrainConfig.model_validate(base)


@pytest.mark.slow
def test_train_recover_resume_and_dmu_on_s3(ray_local, s3, digits):
    runs = f"s3://{s3.bucket}/runs"
    storage = s3.storage.model_dump()
    # 1. two workers; one is killed during epoch 1 and the run recovers from epoch 0's checkpoint.
    # Decoding every epoch (one stream over the run's epochs, read from S3), so the recovered and
    # the resumed worker groups take their remaining epochs from a new stream
    off = {"cache": "off"}
    first = run_training(
        config("old", runs, digits, storage, data=off, failure_drill_epoch=1), progress=False
    )
    hist = first["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[1]["resumed_from"] == 1  # the recovered worker group started at epoch 1
    keys = s3.keys("runs/old/")
    assert any("checkpoint_" in k and k.endswith("state.pt") for k in keys), keys
    assert "runs/old/export/model.pt" in keys
    # 2. the same run submitted again with more epochs resumes at the right epoch
    again = run_training(config("old", runs, digits, storage, data=off, optim={"epochs": 3}), progress=False)
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2]
    assert again["metrics"]["steps"] == plan_training(config("old", runs, digits, storage)).rows // 64
    assert again["history"][-1]["resumed_from"] == 2
    assert again["history"][-1]["loss"] < again["history"][0]["loss"]  # it learns
    learnt = 1 - again["history"][-1]["loss"] / again["history"][0]["loss"]
    assert (again["notes"] == []) == (learnt >= 0.05), again["notes"]  # a stalled run would say so
    model, head = build_embedding_model(load_artifact(again["model"], s3.storage))
    assert model.dim == 32 and head.num_classes == 10
    # 3. DMU against that old model exports the new model and the upgrade module
    dmu = run_training(
        config(
            "dmu",
            runs,
            digits,
            storage,
            optim={"epochs": 1},
            method={"name": "dmu", "old_model": again["model"], "upgrade_width": 32},
        ),
        progress=False,
    )
    psi = build_upgrade_module(load_artifact(dmu["upgrade_module"], s3.storage))
    assert (psi.in_dim, psi.out_dim) == (32, 32)
    card = load_artifact(dmu["model"], s3.storage).card
    assert card.method == "dmu" and card.old_model["uri"] == again["model"]
    assert {"compat", "upgrade", "old_d"} <= set(dmu["metrics"])


def test_bad_configs_fail_before_any_worker(tmp_path, digits):
    p = tmp_path / "c.yaml"
    good = {"name": "x", "storage_path": str(tmp_path / "runs"), "data": {"uri": digits}}
    p.write_text(yaml.safe_dump({**good, "method": {"name": "magic"}}))
    with pytest.raises(
        ConfigError,
        match=r"method: Input tag 'magic' found using 'name' does not match any of the expected tags: 'bct'",
    ):
        load_config(TrainConfig, p)
    p.write_text(yaml.safe_dump({**good, "method": {"name": "bct"}}))
    with pytest.raises(ConfigError, match="needs method.old_model"):
        load_config(TrainConfig, p)
    p.write_text(yaml.safe_dump({**good, "name": "bad name!"}))
    with pytest.raises(ConfigError, match=r"  name: "):
        load_config(TrainConfig, p)
    p.write_text(yaml.safe_dump({**good, "scaling": {"num_workers": 2, "min_workers": 3}}))
    with pytest.raises(ConfigError, match=r"scaling\.min_workers: .*must be <= num_workers \(2\)"):
        load_config(TrainConfig, p)

    # an old model to check against (an export written without training: only its card matters)
    from dmu_ray.models.artifact import save_embedding_model
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead

    old_uri = str(tmp_path / "old.pt")
    save_embedding_model(old_uri, EmbeddingModel("small", 64, 1), MarginHead(64, 10), {"id": "old"})
    with pytest.raises(ConfigError, match="no such artefact"):
        plan_training(
            config("n", str(tmp_path), digits, method={"name": "dmu", "old_model": str(tmp_path / "none.pt")})
        )
    with pytest.raises(ConfigError, match="model.dim is 32 but the old model .* embeds in 64 dims"):
        plan_training(config("n", str(tmp_path), digits, method={"name": "dmu", "old_model": old_uri}))
    with pytest.raises(ConfigError, match="method.upgrade_in_dim is 16 but the old model .* produces 64-d"):
        plan_training(
            config(
                "n",
                str(tmp_path),
                digits,
                model={"dim": 64},
                method={"name": "dmu", "old_model": old_uri, "upgrade_in_dim": 16},
            )
        )

    # a run name already used by a different config is refused (Ray Train would resume its checkpoint)
    from dmu_ray.train.job import _claim_run

    claimed = str(tmp_path / "claimed")
    _claim_run(plan_training(config("same-name", claimed, digits)))
    _claim_run(
        plan_training(config("same-name", claimed, digits, optim={"epochs": 5}))
    )  # more epochs: same run
    # where metrics are logged is not what is trained: a run from before MLflow tracking resumes
    tracked = {"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    _claim_run(plan_training(config("same-name", claimed, digits, **tracked)))
    from dmu_ray.train.job import _same_config

    saved = plan_training(config("same-name", claimed, digits)).cfg.model_dump(mode="json")
    assert _same_config(saved, plan_training(config("same-name", claimed, digits, **tracked)).cfg)
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        run_training(config("same-name", claimed, digits, model={"dim": 16}), progress=False)
    # locations compare by what they name: a relative spelling, a trailing slash, file://
    import os

    respelled = config("same-name", os.path.relpath(claimed) + "/", "file://" + digits)
    _claim_run(plan_training(respelled))
    assert _same_config(saved, plan_training(respelled).cfg)
    # two methods at their defaults are two configs (the method's name is not a default to drop)
    bct = config("methods", claimed, digits, model={"dim": 64}, method={"name": "bct", "old_model": old_uri})
    dmu = config("methods", claimed, digits, model={"dim": 64}, method={"name": "dmu", "old_model": old_uri})
    _claim_run(plan_training(bct))
    assert not _same_config(bct.model_dump(mode="json"), dmu)
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        _claim_run(plan_training(dmu))
    with pytest.raises(ConfigError, match="fewer than one batch per worker"):
        plan_training(config("n", str(tmp_path), digits, optim={"batch_size": 4096}))
    with pytest.raises(ValueError, match="not an image data set"):
        plan_training(config("n", str(tmp_path), str(tmp_path / "nodata")))


@pytest.mark.slow
def test_open_class_unibct_then_fastfill_transformation(ray_local, tmp_path, digits):
    runs = str(tmp_path / "runs")
    split = {"split": "open-class", "old_fraction": 0.4}
    # the old model trains without the decoded-image cache (decoding every epoch), the rest with it
    old = run_training(
        config("old", runs, digits, data={**split, "role": "old", "cache": "off"}, optim={"epochs": 1}),
        progress=False,
    )
    # UniBCT: the new model sees only classes the old one never did; BCT's loss would be empty here.
    # Its prototypes are rebuilt at epoch 1 from both workers' new features of epoch 0 (gathered).
    uni = run_training(
        config(
            "unibct",
            runs,
            digits,
            data={**split, "role": "new"},
            optim={"epochs": 2},
            method={"name": "unibct", "old_model": old["model"]},
        ),
        progress=False,
    )
    assert uni["metrics"]["compat"] > 0 and load_artifact(uni["model"]).card.method == "unibct"
    assert [h["proto_rebuilds"] for h in uni["history"]] == [0, 1]
    # FastFill: only the transformation learns, towards the frozen UniBCT model
    ff = run_training(
        config(
            "fastfill",
            runs,
            digits,
            data={**split, "role": "new"},
            optim={"epochs": 1},
            method={
                "name": "fastfill",
                "old_model": old["model"],
                "new_model": uni["model"],
                "upgrade_width": 32,
            },
        ),
        progress=False,
    )
    assert {"align", "transform_ce", "log_var"} <= set(ff["metrics"])
    art = load_artifact(ff["upgrade_module"])
    psi = build_upgrade_module(art)
    assert psi.uncertainty and art.card.new_model_id == "unibct"
    frozen = load_artifact(ff["model"]).state_dict
    target = load_artifact(uni["model"]).state_dict
    assert all(torch.equal(frozen[k], target[k]) for k in target)  # the new model did not move
    # a fastfill config whose model section does not describe the new model fails up front
    with pytest.raises(ConfigError, match="model.dim is 16"):
        plan_training(
            config(
                "bad",
                runs,
                digits,
                model={"dim": 16},
                method={"name": "fastfill", "old_model": old["model"], "new_model": uni["model"]},
            )
        )


def test_decoded_training_set_cached_once_and_whole_every_epoch(ray_local, tmp_path, digits):
    """``data.cache``: the decoded set (this run's side of the split, as uint8 pixels) is
    materialised once; every pass over it yields every row exactly once, in a new block order;
    without the cache one stream holds every epoch, each decoding the same rows again. Files
    that Parquet discovery skips (a hidden partial upload, an unfinished write) are skipped by
    both, as by the plan that counted the rows."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq

    from dmu_ray.data.images import decode_images
    from dmu_ray.data.splits import split_mask
    from dmu_ray.train.job import build_train_dataset, cache_decision

    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    first = sorted((data / "train").glob("*.parquet"))[0]
    shutil.copy(first, data / "train" / ".partial-upload.parquet")
    (data / "train" / "_tmp").mkdir(exist_ok=True)
    shutil.copy(first, data / "train" / "_tmp" / "unfinished.parquet")
    for cache, split in ((True, "all"), (False, "extended-class")):
        plan = plan_training(config("c", str(tmp_path), str(data), data={"split": split, "role": "old"}))
        raw = pq.read_table(f"{digits}/train")
        keep = split_mask(split, "old", raw["id"].to_numpy(), raw["label"].to_numpy(), 0.3, 0)
        want = {int(i): raw["image"][k].as_py() for k, i in enumerate(raw["id"].to_numpy()) if keep[k]}
        ds = build_train_dataset(plan, cache)
        passes = []
        for _ in range(2 if cache else 1):  # cached: two epochs; not cached: one stream of both
            ids, pixels = [], []
            for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
                ids.append(b["id"])
                pixels.append(b["image"])
            ids, pixels = np.concatenate(ids), np.concatenate(pixels)
            k = np.argsort(ids)[:5]
            np.testing.assert_array_equal(
                pixels[k], decode_images([want[int(i)] for i in ids[k]], 16, 1, np.uint8)
            )
            assert pixels.dtype == np.uint8
            passes.append(ids)
        if cache:  # 1,258 rows in blocks of 4 batches of 32: ten blocks, in a new order each epoch
            assert all(sorted(p.tolist()) == sorted(want) for p in passes)
            assert not np.array_equal(*passes)
        else:  # every row once per epoch of the run (2), each epoch reading the files in its order
            ids = passes[0]
            assert len(ids) == 2 * len(want)
            assert np.unique(ids, return_counts=True)[1].tolist() == [2] * len(want)
            assert set(ids.tolist()) == set(want)
    # auto keeps the set when it is small against the object store; off and memory are obeyed
    assert cache_decision(plan, 1e9)[0] and not cache_decision(plan, 1e3)[0]
    off = plan_training(config("c", str(tmp_path), digits, data={"cache": "off"}))
    forced = plan_training(config("c", str(tmp_path), digits, data={"cache": "memory"}))
    assert not cache_decision(off, 1e12)[0] and cache_decision(forced, 1e3)[0]


def test_a_run_whose_losses_hardly_move_says_so_at_the_end():
    from dmu_ray.train.progress import stall_notes

    assert stall_notes([{"loss": 2.0}]) == []  # one epoch: nothing to judge
    assert stall_notes([{"loss": 2.0, "compat": 1.0}, {"loss": 1.0, "compat": 0.5}]) == []
    stalled = stall_notes(
        [{"loss": 43.6, "compat": 40.0}, {"loss": 42.0, "compat": 39.0}, {"loss": 41.1, "compat": 38.9}]
    )
    assert len(stalled) == 1 and stalled[0].startswith(
        "the compatibility loss fell 3% in 3 epochs (40 -> 38.9)"
    )
    assert "new/old is unlikely to beat old/old" in stalled[0] and "optim.epochs" in stalled[0]
    only_loss = stall_notes([{"loss": 1.0}, {"loss": 0.99}])
    assert len(only_loss) == 1 and only_loss[0].startswith("the training loss fell 1% in 2 epochs")
