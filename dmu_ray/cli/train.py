"""``dmu-ray train``: a model on Ray Train."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import (
    _job_args,
    _job_config,
)


def _cmd_train(ns: argparse.Namespace) -> int:
    from dmu_ray.train.config import TrainConfig
    from dmu_ray.train.job import run_training

    cfg = _job_config(TrainConfig, ns)
    out = run_training(cfg, progress=not ns.quiet)
    last = out["metrics"]
    print(
        f"trained {cfg.name}: {out['epochs']} epochs, loss {last.get('loss', float('nan')):.4f}; "
        f"model {out['model']}"
        + (f"; upgrade module {out['upgrade_module']}" if "upgrade_module" in out else "")
    )
    for note in out.get("notes", []):
        print(f"note: {note}")
    return 0


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    tr = sub.add_parser(
        "train",
        help="train on Ray Train: old model, new model (independent/bct/dmu/unibct), fastfill transformation",
        description="Run one Ray Train job from a config, with an epoch/step progress bar and ETA. Re-running "
        "the same config (same name and storage_path) resumes from the last checkpoint. Metrics per epoch go to "
        "MLflow (default: storage_path/mlflow.db; the config's tracking section).",
    )
    _job_args(tr, "training config (YAML); see configs/train_*.yaml")
    tr.set_defaults(func=_cmd_train)
