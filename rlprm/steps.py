"""The one step convention (docs/design.md section 4).

A solution is a list of step strings; the last one carries the final answer the
PRM800K way, `# Answer\\n\\n<answer>`.

Text form: every step is followed by the separator (default `"\\n"`), the last
one included, so `render_steps(steps, sep)` is exactly the completion a
generator is trained to write and `split_steps` reads it back.

Token form (`encode_steps`): the prompt, then each step+separator tokenized as
its own piece and concatenated. Tokenizing piece by piece, instead of the whole
text at once, is deliberate: it makes every step end a token boundary for any
tokenizer. On whole text a byte-level BPE glues a `" "` separator onto the next
word (`" foo"`), so no token ends where the step ends and a PRM label would
land on a token that has already seen the next step. Piecewise, the index of
the last token of each piece is the step end, and the prefix of ids up to a
step end is exactly the encoding of the solution cut after that step, which is
what makes one forward pass equal to scoring every prefix separately.

Two failure modes are checked rather than trusted: a tokenizer that
normalises the separator away (then step+sep encodes to the same ids as the
step alone, and the step end would silently vanish) raises `StepTokenError`,
and so does a step that encodes to nothing.

The policy and a reward model may use different tokenizers: RL maps step ends
onto the policy's own generated tokens through character offsets
(`step_char_ends`, `token_char_ends`, `char_ends_to_token_ends`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER_MARK = "# Answer"
DEFAULT_SEPARATOR = "\n"


class StepTokenError(ValueError):
    """A step end cannot be placed on a token (see the module docstring)."""


def answer_step(answer: str) -> str:
    """The final step that carries the answer, PRM800K style."""
    return f"{ANSWER_MARK}\n\n{answer}"


def is_answer_step(step: str) -> bool:
    return step.lstrip().startswith(ANSWER_MARK)


def step_answer(step: str) -> str | None:
    """The answer written in an answer step (`# Answer\\n\\n5`, `# Answer: 5`), else None."""
    step = step.strip()
    if not step.startswith(ANSWER_MARK):
        return None
    answer = step[len(ANSWER_MARK):].lstrip(":").strip()
    return answer or None


def _answer_start(text: str, sep: str) -> int:
    """Index where the answer step begins: `# Answer` at the start or right after a separator."""
    if text.lstrip().startswith(ANSWER_MARK):
        return text.index(ANSWER_MARK)
    idx = text.find(sep + ANSWER_MARK)
    return -1 if idx < 0 else idx + len(sep)


def _answer_len(tail: str, sep: str) -> int:
    """Length of the answer step at the start of `tail`, without trailing separators or spaces."""
    core = sep.strip()
    tail = tail.rstrip()
    while core and tail.endswith(core):
        tail = tail[: -len(core)].rstrip()
    return len(tail)


def split_steps(text: str, sep: str = DEFAULT_SEPARATOR) -> list[str]:
    """Solution text -> steps.

    Pieces between separators, stripped, empty ones dropped. Everything from a
    `# Answer` line to the end is one step, even though it holds newlines.
    """
    if not sep:
        raise ValueError("the step separator must not be empty")
    start = _answer_start(text, sep)
    head, tail = (text, "") if start < 0 else (text[:start], text[start:])
    steps = [piece.strip() for piece in head.split(sep)]
    steps = [s for s in steps if s]
    answer = tail[: _answer_len(tail, sep)].strip()
    if answer:
        steps.append(answer)
    return steps


def render_steps(steps: list[str], sep: str = DEFAULT_SEPARATOR) -> str:
    """Steps -> text, every step followed by the separator."""
    if not sep:
        raise ValueError("the step separator must not be empty")
    return "".join(step + sep for step in steps)


def step_char_ends(text: str, sep: str = DEFAULT_SEPARATOR) -> list[int]:
    """End (exclusive) of each step in `text`, in characters, separator included.

    The steps are those `split_steps(text, sep)` returns; a last step with no
    separator after it ends at its last non-space character. Used to place
    step rewards on tokens of text a model generated.
    """
    start = _answer_start(text, sep)
    head_end = len(text) if start < 0 else start
    ends: list[int] = []
    pos = 0
    while pos < head_end:
        cut = text.find(sep, pos, head_end)
        if cut < 0:  # a last piece with no separator after it
            piece = text[pos:head_end]
            if piece.strip():
                ends.append(pos + len(piece.rstrip()))
            break
        if text[pos:cut].strip():
            ends.append(cut + len(sep))
        pos = cut + len(sep)
    if start >= 0 and _answer_len(text[start:], sep):
        end = start + _answer_len(text[start:], sep)
        ends.append(end + len(sep) if text.startswith(sep, end) else end)
    return ends


@dataclass
class EncodedSolution:
    """A prompt and its steps in token form."""

    input_ids: list[int]
    step_ends: list[int]
    """Index into input_ids of the last token of each step+separator."""
    prompt_len: int
    """Tokens of the prompt (BOS included)."""


def leading_bos(tokenizer) -> list[int]:
    """BOS, if this tokenizer puts one in front of its encodings (Llama, Mistral), as `tokenizer.encode` does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def encode_steps(tokenizer, prompt: str, steps: list[str], sep: str = DEFAULT_SEPARATOR) -> EncodedSolution:
    """Token form of one solution; see `encode_batch`."""
    return encode_batch(tokenizer, [prompt], [steps], sep)[0]


def encode_batch(tokenizer, prompts: list[str], solutions: list[list[str]], sep: str = DEFAULT_SEPARATOR) -> list[EncodedSolution]:
    """Token form of many solutions: prompt, then each step+separator as its own piece.

    Raises StepTokenError when a step end cannot be placed on a token: the
    tokenizer drops the separator, or a step encodes to nothing.
    """
    if len(prompts) != len(solutions):
        raise ValueError(f"{len(prompts)} prompts but {len(solutions)} solutions")
    if not sep:
        raise ValueError("the step separator must not be empty")
    bos = leading_bos(tokenizer)
    flat_steps = [step for steps in solutions for step in steps]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
    prompt_ids = enc(list(prompts))
    piece_ids = enc([step + sep for step in flat_steps])
    bare_ids = enc(flat_steps)
    out, k = [], 0
    for p_ids, steps in zip(prompt_ids, solutions):
        ids = bos + list(p_ids)
        prompt_len = len(ids)
        ends = []
        for step in steps:
            piece, bare = piece_ids[k], bare_ids[k]
            k += 1
            if not piece:
                raise StepTokenError(f"step {step!r} with separator {sep!r} encodes to no tokens with {type(tokenizer).__name__}")
            if piece == bare:
                raise StepTokenError(
                    f"the tokenizer ({type(tokenizer).__name__}) normalises the step separator {sep!r} away: "
                    f"{step!r} and {step + sep!r} encode to the same tokens, so the step end would vanish. "
                    "Use a separator this tokenizer keeps (check tokenizer(step + sep) != tokenizer(step))."
                )
            ids.extend(piece)
            ends.append(len(ids) - 1)
        out.append(EncodedSolution(ids, ends, prompt_len))
    return out


def token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """Character end (exclusive) of each token in `tokenizer.decode(ids)`.

    Computed from decoding growing prefixes, so it is right for generated ids
    whatever the tokenizer would produce on re-encoding the text.
    """
    ends, n = [], 0
    for i in range(len(ids)):
        n = max(n, len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)))
        ends.append(n)
    return ends


def char_ends_to_token_ends(token_ends: list[int], char_ends: list[int]) -> list[int]:
    """For each step's char end, the index of the token holding its last character.

    `token_ends[i]` is the char end of token i (non-decreasing). A step end
    that falls inside a token (a BPE merge across the boundary) maps to that
    token: the earliest position that has seen the whole step.
    """
    out, t = [], 0
    for end in char_ends:
        while t < len(token_ends) and token_ends[t] < end:
            t += 1
        if t == len(token_ends):
            raise StepTokenError(f"character {end} lies beyond the decoded text ({token_ends[-1] if token_ends else 0} chars)")
        out.append(t)
    return out


_WS = re.compile(r"\s+")


def normalize_step(step: str) -> str:
    """Collapse whitespace; handy for comparing steps written by different sources."""
    return _WS.sub(" ", step).strip()
