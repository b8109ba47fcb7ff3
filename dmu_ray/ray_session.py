"""Connecting to Ray: one place that decides which cluster a job runs on, and checks up front that
it can run what a job asks for (so a wrong address or an impossible resource request fails in
seconds, before anything is written, instead of hanging)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import ray
import ray.data

from dmu_ray.settings import ActorPoolConfig

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


#: Environment switches the CLI sets (``dmu-ray --verbose``, a command's ``--quiet``); read here so
#: that library code deep inside a job needs no flag passed down.
VERBOSE_ENV, QUIET_ENV = "DMU_RAY_VERBOSE", "DMU_RAY_QUIET"


def verbose() -> bool:
    """Whether Ray's own logs (driver INFO lines, worker and actor output) should reach the terminal."""
    return os.environ.get(VERBOSE_ENV) == "1"


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once: ``address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit``),
    else a local single-node cluster (``num_cpus`` caps it; default all cores). An address where
    nothing listens fails in seconds (:func:`check_reachable`).

    Quiet unless :func:`verbose`: Ray's driver logs at ERROR only, worker/actor output stays in the
    session's log files, Ray Data logs warnings and up (its progress bars still draw on a
    terminal); native log lines at FATAL only, in the session's log files as well (Ray reads that
    level in every process it starts: ``--verbose`` keeps Ray's default). A local cluster starts
    with the dashboard: Ray Train's placement-group cleaner asks
    the State API, which the dashboard serves (without it every check logs a warning); its address
    is printed unless ``$DMU_RAY_QUIET``."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_reachable(address)
    loud = verbose()
    if not loud:  # the C++ core worker's own log lines (read before the core worker starts)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict = {
        "address": address,
        "log_to_driver": loud,
        "logging_level": logging.INFO if loud else logging.ERROR,
    }
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=True)
    try:
        ctx = ray.init(**kwargs) if loud else _init_captured(kwargs)
    except Exception as err:  # Ray raises a bare Exception for this one
        if "timed out during startup" not in str(err):
            raise
        raise RayUnavailableError(
            "Ray's local node did not start in time: this machine is too busy (Ray: "
            f"{str(err).splitlines()[0][:160]}); run again when it is less loaded, or start a cluster "
            "once with `ray start --head` and pass --ray-address"
        ) from None
    _ray_data_console(logging.INFO if loud else logging.WARNING)
    if not loud:
        _quiet_task_errors()
    url = getattr(ctx, "dashboard_url", None)
    if url and address is None and os.environ.get(QUIET_ENV) != "1":
        print(f"Ray dashboard: http://{url}", file=sys.stderr, flush=True)
    log.info("ray: %s", ray.cluster_resources())


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[Any]:
    """Ray Data's context for the datasets made and run inside the block: a copy of the current one
    with ``settings`` applied, so a job's knobs (progress bars, actor start-up wait, autoscaling)
    do not stay behind in the caller's process for the next job it runs. Set nested attributes
    (``autoscaling_config``) on the yielded copy."""
    ctx = ray.data.DataContext.get_current().copy()
    for name, value in settings.items():
        if not hasattr(ctx, name):
            raise AttributeError(f"ray.data.DataContext has no setting {name!r}")
        setattr(ctx, name, value)
    with ray.data.DataContext.current(ctx):
        yield ctx


#: Rows of each block an actor pool is fed, in batches of the pool (:func:`map_on_pool`).
BATCHES_PER_BLOCK = 4


def map_on_pool(ds: Any, actor: type, pool: ActorPoolConfig, constructor_kwargs: dict[str, Any]) -> Any:
    """``ds.map_batches`` of the callable class ``actor`` on an actor pool of ``pool`` (its sizes,
    CPUs, GPUs and batch size; Arrow batches), its input first cut into blocks of
    :data:`BATCHES_PER_BLOCK` batches. Ray Data hands an actor whole blocks, and its Parquet read
    makes one block of several small files: a data set part of a few thousand images was one
    block, embedded by one actor while the others idled (benchmarks/backfill_throughput.py: two
    actors were no faster than one). The cut is Ray Data's streaming repartition: blocks are
    sliced as they arrive, with no barrier and no shuffle."""
    ds = ds.repartition(target_num_rows_per_block=BATCHES_PER_BLOCK * pool.batch_size)
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )


def collect_batches(ds: Any, batch_format: str = "pyarrow") -> list:
    """Every batch of the Ray Data dataset ``ds`` (one per block), run to its end on the
    cluster. When the run fails, the error propagates without the tracebacks of its Ray-internal
    frames (the worker's traceback stays in its message): those frames hold the failed tasks, and
    through them the actor pool's handles, so until Python's next cyclic collection the pool's
    actors stayed alive holding their CPUs and GPUs, and the caller's next job on the same cluster
    waited for them (in the suite: ten minutes, to the test's timeout)."""
    try:
        return list(ds.iter_batches(batch_size=None, batch_format=batch_format))
    except BaseException as err:
        _drop_tracebacks(err)
        raise


def _drop_tracebacks(err: BaseException) -> None:
    """Clear the traceback of ``err`` and of every exception it was raised from or during."""
    stack: list[BaseException | None] = [err]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__cause__, e.__context__]


def _init_captured(kwargs: dict) -> Any:
    """``ray.init`` with what its native code writes to this process's stderr (the core worker's
    start-up lines) held back, and shown only if the start fails."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            return ray.init(**kwargs)
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _quiet_task_errors() -> None:
    """Keep the raylet's per-task error reports (a failed task's whole traceback, which Ray's
    driver prints to stdout as it happens) off the terminal: the failure reaches the caller as an
    exception, and the CLI says its cause in one line with where the logs are. Ray offers no switch
    for this, so its private printer is wrapped; where that name is gone, nothing changes."""
    try:
        from ray._private import worker as _worker
    except ImportError:  # pragma: no cover - a Ray without it
        return
    shown = getattr(_worker, "print_to_stdstream", None)
    if shown is None or getattr(shown, "_dmu_quiet", False):
        return

    def printer(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            log.debug("raylet: %s", "\n".join(data.get("lines", [])))
            return None
        return shown(data, *args, **kwargs)

    printer._dmu_quiet = True  # type: ignore[attr-defined]
    _worker.print_to_stdstream = printer


def _ray_data_console(level: int) -> None:
    """Ray Data's terminal output at ``level``; its session log file keeps everything."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    for h in logging.getLogger("ray.data").handlers:
        console = getattr(h, "stream", None) in (sys.stderr, sys.stdout)
        if console and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(level)
            if level > logging.INFO and not any(isinstance(f, _NoErrors) for f in h.filters):
                h.addFilter(_NoErrors())


class _NoErrors(logging.Filter):
    """Keeps Ray Data's error records (a failed task's whole traceback) off the terminal: the
    exception reaches the caller, which says its cause in one line; the session's log file keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def from_ray(err: BaseException) -> bool:
    """Whether ``err`` is one of Ray's own exception types (a wrapper whose text holds a worker's
    traceback), not the failure it reports."""
    return any(c.__module__.startswith("ray.") for c in type(err).__mro__)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps: Ray's ``cause`` attribute, ``__cause__``, ``__context__``."""
    out: list[BaseException] = []
    while err is not None and all(e is not err for e in out):
        out.append(err)
        nxt = getattr(err, "cause", None)
        if not isinstance(nxt, BaseException):
            nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        err = nxt
    return out


#: a line of a worker's traceback text that names the exception: ``pkg.mod.SomeError: message``
_RAISED = re.compile(r"^\s*((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def root_cause(err: BaseException) -> tuple[str, str, BaseException | None]:
    """``(qualified type name, first line of its message, the exception when this process has
    it)`` of the failure at the bottom of ``err``: the innermost exception that is not one of Ray's
    wrappers, else the last ``Type: message`` line of a non-Ray type in a wrapper's text (an actor
    that died in its constructor reaches the driver only as text)."""
    layers = _chain(err)
    for e in reversed(layers):
        if not from_ray(e):
            text = str(e).strip().splitlines()
            return f"{type(e).__module__}.{type(e).__name__}", text[0] if text else "", e
    for e in layers:
        for line in reversed(str(e).splitlines()):
            m = _RAISED.match(line)
            if m and not m.group(1).startswith("ray."):
                return m.group(1) + m.group(2), m.group(3).strip(), None
    text = str(err).strip().splitlines()
    return type(err).__name__, text[0] if text else "", err


def cause_line(err: BaseException) -> str:
    """One line saying why ``err`` happened: its root cause's type and the first line of its
    message (which names the file or artefact where dmu-ray raised it)."""
    name, first, _ = root_cause(err)
    kind = name.rsplit(".", 1)[-1]
    return f"{kind}: {first}" if first else kind


def ray_logs_dir() -> str | None:
    """Where this session's full Ray logs are (the driver's node), when Ray is initialised."""
    if not ray.is_initialized():
        return None
    try:
        from ray._private.worker import global_worker

        return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001  (a private API: any failure just means no path to print)
        return None


def _alive_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the cluster."""
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _fits(bundle: dict[str, float]) -> bool:
    return any(all(have.get(k, 0.0) >= v for k, v in bundle.items()) for have in _alive_resources())


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
            ", ".join(f"{k}: {v:g}" for k, v in sorted(have.items()) if k in ("CPU", "GPU") or k in bundle)
            for have in _alive_resources()
        }
    )
    raise RayUnavailableError(
        f"{what} needs {bundle} on one node, and no node of the cluster has it"
        + (f" (waited {wait_s:g}s for the autoscaler)" if wait_s > 0 else "")
        + f"; nodes offer: {'; '.join(offered) or 'nothing'}. Lower the request, or, on an "
        "autoscaling cluster, raise resource_wait_s so that a node can start"
    )


# What Ray Data asks for each read task, and each task of a function's ``map_batches``, by default.
TASK_CPUS = 1.0


def _room_for_a_task(cpus: list[float], min_actors: int, num_cpus: float) -> bool:
    """Whether ``min_actors`` actors of ``num_cpus`` CPUs each can be placed on nodes of ``cpus``
    CPUs so that some node keeps :data:`TASK_CPUS` free (the best placement; Ray may choose worse)."""

    def holds(c: float) -> int:  # actors a node of c CPUs holds (1e-9: 0.3 / 0.1 is 2.9999...)
        return int(c / num_cpus + 1e-9)

    total = sum(holds(c) for c in cpus)
    return any(c >= TASK_CPUS and total - holds(c) + holds(c - TASK_CPUS) >= min_actors for c in cpus)


def require_pool(pool: ActorPoolConfig, what: str, *, field: str = "pool", fed_by_tasks: bool = True) -> None:
    """:func:`require_resources` for one actor of a Ray Data actor pool config (``field`` names it
    in the config). A pool ``fed_by_tasks`` (Parquet reads, image fetches upstream of it) must
    also leave CPU for one such task once its ``min_actors`` hold theirs: otherwise the actors wait
    for input that can never be read, and the job hangs without an error (DESIGN.md section 8).
    That is refused here, on a cluster that is not asked to grow (``resource_wait_s`` 0)."""
    require_resources(
        {"CPU": pool.num_cpus, "GPU": pool.num_gpus},
        f"{what} ({field}.num_cpus {pool.num_cpus:g}, {field}.num_gpus {pool.num_gpus:g})",
        wait_s=pool.resource_wait_s,
        count=pool.min_actors,
    )
    if not fed_by_tasks or pool.resource_wait_s > 0:
        return
    cpus = [float(have.get("CPU", 0.0)) for have in _alive_resources()]
    if not _room_for_a_task(cpus, pool.min_actors, pool.num_cpus):
        raise RayUnavailableError(
            f"{field}.min_actors {pool.min_actors} x {field}.num_cpus {pool.num_cpus:g} ({what}) leave no "
            f"node of this cluster ({sum(cpus):g} CPUs) a free {TASK_CPUS:g} CPU for the Ray Data tasks "
            "that read the actors' input: the job would wait forever. Give the actors fractional "
            f"{field}.num_cpus (e.g. 0.5), or lower {field}.min_actors"
        )


def _probe_storage(reads: list, write_dir) -> str | None:
    """On a worker: read a few bytes of each of ``reads`` and write then delete a probe object
    under ``write_dir`` (Locations); None when all works, else what failed (no credential in it)."""
    import uuid

    from dmu_ray.storage import redact, write_bytes_atomic

    try:
        for loc in reads:
            with loc.fs.open_input_stream(loc.path) as f:
                f.read(4)
    except Exception as err:  # any failure of the store: its text, credentials redacted
        return f"cannot read {loc.uri} ({type(err).__name__}: {redact(str(err))[:300]})"
    if write_dir is not None:
        probe = write_dir.join("_tmp", f"probe-{uuid.uuid4().hex}")
        try:
            write_bytes_atomic(probe, b"dmu-ray write check")
            probe.fs.delete_file(probe.path)
        except Exception as err:
            return f"cannot write into {write_dir.uri} ({type(err).__name__}: {redact(str(err))[:300]})"
    return None


def check_storage_from_a_worker(reads: list, write_dir=None, *, what: str = "the job") -> None:
    """Raise :class:`RayUnavailableError` when a Ray worker (not this driver) cannot read each of
    ``reads`` or write into ``write_dir`` (storage Locations): on an existing cluster the workers
    have their own credentials and working folder, and a job that claims its output first would
    otherwise fail only in its actors, leaving the claim behind. Runs one small task."""
    probe = ray.remote(num_cpus=0)(_probe_storage)
    why = ray.get(probe.remote(list(reads), write_dir))
    if why is not None:
        raise RayUnavailableError(
            f"{what}: a Ray worker {why}, although this driver can; the workers need the same access "
            "(credentials in every node's environment or instance role, or the config's storage "
            "section; local paths visible on every node). Nothing was claimed or written"
        )
