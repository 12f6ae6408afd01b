"""Independent seeded jobs of an experiment side by side in child processes ("lanes").

Synthetic supervision trains dozens of small reward models that never read each other's weights, and the
active-learning loop's arms only share their seed's starting PRM. Each such job is seeded (its batch order, its
initial weights, its picks), so where it runs does not change its result; what does is torch's thread count
(a reduction split over 2 threads adds in another order), and every lane runs with the recipe's run.threads. So
two lanes of one thread give exactly the numbers of one process of one thread, in about half its wall time on two
idle cores. The demo's stages run the same way (rlprm/experiments/demo.py).

`Lanes(1, ...)` runs each job at once in this process, so one code path serves both.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Callable


def _start_lane(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


class Lanes:
    """A pool of `lanes` child processes (spawn: no state copied from this one but what a job's arguments carry),
    each with `threads` torch threads; `submit` returns a Future. lanes <= 1: jobs run here, at submit.

    Use as a context manager: on leaving (an error, Ctrl-C included) the jobs not started are cancelled and the
    running ones waited for, so no child outlives the command."""

    def __init__(self, lanes: int, threads: int | None):
        self.lanes, self.threads = lanes, threads
        self.pool = None
        if lanes > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(lanes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_lane, initargs=(threads,))

    def submit(self, fn: Callable, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:  # the caller's .result() raises it, as from a lane
            done.set_exception(exc)
        return done

    def __enter__(self) -> "Lanes":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class PhaseClock:
    """A command's phases on stdout as they start (`[m:ss] what`), their wall seconds, and the total at the end."""

    def __init__(self):
        import time

        self._now = time.monotonic
        self.start = self._now()
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def _close(self) -> None:
        if self._current is not None:
            name, since = self._current
            self.seconds[name] = round(self.seconds.get(name, 0.0) + self._now() - since, 1)
            self._current = None

    def phase(self, what: str) -> None:
        self._close()
        elapsed = self._now() - self.start
        print(f"[{int(elapsed // 60)}:{int(elapsed % 60):02d}] {what}", flush=True)
        self._current = (what, self._now())

    def finish(self, command: str) -> dict:
        """Prints the total wall time; returns {"wall_seconds", "phase_seconds"} for the summary."""
        self._close()
        total = self._now() - self.start
        print(f"{command}: total wall time {int(total // 60)} min {total % 60:.0f} s ({total:.0f} s)", flush=True)
        return {"wall_seconds": round(total, 1), "phase_seconds": dict(self.seconds)}
