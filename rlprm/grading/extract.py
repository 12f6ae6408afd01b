"""Final-answer extraction: the ``# Answer`` step, the last box, GSM8K's ``####``.

Pure string work in linear time on any input; runs in the caller's process
(a worker never sees a whole solution, only the extracted answers).
"""

from __future__ import annotations

import re

from .rules import match_brace

# --------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------

_ANSWER_HEAD_RE = re.compile(r"^[ \t]*#[ \t]*Answer\b[ \t]*:?[ \t]*(.*)$", re.M | re.I)
_GSM8K_RE = re.compile(r"####[ \t]*(.*)$", re.M)
_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")



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
        end = match_brace(text, i)
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
