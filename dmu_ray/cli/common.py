"""What every command module shares: storage flags, job flags, errors and progress lines."""

from __future__ import annotations

import argparse
import sys
import typing

from dmu_ray.settings import StorageConfig


def _storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (credentials come from the standard AWS chain)")
    g.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL_S3/$AWS_ENDPOINT_URL, else AWS)",
    )
    g.add_argument("--region", help="AWS region (default: the AWS chain's)")


def _storage(ns: argparse.Namespace) -> StorageConfig:
    return StorageConfig(endpoint_url=ns.endpoint_url, region=ns.region)


def _err(msg: str) -> None:
    """Print an error; credentials (URI user-info, AWS secrets of this environment) are redacted."""
    from dmu_ray.storage import redact

    print(f"dmu-ray: error: {redact(msg)}", file=sys.stderr)


def _job_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """The arguments every job command takes (``_job_config`` reads them)."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _job_config(cls, ns: argparse.Namespace, load=None):
    """A job's config from ``--config`` (as ``cls``, or by ``load(path)`` where the file's kind picks
    the class), with ``--ray-address`` applied."""
    from dmu_ray.settings import load_config

    cfg = load(ns.config) if load is not None else load_config(cls, ns.config)
    if ns.ray_address:
        cfg.ray_address = ns.ray_address
    return cfg


def _progress(msg: str) -> None:
    """A progress update: redrawn in place on a terminal; one line each elsewhere (log files,
    Ray job logs, pipes), so updates never run together."""
    if sys.stderr.isatty():
        print(f"\r{msg}", end="", file=sys.stderr, flush=True)
    else:
        print(msg, file=sys.stderr, flush=True)


def _progress_done() -> None:
    """End a run of :func:`_progress` updates (the line drawn in place, on a terminal)."""
    if sys.stderr.isatty():
        print(file=sys.stderr)


def _literal_choices(model, field: str) -> list[str]:
    """The values a config field's ``Literal`` allows: CLI choices come from the configs."""
    return list(typing.get_args(model.model_fields[field].annotation))
