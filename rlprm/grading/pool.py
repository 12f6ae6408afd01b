"""The grading pool: :class:`Grader` and the module-level functions on a shared one.

The caller's side of the sandbox. Each pair is screened and normalised here
(:mod:`rlprm.grading.rules`, pure string work); pairs the exact rules cannot
settle go to worker processes (:mod:`rlprm.grading.worker`) over JSON pipes,
with a hard deadline per item: a worker running past it is killed (SIGKILL),
its item graded False, and a replacement started. See :mod:`rlprm.grading`
for the design.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import subprocess
import sys
import threading
import time
import unicodedata
import weakref
from collections import deque
from fractions import Fraction
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_conns
from typing import Iterable, Sequence

from .extract import extract_answer
from .rules import (MAX_ANSWER_CHARS, MAX_NESTING, HOSTILE_RE, decide_local, drop_redundant_braces, hazard,
                    nesting_depth, normalize)

#: Seconds one comparison may take inside a worker before its worker is killed.
DEFAULT_TIMEOUT = 5.0
#: Address-space cap of a worker. A warmed-up worker uses about 70 MiB.
DEFAULT_MEMORY_MB = 1024
#: Seconds a new worker may take to import sympy/math-verify and warm up.
BOOT_TIMEOUT = 120.0


class GraderError(RuntimeError):
    """Raised when the grading pool cannot run at all (closed, workers fail to start)."""


# What a fresh worker interpreter runs. It registers this folder as a bare
# package (no __init__ is executed, so neither ``rlprm`` nor this package's
# imports are loaded) and imports the worker module from it, which pulls in its
# stdlib-only sibling ``rules`` and nothing else until math-verify's first use.
_BOOT = (
    "import sys, json, types, importlib\n"
    "sys.dont_write_bytecode = True\n"
    "cfg = json.loads(sys.argv[1])\n"
    "sys.path[:0] = [p for p in cfg['path'] if p not in sys.path]\n"
    "pkg = types.ModuleType('_rlprm_grading')\n"
    "pkg.__path__ = [cfg['package']]\n"
    "sys.modules[pkg.__name__] = pkg\n"
    "importlib.import_module('_rlprm_grading.worker')._worker_main(cfg)\n"
)

# The only variables a worker inherits: nothing secret, nothing that changes Python.
_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT")


def _child_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


# --------------------------------------------------------------------------
# Caller side: worker handles and the pool
# --------------------------------------------------------------------------


class _Worker:
    """One worker process and its two pipes (JSON messages both ways)."""

    __slots__ = ("proc", "tx", "rx", "ready", "born")

    def __init__(self, memory_mb: int | None, debug: bool) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        cfg = {
            "rfd": p2c_r,
            "wfd": c2p_w,
            "memory_mb": memory_mb,
            "package": os.path.dirname(os.path.abspath(__file__)),
            "path": [p for p in sys.path if p],
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-E", "-c", _BOOT, json.dumps(cfg)],
                pass_fds=(p2c_r, c2p_w),
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if debug else subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(p2c_w)
            os.close(c2p_r)
            raise
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self.tx = Connection(p2c_w, readable=False)
        self.rx = Connection(c2p_r, writable=False)
        self.ready = False
        self.born = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for conn in (self.tx, self.rx):
            try:
                conn.close()
            except OSError:
                pass


class _InFlight:
    __slots__ = ("idxs", "pos", "t0")

    def __init__(self, idxs: list[int]) -> None:
        self.idxs = idxs
        self.pos = 0
        self.t0 = time.monotonic()


_STAT_KEYS = ("graded", "settled_locally", "sent_to_workers", "timeouts", "crashes",
              "worker_errors", "rejected_too_long", "rejected_hostile", "rejected_hazard",
              "internal_errors", "workers_started", "worker_start_failures")

_ALL_GRADERS: "weakref.WeakSet[Grader]" = weakref.WeakSet()


class Grader:
    """A pool of sandboxed grading workers; thread-safe; a context manager.

    Args:
        workers: number of worker processes (default ``min(2, os.cpu_count())``).
        timeout: default seconds per comparison before its worker is killed.
        memory_mb: address-space cap per worker (``None`` for none).
        max_chars: answers longer than this are False without parsing.
        chunk_size: most pairs sent to a worker in one message.
        shortcuts: settle pairs by the exact rules in the caller's process
            (default). ``False`` sends every screened pair to a worker (used to
            measure the sandbox's own cost).
        debug: let workers write to the caller's stderr.

    ``stats`` counts graded pairs, timeouts, crashes and rejections.
    """

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 memory_mb: int | None = DEFAULT_MEMORY_MB, max_chars: int = MAX_ANSWER_CHARS,
                 chunk_size: int = 16, shortcuts: bool = True, debug: bool = False) -> None:
        if workers is None:
            workers = min(2, os.cpu_count() or 1)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.workers = int(workers)
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.max_chars = int(max_chars)
        self.chunk_size = max(1, int(chunk_size))
        self.shortcuts = bool(shortcuts)
        self.debug = bool(debug)
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._leased: set[_Worker] = set()
        self._live = 0
        self._closed = False
        self._pid = os.getpid()
        self._start_failures = 0
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        _ALL_GRADERS.add(self)

    # ---- public API -------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (graded, timeouts, crashes, rejections, ...)."""
        with self._stats_lock:
            return dict(self._stats)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring)."""
        with self._cond:
            return [w.pid for w in list(self._idle) + list(self._leased)]

    def start(self) -> "Grader":
        """Start all workers now and wait until they are ready (else lazily on first use)."""
        self._check_fork()
        fresh: list[_Worker] = []
        try:
            while True:
                w = self._lease(block=False)
                if w is None:
                    break
                fresh.append(w)
            deadline = time.monotonic() + BOOT_TIMEOUT
            for w in fresh:
                if not w.ready:
                    self._await_ready(w, deadline)
        finally:
            for w in fresh:
                if w.proc.poll() is None:
                    self._release(w)
                else:
                    self._discard(w)
        return self

    def is_equiv(self, pred: str | None, gold: str | None, timeout: float | None = None) -> bool:
        """Whether answer ``pred`` equals answer ``gold`` (both untrusted strings)."""
        return self.is_equiv_many([(pred, gold)], timeout=timeout)[0]

    def is_equiv_many(self, pairs: Iterable[tuple[str | None, str | None]],
                      timeout: float | None = None) -> list[bool]:
        """Grade many ``(pred, gold)`` pairs in parallel; one bool per pair, in order.

        ``timeout`` bounds each pair's time in a worker; a pair that runs past it,
        or whose worker dies, is False.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        pairs = list(pairs)
        out = [False] * len(pairs)
        jobs: list[tuple[str, str]] = []
        where: list[int] = []
        counts = dict.fromkeys(_STAT_KEYS, 0)
        for i, (pred, gold) in enumerate(pairs):
            counts["graded"] += 1
            verdict, pn, gn = self._prepare(pred, gold, counts)
            if verdict is not None:
                out[i] = verdict
            else:
                jobs.append((pn, gn))
                where.append(i)
        counts["sent_to_workers"] = len(jobs)
        self._add_stats(counts)
        if jobs:
            for i, ok in zip(where, self._run(jobs, timeout)):
                out[i] = ok
        return out

    def grade(self, solution: str | None, gold: str | None, timeout: float | None = None) -> bool:
        """Extract the final answer of ``solution`` and compare it with ``gold``."""
        return self.grade_many([solution], [gold], timeout=timeout)[0]

    def grade_many(self, solutions: Sequence[str | None], golds: Sequence[str | None],
                   timeout: float | None = None) -> list[bool]:
        """:meth:`grade` for many solutions at once (a missing answer is False)."""
        if len(solutions) != len(golds):
            raise ValueError(f"{len(solutions)} solutions but {len(golds)} golds")
        preds = [extract_answer(s) for s in solutions]
        return self.is_equiv_many(list(zip(preds, golds)), timeout=timeout)

    def close(self) -> None:
        """Stop all workers. Later calls raise :class:`GraderError`."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.kill()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- screening ----------------------------------------------------------

    def _prepare(self, pred, gold, counts: dict[str, int]) -> tuple[bool | None, str, str]:
        """Screen and normalise one pair; a verdict, or ``None`` to send it to a worker."""
        if pred is None or gold is None:
            return False, "", ""
        pred, gold = _as_text(pred), _as_text(gold)
        if len(pred) > self.max_chars or len(gold) > self.max_chars:
            counts["rejected_too_long"] += 1
            return False, "", ""
        for text in (pred, gold):
            # redundant groups ({{{9}}}) are not nesting that a parser would have to work through
            if (HOSTILE_RE.search(unicodedata.normalize("NFKC", text))
                    or nesting_depth(drop_redundant_braces(text)) > MAX_NESTING):
                counts["rejected_hostile"] += 1
                return False, "", ""
        try:
            pn, gn = normalize(pred), normalize(gold)
            if HOSTILE_RE.search(pn) or HOSTILE_RE.search(gn):
                counts["rejected_hostile"] += 1
                return False, "", ""
            if not pn or not gn:
                return False, pn, gn
            if self.shortcuts:
                verdict = decide_local(pn, gn)
                if verdict is not None:
                    counts["settled_locally"] += 1
                    return verdict, pn, gn
            if hazard(pn) and not hazard(gn):
                counts["rejected_hazard"] += 1
                return False, pn, gn
        except Exception:  # noqa: BLE001 - a string we cannot even normalise is not an answer
            counts["internal_errors"] += 1
            return False, "", ""
        return None, pn, gn

    def _add_stats(self, counts: dict[str, int]) -> None:
        with self._stats_lock:
            for k, v in counts.items():
                if v:
                    self._stats[k] += v

    # ---- pool ---------------------------------------------------------------

    def _check_fork(self) -> None:
        # A forked child must not talk to its parent's workers through copied pipes.
        if os.getpid() != self._pid:
            with self._cond:
                if os.getpid() != self._pid:
                    self._pid = os.getpid()
                    self._idle, self._leased, self._live = [], set(), 0
                    self._cond = threading.Condition()

    def _lease(self, block: bool) -> _Worker | None:
        """Take an idle worker, or start one if the pool is not full; may block."""
        with self._cond:
            while True:
                if self._closed:
                    raise GraderError("this Grader is closed")
                if self._idle:
                    w = self._idle.pop()
                    self._leased.add(w)
                    return w
                if self._live < self.workers:
                    self._live += 1
                    break
                if not block:
                    return None
                self._cond.wait()
        try:
            w = _Worker(self.memory_mb, self.debug)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()
            raise
        self._add_stats({"workers_started": 1})
        with self._cond:
            self._leased.add(w)
        return w

    def _release(self, w: _Worker) -> None:
        with self._cond:
            self._leased.discard(w)
            if self._closed:
                self._live -= 1
                kill = True
            else:
                self._idle.append(w)
                kill = False
            self._cond.notify_all()
        if kill:
            w.kill()

    def _discard(self, w: _Worker) -> None:
        w.kill()
        with self._cond:
            self._leased.discard(w)
            self._live -= 1
            self._cond.notify_all()

    def _await_ready(self, w: _Worker, deadline: float) -> None:
        if not w.rx.poll(max(0.0, deadline - time.monotonic())):
            raise GraderError("a grading worker did not start in time")
        self._on_message(w, None, None)

    def _on_message(self, w: _Worker, state: _InFlight | None, results: list[bool] | None) -> bool:
        """Read every message waiting from ``w``; False if the worker is gone."""
        try:
            while w.rx.poll():
                msg = json.loads(w.rx.recv_bytes(4096))
                if not w.ready:
                    if msg.get("ready") is not True:
                        return False
                    w.ready = True
                    self._start_failures = 0
                    continue
                if state is None or results is None:
                    continue
                k = int(msg["k"])
                if k != state.pos:
                    return False
                results[state.idxs[k]] = msg["ok"] is True
                if msg.get("err"):
                    self._add_stats({"worker_errors": 1})
                state.pos = k + 1
                state.t0 = time.monotonic()
        except (EOFError, OSError, ValueError, KeyError, TypeError):
            if not w.ready:
                self._start_failures += 1
                self._add_stats({"worker_start_failures": 1})
                if self._start_failures >= 3:
                    raise GraderError("grading workers keep dying at start-up; "
                                      "run with Grader(debug=True) to see why") from None
            return False
        return True

    def _run(self, jobs: list[tuple[str, str]], timeout: float) -> list[bool]:
        """Grade screened pairs on leased workers, with a hard deadline per pair."""
        self._check_fork()
        n = len(jobs)
        results = [False] * n
        alarm = max(1, int(timeout // 2))
        size = max(1, min(self.chunk_size, math.ceil(n / (4 * self.workers))))
        pending: deque[list[int]] = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))
        mine: dict[_Worker, _InFlight | None] = {}
        counts = dict.fromkeys(("timeouts", "crashes"), 0)
        try:
            while pending or any(st is not None for st in mine.values()):
                spare = sum(1 for st in mine.values() if st is None)
                while pending and spare < len(pending):
                    w = self._lease(block=not mine)
                    if w is None:
                        break
                    mine[w] = None
                    spare += 1
                for w in list(mine):
                    if mine[w] is not None or not w.ready:
                        continue
                    if not pending:
                        del mine[w]
                        self._release(w)
                        continue
                    idxs = pending.popleft()
                    msg = {"items": [jobs[i] for i in idxs], "alarm": alarm}
                    try:
                        w.tx.send_bytes(json.dumps(msg).encode())
                    except (OSError, ValueError):
                        pending.appendleft(idxs)  # nothing ran: resend all of it elsewhere
                        del mine[w]
                        self._discard(w)
                        continue
                    mine[w] = _InFlight(idxs)
                if not mine:
                    continue
                now = time.monotonic()
                limits = [st.t0 + timeout if st is not None else w.born + BOOT_TIMEOUT
                          for w, st in mine.items()]
                by_conn = {w.rx: w for w in mine}
                for conn in _wait_conns(list(by_conn), timeout=max(0.0, min(limits) - now)):
                    w = by_conn[conn]
                    st = mine[w]
                    if self._on_message(w, st, results):
                        if st is not None and st.pos == len(st.idxs):
                            mine[w] = None
                        continue
                    del mine[w]
                    self._discard(w)
                    if st is not None:
                        counts["crashes"] += 1
                        self._requeue(st, pending)
                now = time.monotonic()
                for w, st in list(mine.items()):
                    if st is not None and now - st.t0 > timeout:
                        counts["timeouts"] += 1
                        del mine[w]
                        self._discard(w)
                        self._requeue(st, pending)
                    elif st is None and not w.ready and now - w.born > BOOT_TIMEOUT:
                        del mine[w]
                        self._discard(w)
                        raise GraderError("a grading worker did not start in time")
        finally:
            self._add_stats(counts)
            for w, st in mine.items():
                if st is None:
                    self._release(w)
                else:
                    self._discard(w)  # mid-chunk: its later output would be stale
        return results

    @staticmethod
    def _requeue(state: _InFlight, pending: deque) -> None:
        # The item that was running stays False; the rest of its chunk goes on.
        rest = state.idxs[state.pos + 1 :]
        if rest:
            pending.appendleft(rest)


def _as_text(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, (int, float, Fraction)) and not isinstance(x, bool):
        return str(x)
    raise TypeError(f"answers must be str (or a number), got {type(x).__name__}")


# --------------------------------------------------------------------------
# Module-level default grader
# --------------------------------------------------------------------------

_DEFAULT: Grader | None = None
_DEFAULT_LOCK = threading.Lock()


def default_grader() -> Grader:
    """The shared :class:`Grader` behind the module-level functions (started lazily)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = Grader()
        return _DEFAULT


def is_equiv(pred: str | None, gold: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether answer ``pred`` equals answer ``gold``, graded in the sandbox pool.

    A timeout, a worker crash, an over-long or code-like input are all False.
    """
    return default_grader().is_equiv(pred, gold, timeout=timeout)


def is_equiv_many(pairs: Iterable[tuple[str | None, str | None]],
                  timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    """Grade many ``(pred, gold)`` pairs in parallel on the default pool."""
    return default_grader().is_equiv_many(pairs, timeout=timeout)


def grade(solution_text: str | None, gold: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Extract the final answer of a solution and compare it with ``gold``; no answer is False."""
    return default_grader().grade(solution_text, gold, timeout=timeout)


def grade_many(solutions: Sequence[str | None], golds: Sequence[str | None],
               timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    """:func:`grade` for many solutions, in parallel."""
    return default_grader().grade_many(solutions, golds, timeout=timeout)


@atexit.register
def _close_all() -> None:
    for g in list(_ALL_GRADERS):
        try:
            g.close()
        except Exception:
            pass


