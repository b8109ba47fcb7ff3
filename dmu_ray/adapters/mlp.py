"""The trained adapters (``mlp``, ``mlp-uncertainty``): the residual upgrade module fitted to paired
vectors on Ray Train.

The module is :class:`~dmu_ray.models.upgrade.UpgradeModule` with a linear skip path that starts at
the closed-form fit of the same pairs (so epoch 0 is already the affine or Procrustes adapter and
the MLP learns what a linear map cannot). Each step takes a batch of fitted pairs ``(x, y)`` and
minimises ``||normalize(psi(x)) - normalize(y)||^2`` (2 - 2 cos, what a cosine search sees); with
the uncertainty head, under FastFill's heteroscedastic loss, so ``log_var`` learns each row's
expected error and ``backfill --policy uncertainty`` re-embeds the worst-mapped rows first. No
labels are involved.

Workers stream the fitted pairs (Parquet written by the join) as a Ray Data dataset split across
them (equal shards, whole batches only, so DDP's collectives stay in step). One code path for CPU
(gloo) and GPU (NCCL, ``mlp.use_gpu``) workers; the GPU path is the same code with the device Ray
Train hands out, and was not run on this project's CPU-only machines.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from dmu_ray.adapters.config import MlpSection
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.storage import Location

__all__ = ["build_mlp", "check_training", "train_mlp", "STATE_FILE"]

STATE_FILE = "adapter_mlp.pt"
#: fitted pairs smaller than this share of the object store are read once and kept there
CACHE_SHARE = 0.25


def build_mlp(
    in_dim: int,
    out_dim: int,
    section: MlpSection,
    *,
    uncertainty: bool,
    init: tuple[np.ndarray, np.ndarray] | None,
) -> UpgradeModule:
    """The residual module, its skip path set to ``init = (W, b)`` (the closed-form map; None: zero)."""
    m = UpgradeModule(
        in_dim, out_dim, section.width, section.depth, uncertainty=uncertainty, skip_linear=True
    )
    with torch.no_grad():
        if init is None:
            m.skip.weight.zero_()
        else:
            w, b = init
            m.skip.weight.copy_(torch.as_tensor(w, dtype=torch.float32).T)  # Linear stores (out, in)
            m.mlp[-1].bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return m


class _Fitted(torch.nn.Module):
    """What DDP wraps: the module's output, with its log variance when it has the head (so the
    head's gradients are synchronised too)."""

    def __init__(self, module: UpgradeModule) -> None:
        super().__init__()
        self.module_ = module

    def forward(self, x: torch.Tensor):
        m = self.module_
        return m.forward_with_uncertainty(x) if m.uncertainty else m(x)


def check_training(section: MlpSection, pairs: str, rows: int) -> None:
    """Raise ValueError unless ``rows`` fitted pairs (``pairs`` says how they were counted) give
    every worker a batch, and the cluster can hold a worker; asks an autoscaler for them."""
    from dmu_ray.ray_session import require_resources

    if rows < section.batch_size * section.num_workers:
        raise ValueError(
            f"{pairs} {rows:,} pairs, fewer than one batch per worker (mlp.batch_size {section.batch_size} x "
            f"mlp.num_workers {section.num_workers}); lower them or bring more pairs"
        )
    require_resources(
        {"CPU": section.cpus_per_worker, "GPU": 1 if section.use_gpu else 0},
        "an adapter training worker (mlp.cpus_per_worker, mlp.use_gpu)",
        count=section.num_workers,
    )


def _loss(out, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean ||normalize(out) - normalize(y)||^2``, under FastFill's loss when ``out`` carries a
    log variance; with the mean cosine and alignment of the batch."""
    import torch.nn.functional as F

    from dmu_ray.methods.fastfill import uncertainty_loss

    target = F.normalize(y.float(), dim=1)
    out, log_var = out if isinstance(out, tuple) else (out, None)
    u = F.normalize(out.float(), dim=1)
    align = ((u - target) ** 2).sum(1)
    loss = align.mean() if log_var is None else uncertainty_loss(align, log_var)
    return loss, {"align": float(align.mean().detach()), "cos": float((u * target).sum(1).mean().detach())}


def _worker_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: train the module for the configured epochs; rank 0 posts progress
    and writes the final state as the checkpoint."""
    import ray.train
    import ray.train.torch

    from dmu_ray.gallery import embedding_matrix
    from dmu_ray.train.progress import Poster

    sec = MlpSection.model_validate(config["section"])
    torch.manual_seed(sec.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    module = build_mlp(config["in_dim"], config["out_dim"], sec, uncertainty=config["uncertainty"], init=None)
    module.load_state_dict(config["state"])
    inner = module
    module = ray.train.torch.prepare_model(_Fitted(module))  # DDP when world > 1, on the worker's device
    opt = torch.optim.AdamW(module.parameters(), lr=sec.lr, weight_decay=sec.weight_decay)
    steps = max(1, config["fit_rows"] // (sec.batch_size * world))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sec.lr, total_steps=steps * sec.epochs)
    poster = Poster(config.get("board"), rank)
    poster.begin(0, sec.epochs, steps)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(sec.epochs):
        module.train()
        t0, seen, total, stats = time.perf_counter(), 0, 0.0, {"align": 0.0, "cos": 0.0}
        for step, batch in enumerate(
            shard.iter_batches(
                batch_size=sec.batch_size,
                batch_format="pyarrow",
                drop_last=True,
                local_shuffle_buffer_size=sec.shuffle_buffer or None,
                local_shuffle_seed=sec.seed + 1000 * epoch + rank,
            )
        ):
            x = torch.from_numpy(np.ascontiguousarray(embedding_matrix(batch["src"]), np.float32)).to(device)
            y = torch.from_numpy(np.ascontiguousarray(embedding_matrix(batch["dst"]), np.float32)).to(device)
            loss, part = _loss(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch < sched.total_steps - 1:
                sched.step()
            n = len(x)
            seen += n
            total += float(loss.detach()) * n
            for k in stats:
                stats[k] += part[k] * n
            poster.step(epoch, step + 1, float(loss.detach()))
        metrics = {
            "epoch": epoch,
            "loss": total / max(1, seen),
            "cos": stats["cos"] / max(1, seen),
            "align": stats["align"] / max(1, seen),
            "seconds": time.perf_counter() - t0,
            "samples_per_s": seen * world / max(1e-9, time.perf_counter() - t0),
        }
        last = epoch == sec.epochs - 1
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if last and rank == 0:
                state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
                torch.save(state, os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        poster.epoch_done(metrics)


def train_mlp(
    module: UpgradeModule,
    section: MlpSection,
    fit_loc: Location,
    fit_rows: int,
    run_loc: Location,
    *,
    name: str,
    progress: bool = True,
) -> tuple[UpgradeModule, list[dict[str, Any]]]:
    """Train ``module`` (built by :func:`build_mlp`) on the fitted pairs under ``fit_loc`` with
    Ray Train (checkpoints under ``run_loc``); returns it trained, in eval mode, and the epochs'
    metrics. Needs a Ray session."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from dmu_ray.train.progress import ProgressBoard, TrainWatcher

    check_training(section, "the join found", fit_rows)
    files = [fit_loc.join(n).path for n in fit_loc.list_files(".parquet", data_only=True)]
    dataset = ray.data.read_parquet(files, filesystem=fit_loc.fs)
    size = fit_rows * (module.in_dim + module.out_dim) * 4
    if size < CACHE_SHARE * ray.cluster_resources().get("object_store_memory", 0.0):
        dataset = dataset.materialize()  # read once; every epoch then streams from the object store
    dataset = dataset.randomize_block_order(seed=section.seed)
    if not run_loc.is_s3:
        run_loc.fs.create_dir(run_loc.path, recursive=True)
    board = ProgressBoard.remote()
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_loop,
        train_loop_config={
            "section": section.model_dump(mode="json"),
            "in_dim": module.in_dim,
            "out_dim": module.out_dim,
            "uncertainty": module.uncertainty,
            "state": {k: v.clone() for k, v in module.state_dict().items()},
            "fit_rows": fit_rows,
            "board": board,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=section.num_workers,
            use_gpu=section.use_gpu,
            resources_per_worker={"CPU": section.cpus_per_worker, **({"GPU": 1} if section.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(name=name, storage_path=run_loc.path, storage_filesystem=run_loc.fs),
        datasets={"train": dataset},
    )
    history: list[dict[str, Any]] = []
    try:
        with TrainWatcher(board, name, on_epoch=history.append, show=progress, unit="pairs"):
            result = trainer.fit()
    finally:
        with contextlib.suppress(Exception):
            ray.kill(board)
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module.eval(), history
