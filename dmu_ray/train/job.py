"""Driver side of training: check the config against the data and the old model before any worker
starts, build the Ray Data pipeline, run ``TorchTrainer``, export the artefacts.

Runs live under ``<storage_path>/<name>/`` (Ray Train's checkpoints and ``export/``). Running the
same config again resumes from the last checkpoint (Ray Train restores a run by name and storage
path); a finished run re-exports and returns.
"""

import contextlib
import json
import sys
from typing import Any

from dmu_ray.data.images import decode_epoch_stream, decode_split_batch
from dmu_ray.methods.base import PINS
from dmu_ray.models.artifact import (
    UPGRADE_MODULE,
    Artifact,
    artifact_sha256,
    save_artifact,
    save_embedding_model,
)
from dmu_ray.storage import redact, resolve
from dmu_ray.tracking import Tracker, flatten
from dmu_ray.train.config import ScalingSection, TrainConfig
from dmu_ray.train.plan import EXPORT_DIR, TrainPlan, plan_training
from dmu_ray.train.run_identity import (  # _same_config, _saved_config: named here for callers
    METHOD_REVISION,
    RUN_CONFIG,
    _claim_run,
    _same_config,  # noqa: F401
    _saved_config,  # noqa: F401
    _saved_view,
    finished_export,
)

__all__ = ["plan_training", "run_training", "TrainPlan", "EXPORT_DIR", "RUN_CONFIG"]


#: ``data.cache: auto`` keeps the decoded set in the object store when it takes at most this share
#: of the cluster's object store memory
CACHE_SHARE = 0.3


def decoded_bytes(plan: TrainPlan) -> int:
    """Bytes of this run's training images decoded to uint8 pixels."""
    return plan.rows * plan.data.channels * plan.data.image_size**2


def cache_decision(plan: TrainPlan, object_store_bytes: float) -> tuple[bool, str]:
    """Whether to keep the decoded training set between epochs (``data.cache``), and why, in words."""
    mode, need = plan.cfg.data.cache, decoded_bytes(plan)
    size = f"{need / 2**20:,.0f} MiB decoded"
    if mode == "off":
        return False, f"decoding every epoch (data.cache: off; {size})"
    if mode == "memory":
        return True, f"decoded once, kept in the object store ({size}; data.cache: memory)"
    if need <= CACHE_SHARE * object_store_bytes:
        return True, f"decoded once, kept in the object store ({size})"
    return False, (
        f"decoding every epoch: {size} is over {CACHE_SHARE:.0%} of the object store "
        f"({object_store_bytes / 2**30:,.1f} GiB; data.cache: memory forces the cache)"
    )


#: a decoded-every-epoch stream reads at most this many blocks of files per epoch (one file per
#: block on smaller sets): enough decode tasks in flight to feed the workers, a bounded plan
STREAM_BLOCKS_PER_EPOCH = 256


def build_train_dataset(plan: TrainPlan, cache: bool):
    """This run's side of the split, decoded to uint8 pixels.

    With ``cache`` the set is read and decoded once and materialised (the object store, spilling
    to local disk if it must) in blocks of about four batches; every epoch iterates it again, its
    blocks in a new random order. Without it the dataset is one stream of every epoch of the run
    (:func:`~dmu_ray.data.images.decode_epoch_stream`: each epoch reads the files in its own
    order and decodes again), executed once: the worker takes an epoch's steps from it in turn,
    and the next epoch's decoding overlaps the last steps of the one before (a new execution per
    epoch cost seconds before its first batch)."""
    import ray.data

    c = plan.cfg.data
    split = dict(
        protocol=c.split,
        role=c.role,
        old_fraction=c.old_fraction,
        seed=c.split_seed,
        size=plan.data.image_size,
        channels=plan.data.channels,
    )
    if not cache:
        loc = plan.train_loc
        # the files pyarrow's discovery reads for the plan's row count
        files = [loc.join(name).path for name in loc.list_files(".parquet", recursive=True, data_only=True)]
        epochs = plan.cfg.optim.epochs
        ds = ray.data.range(
            epochs * len(files), override_num_blocks=epochs * min(len(files), STREAM_BLOCKS_PER_EPOCH)
        )
        return ds.map_batches(
            decode_epoch_stream,  # in a module without torch: a decode task's process starts fast
            fn_kwargs=dict(files=files, filesystem=loc.fs, order_seed=plan.cfg.seed, **split),
            batch_size=None,
            num_cpus=c.decode_cpus,
        )
    ds = ray.data.read_parquet(plan.train_loc.path, filesystem=plan.train_loc.fs, file_extensions=["parquet"])
    ds = ds.select_columns(["id", "image", "label"]).map_batches(
        decode_split_batch, fn_kwargs=split, batch_format="pyarrow", batch_size=256, num_cpus=c.decode_cpus
    )
    # blocks of a few batches each, so that a new block order every epoch shuffles the set well
    # (a file decodes to one block otherwise); the local shuffle buffer mixes within and across them
    ds = ds.repartition(target_num_rows_per_block=4 * plan.cfg.optim.batch_size)
    return ds.materialize().randomize_block_order()


def run_training(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) and export. Returns the last metrics and the exported artefact URIs."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from dmu_ray.ray_session import data_context, ensure_ray, require_resources
    from dmu_ray.train.progress import ProgressBoard, TrainWatcher, stall_notes

    plan = plan_training(cfg)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    done = finished_export(plan)
    if done is not None:
        say(f"train {cfg.name}: already finished ({done['epochs']} epochs), using {done['model']}")
        return done
    say(
        f"train {cfg.name}: {cfg.method.name} on {plan.rows:,} images ({cfg.data.split}, {cfg.data.role}), "
        f"{_worker_desc(cfg.scaling)}, {cfg.optim.epochs} epochs -> {plan.run_uri}"
    )
    # the tracking store is opened before any cluster work: a bad tracking.uri fails here
    tracker = Tracker.open(cfg.tracking, resolve(cfg.storage_path, cfg.storage), say=say)
    ensure_ray(cfg.ray_address)  # reachable, and room for one worker, before the run is claimed
    require_resources(
        {
            "CPU": cfg.scaling.cpus_per_worker,
            "GPU": cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0,
        },
        "a training worker (scaling.cpus_per_worker, scaling.gpus_per_worker)",
        wait_s=cfg.scaling.resource_wait_s,
        count=cfg.scaling.min_workers or cfg.scaling.num_workers,
    )
    _claim_run(plan)
    with data_context(enable_progress_bars=progress):  # not left set for the caller's next job
        storage_loc = resolve(cfg.storage_path, cfg.storage)
        if not storage_loc.is_s3:
            storage_loc.fs.create_dir(storage_loc.path, recursive=True)
        info = plan.info()
        info.update(cfg.method.prepare(plan, progress))  # driver-side work of the method, if any
        cache, why = cache_decision(plan, ray.cluster_resources().get("object_store_memory", 0.0))
        say(f"  training images: {why}")
        dataset = build_train_dataset(plan, cache)
        cfg = _absolute_uris(cfg)  # workers run in another folder (Ray Train's run folder)
        info[PINS] = _pins(plan, info)  # and load exactly the bytes checked here
        board = ProgressBoard.remote()
        trainer = TorchTrainer(
            train_loop_per_worker=_train_entry,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json", round_trip=True) | _secrets(cfg),
                "info": info,
                "run_uri": plan.run_uri,
                "stream_epochs": not cache,  # one stream of every epoch: WorkerLoop takes an epoch at a time
                "progress": board,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=_worker_count(cfg.scaling),
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={
                    "CPU": cfg.scaling.cpus_per_worker,
                    **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {}),
                },
                placement_strategy=cfg.scaling.placement_strategy,
                elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            ),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=storage_loc.path,
                storage_filesystem=storage_loc.fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": dataset},
        )
        run, ok = None, False
        try:
            run = _track_start(tracker, cfg, plan)
            on_epoch = None if run is None else (lambda m: run.metrics(m, step=int(m["epoch"])))
            with TrainWatcher(board, cfg.name, on_epoch=on_epoch, show=progress):
                result = trainer.fit()
            if result.error:
                raise result.error
            out = export_run(plan, result.checkpoint, result.metrics or {}, info)
            out["notes"] = stall_notes(out.get("history", []))
            ok = True
        finally:
            if run is not None:
                if ok:
                    run.tags({f"dmu.{k}": v for k, v in out.items() if k in ("model", "upgrade_module")})
                    run.files({"export.json": json.dumps(out, indent=2, default=str).encode()})
                run.finish(ok)
            with contextlib.suppress(Exception):  # the board is done either way
                ray.kill(board)
        return out


def _track_start(tracker: Tracker | None, cfg: TrainConfig, plan: TrainPlan):
    """The run's MLflow run (continued when the training resumes): its config as parameters
    (storage credentials left out), method and data as tags."""
    if tracker is None:
        return None
    try:
        run = tracker.start(
            cfg.name,
            key=plan.run_uri,
            tags={
                "dmu.kind": "train",
                "dmu.method": cfg.method.name,
                "dmu.dataset": plan.data.name,
                "dmu.run_uri": plan.run_uri,
            },
        )
    except Exception as err:  # the store was opened; a failure now costs the tracking, not the run
        print(
            f"tracking: could not start the MLflow run ({redact(str(err))[:200]}); training goes on",
            file=sys.stderr,
        )
        return None
    run.params(
        flatten(cfg.model_dump(mode="json", exclude={"storage", "tracking", "ray_address"}))
        | {"rows": plan.rows, "classes": int(sum(plan.trained_classes))}
    )
    return run


def _pins(plan: TrainPlan, info: dict[str, Any]) -> dict[str, str]:
    """The sha256 of every artefact the workers load, by the absolute URI they load it from: the old
    model and FastFill's new model as the plan checked them, and the classifier ``prepare`` built."""
    pins = {a.uri: a.sha256 for a in (plan.old, plan.new) if a is not None}
    if info.get("old_classifier"):
        pins[info["old_classifier"]] = artifact_sha256(info["old_classifier"], plan.cfg.storage)
    return pins


def _absolute_uris(cfg: TrainConfig) -> TrainConfig:
    """The config with the local paths that workers open (the old and new model artefacts, the
    backbone weights) made absolute: a relative path in a config means the submitting folder, and
    Ray Train workers run elsewhere."""

    def absolute(uri: str | None) -> str | None:
        return None if uri is None else resolve(uri, cfg.storage).uri

    method = cfg.method.model_copy(
        update={
            k: absolute(getattr(cfg.method, k))
            for k in ("old_model", "new_model")
            if getattr(cfg.method, k, None) is not None
        }
    )
    model = cfg.model.model_copy(update={"weights": absolute(cfg.model.weights)})
    return cfg.model_copy(update={"method": method, "model": model})


def _worker_desc(scaling: ScalingSection) -> str:
    n = _worker_count(scaling)
    return f"{n[0]}-{n[1]} workers (elastic)" if isinstance(n, tuple) else f"{n} worker(s)"


def _worker_count(scaling: ScalingSection) -> int | tuple[int, int]:
    """Ray Train's num_workers: a fixed count, or (min, max) for an elastic run."""
    if scaling.min_workers is None:
        return scaling.num_workers
    return (scaling.min_workers, scaling.num_workers)


def _train_entry(config: dict[str, Any]) -> None:
    from dmu_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def _secrets(cfg: TrainConfig) -> dict[str, Any]:
    """model_dump masks SecretStr; the workers need the real values (they never log them)."""
    s = cfg.storage
    raw = {
        k: (v.get_secret_value() if v is not None else None)
        for k, v in (
            ("access_key_id", s.access_key_id),
            ("secret_access_key", s.secret_access_key),
            ("session_token", s.session_token),
        )
    }
    return {"storage": {**cfg.storage.model_dump(mode="json"), **raw}}


def generations(old: Artifact | None) -> dict[str, Any]:
    """A model's place in its line: ``generation`` (1 without an old model, else the old model's
    + 1) and ``ancestry``, the idents of every earlier generation, oldest first (from the old
    model's card; an imported old model starts the line)."""
    if old is None:
        return {"generation": 1, "ancestry": []}
    extra = old.card.model_extra or {}
    before = list(extra.get("ancestry") or [])
    gen = int(extra.get("generation") or len(before) + 1)
    return {"generation": gen + 1, "ancestry": [*before, old.ident]}


def export_run(plan: TrainPlan, checkpoint, metrics: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Write ``export/model.pt`` (embedding model + classifier + card) and, for DMU with
    adaptation, ``export/upgrade.pt``, from the final checkpoint (``info``: what the workers got)."""
    import os

    import torch

    from dmu_ray.train.loop import STATE_FILE, build_trainee

    cfg = plan.cfg
    trainee, _ = build_trainee(cfg, {**info, "init_backbone": False})  # the checkpoint has the weights
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    trainee.load_state_dict(state["trainee"])
    card = {
        "id": cfg.name,
        "method": cfg.method.name,
        "dataset": plan.data.name,
        "split": {
            "protocol": cfg.data.split,
            "role": cfg.data.role,
            "old_fraction": cfg.data.old_fraction,
            "seed": cfg.data.split_seed,
        },
        "trained_classes": plan.trained_classes,
        "preprocessing": {"mean": plan.mean, "std": plan.std, "size": plan.data.image_size},
        "old_model": {"uri": plan.old.uri, "id": plan.old.ident} if plan.old else None,
        "old_classifier": info.get("old_classifier"),
        "method_revision": METHOD_REVISION,
        "epochs": int(state["epoch"]) + 1,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "history": state.get("history", []),
        "config": _saved_view(cfg),
    }
    card.update(generations(plan.old))
    model_uri = f"{plan.export_uri}/model.pt"
    model_sha = save_embedding_model(model_uri, trainee.model, trainee.head, card, cfg.storage)
    out = {
        "model": model_uri,
        "metrics": card["metrics"],
        "epochs": card["epochs"],
        "history": card["history"],
    }
    if trainee.psi is not None:
        up_uri = f"{plan.export_uri}/upgrade.pt"
        # fastfill targets an already trained model; the others the model trained here
        target_id, target_version, target = (
            (plan.new.card.id, plan.new.card.version, {"uri": plan.new.uri, "id": plan.new.ident})
            if plan.new is not None
            else (card["id"], str(card["epochs"]), {"uri": model_uri, "id": f"{card['id']}@{model_sha[:12]}"})
        )
        psi_card = {
            "id": f"{cfg.name}-psi",
            "method": cfg.method.name,
            "new_model_id": str(target_id),
            "new_model_version": str(target_version),
            "new_model": target,
            "old_model": card["old_model"],
            **trainee.psi.config(),
        }
        save_artifact(up_uri, UPGRADE_MODULE, trainee.psi.state_dict(), psi_card, cfg.storage)
        out["upgrade_module"] = up_uri
    return out
