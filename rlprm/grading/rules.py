"""Screening, normalisation and exact rules: pure string work on untrusted answers.

This file is what a sandboxed grading worker loads (as a sibling of
:mod:`rlprm.grading.worker`, by path, never through the ``rlprm`` package), and
it also runs on model text in the caller's process. So it imports the standard
library only (``tests/test_grading.py`` checks) and never parses, evaluates or
calls out: regular expressions, brace matching and :class:`fractions.Fraction`.

* screening: :data:`HOSTILE_RE` (code-like text), :func:`nesting_depth`,
  :func:`hazard` (giant numbers);
* normalisation to one LaTeX form following the MATH conventions
  (:func:`normalize`) and the key for exact comparison (:func:`canon`);
* exact rules (:func:`decide_local`): equal normal forms, plain numbers
  compared as fractions, text answers as words, hedges; ``None`` defers a pair
  to math-verify in a worker.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from fractions import Fraction

#: Longest answer (in characters) that is parsed at all; longer ones are False.
MAX_ANSWER_CHARS = 1000
#: Deepest bracket nesting accepted. ANTLR's LaTeX parsing is exponential in
#: nested bare braces (15 levels already take seconds); real answers use <= 4.
MAX_NESTING = 10


def match_brace(s: str, start: int) -> int:
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



def drop_redundant_braces(s: str) -> str:
    """``s`` without brace groups that change nothing: ``{{x}}`` -> ``{x}``, and a group around the whole answer.

    In LaTeX a group only delimits: ``\\frac{{1}}{{2}}``, ``\\text{{Evelyn}}`` and ``{{{9}}}`` read as
    ``\\frac{1}{2}``, ``\\text{Evelyn}`` and ``9``. Dropping them first lets a deeply but redundantly braced
    answer pass the nesting screen (ANTLR's parsing is exponential in nested braces, MAX_NESTING) while
    a hostile one, with content at every level, is still refused. Escaped braces (``\\{``) are not groups;
    unbalanced text is returned unchanged. Linear time, no recursion.
    """
    if "{" not in s:
        return s
    close_of: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}":
            if not stack:
                return s
            close_of[stack.pop()] = i
        i += 1
    if stack:
        return s
    drop = bytearray(n)
    for o, c in close_of.items():
        a, b = o + 1, c - 1
        while a < c and s[a] == " ":
            a += 1
        while b > o and s[b] == " ":
            b -= 1
        if close_of.get(a) == b:  # the group holds exactly one group: the outer one is redundant
            drop[o] = drop[c] = 1
    a, b = 0, n - 1
    while a < n and (drop[a] or s[a].isspace()):
        a += 1
    while b >= 0 and (drop[b] or s[b].isspace()):
        b -= 1
    if close_of.get(a) == b:  # the one group left around the whole answer
        drop[a] = drop[b] = 1
    return "".join(ch for ch, d in zip(s, drop) if not d)


def _drop_phantoms(s: str) -> str:
    """``s`` without ``\\phantom`` / ``\\hphantom`` / ``\\vphantom`` and their argument: invisible text that only
    aligns (``1 & \\phantom{-}1`` reads ``1 & 1``). A braced argument or one token."""
    out: list[str] = []
    pos = 0
    for _ in range(len(s)):
        m = _PHANTOM_RE.search(s, pos)
        if m is None:
            break
        out.append(s[pos : m.start()])
        i = m.end()
        while i < len(s) and s[i] == " ":
            i += 1
        if i < len(s) and s[i] == "{":
            end = match_brace(s, i)
            i = len(s) if end < 0 else end + 1
        elif i < len(s):
            tok = _CMD_TOKEN_RE.match(s, i) if s[i] == "\\" else None
            i = tok.end() if tok else i + 1
        pos = i
    out.append(s[pos:])
    return "".join(out)


# --------------------------------------------------------------------------
# Screening: cheap checks that run before any parser
# --------------------------------------------------------------------------

# Python-looking text never is a math answer; refusing it keeps code out of
# every parser even if one of them had an eval path we missed.
HOSTILE_RE = re.compile(
    r"__"
    r"|\b(?:import|lambda|eval|exec|execfile|compile|getattr|setattr|delattr|globals|locals"
    r"|vars|builtins|subprocess|pathlib|breakpoint|pickle|marshal|ctypes)\b"
    r"|\bopen\s*\("
    r"|\.\s*[A-Za-z_]\w*\s*\(",  # attribute call: os.system(, Path(...).touch(
    re.I,
)


def nesting_depth(s: str) -> int:
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
        end = match_brace(s, i)
        if end < 0:
            return s[i + 1 :], n
        return s[i + 1 : end], end + 1
    m = _EXP_TOKEN_RE.match(s, i)
    return m.group(0), m.end()


def hazard(s: str) -> bool:
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

_PHANTOM_RE = re.compile(r"\\[hv]?phantom(?![A-Za-z])")
# The word "degree(s)" after a value, bare or in a text group: ``60 degrees, 120 degrees``, ``6\\text{ degrees}``.
_DEGREE_WORD_RE = re.compile(r"(?<=[\d}])\s*(?:\\text\s*\{\s*degrees?\s*\}|degrees?(?![A-Za-z]))")
# A number and its unit in one text group: ``\\text{5 cm}`` -> ``5\\text{ cm}`` (then `_strip_units`).
_TEXT_NUMBER_RE = re.compile(r"^\\text\s*\{\s*([+-]?\d[\d,]*(?:\.\d+)?)\s+([A-Za-z][A-Za-z .]*)\}$")
_MATHRM_WORD_RE = re.compile(r"\\mathrm\s*\{([A-Za-z][A-Za-z .]+)\}")
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
        if m and match_brace(s, m.end() - 1) == len(s) - 1:
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
                end = match_brace(s, i)
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
def normalize(ans: str) -> str:
    """Bring an answer to the one LaTeX form both sides are compared in.

    Pure string work (no parser). Only rewrites that keep the value: it is
    used for the string fast path and for what math-verify sees.
    """
    s = "".join(" " if unicodedata.category(c) == "Cc" else c
                for c in ans if unicodedata.category(c) != "Cf")
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPT_TABLE) + "}", s)
    s = unicodedata.normalize("NFKC", s).translate(_UNICODE_TABLE)
    s = drop_redundant_braces(_strip_wrappers(drop_redundant_braces(_drop_phantoms(s))))
    s = s.replace("smallmatrix", "matrix")  # the same matrix, typeset small
    s = _MATHRM_WORD_RE.sub(r"\\text{\1}", s)  # upright words (not single letters: \mathrm{d}, \mathrm{e})
    s = _TEXT_NUMBER_RE.sub(r"\1\\text{ \2}", s)
    s = _FRAC_ALIAS_RE.sub(r"\\frac", s)
    s = _LEFT_RIGHT_DOT_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _TEXT_ALIAS_RE.sub(r"\\text{", s)
    s = _DEGREE_RE.sub("", s)
    s = _DEGREE_WORD_RE.sub("", s)
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


def canon(s: str) -> str:
    """Key for exact comparison: text unwrapped, spaces removed, trivial braces dropped."""
    s = squeeze(_TEXT_GROUP_RE.sub(r"\1", s))
    s = _SINGLE_SCRIPT_RE.sub(r"\1\2", s)
    s = s.replace("bmatrix", "pmatrix").replace("+\\infty", "\\infty")
    s = re.sub(r"\\(le|ge|ne)(?![A-Za-z])", r"\\\1q", s)
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    if m:
        s = m.group(1)
    return s[1:] if s.startswith("+") else s


_DIGIT_SPACE_RE = re.compile(r"(?<=\d)\s+(?=\d)")


def squeeze(s: str) -> str:
    """``s`` without spaces, except one after a command followed by a letter
    (``\\cot x``) and one between digits (``1 2`` is not ``12``)."""
    s = _CMD_SPACE_RE.sub("\\1\x00", s)
    s = _DIGIT_SPACE_RE.sub("\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


# --------------------------------------------------------------------------
# Exact rules for numbers, text answers and hedges
# --------------------------------------------------------------------------

_INT_DEC_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")
_FRAC_NUM_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+(?:\.\d+)?)\}\{([+-]?\d+(?:\.\d+)?)\}")
_SLASH_NUM_RE = re.compile(r"([+-]?)(\d+)/(\d+)")
_MIXED_NUM_RE = re.compile(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_SCI_NUM_RE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)\\(?:times|cdot)10\^(?:\{([+-]?\d{1,3})\}|(\d))")


def as_number(c: str) -> tuple[Fraction, int | None] | None:
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


def terminates(q: Fraction) -> bool:
    """Whether ``q`` has a finite decimal expansion (no prime but 2 and 5 in its denominator)."""
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
        if places is None or places < 6 or terminates(qv):
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


def decide_local(pn: str, gn: str) -> bool | None:
    """Settle a pair of normalised answers by exact rules, or ``None`` to defer.

    Pure string and :class:`~fractions.Fraction` work: safe to run on model text
    in any process.
    """
    if not pn or not gn:
        return False
    if _is_hedged(pn) and not _is_hedged(gn) and not _is_multi(gn):
        return False
    pc, gc = canon(pn), canon(gn)
    if pc == gc:
        return True
    if _TEXT_ONLY_RE.fullmatch(gn) and re.search(r"[A-Za-z]", gn):
        return _words(pn) == _words(gn)
    if "=" not in gc:
        pc = _ASSIGN_RE.sub("", pc, count=1)
        if pc == gc:
            return True
    a, b = as_number(pc), as_number(gc)
    if a is not None and b is not None:
        return _numbers_equal(a, b)
    return None
