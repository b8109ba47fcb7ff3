"""Connecting to Ray: one place that decides which cluster a job runs on."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once: ``address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit``),
    else a local single-node cluster (``num_cpus`` caps it; default all cores)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"address": address, "log_to_driver": True}
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)
    log.info("ray: %s", ray.cluster_resources())
