"""Training progress seen from the driver: an epoch/step bar with ETA, and each epoch's metrics as
soon as it ends (for the terminal and the run tracker).

Rank 0 of the Ray Train worker group posts to a :class:`ProgressBoard` actor (a few fire-and-forget
calls per second at most); a :class:`TrainWatcher` thread on the driver polls it while
``trainer.fit()`` blocks. On a terminal the watcher draws a tqdm bar (steps, epoch, loss, ETA);
elsewhere (Ray job logs, CI, pipes) it prints one line per epoch with the ETA.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import ray

#: the least time between two step posts of rank 0 (seconds)
POST_EVERY_S = 0.5


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where rank 0 posts the run's position and finished epochs; the driver reads them."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {
            "start_epoch": 0,
            "epochs": None,
            "steps_per_epoch": None,
            "epoch": None,
        }
        self.state.update(step=0, loss=None)
        self.finished: list[dict[str, Any]] = []

    def begin(self, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self.state.update(start_epoch=start_epoch, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.state.update(epoch=start_epoch, step=0)

    def step(self, epoch: int, step: int, loss: float) -> None:
        self.state.update(epoch=epoch, step=step, loss=loss)

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        self.finished.append(metrics)
        self.state.update(epoch=int(metrics["epoch"]) + 1, step=0)

    def read(self, since: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return dict(self.state), self.finished[since:]


class Poster:
    """Rank 0's side: posts the position at most every :data:`POST_EVERY_S` and every epoch's end;
    other ranks and runs without a board post nothing."""

    def __init__(self, board: Any | None, rank: int) -> None:
        self.board = board if rank == 0 else None
        self.last = 0.0

    def begin(self, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        if self.board is not None:
            self.board.begin.remote(start_epoch, epochs, steps_per_epoch)

    def step(self, epoch: int, step: int, loss: Any) -> None:
        if self.board is None or time.perf_counter() - self.last < POST_EVERY_S:
            return
        self.last = time.perf_counter()
        self.board.step.remote(epoch, step, float(loss))

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        """Waits for the board (once an epoch), so the last epoch is posted before fit() returns."""
        if self.board is not None:
            try:
                ray.get(self.board.epoch_done.remote(metrics), timeout=30)
            except Exception:  # the driver (and its board) went away: training goes on unwatched
                self.board = None


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainWatcher:
    """Polls a :class:`ProgressBoard` every ``interval`` seconds from a thread: draws a bar (``bar``)
    or prints a line per finished epoch, and hands each finished epoch's metrics to ``on_epoch``."""

    def __init__(
        self,
        board: Any,
        name: str,
        *,
        bar: bool | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        stream: TextIO | None = None,
        interval: float = 0.5,
        show: bool = True,
        unit: str = "img",
    ) -> None:
        self.board, self.name, self.on_epoch, self.unit = board, name, on_epoch, unit
        self.stream = stream or sys.stderr
        self.bar_mode = self.stream.isatty() if bar is None else bar
        self.interval, self.show = interval, show
        self.seen = 0  # finished epochs handed on
        self.done_steps = 0
        self._bar = None
        self._epoch_s: list[float] = []
        self._t0: float | None = None
        self._steps0 = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"train-progress-{name}", daemon=True)

    def __enter__(self) -> TrainWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with contextlib.suppress(Exception):  # never hide the training's outcome behind the watcher's
            self.poll()  # the last epoch's metrics, posted just before fit() returned
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a board that is gone must not take the training down
                if self._stop.is_set():
                    return

    def eta(self, done: int, total: int) -> float | None:
        """Seconds left at the rate of the steps seen since this watcher first saw progress."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._steps0 = now, done
            return None
        rate = (done - self._steps0) / max(1e-9, now - self._t0)
        return (total - done) / rate if rate > 0 else None

    def poll(self) -> None:
        state, finished = ray.get(self.board.read.remote(self.seen), timeout=30)
        epochs = state.get("epochs")
        for m in finished:
            self.seen += 1
            if self.on_epoch is not None:
                self.on_epoch(m)
            if self.show and not self.bar_mode and epochs:
                self._line(m, int(epochs))
        spe = state.get("steps_per_epoch")
        if not spe or not epochs:
            return
        total = spe * epochs
        self.done_steps = min(total, spe * int(state["epoch"]) + int(state["step"]))
        eta = self.eta(self.done_steps, total)
        if self.show and self.bar_mode:
            self._draw(state, total, eta)

    def _draw(self, state: dict[str, Any], total: int, eta: float | None) -> None:
        from tqdm import tqdm

        if self._bar is None or self._bar.total != total:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(
                total=total, desc=f"train {self.name}", unit="step", file=self.stream, leave=True
            )
        self._bar.n = self.done_steps
        loss = state.get("loss")
        epoch = min(int(state["epoch"]) + 1, int(state["epochs"]))
        text = f"epoch {epoch}/{state['epochs']}" + (f", loss {loss:.4f}" if loss is not None else "")
        self._bar.set_postfix_str(f"{text}, ETA {_clock(eta)}", refresh=True)

    def _line(self, m: dict[str, Any], epochs: int) -> None:
        """``train NAME: epoch 2/6: loss 1.2345, 41s, 180 img/s, ETA 2:44`` (ETA: epochs left times
        the mean epoch time seen so far)."""
        e = int(m["epoch"])
        parts = [f"loss {m['loss']:.4f}"] if "loss" in m else []
        if "seconds" in m:
            self._epoch_s.append(float(m["seconds"]))
            parts.append(f"{m['seconds']:.0f}s")
        if "samples_per_s" in m:
            parts.append(f"{m['samples_per_s']:.0f} {self.unit}/s")
        mean = sum(self._epoch_s) / len(self._epoch_s) if self._epoch_s else None
        parts.append(f"ETA {_clock(None if mean is None else max(0, epochs - e - 1) * mean)}")
        print(
            f"  train {self.name}: epoch {e + 1}/{epochs}: " + ", ".join(parts), file=self.stream, flush=True
        )


#: a loss that fell less than this share over a run's epochs is reported as not learning
STALL_SHARE = 0.05


def stall_notes(history: list[dict[str, Any]]) -> list[str]:
    """Sentences for the end of a training whose losses hardly moved over its epochs (the total
    and, where the method has one, the compatibility loss ``compat``); none for one epoch."""
    if len(history) < 2:
        return []
    notes = []
    for key, what, then in (
        ("compat", "the compatibility loss", "new/old is unlikely to beat old/old"),
        ("loss", "the training loss", "the model has hardly learnt from these epochs"),
    ):
        first, last = history[0].get(key), history[-1].get(key)
        if first is None or last is None or not first > 0:
            continue
        fell = 1 - last / first
        if fell < STALL_SHARE:
            notes.append(
                f"{what} fell {fell:.0%} in {len(history)} epochs ({first:.4g} -> {last:.4g}): {then}; train "
                "longer (optim.epochs), or check optim.lr and, against an imported old model, the scale of its "
                "features and the classifier built from its class prototypes"
            )
            break  # one sentence: the compatibility loss's, when it stalled
    return notes
