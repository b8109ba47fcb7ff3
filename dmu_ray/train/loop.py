"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

One code path for CPU and GPU: DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL
on GPU, chosen by Ray Train), autocast + GradScaler and channels-last only when the device is
CUDA. Everything trained (embedding model, classifier, upgrade module) sits in one
:class:`~dmu_ray.methods.trainee.Trainee` whose ``forward`` is the method's loss, so DDP
synchronises all of it; the method (``cfg.method``, from the registry) builds it.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dmu_ray.data.images import TrainTransform
from dmu_ray.methods.trainee import Trainee
from dmu_ray.train.config import OptimConfig, TrainConfig
from dmu_ray.train.progress import Poster

__all__ = [
    "Trainee",
    "WorkerLoop",
    "build_trainee",
    "lr_lambda",
    "run_scheduler",
    "train_step",
    "train_loop_per_worker",
]

STATE_FILE = "state.pt"
#: per-epoch metrics kept in the run's history (checkpoint and exported card): the losses, the
#: share of samples under the compatibility constraint, DMU's distribution of d, the worker count,
#: the epoch's seconds, throughput and wait before its first batch
HISTORY_KEYS = (
    "epoch",
    "loss",
    "ce",
    "compat",
    "constrained",
    "old_d",
    "d_q10",
    "d_q50",
    "d_q90",
    "d_near0",
    "d_near1",
    "w_max",
    "proto_rebuilds",
    "resumed_from",
    "workers",
    "seconds",
    "samples_per_s",
    "first_batch_s",
)
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
    ids: torch.Tensor | None = None,
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
        loss, stats = trainee(x, y, f_o, ids)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), stats


class WorkerLoop:
    """One Ray Train worker's run, as small steps: :meth:`setup` (build, restore a checkpoint,
    wrap for DDP, optimiser and schedule), :meth:`step` (one batch), :meth:`epoch` (one pass
    over this worker's shard), :meth:`save` (report metrics and a checkpoint) and :meth:`run`.

    A method that keeps state across steps (a logits cache, a queue of negatives) registers it as
    buffers or sub-modules of the trainee in its ``build`` (so it is checkpointed, restored and,
    for parameters, synchronised by DDP with everything else) and updates it from its ``loss``
    or the ``on_epoch_start`` hook; the loop itself needs no edit."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.config = config
        self.cfg = TrainConfig.model_validate(config["cfg"])
        self.info = config["info"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.cuda = self.device.type == "cuda"
        self.start_epoch, self.history = 0, []
        self.last_report = time.perf_counter()
        self.poster = Poster(config.get("progress"), self.rank)  # the driver's progress bar

    def setup(self) -> None:
        """Build the trainee, restore the last checkpoint if any, and prepare DDP and the optimiser."""
        import ray.train
        import ray.train.torch

        cfg = self.cfg
        if not self.cuda:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        trainee, self.old_model = build_trainee(cfg, self.info)
        state = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            trainee.load_state_dict(state["trainee"])
            self.start_epoch = int(state["epoch"]) + 1
            self.history = list(state.get("history", []))
        if self.old_model is not None:
            self.old_model.to(self.device).eval()
        self.trainee = ray.train.torch.prepare_model(trainee)
        self.inner: Trainee = self.trainee.module if hasattr(self.trainee, "module") else self.trainee
        params = [p for p in self.inner.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.steps_per_epoch = steps_per_epoch = max(1, self.info["rows"] // (o.batch_size * self.world))
        self.sched = run_scheduler(self.opt, o, steps_per_epoch, self.start_epoch)
        self.poster.begin(self.start_epoch, o.epochs, steps_per_epoch)
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])  # momentum buffers; its saved LR is set below
            for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr(), strict=True):
                group["lr"] = lr
        self.amp = o.amp and self.cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.shard = ray.train.get_dataset_shard("train")
        self.stream: Iterator[dict[str, torch.Tensor]] | None = None
        c, info = cfg.data, self.info
        # crops differ per worker and per (re)start: a resumed run does not replay epoch 0's crops
        self.transform = TrainTransform(
            c.augment,
            c.flip,
            c.crop_scale,
            info["mean"],
            info["std"],
            seed=_seed(cfg.seed, self.rank, self.start_epoch),
        )

    def step(self, batch: dict[str, torch.Tensor], epoch: int, steps: int) -> tuple[torch.Tensor, dict]:
        """One optimisation step and the LR schedule's; a non-finite loss stops the run."""
        loss, stats = train_step(
            self.trainee,
            self.old_model,
            self.transform(batch["image"]),
            batch["label"],
            self.opt,
            self.scaler,
            self.amp,
            batch.get("id"),
        )
        self.sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {steps}; lower optim.lr")
        return loss, stats

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch's batches of this worker's shard. Where the shard is a stream of every epoch
        (``stream_epochs``: the set is decoded every epoch), its next ``steps_per_epoch`` batches
        from the one iteration that runs through the whole run; otherwise a new pass."""
        it = self.stream
        if it is None:
            it = self.shard.iter_torch_batches(
                batch_size=self.cfg.optim.batch_size,
                dtypes={"image": torch.uint8, "label": torch.int64, "id": torch.int64},
                device=self.device,  # pixels cross to the GPU as uint8; TrainTransform runs there
                drop_last=True,
                local_shuffle_buffer_size=self.cfg.optim.batch_size * 4,
                prefetch_batches=2,
            )
            if not self.config.get("stream_epochs"):
                return iter(it)
            it = self.stream = iter(it)
        return itertools.islice(it, self.steps_per_epoch)

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch of this worker's shard; returns the epoch's metrics."""
        cfg = self.cfg
        self.trainee.train()
        if self.old_model is not None:
            self.old_model.eval()
        self.inner.method.on_epoch_start(self.inner, epoch)
        sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per statistic and step
        steps, samples, t0, first_batch_s = 0, 0, time.perf_counter(), 0.0
        for batch in self.batches():
            if steps == 0:
                first_batch_s = time.perf_counter() - t0  # the pipeline's start within the epoch
                _maybe_failure_drill(
                    cfg, self.config, epoch, self.rank, self.world, time.perf_counter() - self.last_report
                )
            loss, stats = self.step(batch, epoch, steps)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double()
            steps += 1
            samples += len(batch["label"])
            self.poster.step(epoch, steps, loss)
        seconds = time.perf_counter() - t0
        if steps == 0:  # the plan checked that every worker gets a batch: the data changed or ran out
            raise RuntimeError(
                f"epoch {epoch}: worker {self.rank} got no batch of {cfg.optim.batch_size} from its shard "
                f"(planned {self.steps_per_epoch} steps over {self.info['rows']} rows)"
            )
        metrics = {k: float(v) / max(1, steps) for k, v in sums.items()}
        metrics.update(
            epoch=epoch,
            steps=steps,
            lr=self.sched.get_last_lr()[0],
            seconds=seconds,
            first_batch_s=first_batch_s,
            samples_per_s=samples * self.world / seconds if seconds else 0.0,
            resumed_from=self.start_epoch,
            workers=self.world,
        )
        return metrics

    def save(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Report the epoch's metrics with a checkpoint (written by rank 0)."""
        import ray.train

        self.history.append({k: metrics[k] for k in HISTORY_KEYS if k in metrics})
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                torch.save(
                    {
                        "trainee": self.inner.state_dict(),
                        "optimizer": self.opt.state_dict(),
                        "epoch": epoch,
                        "history": self.history,
                    },
                    os.path.join(d, STATE_FILE),
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        self.poster.epoch_done(metrics)
        self.last_report = time.perf_counter()

    def run(self) -> None:
        self.setup()
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            self.save(epoch, self.epoch(epoch))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: resume if a checkpoint exists, train the remaining epochs, report
    metrics and a checkpoint after every epoch (:class:`WorkerLoop`)."""
    WorkerLoop(config).run()


def _seed(seed: int, rank: int, start_epoch: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + start_epoch) % 2**63


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
