"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

One code path for CPU and GPU: DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL
on GPU, chosen by Ray Train), autocast + GradScaler and channels-last only when the device is
CUDA. Everything trained (embedding model, classifier, upgrade module) sits in one
:class:`Trainee` whose ``forward`` returns the loss, so DDP synchronises all of it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmu_ray.config import MethodConfig, OptimConfig, TrainConfig
from dmu_ray.methods.fastfill import fastfill_loss
from dmu_ray.methods.losses import compatibility_loss, discriminativeness, dmu_weights, mean_one, upgrade_loss
from dmu_ray.models.artifact import EMBEDDING_MODEL, build_embedding_model, load_artifact
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule

STATE_FILE = "state.pt"
DRILL_WAIT_S = 6.0  # > 2 of Ray Train's default 2 s health-check polls


class Trainee(nn.Module):
    """New model + new classifier (+ upgrade module), the frozen old classifier, and the loss.

    For ``fastfill`` the new model and its classifier are the frozen, already trained new model
    (``frozen_model``) and only psi learns; for ``unibct`` ``old_head`` holds the refined old-feature
    prototypes instead of the old classifier."""

    def __init__(
        self,
        model: EmbeddingModel,
        head: MarginHead,
        method: MethodConfig,
        *,
        psi: UpgradeModule | None = None,
        old_head: MarginHead | None = None,
        old_classes: torch.Tensor | None = None,
        frozen_model: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.head, self.psi, self.method = model, head, psi, method
        self.old_head = old_head
        self.frozen_model = frozen_model
        if frozen_model:
            model.requires_grad_(False)
            head.requires_grad_(False)
        if old_head is not None:
            old_head.requires_grad_(False)
            self.register_buffer("old_classes", old_classes.bool())

    def train(self, mode: bool = True) -> Trainee:
        super().train(mode)
        if self.frozen_model:  # its BatchNorm statistics must not move either
            self.model.eval()
        return self

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, f_o: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.method
        if m.name == "fastfill":
            with torch.no_grad():
                f_n = self.model(x)
            return fastfill_loss(self.psi, f_o, f_n, labels, self.head, m.transform_ce_weight)
        f_n = self.model(x)
        ce = F.cross_entropy(self.head(f_n, labels), labels)
        loss, stats = ce, {"ce": ce.detach()}
        if m.name == "independent" or (f_o is None and m.name != "unibct"):
            return loss, stats
        known = self.old_classes[labels]
        if m.name in ("bct", "unibct"):
            w_compat = mean_one(torch.ones_like(f_n[:, 0]), known)
        else:
            d = discriminativeness(self.old_head, f_o, labels, m.discriminativeness)
            w = dmu_weights(d, known, selective=m.selective, adapt_weighting=m.adapt_weighting)
            w_compat = w.compat
            stats["old_d"] = d.mean()
        compat = compatibility_loss(f_n, labels, self.old_head, w_compat)
        loss = loss + m.compat_weight * compat
        stats["compat"] = compat.detach()
        if m.name == "dmu" and self.psi is not None:
            up, cos = upgrade_loss(self.psi, f_o, f_n, labels, self.head, w.upgrade, m.align_weight)
            loss = loss + m.upgrade_weight * up
            stats["upgrade"], stats["psi_cos"] = up.detach(), cos
        if f_o is not None:
            with torch.no_grad():
                stats["new_old_cos"] = (f_n * F.normalize(f_o.float(), dim=1)).sum(1).mean()
        return loss, stats


def build_trainee(cfg: TrainConfig, info: dict[str, Any]) -> tuple[Trainee, nn.Module | None]:
    """The Trainee and the frozen old embedding model (None where the loss needs no old features:
    independent, unibct). ``info["prototypes"]`` (unibct) may be absent when a checkpoint will
    supply them."""
    torch.manual_seed(cfg.seed)
    m = cfg.method
    if m.name == "independent":
        model = EmbeddingModel(cfg.model.backbone, cfg.model.dim, info["channels"])
        head = MarginHead(cfg.model.dim, info["num_classes"], cfg.model.head, cfg.model.s, cfg.model.m)
        return Trainee(model, head, m), None
    art = load_artifact(m.old_model, cfg.storage, kind=EMBEDDING_MODEL)
    old_model, old_head = build_embedding_model(art)
    old_model.requires_grad_(False)
    if m.name == "fastfill":
        new_model, new_head = build_embedding_model(
            load_artifact(m.new_model, cfg.storage, kind=EMBEDDING_MODEL)
        )
        psi = UpgradeModule(old_model.dim, new_model.dim, m.upgrade_width, m.upgrade_depth, uncertainty=True)
        return Trainee(new_model, new_head, m, psi=psi, frozen_model=True), old_model
    model = EmbeddingModel(cfg.model.backbone, cfg.model.dim, info["channels"])
    head = MarginHead(cfg.model.dim, info["num_classes"], cfg.model.head, cfg.model.s, cfg.model.m)
    if m.name == "unibct":
        proto_head = MarginHead(old_model.dim, info["num_classes"], old_head.kind, old_head.s, old_head.m)
        present = torch.zeros(info["num_classes"], dtype=torch.bool)
        if info.get("prototypes") is not None:
            with torch.no_grad():
                proto_head.weight.copy_(torch.tensor(info["prototypes"], dtype=torch.float32))
            present = torch.tensor(info["prototype_present"], dtype=torch.bool)
        return Trainee(model, head, m, old_head=proto_head, old_classes=present), None
    psi = None
    if m.name == "dmu" and m.adapt:
        psi = UpgradeModule(old_model.dim, cfg.model.dim, m.upgrade_width, m.upgrade_depth)
    old_classes = torch.tensor(art.card.get("trained_classes") or [True] * info["num_classes"])
    return Trainee(model, head, m, psi=psi, old_head=old_head, old_classes=old_classes), old_model


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
