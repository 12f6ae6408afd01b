"""The sandboxed grading worker: warm up, cap its own resources, serve batches.

:class:`rlprm.grading.pool.Grader` starts each worker as a fresh interpreter
(``python -E -c <boot>``, an allowlisted environment, its own session) that
registers this folder as a bare package ``_rlprm_grading`` and imports
``_rlprm_grading.worker``: this file and its sibling :mod:`rules` only, never
``rlprm`` or ``rlprm.grading``'s ``__init__``. At import it needs the standard
library alone; math-verify (and through it sympy) is imported on first use.

What runs here: :func:`worker_equiv` (screening again, the exact rules, then
math-verify with LaTeX extraction only) under :func:`apply_limits` (address
space, no child processes, no file growth, no core dumps). The caller enforces
the hard deadline per item by killing the worker.
"""

from __future__ import annotations

import json
import os
import sys
from multiprocessing.connection import Connection

from .rules import (MAX_ANSWER_CHARS, MAX_NESTING, HOSTILE_RE, decide_local, nesting_depth,
                    normalize)

_GOLD_CACHE: dict[str, list] = {}
_GOLD_CACHE_MAX = 512


def mv_parse(answer: str, alarm: int) -> list:
    from math_verify import LatexExtractionConfig, parse

    # LaTeX extraction only: the expression extractor would hand text to
    # sympy's parse_expr, which evaluates Python code.
    config = [LatexExtractionConfig(boxed_match_priority=0)]
    return parse("$\\boxed{" + answer + "}$", extraction_config=config,
                 parsing_timeout=alarm)


def worker_equiv(pn: str, gn: str, alarm: int = 2) -> bool:
    """Decide one normalised pair: exact rules, then math-verify.

    This is what a worker runs. It has no timeout of its own beyond
    math-verify's alarms (main thread only): call it through :class:`Grader`.
    """
    if len(pn) > 4 * MAX_ANSWER_CHARS or len(gn) > 4 * MAX_ANSWER_CHARS:
        return False
    if HOSTILE_RE.search(pn) or nesting_depth(pn) > MAX_NESTING:
        return False
    local = decide_local(pn, gn)
    if local is not None:
        return local
    from math_verify import verify

    gold = _GOLD_CACHE.get(gn)
    if gold is None:
        gold = mv_parse(gn, alarm)
        if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gn] = gold
    pred = mv_parse(pn, alarm)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=alarm))


#: Pairs a new worker grades before serving, one per kind of sympy work.
WARMUP_PAIRS = (
    (r"\frac{1}{2}", "0.5"), ("(1,2]", "(1,2]"), (r"\{1,2\}", "2,1"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{bmatrix}1\\2\end{bmatrix}"),
    ("(x+1)^2", "x^2+2x+1"), ("x=2", "2"), (r"\sqrt{8}", r"2\sqrt{2}"), ("y=2x+3", "2x+3"),
    ("-q+p", "p-q"), (r"(3\sqrt{3})/(4)", r"\frac{3\sqrt{3}}{4}"), ("6-5i", "-5i+6"),
    (r"\frac{1}{6}\pi", r"\frac{\pi}{6}"), (r"(-\infty,0]\cup(1,\infty)", r"(-\infty, 0] \cup (1,\infty)"),
    (r"x \in [-2,7]", "[-2,7]"), (r"1\pm\sqrt{5}", r"1+\sqrt{5},1-\sqrt{5}"),
    (r"\cot x", r"\frac{\cos x}{\sin x}"), ("5x-7y+11z+4=0", "-7y+5x+11z+4=0"),
    ("(a+5)(b+2)", "ab+2a+5b+10"), ("52_8", "52"), ("2k+2", "2(k+1)"), ("x^3+3x-6", "3x-6+x^3"),
    (r"\sqrt{117}", r"3\sqrt{13}"), (r"e^{i\pi}", "-1"), (r"\log_2 8", "3"),
    (r"\sin^2 x+\cos^2 x", "1"), ("x>2", r"(2,\infty)"), ("(1,2,3)", "(1,3,2)"),
)


def apply_limits(memory_mb: int | None) -> None:
    import resource
    import signal

    def lower(which: int, value: int) -> None:
        try:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # a limit we cannot set is defence in depth lost, not an error

    if memory_mb:
        lower(resource.RLIMIT_AS, int(memory_mb) << 20)
    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_FSIZE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead
    if hasattr(resource, "RLIMIT_NPROC"):
        lower(resource.RLIMIT_NPROC, 0)


def _worker_main(cfg: dict) -> None:
    """Entry point of a worker process: warm up, cap resources, serve batches."""
    import logging
    import warnings

    sys.dont_write_bytecode = True
    rx = Connection(int(cfg["rfd"]), writable=False)
    tx = Connection(int(cfg["wfd"]), readable=False)
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout and parse failure
    # Warm up before the limits apply: sympy imports much lazily and its first
    # simplify/solve/set operations cost about a second.
    for p, g in WARMUP_PAIRS:
        worker_equiv(normalize(p), normalize(g), 5)
    apply_limits(cfg.get("memory_mb"))
    tx.send_bytes(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            req = json.loads(rx.recv_bytes())
        except (EOFError, OSError):
            return  # the caller went away
        if req.get("op") == "exit":
            return
        alarm = max(1, int(req.get("alarm", 2)))
        for k, (pn, gn) in enumerate(req["items"]):
            err = None
            try:
                ok = worker_equiv(pn, gn, alarm)
            except SystemExit:
                raise
            except BaseException as exc:  # incl. math-verify's TimeoutException, MemoryError
                ok, err = False, type(exc).__name__
            try:
                tx.send_bytes(json.dumps({"k": k, "ok": bool(ok), "err": err}).encode())
            except (OSError, ValueError):
                return
