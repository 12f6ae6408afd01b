"""Final-answer extraction and equivalence, graded in sandboxed worker processes.

Model outputs are untrusted input. This module turns a solution into its final
answer (:func:`extract_answer`) and decides whether that answer equals a gold
answer (:func:`is_equiv`, :func:`is_equiv_many`, :func:`grade`), without ever
letting model text reach ``eval``-like code in this process and without hanging.

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
   unicode ``°``/``∞``/``π``/``−``, repeating decimals ``0.\\overline{3}``).
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
  (a terminal Ctrl-C does not reach it), and it loads this file by path, not
  the ``rlprm`` package;
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

This module is POSIX-only (``resource``, fd passing).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
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

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ANSWER_CHARS",
    "MAX_NESTING",
    "Grader",
    "GraderError",
    "default_grader",
    "equivalent_forms",
    "extract_answer",
    "grade",
    "grade_many",
    "is_equiv",
    "is_equiv_many",
    "near_misses",
]

#: Seconds one comparison may take inside a worker before its worker is killed.
DEFAULT_TIMEOUT = 5.0
#: Longest answer (in characters) that is parsed at all; longer ones are False.
MAX_ANSWER_CHARS = 1000
#: Deepest bracket nesting accepted. ANTLR's LaTeX parsing is exponential in
#: nested bare braces (15 levels already take seconds); real answers use <= 4.
MAX_NESTING = 10
#: Address-space cap of a worker. A warmed-up worker uses about 70 MiB.
DEFAULT_MEMORY_MB = 1024
#: Seconds a new worker may take to import sympy/math-verify and warm up.
BOOT_TIMEOUT = 120.0


class GraderError(RuntimeError):
    """Raised when the grading pool cannot run at all (closed, workers fail to start)."""


# --------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------

_ANSWER_HEAD_RE = re.compile(r"^[ \t]*#[ \t]*Answer\b[ \t]*:?[ \t]*(.*)$", re.M | re.I)
_GSM8K_RE = re.compile(r"####[ \t]*(.*)$", re.M)
_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")


def _match_brace(s: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start``, or -1.

    Escaped braces (``\\{``) do not count. Linear time, no recursion.
    """
    depth = 0
    i, n = start, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed x``)."""
    last = None
    for m in _BOX_CMD_RE.finditer(text):
        last = m
    if last is None:
        return None
    i = last.end()
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        end = _match_brace(text, i)
        # An unclosed last box is a truncated generation: its answer is unknown.
        return None if end < 0 else text[i + 1 : end]
    # "\boxed 5": the argument is the next token.
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0) if m else None


def _strip_answer(ans: str) -> str | None:
    """Trim a raw answer: math delimiters, a wrapping box, a final period."""
    ans = ans.strip()
    boxed = _last_boxed(ans) if _BOX_CMD_RE.search(ans) else None
    if boxed is not None:
        ans = boxed.strip()
    for _ in range(3):
        before = ans
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(ans) >= len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
                ans = ans[len(left) : len(ans) - len(right)].strip()
        ans = ans.rstrip(".").strip()
        if ans == before:
            break
    return ans or None


def extract_answer(text: str | None) -> str | None:
    """Return the final answer written in a solution, or ``None`` if there is none.

    Looked for, in order:

    * the PRM800K answer step: a line ``# Answer`` followed by the answer on the
      next non-blank lines (up to a blank line), or ``# Answer: x`` / ``# Answer x``
      on one line (the last such heading counts);
    * the last ``\\boxed{...}`` or ``\\fbox{...}``, nested braces allowed (an
      unclosed last box gives ``None``);
    * GSM8K's ``#### n`` (the last one).

    Surrounding ``$...$``/``\\(...\\)``, a wrapping ``\\boxed{}`` and a final
    period are removed. Runs in linear time on any input.
    """
    if not text or not isinstance(text, str):
        return None
    head = None
    for m in _ANSWER_HEAD_RE.finditer(text):
        head = m
    if head is not None:
        same_line = head.group(1).strip()
        if same_line:
            return _strip_answer(same_line)
        rest = text[head.end() :].lstrip("\n \t\r")
        para = _BLANK_LINE_RE.split(rest, maxsplit=1)[0]
        got = _strip_answer(para)
        if got is not None:
            return got
    boxed = _last_boxed(text)
    if boxed is not None:
        return _strip_answer(boxed)
    last = None
    for m in _GSM8K_RE.finditer(text):
        last = m
    if last is not None:
        return _strip_answer(last.group(1))
    return None


# --------------------------------------------------------------------------
# Screening: cheap checks that run before any parser
# --------------------------------------------------------------------------

# Python-looking text never is a math answer; refusing it keeps code out of
# every parser even if one of them had an eval path we missed.
_HOSTILE_RE = re.compile(
    r"__"
    r"|\b(?:import|lambda|eval|exec|execfile|compile|getattr|setattr|delattr|globals|locals"
    r"|vars|builtins|subprocess|pathlib|breakpoint|pickle|marshal|ctypes)\b"
    r"|\bopen\s*\("
    r"|\.\s*[A-Za-z_]\w*\s*\(",  # attribute call: os.system(, Path(...).touch(
    re.I,
)


def _nesting_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "{[(":
            depth += 1
            if depth > best:
                best = depth
        elif c in "}])":
            depth = max(0, depth - 1)
    return best


_EXP_TOKEN_RE = re.compile(r"\\[A-Za-z]+|\d+|.", re.S)
_CMD_TOKEN_RE = re.compile(r"\\(?:[A-Za-z]+|.)", re.S)


def _exponent_end(s: str, i: int) -> tuple[str, int]:
    """The exponent that follows a ``^`` at ``i - 1``: (its text, index after it)."""
    n = len(s)
    while i < n and s[i] == " ":
        i += 1
    if i >= n:
        return "", i
    if s[i] == "{":
        end = _match_brace(s, i)
        if end < 0:
            return s[i + 1 :], n
        return s[i + 1 : end], end + 1
    m = _EXP_TOKEN_RE.match(s, i)
    return m.group(0), m.end()


def _hazard(s: str) -> bool:
    """True when ``s`` asks sympy to build a number too big to compare.

    Power towers (an exponent holding ``^``, or chained ``a^b^c``), exponents
    of 7+ digits, ``**``, and factorials of anything but a literal below 10^4
    (``(10^7)!``, ``10!!!!``) make sympy compute for minutes or exhaust memory.
    """
    if "**" in s:
        return True
    i = s.find("^")
    while i >= 0:
        exp, after = _exponent_end(s, i + 1)
        if "^" in exp or "!" in exp or re.search(r"\d{7,}", exp):
            return True
        j = after
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] == "^":
            return True
        i = s.find("^", i + 1)
    for m in re.finditer(r"!", s):
        k = m.start()
        digits = re.search(r"(\d+)\s*$", s[max(0, k - 12) : k])
        if digits is None or len(digits.group(1)) > 4 or s[k + 1 : k + 2] == "!":
            return True
    return False


# --------------------------------------------------------------------------
# Normalisation (MATH conventions)
# --------------------------------------------------------------------------

_SUPERSCRIPTS = {"⁰": "0", "¹": "1", "²": "2", "³": "3", "⁴": "4", "⁵": "5", "⁶": "6",
                 "⁷": "7", "⁸": "8", "⁹": "9", "⁻": "-", "⁺": "+"}
_SUPERSCRIPT_RE = re.compile("[" + "".join(_SUPERSCRIPTS) + "]+")
_SUPERSCRIPT_TABLE = str.maketrans(_SUPERSCRIPTS)

# After NFKC: symbols that NFKC keeps but LaTeX spells as commands.
_UNICODE_TABLE = str.maketrans({
    "−": "-", "–": "-", "—": "-", "‐": "-", "‑": "-",
    "∞": r"\infty ", "°": r"^\circ ", "π": r"\pi ", "×": r"\times ", "·": r"\cdot ",
    "⋅": r"\cdot ", "÷": r"\div ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ",
    "±": r"\pm ", "∓": r"\mp ", "∪": r"\cup ", "∩": r"\cap ", "√": r"\sqrt ",
    "∈": r"\in ", "⁄": "/", "∅": r"\emptyset ", "θ": r"\theta ",
})

_LEFT_RIGHT_DOT_RE = re.compile(r"\\(?:left|right)\s*\.")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|[Bb]igg?[lrm]?)(?![A-Za-z])")
_FRAC_ALIAS_RE = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_TEXT_ALIAS_RE = re.compile(r"\\(?:textbf|textrm|textit|textup|textnormal|textsf|texttt|mbox|hbox)\s*\{")
_DISPLAY_RE = re.compile(r"\\\\|\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits|!)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\(?:text)?degree(?![A-Za-z])")
# Explicit thousands separators between digit groups: 10\,080, 10{,}080, 10,\!080.
_THOUSANDS_EXPLICIT_RE = re.compile(
    r"(?<![\d.])(\d{1,3})((?:(?:\{,\}|,\\!\s*|\\[,!;: ]|~)\d{3})+)(?!\d)")
_THOUSANDS_SEP_RE = re.compile(r"\{,\}|,\\!\s*|\\[,!;: ]|~")
# "\\\\" (a matrix row break) is matched first so its second backslash is never
# read as the start of "\\ " or "\\!".
_SPACING_RE = re.compile(r"\\\\|\\[,;: ]|\\q?quad(?![A-Za-z])|~|\\hspace\s*\{[^{}]*\}")
_REPEATING_RE = re.compile(r"(\d*)\.(\d*)\\(?:overline|bar)\s*\{(\d+)\}")
_FRAC_SQRT_RE = re.compile(r"\\(frac|sqrt)(?![A-Za-z])")
_TRAILING_TEXT_RE = re.compile(
    r"^(?P<body>.*?\S)\s*\\text\s*\{(?P<unit>[^{}]*)\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$", re.S)
# Text after a value that changes or hedges it is not a unit: "5 \text{ less than } x".
_NOT_UNIT_WORDS = frozenset(("or", "and", "either", "not", "no", "than", "less", "more", "plus",
                             "minus", "times", "of", "except", "but", "if", "only", "approximately",
                             "about", "roughly"))
_UNIT_CONTENT_RE = re.compile(r"^\s*[A-Za-z][A-Za-z .\-/]*(?:\^?\d)?\s*$")
_UNIT_WORDS = (
    r"(?:square|sq\.?|cubic|cu\.?)?\s*"
    r"(?:cm|centimeters?|centimetres?|mm|millimeters?|km|kilometers?|meters?|metres?|inch(?:es)?"
    r"|in\.|ft|feet|foot|yards?|yd|miles?|mi|units?|degrees?|cents?|dollars?|hours?|hrs?"
    r"|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|mph|pounds?|lbs?|ounces?"
    r"|oz|gallons?|liters?|litres?|grams?|kg|kilograms?|percent|people|students|ways"
    r"|points?|marbles|apples|books|pages|eggs|cookies|times)")
_TRAILING_WORD_UNIT_RE = re.compile(
    r"^(?P<body>.*[\d}])\s+" + _UNIT_WORDS + r"(?:\s*\^\s*\{?[23]\}?)?\s*$", re.I | re.S)
_WHOLE_NUMBER_GROUPS_RE = re.compile(r"^([+-]?)(\d{1,3}(?:[, ]\d{3})+)(\.\d+)?$")
_HEDGE_RE = re.compile(
    r"\\text\s*\{\s*(?:or|either)\s*\}|(?<![A-Za-z\\])or(?![A-Za-z])|\\(?:lor|vee)(?![A-Za-z])", re.I)


def _strip_wrappers(s: str) -> str:
    """Remove math delimiters and a box that wrap the whole answer."""
    for _ in range(MAX_NESTING):
        before = s
        s = s.strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
        m = re.match(r"\\(?:boxed|fbox)\s*\{", s)
        if m and _match_brace(s, m.end() - 1) == len(s) - 1:
            s = s[m.end() : -1]
        if s == before:
            break
    return s


def _brace_args(s: str) -> str:
    r"""Give ``\frac`` and ``\sqrt`` braced arguments: ``\frac12`` -> ``\frac{1}{2}``.

    math-verify mangles unbraced command arguments (``\frac\pi2``).
    Recursion depth is bounded by the nesting cap checked before.
    """
    if "\\frac" not in s and "\\sqrt" not in s:
        return s
    out: list[str] = []
    pos = 0
    n = len(s)
    while True:
        m = _FRAC_SQRT_RE.search(s, pos)
        if m is None:
            out.append(s[pos:])
            return "".join(out)
        out.append(s[pos : m.end()])
        i = m.end()
        nargs = 2 if m.group(1) == "frac" else 1
        if m.group(1) == "sqrt":
            j = i
            while j < n and s[j] == " ":
                j += 1
            if j < n and s[j] == "[":
                close = s.find("]", j)
                if close > 0:
                    out.append(s[j : close + 1])
                    i = close + 1
        for _ in range(nargs):
            while i < n and s[i] == " ":
                i += 1
            if i >= n:
                break
            if s[i] == "{":
                end = _match_brace(s, i)
                if end < 0:
                    break
                out.append("{" + _brace_args(s[i + 1 : end]) + "}")
                i = end + 1
            elif s[i] == "\\":
                cm = _CMD_TOKEN_RE.match(s, i)
                if cm is None:  # a lone trailing backslash
                    break
                out.append("{" + cm.group(0) + "}")
                i = cm.end()
            elif s[i] in "}^_":
                break
            else:
                out.append("{" + s[i] + "}")
                i += 1
        pos = i


def _repeating_to_frac(m: re.Match) -> str:
    whole, fixed, rep = m.group(1), m.group(2), m.group(3)
    if len(whole) + len(fixed) + len(rep) > 60:
        return m.group(0)
    base = int(whole) if whole else 0
    value = base + Fraction(int(fixed + rep) - int(fixed or "0"), 10 ** len(fixed) * (10 ** len(rep) - 1))
    return r"\frac{%d}{%d}" % (value.numerator, value.denominator)


def _strip_units(s: str) -> str:
    """Drop units after a value: ``5.4 \\text{ cents}``, ``15\\text{ cm}^2``, ``10 feet``."""
    for _ in range(3):
        m = _TRAILING_TEXT_RE.match(s)
        if not m:
            break
        words = set(m.group("unit").lower().split())
        if not _UNIT_CONTENT_RE.match(m.group("unit")) or len(words) > 3 or words & _NOT_UNIT_WORDS:
            break
        s = m.group("body")
    m = _TRAILING_WORD_UNIT_RE.match(s)
    if m:
        s = m.group("body")
    return s


def _keep_row_break(replacement: str):
    return lambda m: m.group(0) if m.group(0) == "\\\\" else replacement


@functools.lru_cache(maxsize=8192)
def _normalize(ans: str) -> str:
    """Bring an answer to the one LaTeX form both sides are compared in.

    Pure string work (no parser). Only rewrites that keep the value: it is
    used for the string fast path and for what math-verify sees.
    """
    s = "".join(" " if unicodedata.category(c) == "Cc" else c
                for c in ans if unicodedata.category(c) != "Cf")
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPT_TABLE) + "}", s)
    s = unicodedata.normalize("NFKC", s).translate(_UNICODE_TABLE)
    s = _strip_wrappers(s)
    s = _FRAC_ALIAS_RE.sub(r"\\frac", s)
    s = _LEFT_RIGHT_DOT_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _TEXT_ALIAS_RE.sub(r"\\text{", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _THOUSANDS_EXPLICIT_RE.sub(lambda m: m.group(1) + _THOUSANDS_SEP_RE.sub("", m.group(2)), s)
    s = _DISPLAY_RE.sub(_keep_row_break(""), s)
    s = _SPACING_RE.sub(_keep_row_break(" "), s)
    s = _brace_args(s)
    s = _REPEATING_RE.sub(_repeating_to_frac, s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _strip_units(s)
    s = s.rstrip(" .;")
    m = _WHOLE_NUMBER_GROUPS_RE.match(s)
    if m:
        s = m.group(1) + m.group(2).replace(",", "").replace(" ", "") + (m.group(3) or "")
    s = re.sub(r"\\infty\b\s*", r"\\infty ", s)
    return re.sub(r"\s+", " ", s).strip()


_TEXT_GROUP_RE = re.compile(r"\\text\s*\{([^{}]*)\}")
_CMD_SPACE_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_SINGLE_SCRIPT_RE = re.compile(r"([\^_])\{(\w)\}")


def _canon(s: str) -> str:
    """Key for exact comparison: text unwrapped, spaces removed, trivial braces dropped."""
    s = _squeeze(_TEXT_GROUP_RE.sub(r"\1", s))
    s = _SINGLE_SCRIPT_RE.sub(r"\1\2", s)
    s = s.replace("bmatrix", "pmatrix").replace("+\\infty", "\\infty")
    s = re.sub(r"\\(le|ge|ne)(?![A-Za-z])", r"\\\1q", s)
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    if m:
        s = m.group(1)
    return s[1:] if s.startswith("+") else s


# --------------------------------------------------------------------------
# Exact rules for numbers, text answers and hedges
# --------------------------------------------------------------------------

_INT_DEC_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")
_FRAC_NUM_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+(?:\.\d+)?)\}\{([+-]?\d+(?:\.\d+)?)\}")
_SLASH_NUM_RE = re.compile(r"([+-]?)(\d+)/(\d+)")
_MIXED_NUM_RE = re.compile(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_SCI_NUM_RE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)\\(?:times|cdot)10\^(?:\{([+-]?\d{1,3})\}|(\d))")


def _as_number(c: str) -> tuple[Fraction, int | None] | None:
    """Exact value of a plain number in canonical form, with its decimal places.

    Returns ``(value, places)`` where ``places`` is the number of digits after
    the point for a decimal literal and ``None`` for integers and fractions.
    ``None`` when ``c`` is not a plain number.
    """
    if not c or len(c) > 200:
        return None
    m = _INT_DEC_RE.fullmatch(c)
    if m and (m.group(2) or m.group(3)):
        whole, frac = m.group(2) or "0", m.group(3)
        value = Fraction(int(whole + (frac or "")), 10 ** len(frac or ""))
        return (-value if m.group(1) == "-" else value), (len(frac) if frac else None)
    m = _FRAC_NUM_RE.fullmatch(c)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        if den == 0:
            return None
        value = num / den
        return (-value if m.group(1) == "-" else value), None
    m = _SLASH_NUM_RE.fullmatch(c)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return (-value if m.group(1) == "-" else value), None
    m = _MIXED_NUM_RE.fullmatch(c)
    if m and int(m.group(4)) != 0:
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return (-value if m.group(1) == "-" else value), None
    m = _SCI_NUM_RE.fullmatch(c)
    if m:
        exp = int(m.group(3) if m.group(3) is not None else m.group(4))
        value = Fraction(m.group(2)) * Fraction(10) ** exp
        return (-value if m.group(1) == "-" else value), None
    return None


def _terminates(q: Fraction) -> bool:
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _numbers_equal(a: tuple[Fraction, int | None], b: tuple[Fraction, int | None]) -> bool:
    """Exact equality, except that a decimal written to >= 6 places may stand for a
    non-terminating fraction it rounds or truncates (``0.333333`` = ``1/3``)."""
    if a[0] == b[0]:
        return True
    for (dv, places), (qv, _) in ((a, b), (b, a)):
        if places is None or places < 6 or _terminates(qv):
            continue
        scale = 10 ** places
        scaled = abs(qv) * scale
        target = abs(dv) * scale
        if (dv < 0) != (qv < 0) or target.denominator != 1:
            continue
        truncated = scaled.numerator // scaled.denominator
        rounded = math.floor(scaled + Fraction(1, 2))
        if target.numerator in (truncated, rounded):
            return True
    return False


def _is_hedged(s: str) -> bool:
    return bool(_HEDGE_RE.search(s))


def _is_multi(s: str) -> bool:
    """Whether a gold lists several values (a top-level comma or a ``\\pm``)."""
    if "\\pm" in s or "\\mp" in s:
        return True
    depth = 0
    for c in s:
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        elif c == "," and depth == 0:
            return True
    return False


_TEXT_ONLY_RE = re.compile(r"\\text\s*\{([^{}]*)\}")
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=(?!=)")


def _words(s: str) -> str:
    s = _TEXT_GROUP_RE.sub(r"\1", s).strip().lower()
    s = re.sub(r"\s+", " ", s)
    m = re.fullmatch(r"\(\s*([a-z])\s*\)", s)
    return m.group(1) if m else s


def _decide_local(pn: str, gn: str) -> bool | None:
    """Settle a pair of normalised answers by exact rules, or ``None`` to defer.

    Pure string and :class:`~fractions.Fraction` work: safe to run on model text
    in any process.
    """
    if not pn or not gn:
        return False
    if _is_hedged(pn) and not _is_hedged(gn) and not _is_multi(gn):
        return False
    pc, gc = _canon(pn), _canon(gn)
    if pc == gc:
        return True
    if _TEXT_ONLY_RE.fullmatch(gn) and re.search(r"[A-Za-z]", gn):
        return _words(pn) == _words(gn)
    if "=" not in gc:
        pc = _ASSIGN_RE.sub("", pc, count=1)
        if pc == gc:
            return True
    a, b = _as_number(pc), _as_number(gc)
    if a is not None and b is not None:
        return _numbers_equal(a, b)
    return None


# --------------------------------------------------------------------------
# Worker side (runs in the sandbox process; also importable for tests)
# --------------------------------------------------------------------------

_GOLD_CACHE: dict[str, list] = {}
_GOLD_CACHE_MAX = 512


def _mv_parse(answer: str, alarm: int) -> list:
    from math_verify import LatexExtractionConfig, parse

    # LaTeX extraction only: the expression extractor would hand text to
    # sympy's parse_expr, which evaluates Python code.
    config = [LatexExtractionConfig(boxed_match_priority=0)]
    return parse("$\\boxed{" + answer + "}$", extraction_config=config,
                 parsing_timeout=alarm)


def _worker_equiv(pn: str, gn: str, alarm: int = 2) -> bool:
    """Decide one normalised pair: exact rules, then math-verify.

    This is what a worker runs. It has no timeout of its own beyond
    math-verify's alarms (main thread only): call it through :class:`Grader`.
    """
    if len(pn) > 4 * MAX_ANSWER_CHARS or len(gn) > 4 * MAX_ANSWER_CHARS:
        return False
    if _HOSTILE_RE.search(pn) or _nesting_depth(pn) > MAX_NESTING:
        return False
    local = _decide_local(pn, gn)
    if local is not None:
        return local
    from math_verify import verify

    gold = _GOLD_CACHE.get(gn)
    if gold is None:
        gold = _mv_parse(gn, alarm)
        if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gn] = gold
    pred = _mv_parse(pn, alarm)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=alarm))


#: Pairs a new worker grades before serving, one per kind of sympy work.
_WARMUP_PAIRS = (
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


def _apply_limits(memory_mb: int | None) -> None:
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
    for p, g in _WARMUP_PAIRS:
        _worker_equiv(_normalize(p), _normalize(g), 5)
    _apply_limits(cfg.get("memory_mb"))
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
                ok = _worker_equiv(pn, gn, alarm)
            except SystemExit:
                raise
            except BaseException as exc:  # incl. math-verify's TimeoutException, MemoryError
                ok, err = False, type(exc).__name__
            try:
                tx.send_bytes(json.dumps({"k": k, "ok": bool(ok), "err": err}).encode())
            except (OSError, ValueError):
                return


_BOOT = (
    "import sys, json, importlib.util\n"
    "cfg = json.loads(sys.argv[1])\n"
    "sys.path[:0] = [p for p in cfg['path'] if p not in sys.path]\n"
    "spec = importlib.util.spec_from_file_location('_rlprm_grading_worker', cfg['module'])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main(cfg)\n"
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
            "module": os.path.abspath(__file__),
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
            if (_HOSTILE_RE.search(unicodedata.normalize("NFKC", text))
                    or _nesting_depth(text) > MAX_NESTING):
                counts["rejected_hostile"] += 1
                return False, "", ""
        try:
            pn, gn = _normalize(pred), _normalize(gold)
            if _HOSTILE_RE.search(pn) or _HOSTILE_RE.search(gn):
                counts["rejected_hostile"] += 1
                return False, "", ""
            if not pn or not gn:
                return False, pn, gn
            if self.shortcuts:
                verdict = _decide_local(pn, gn)
                if verdict is not None:
                    counts["settled_locally"] += 1
                    return verdict, pn, gn
            if _hazard(pn) and not _hazard(gn):
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


# --------------------------------------------------------------------------
# Known-equivalent forms and near misses (for testing and benchmarking graders)
# --------------------------------------------------------------------------

_SIMPLE_FRAC_RE = re.compile(r"^(-?)\\frac\{(\d+)\}\{(\d+)\}$")
_INT_RE = re.compile(r"^-?\d+$")
_DEC_RE = re.compile(r"^-?\d*\.\d+$")


def _repeating_decimal(q: Fraction) -> str | None:
    """``0.1\\overline{6}`` for 1/6: the repeating decimal of a non-terminating fraction."""
    sign = "-" if q < 0 else ""
    q = abs(q)
    whole, rem = divmod(q.numerator, q.denominator)
    digits: list[str] = []
    seen: dict[int, int] = {}
    while rem and rem not in seen and len(digits) < 12:
        seen[rem] = len(digits)
        rem *= 10
        d, rem = divmod(rem, q.denominator)
        digits.append(str(d))
    if not rem or rem not in seen:
        return None
    start = seen[rem]
    return f"{sign}{whole}.{''.join(digits[:start])}\\overline{{{''.join(digits[start:])}}}"


def equivalent_forms(answer: str) -> list[str]:
    """Rewrites of a MATH-style answer that every grader should accept as equal.

    Built by rules that keep the value: ``\\dfrac``, ``a/b``, units, ``^\\circ``,
    ``\\$``, ``\\%``-free forms, thousands separators, dropped ``\\left``/``\\right``,
    whitespace, unicode symbols, a wrapping box, repeating decimals, reordered
    sets. Used by this project's tests and benchmark; not exhaustive.
    """
    a = answer.strip()
    out: list[str] = []

    def add(x: str) -> None:
        if x != a and x not in out:
            out.append(x)

    norm = _normalize(a)
    add(a.replace("\\frac", "\\dfrac"))
    add(_squeeze(a))
    if not re.search(r"\d\s*(?:,|\{,\})", a):
        add(re.sub(r"\s*([,=+])\s*", r"\1 ", a))
    if "\\left" in a or "\\right" in a:
        add(re.sub(r"\\(?:left|right)(?![A-Za-z])", "", a))
    add("\\boxed{" + a + "}")
    add("$" + a + "$")
    for tex, uni in (("\\infty", "∞"), ("^\\circ", "°"), ("\\pi", "π")):
        if tex in a:
            add(a.replace(tex, uni))
    m = _SIMPLE_FRAC_RE.match(norm)
    if m:
        sign, p, q = m.groups()
        add(f"{sign}{p}/{q}")
        if len(p) == 1 and len(q) == 1:
            add(f"{sign}\\frac{p}{q}")
        add(f"{sign}\\frac{{{2 * int(p)}}}{{{2 * int(q)}}}")
        value = Fraction(int(p), int(q)) * (-1 if sign else 1)
        if _terminates(value):
            add(str(float(value)) if value.denominator != 1 else str(value.numerator))
        else:
            rep = _repeating_decimal(value)
            if rep:
                add(rep)
    plain = _as_number(_canon(norm))
    if plain is not None:
        add(norm + " \\text{ cm}")
        add(norm + "^\\circ")
        add("\\$" + norm)
        add(norm + "\\%")
        add("x = " + norm)
        value = plain[0]
        if value.denominator == 1:
            n = value.numerator
            add(f"{n}.0")
            if abs(n) >= 1000:
                grouped = f"{abs(n):,}"
                sign = "-" if n < 0 else ""
                add(sign + grouped)
                add(sign + grouped.replace(",", "\\,"))
                add(sign + grouped.replace(",", "{,}"))
            elif n < 0:
                add(norm.replace("-", "−"))
        elif _DEC_RE.match(norm):
            add(norm + "0")
            if norm.startswith("0."):
                add(norm[1:])
            elif norm.startswith("."):
                add("0" + norm)
    if norm != a:
        add(norm)
    m = re.fullmatch(r"\\\{(.*)\\\}", norm)
    items = _split_top(m.group(1) if m else norm)
    if len(items) > 1 and not re.match(r"^[(\[]", norm) and "=" not in norm:
        rev = ", ".join(reversed(items))
        add("\\{" + rev + "\\}" if m else rev)
    if re.fullmatch(r"\\text\{[^{}]*\}", norm):
        inner = norm[6:-1]
        add(inner)
        add("\\textbf{" + inner + "}")
    # Algebraic rewrites that string normalisation cannot undo.
    terms = _split_terms(norm)
    if (len(terms) > 1 and len(items) == 1 and "=" not in norm and "\\pm" not in norm
            and not norm.startswith(("(", "[", "\\{", "\\begin"))):
        signed = [t.strip() if t.strip()[0] in "+-" else "+" + t.strip() for t in reversed(terms)]
        add(" ".join(signed).lstrip("+ "))
    m = re.match(r"(-?)\\frac\{", norm)
    if m:
        i = m.end() - 1
        j = _match_brace(norm, i)
        if j > 0 and j + 1 < len(norm) and norm[j + 1] == "{" and _match_brace(norm, j + 1) == len(norm) - 1:
            top, bottom = norm[i + 1 : j], norm[j + 2 : -1]
            if _as_number(_canon(norm)) is None:
                add(f"{m.group(1)}({top})/({bottom})")
            if top == "\\pi":
                add(f"{m.group(1)}\\frac{{1}}{{{bottom}}}\\pi")
    m = re.fullmatch(r"(\d+)\s*\\sqrt\{(\d+)\}", norm)
    if m:
        add(f"\\sqrt{{{int(m.group(1)) ** 2 * int(m.group(2))}}}")
    m = re.fullmatch(r"(\d+)\s*\\pi", norm)
    if m:
        add(f"\\pi \\cdot {m.group(1)}")
    if "\\begin{pmatrix}" in norm:
        add(re.sub(r"(-?\d+)/(\d+)", r"\\frac{\1}{\2}", norm).replace("pmatrix", "bmatrix"))
    return out


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def near_misses(answer: str) -> list[str]:
    """Answers close to ``answer`` that every grader must reject.

    A flipped sign, off by one, a reciprocal, an over-precise decimal (6-decimal
    rounding), an open/closed interval swap, swapped tuple entries, a dropped term
    or element, a different word, and a hedge (``a \\text{ or } b``).
    """
    a = answer.strip()
    norm = _normalize(a)
    out: list[str] = []

    def add(x: str) -> None:
        if x != a and x not in out:
            out.append(x)

    plain = _as_number(_canon(norm))
    if plain is not None:
        value = plain[0]
        if value != 0:
            add(norm[1:] if norm.startswith("-") else "-" + norm)
        if value.denominator == 1:
            add(str(value.numerator + 1))
            add(str(value.numerator - 1))
            add(f"{norm} \\text{{ or }} {value.numerator + 1}")
        m = _SIMPLE_FRAC_RE.match(norm)
        if m and m.group(2) != m.group(3):
            add(f"{m.group(1)}\\frac{{{m.group(3)}}}{{{m.group(2)}}}")
        if _DEC_RE.match(norm):
            add(norm + "00001")
        return out
    m = re.fullmatch(r"([(\[])\s*([^,]+?)\s*,\s*([^,]+?)\s*([)\]])", norm)
    if m and "\\cup" not in norm:
        lo, x, y, hi = m.groups()
        flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
        if "infty" not in x:
            add(f"{flip[lo]}{x}, {y}{hi}")
        if "infty" not in y:
            add(f"{lo}{x}, {y}{flip[hi]}")
    m = re.fullmatch(r"\((.*)\)", norm)
    if m:
        items = _split_top(m.group(1))
        if len(items) >= 2 and items[0] != items[1] and "\\cup" not in norm:
            swapped = [items[1], items[0]] + items[2:]
            add("(" + ", ".join(swapped) + ")")
    items = _split_top(norm)
    if len(items) > 1 and not norm.startswith("("):
        add(", ".join(items[:-1]))
    if "\\pm" in norm:
        add(norm.replace("\\pm", "+"))
    terms = _split_terms(norm)
    if len(terms) > 1 and len(items) == 1 and "\\pm" not in norm:
        add("".join(terms[:-1]).strip())
    if re.fullmatch(r"\\text\{[^{}]*\}", norm):
        add("\\text{Bob}" if "bob" not in norm.lower() else "\\text{Alice}")
    if re.fullmatch(r"-?\d*\s*\\sqrt\{\d+\}", norm):
        add(norm.replace("\\sqrt{", "\\sqrt{2"))
    if norm.startswith("-"):
        add(norm[1:])
    elif len(items) == 1 and "=" not in norm and not norm.startswith(("(", "[", "\\text")):
        add("-" + norm)
    return [x for x in out if x != norm]


def _split_terms(s: str) -> list[str]:
    """Top-level terms of a sum: ``x^2 - 3x + 1`` -> ``["x^2", " - 3x", " + 1"]``."""
    terms, depth, start, prev = [], 0, 0, ""
    for i, c in enumerate(s):
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        elif c in "+-" and depth == 0 and (prev.isalnum() or prev in ")}"):
            terms.append(s[start:i])
            start = i
        if not c.isspace():
            prev = c
    terms.append(s[start:])
    return [t for t in terms if t.strip()]


def _squeeze(s: str) -> str:
    """``s`` without spaces, except one after a command followed by a letter
    (``\\cot x``) and one between digits (``1 2`` is not ``12``)."""
    s = _CMD_SPACE_RE.sub("\\1\x00", s)
    s = _DIGIT_SPACE_RE.sub("\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


_DIGIT_SPACE_RE = re.compile(r"(?<=\d)\s+(?=\d)")
