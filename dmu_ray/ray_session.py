"""Connecting to Ray: one place that decides which cluster a job runs on, and checks up front that
it can run what a job asks for (so a wrong address or an impossible resource request fails in
seconds, before anything is written, instead of hanging)."""

from __future__ import annotations

import logging
import os
import socket
import time

import ray

from dmu_ray.config import ActorPoolConfig

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to a given cluster address before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0


class RayUnavailableError(ValueError):
    """The Ray cluster cannot be reached, or cannot run what the job asks for."""


def check_reachable(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`RayUnavailableError` when ``address`` (``host:port`` or ``ray://host:port``)
    does not accept a TCP connection within ``timeout_s``. ``None``, ``auto`` and ``local`` are
    resolved by Ray itself and not checked here. (``ray.init`` on an address where nothing
    listens retries for minutes.)"""
    if address is None or address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    hostport = rest if sep else address
    if sep and scheme != "ray":
        raise RayUnavailableError(
            f"Ray address {address!r}: expected host:port (GCS) or ray://host:port (Ray Client); the "
            "http://...:8265 address is the job API, for `dmu-ray submit --address`"
        )
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host:
        host, port = hostport, "10001" if sep else "6379"
    if not port.isdigit():
        raise RayUnavailableError(f"Ray address {address!r}: the port {port!r} is not a number")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); is it running, and is "
            "the address right (--ray-address, ray_address in the config, or $RAY_ADDRESS)?"
        ) from None


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once: ``address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit``),
    else a local single-node cluster (``num_cpus`` caps it; default all cores). An address where
    nothing listens fails in seconds (:func:`check_reachable`)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_reachable(address)
    kwargs: dict = {"address": address, "log_to_driver": True}
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)
    log.info("ray: %s", ray.cluster_resources())


def _fits(bundle: dict[str, float]) -> bool:
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        if all(have.get(k, 0.0) >= v for k, v in bundle.items()):
            return True
    return False


def require_resources(bundle: dict[str, float], what: str, *, wait_s: float = 0.0, count: int = 1) -> None:
    """Raise :class:`RayUnavailableError` unless some alive node can hold ``bundle`` (e.g.
    ``{"CPU": 0.5, "GPU": 1}``, one actor or worker of ``what``). On an autoscaling cluster the
    autoscaler is asked for ``count`` such bundles and given up to ``wait_s`` seconds to start a
    node that fits (a cluster without an autoscaler ignores the request)."""
    bundle = {k: float(v) for k, v in bundle.items() if v}
    if _fits(bundle):
        return
    deadline = time.monotonic() + wait_s
    if wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[bundle] * max(1, count))
        try:
            while time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
                if _fits(bundle):
                    return
        finally:
            request_resources(bundles=[])
    offered = sorted(
        {
            ", ".join(
                f"{k}: {v:g}" for k, v in sorted(n["Resources"].items()) if k in ("CPU", "GPU") or k in bundle
            )
            for n in ray.nodes()
            if n.get("Alive")
        }
    )
    raise RayUnavailableError(
        f"{what} needs {bundle} on one node, and no node of the cluster has it"
        + (f" (waited {wait_s:g}s for the autoscaler)" if wait_s > 0 else "")
        + f"; nodes offer: {'; '.join(offered) or 'nothing'}. Lower the request, or, on an "
        "autoscaling cluster, raise resource_wait_s so that a node can start"
    )


def require_pool(pool: ActorPoolConfig, what: str) -> None:
    """:func:`require_resources` for one actor of a Ray Data actor pool config."""
    require_resources(
        {"CPU": pool.num_cpus, "GPU": pool.num_gpus},
        f"{what} (pool.num_cpus {pool.num_cpus:g}, pool.num_gpus {pool.num_gpus:g})",
        wait_s=pool.resource_wait_s,
        count=pool.min_actors,
    )
