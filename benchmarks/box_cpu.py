"""Where a box's CPU went during a run: every process's CPU seconds and the cores' idle time,
read from Linux's /proc (a benchmark helper, not part of the package).

    with BoxCpu() as box:
        run_refresh(cfg)
    print(box.summary())

``/proc/stat`` gives the box's busy and idle core-seconds exactly; each process's CPU seconds come
from ``/proc/<pid>/stat``, sampled every ``interval`` seconds on a thread (a process that exits
between two samples loses what it used since the last one: at most ``interval`` of its time).
Processes are grouped by what they are: the job's Ray Data actors (``ray::MapWorker``), Ray's other
workers, Ray's daemons (raylet, GCS, dashboard and agents), this driver, everything else.
On a system without /proc, :attr:`available` is False and the summary says so.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
GROUPS = ("actors", "ray workers", "ray daemons", "driver", "other")


def _box_times() -> tuple[float, float]:
    """(busy, idle) core-seconds of the whole box since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / TICK, idle / TICK


def _args(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def _group(pid: int, me: int, args: list[str] | None) -> tuple[str, bool]:
    """The group of process ``pid`` and whether that is final: a Ray worker starts as a plain
    ``python .../default_worker.py`` and takes its ``ray::<what it runs>`` title later, so it is
    looked at again until it has one. ``args``: its command line (:func:`_args`)."""
    if pid == me:
        return "driver", True
    if not args:
        return "other", True
    prog = os.path.basename(args[0])
    if args[0].startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "ray daemons", True
    if args[0].startswith("ray::"):
        return ("actors" if "MapWorker" in args[0] else "ray workers"), "IDLE" not in args[0]
    if prog in ("raylet", "gcs_server"):  # (the raylet's arguments name the worker's script)
        return "ray daemons", True
    script = args[1] if len(args) > 1 else ""
    if script.endswith("default_worker.py"):
        return "ray workers", False
    if "/ray/" in script:  # dashboard, agents, log monitor
        return "ray daemons", True
    return "other", True


def _name(args: list[str] | None) -> str:
    """A short name of a process from its command line: its Ray title, or its program and script."""
    if not args:
        return "?"
    if args[0].startswith("ray::"):
        return args[0][:60]
    script = [os.path.basename(args[1])] if len(args) > 1 and args[1].endswith(".py") else []
    return " ".join([os.path.basename(args[0]), *script])[:60]


def _process_times() -> dict[int, float]:
    out: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(name)] = (int(rest[11]) + int(rest[12])) / TICK  # utime + stime
    return out


class BoxCpu:
    """Samples the box's CPU while the ``with`` block runs (see the module docstring)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.available = os.path.exists("/proc/stat")
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self.wall = self.busy = self.idle = self.own = 0.0
        self.by_group: Counter[str] = Counter()
        self._stop = threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._groups: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._final: set[int] = set()

    def _sample(self) -> None:
        me = os.getpid()
        for pid, cpu in _process_times().items():
            if pid not in self._groups:
                self._first[pid] = 0.0 if self._started else cpu
            if pid not in self._final:
                args = _args(pid)
                self._groups[pid], final = _group(pid, me, args)
                self._names[pid] = _name(args)
                if final:
                    self._final.add(pid)
            self._last[pid] = cpu

    def _loop(self) -> None:
        c0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self._sample()
        self.own = time.thread_time() - c0  # the sampler's own CPU (in the driver's process)

    def __enter__(self) -> BoxCpu:
        if not self.available:
            return self
        self._started = False
        self._sample()  # processes alive now count from what they have used so far
        self._started = True  # the ones that start later count from zero
        self._t0, (self._b0, self._i0) = time.perf_counter(), _box_times()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.available:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        busy, idle = _box_times()
        self.wall, self.busy, self.idle = time.perf_counter() - self._t0, busy - self._b0, idle - self._i0
        for pid, last in self._last.items():
            self.by_group[self._groups[pid]] += last - self._first[pid]
        self.by_group["driver"] -= self.own  # reported on its own

    def top(self, n: int = 5, skip: tuple[str, ...] = ("actors",)) -> str:
        """The ``n`` processes that used the most CPU in the block, outside the groups ``skip``
        (the driver's figure without this sampler's own)."""
        if not self.available:
            return "(no /proc on this system)"
        me = os.getpid()
        used = [
            (last - self._first[pid] - (self.own if pid == me else 0.0), pid)
            for pid, last in self._last.items()
            if self._groups[pid] not in skip
        ]
        used = sorted((u for u in used if u[0] >= 0.05), reverse=True)
        return ", ".join(f"{self._names[pid]} ({self._groups[pid]}) {cpu:.1f} s" for cpu, pid in used[:n])

    def summary(self) -> str:
        """One line: the cores' busy and idle share of the block's wall time, and each group's."""
        if not self.available:
            return "box CPU: no /proc on this system"
        total = self.busy + self.idle or 1.0
        parts = ", ".join(f"{g} {self.by_group[g]:.1f} s" for g in GROUPS if self.by_group[g] >= 0.05)
        parts += f" (and this sampler {self.own:.1f} s)"
        return (
            f"box CPU over {self.wall:.1f} s x {self.cores} cores: busy {self.busy:.1f} core-s "
            f"({self.busy / total:.0%}), idle {self.idle:.1f} ({self.idle / total:.0%}); by process: {parts}"
        )
