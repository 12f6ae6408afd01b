"""Known-equivalent forms and near misses of MATH-style answers, for testing graders.

Used by tests/test_grading.py and benchmarks/grading.py (not by the package):
:func:`equivalent_forms` rewrites an answer in ways that keep its value,
:func:`near_misses` in ways that change it. Built on the grading package's
normalisation (:mod:`rlprm.grading.rules`).
"""

from __future__ import annotations

import re
from fractions import Fraction

from rlprm.grading.rules import as_number, canon, match_brace, normalize, squeeze, terminates

__all__ = ["equivalent_forms", "near_misses"]

_SIMPLE_FRAC_RE = re.compile(r"^(-?)\\frac\{(\d+)\}\{(\d+)\}$")
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
    sets, redundant brace groups (12 deep, doubled), a matrix as an array or with a trailing row break, the
    word "degrees". Used by this project's tests and benchmark; not exhaustive.
    """
    a = answer.strip()
    out: list[str] = []

    def add(x: str) -> None:
        if x != a and x not in out:
            out.append(x)

    norm = normalize(a)
    add(a.replace("\\frac", "\\dfrac"))
    add(squeeze(a))
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
        if terminates(value):
            add(str(float(value)) if value.denominator != 1 else str(value.numerator))
        else:
            rep = _repeating_decimal(value)
            if rep:
                add(rep)
    plain = as_number(canon(norm))
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
        j = match_brace(norm, i)
        if j > 0 and j + 1 < len(norm) and norm[j + 1] == "{" and match_brace(norm, j + 1) == len(norm) - 1:
            top, bottom = norm[i + 1 : j], norm[j + 2 : -1]
            if as_number(canon(norm)) is None:
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
        body = norm[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")] if norm.endswith("\\end{pmatrix}") else None
        if body is not None:
            cols = body.split("\\\\")[0].count("&") + 1
            add("\\left(\\begin{array}{" + "c" * cols + "}" + body + "\\end{array}\\right)")
            add("\\begin{pmatrix}" + body + " \\\\ \\end{pmatrix}")  # a trailing row break
            add(re.sub(r"\s+", "", a))
    # redundant groups: around the whole answer, many deep, and doubled around every group
    add("{" * 12 + a + "}" * 12)
    if "\\begin" not in a:
        add(_double_groups(a))
    if "^\\circ" in a and re.search(r"\d\s*\^\\circ", a):
        add(re.sub(r"\s*\^\\circ", " degrees", a))
    if re.fullmatch(r"\d+", norm):
        add(f"{norm}\\,\\%")
        add(f"{norm} \\text{{percent}}")
    return out


def _double_groups(s: str) -> str:
    """Every unescaped brace doubled: ``\\frac{1}{2}`` -> ``\\frac{{1}}{{2}}`` (same LaTeX)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(s[i : i + 2])
            i += 2
            continue
        out.append({"{": "{{", "}": "}}"}.get(s[i], s[i]))
        i += 1
    return "".join(out)


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
    norm = normalize(a)
    out: list[str] = []

    def add(x: str) -> None:
        if x != a and x not in out:
            out.append(x)

    plain = as_number(canon(norm))
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

