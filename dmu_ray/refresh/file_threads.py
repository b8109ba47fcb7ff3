"""The threads a file's upgrade runs on, and their clocks: the busy seconds of each phase
(:class:`Phases`), a batch iterator that produces the next item on another thread
(:func:`prefetched`), a hash that times itself, and a finished future for work done in line."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

__all__ = ["Phases", "in_line", "prefetched", "sha256_of_buffer"]


class Phases:
    """Seconds per phase of one file's upgrade, added from several threads (reader, module,
    encoder): busy time of each, so they may sum to more than the file's wall time."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, t0: float) -> float:
        """Add the time since ``t0`` to ``name``; returns now (the next phase's ``t0``)."""
        now = time.perf_counter()
        with self._lock:
            self.seconds[name] += now - t0
        return now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


def in_line(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``fn(*args)`` run now, on this thread, as a finished future (an exception propagates)."""
    done: Future[Any] = Future()
    done.set_result(fn(*args))
    return done


def sha256_of_buffer(data: pa.Buffer | bytes, phases: Phases | None = None) -> str:
    t0 = time.perf_counter()
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
        t0 = time.perf_counter()
        item = ahead.result()
        if phases is not None:
            phases.add("batch_wait", t0)
        if item is end:
            return
        ahead = pool.submit(next, it, end)
        yield item
