"""The threads a file's upgrade runs on, and their clocks: the busy seconds of each phase and the
CPU seconds its thread spent in it (:class:`Phases`, :func:`mark`), a batch iterator that produces
the next item on another thread (:func:`prefetched`), a hash that times itself, and a finished
future for work done in line."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import pyarrow as pa

__all__ = ["Mark", "Phases", "in_line", "mark", "prefetched", "sha256_of_buffer"]


class Mark(NamedTuple):
    """A moment on one thread: the wall clock (``time.perf_counter``) and the thread's CPU clock
    (``time.thread_time``)."""

    wall: float
    cpu: float


def mark() -> Mark:
    """Now, on this thread."""
    return Mark(time.perf_counter(), time.thread_time())


class Phases:
    """Seconds per phase of one file's upgrade, added from several threads (reader, module,
    encoder): the busy (wall) time of each, so they may sum to more than the file's wall time, and
    the CPU time the phase's thread used meanwhile (less than the busy time when the thread waited
    or was not scheduled; work that the phase hands to other threads, such as Arrow's own pool or
    torch's intra-op threads, is not in it)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, t0: Mark) -> Mark:
        """Add the wall and CPU time since ``t0`` (taken on this thread) to ``name``; returns now
        (the next phase's ``t0``)."""
        now = mark()
        with self._lock:
            self.seconds[name] += now.wall - t0.wall
            self.cpu[name] += now.cpu - t0.cpu
        return now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}

    def rounded_cpu(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.cpu.items())}


def in_line(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``fn(*args)`` run now, on this thread, as a finished future (an exception propagates)."""
    done: Future[Any] = Future()
    done.set_result(fn(*args))
    return done


def sha256_of_buffer(data: pa.Buffer | bytes, phases: Phases | None = None) -> str:
    t0 = mark()
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    if phases is not None:
        phases.add("sha256", t0)
    return digest


def prefetched(it: Iterator[Any], pool: ThreadPoolExecutor, phases: Phases | None = None) -> Iterator[Any]:
    """``it``'s items, the next one produced on ``pool`` while the caller works on the current
    (the caller's waits for it are ``batch_wait`` in ``phases``)."""
    end = object()
    ahead = pool.submit(next, it, end)
    while True:
        t0 = mark()
        item = ahead.result()
        if phases is not None:
            phases.add("batch_wait", t0)
        if item is end:
            return
        ahead = pool.submit(next, it, end)
        yield item
