"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

One code path for CPU and GPU: DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL
on GPU, chosen by Ray Train), autocast + GradScaler and channels-last only when the device is
CUDA. Everything trained (embedding model, classifier, upgrade module) sits in one
:class:`~dmu_ray.train.trainee.Trainee` whose ``forward`` is the method's loss, so DDP
synchronises all of it; the method (``cfg.method``, from the registry) builds it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import torch
from torch import nn

from dmu_ray.config import OptimConfig, TrainConfig
from dmu_ray.train.trainee import Trainee

__all__ = ["Trainee", "build_trainee", "lr_lambda", "run_scheduler", "train_step", "train_loop_per_worker"]

STATE_FILE = "state.pt"
DRILL_WAIT_S = 6.0  # > 2 of Ray Train's default 2 s health-check polls


def build_trainee(cfg: TrainConfig, info: dict[str, Any]) -> tuple[Trainee, nn.Module | None]:
    """The Trainee and the frozen old embedding model (None where the loss needs no old features),
    as the method builds them, after seeding torch with the run's seed."""
    torch.manual_seed(cfg.seed)
    return cfg.method.build(cfg, info)


def lr_lambda(warmup_steps: float, total_steps: int):
    """Linear warm-up to the base LR, then cosine decay to 0 (multiplier per optimizer step)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1.0, warmup_steps)
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def run_scheduler(
    opt: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int, start_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of a worker group that starts at ``start_epoch``: a function of the position
    in the run, counted in this group's steps per epoch, so a run resumed with another number of
    workers (elastic, or resubmitted) stays on the same curve. Build it before loading a saved
    optimizer state (the optimizer's LRs must still be the base LRs)."""
    schedule = lr_lambda(optim.warmup_epochs * steps_per_epoch, optim.epochs * steps_per_epoch)
    done = start_epoch * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(done + step))


def train_step(
    trainee: nn.Module,
    old_model: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step, the same on CPU and GPU: channels-last and fp16 autocast with loss
    scaling when ``x`` is on CUDA and ``amp`` is set; the frozen old model runs under no_grad."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp and x.is_cuda):
        f_o = None
        if old_model is not None:
            with torch.no_grad():
                f_o = old_model(x)
        loss, stats = trainee(x, y, f_o)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), stats


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: resume if a checkpoint exists, train the remaining epochs, report
    metrics and a checkpoint after every epoch."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    info = config["info"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    trainee, old_model = build_trainee(cfg, info)
    start_epoch, state, history = 0, None, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        trainee.load_state_dict(state["trainee"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("history", []))
    if old_model is not None:
        old_model.to(device).eval()
    trainee = ray.train.torch.prepare_model(trainee)
    inner: Trainee = trainee.module if hasattr(trainee, "module") else trainee
    params = [p for p in inner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    sched = run_scheduler(opt, cfg.optim, max(1, info["rows"] // (cfg.optim.batch_size * world)), start_epoch)
    if state is not None:
        opt.load_state_dict(state["optimizer"])  # momentum buffers; its saved LR is set below
        for group, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr
    amp = cfg.optim.amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    shard = ray.train.get_dataset_shard("train")

    last_report = time.perf_counter()
    for epoch in range(start_epoch, cfg.optim.epochs):
        trainee.train()
        if old_model is not None:
            old_model.eval()
        sums: dict[str, float] = {}
        steps, samples, t0 = 0, 0, time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=cfg.optim.batch_size,
            dtypes={"image": torch.float32, "label": torch.int64, "id": torch.int64},
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=cfg.optim.batch_size * 4,
        ):
            if steps == 0:
                _maybe_failure_drill(cfg, config, epoch, rank, world, time.perf_counter() - last_report)
            loss, stats = train_step(trainee, old_model, batch["image"], batch["label"], opt, scaler, amp)
            sched.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at epoch {epoch} step {steps}; lower optim.lr"
                )
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
            samples += len(batch["label"])
        seconds = time.perf_counter() - t0
        metrics = {k: v / max(1, steps) for k, v in sums.items()}
        metrics.update(
            epoch=epoch,
            steps=steps,
            lr=sched.get_last_lr()[0],
            seconds=seconds,
            samples_per_s=samples * world / seconds if seconds else 0.0,
            resumed_from=start_epoch,
            workers=world,
        )
        history.append(
            {k: metrics[k] for k in ("epoch", "loss", "ce", "resumed_from", "workers") if k in metrics}
        )
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "trainee": inner.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "history": history,
                    },
                    os.path.join(d, STATE_FILE),
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        last_report = time.perf_counter()


def _maybe_failure_drill(
    cfg: TrainConfig, config: dict[str, Any], epoch: int, rank: int, world: int, since_report: float
) -> None:
    """``failure_drill_epoch``: the last worker dies once, at the first batch of that epoch, so a
    run exercises its recovery (FailureConfig) for real; it must resume at that epoch from the
    previous epoch's checkpoint. The crash waits until Ray Train's controller has certainly
    collected the previous report (a few health-check polls), as a real crash mid-epoch would.
    A marker in the run folder makes the drill happen once."""
    if cfg.failure_drill_epoch is None or epoch != cfg.failure_drill_epoch or rank != world - 1:
        return
    from dmu_ray.storage import resolve

    marker = resolve(config["run_uri"], cfg.storage).join("_failure_drill_done")
    if marker.exists():
        return
    marker.fs.create_dir(marker.path.rsplit("/", 1)[0], recursive=True)
    with marker.fs.open_output_stream(marker.path) as f:
        f.write(b"1")
    time.sleep(max(0.0, DRILL_WAIT_S - since_report))
    os._exit(1)  # a hard crash of this worker process, not a Python exception
