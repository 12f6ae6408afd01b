"""Final-answer extraction and equivalence, graded in sandboxed worker processes.

Model outputs are untrusted input. This package turns a solution into its final
answer (:func:`extract_answer`) and decides whether that answer equals a gold
answer (:func:`is_equiv`, :func:`is_equiv_many`, :func:`grade`), without ever
letting model text reach ``eval``-like code in this process and without hanging.

Layout
------
* :mod:`rlprm.grading.extract`: :func:`extract_answer`;
* :mod:`rlprm.grading.rules`: screening, normalisation and the exact rules;
  standard library only, since the sandboxed worker loads it too;
* :mod:`rlprm.grading.worker`: the sandboxed child's entry point (warm-up,
  resource limits, math-verify);
* :mod:`rlprm.grading.pool`: :class:`Grader` (the caller's side: screening,
  worker processes, deadlines) and the module-level functions.

Everything public is importable from ``rlprm.grading``. Generators of
equivalent forms and near misses for testing graders live in
``tests/grading_forms.py``.

Design
------
Grading a pair goes through three stages.

1. **Screening (caller's process, pure string work).** Answers longer than
   ``max_chars`` are rejected without parsing. Text that looks like code
   (``__``, ``import``, ``lambda``, ``.method(`` ...) or nests brackets deeper
   than :data:`MAX_NESTING` is rejected: no math answer looks like that, and
   LaTeX parsing of deep nesting is exponential. A prediction that builds a
   giant number (a power tower such as ``9^{9^9}``, a factorial of an
   expression, an exponent of seven digits or more) is rejected unless the
   gold has the same shape. Every rejection is counted in :attr:`Grader.stats`.
2. **Normalisation and exact rules (caller's process, pure string work).** Both
   answers are brought to one LaTeX form following the MATH conventions
   (``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``, ``\\text{...}`` units,
   ``^\\circ``, ``\\$``, ``\\%``, thousands separators including ``10\\,080``,
   unicode ``°``/``∞``/``π``/``−``, repeating decimals ``0.\\overline{3}``,
   redundant brace groups ``{{{9}}}`` / ``\\frac{{1}}{{2}}`` (dropped before the
   nesting screen, so only real nesting counts), ``\\phantom{..}``, ``smallmatrix``,
   the word "degrees", ``\\text{5 cm}``, ``\\mathrm{word}``).
   Equal normal forms are equal. Plain numbers (integers, decimals, fractions,
   mixed numbers, scientific notation) are compared exactly with
   :class:`fractions.Fraction`, so ``3.21`` and ``3.2100001`` differ (math-verify
   rounds both to 6 decimals and calls them equal); a decimal stands for a
   non-terminating fraction only when written to at least 6 places and correct
   to its last place (``0.333333`` = ``1/3``). A hedged prediction
   (``27 \\text{ or } 28``) never equals a single-valued gold. Text answers
   (``\\text{Evelyn}``, ``\\text{(C)}``) are compared as words.
3. **math-verify in a worker (sandbox).** Everything else (expressions,
   intervals, tuples, sets, matrices, equations) goes to math-verify, with both
   answers wrapped in ``$\\boxed{...}$`` and LaTeX extraction only.

Safety
------
math-verify's default ``parse`` config includes ``ExprExtractionConfig``,
whose path calls ``sympy.parse_expr`` (which uses ``eval``) on a regex match
restricted to digits and operators; we never enable it. Our LaTeX-only path
goes through latex2sympy2_extended (an ANTLR parser that builds sympy objects
directly); its ``sympify`` calls only see objects it built. Still, sympy can be
made to work for ever (``10^{10^{10^{10}}}``, ``(10^7)!``), so the worker is
the sandbox:

* a separate, fresh Python interpreter (``subprocess``, spawn semantics: the
  caller is never forked, so torch/CUDA threads and locks in the caller are
  irrelevant, and the caller's ``__main__`` is never re-imported, so scripts
  need no ``if __name__ == "__main__"`` guard). Its environment is a short
  allowlist (no tokens, keys or other secrets), it runs in its own session
  (a terminal Ctrl-C does not reach it), and it loads ``worker.py`` and
  ``rules.py`` from this folder as a bare package, not the ``rlprm`` package;
* resource limits: address space (``memory_mb``), no child processes
  (``RLIMIT_NPROC=0``), no file growth (``RLIMIT_FSIZE=0``), no core dumps;
* math-verify's own ``signal.alarm`` timeouts stay on (grading runs in the
  worker's main thread), set to about half our timeout, as the cheap first
  line: a slow comparison returns False without losing the worker;
* a hard deadline per item, enforced by the caller: the worker streams one
  result per item; an item running past ``timeout`` seconds gets its worker
  killed (SIGKILL), is graded False and counted in ``stats["timeouts"]``; a
  worker that dies is counted in ``stats["crashes"]``. Either way the rest of
  the batch goes on, and a replacement worker is started (without waiting for
  it) as soon as there is work for it;
* the protocol is JSON over pipes, both ways: the caller never unpickles what
  a worker sends.

Speed
-----
Workers (default ``min(2, os.cpu_count())``) are started lazily on first use
(or by :meth:`Grader.start`; about 2 s, mostly sympy's first-use costs, paid
in a warm-up before a worker takes work) and reused; a batch is split into chunks that
workers pull as they finish, so IPC costs one message per chunk out and one
small message per item back. Parsed gold answers are cached in each worker
(RL grades many samples against the same gold), and pairs settled by stage 2
never leave the caller's process.

Threading
---------
:class:`Grader` is thread-safe: concurrent callers lease disjoint workers from
one pool, so calls from many threads interleave safely (and math-verify's
main-thread-only alarms are never used outside the workers). After
``os.fork()`` a child process starts its own pool instead of sharing pipes.

This package is POSIX-only (``resource``, fd passing).
"""

from __future__ import annotations

from .extract import extract_answer
from .pool import (
    BOOT_TIMEOUT,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    Grader,
    GraderError,
    default_grader,
    grade,
    grade_many,
    is_equiv,
    is_equiv_many,
)
from .rules import MAX_ANSWER_CHARS, MAX_NESTING

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ANSWER_CHARS",
    "MAX_NESTING",
    "Grader",
    "GraderError",
    "default_grader",
    "extract_answer",
    "grade",
    "grade_many",
    "is_equiv",
    "is_equiv_many",
]
