"""The embedded task: short chains of + and - on small integers (docs/design.md section 8).

A problem reads `93 +3 -4 -7 mod 10`; its reference solution is

    93 + 3 = 96
    96 - 4 = 92
    92 - 7 = 85
    85 mod 10 = 5
    # Answer

    5

The checker knows the truth of every step, so process labels are exact and
free, like the paper's large PRM supervising small models. Final operations
that lose information (mod 10, last digit, max, min) let some wrong chains
reach the right answer: the paper's central problem, measurable here because
every sample gets both "answer correct" and "process correct".

The last-digit shortcut is the task's confident flawed reasoning: on a problem
that ends in `mod 10` or `last digit`, a shortcut solution writes every
intermediate value as its last digit (`93 + 3 = 6`, `6 - 4 = 2`,
`2 - 7 = 5`, `5 mod 10 = 5`). Arithmetic mod 10 makes its answer always right
while its steps are wrong. The generator's training data takes it at a rate
(`shortcut_rate`), so the generator CHOOSES it, with the confidence of a
habit, rather than slipping into it: its own token probabilities do not flag
it, an outcome check rewards it, and only a step check catches it (the paper's
central problem; Uesato et al. 2022 call the rate of right answers on wrong
traces the trace error).

The dropped carry is the task's answer-changing habit (`carry_drop_rate`): a
solution that takes it writes every +/- step whose carry or borrow changes the
tens digit with the tens digit of its left operand kept (`38 + 5 = 33`,
`52 - 7 = 55`). The last digit stays right, so on a mod 10 / last digit
problem the answer does too (more right answers on wrong steps), but on a
none/max/min final the answer is wrong (unless a carry and a borrow cancel,
or the max/min bound decides), and wrong the same way in every
sample that takes the habit: majority voting then agrees on it, and only a
step check (or a reward model that learned one) finds the chains that did the
arithmetic right.

The sizes (operands 1-9, values kept in 0..99, 2-3 operations, compact text)
come from the calibration in docs/design.md section 8: a 0.86M-parameter char-level
model learns this in about five CPU minutes; longer English prompts and bigger
numbers it does not learn at all.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from rlprm.config import ArithmeticConfig
from rlprm.steps import answer_step, is_answer_step, split_steps, step_answer

FINAL_TEXT = {"mod10": "mod 10", "last_digit": "last digit", "max": "max", "min": "min"}
BOUNDED = ("max", "min")
"""Final operations whose text shows their argument (`max 40`)."""
FINAL_ARG = {"mod10": 10}
"""The argument of an unbounded final operation (its text does not show it; absent: 0)."""
_FINAL_KIND = {text: kind for kind, text in FINAL_TEXT.items()}
_PROBLEM_TEXT = re.compile(r"^(\d+)((?: [+-]\d+)+)(?: (%s)(?: (\d+))?)?$" % "|".join(map(re.escape, _FINAL_KIND)))


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]
    """Chain operations: ("+", 3), ("-", 4), ..."""
    final: str = "none"
    """mod10 | last_digit | max | min | none"""
    final_arg: int = 0
    """The bound of max/min."""

    @property
    def text(self) -> str:
        parts = [str(self.start)] + [f"{op}{b}" for op, b in self.ops]
        if self.final in BOUNDED:
            parts.append(f"{FINAL_TEXT[self.final]} {self.final_arg}")
        elif self.final != "none":
            parts.append(FINAL_TEXT[self.final])
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Problem":
        """`93 +3 -4 -7 mod 10` -> the problem whose `text` it is; ValueError for any other text."""
        m = _PROBLEM_TEXT.match(text.strip())
        kind = _FINAL_KIND.get(m[3], "none") if m else "none"
        if m is None or (kind in BOUNDED) != (m[4] is not None):
            raise ValueError(f"{text!r} is not an arithmetic-task problem (like `93 +3 -4 mod 10`)")
        ops = tuple((tok[0], int(tok[1:])) for tok in m[2].split())
        arg = int(m[4]) if m[4] is not None else FINAL_ARG.get(kind, 0)
        return cls(int(m[1]), ops, kind, arg)

    @property
    def prompt(self) -> str:
        """What the generator is given; the solution follows it."""
        return self.text + "\n"

    def plan(self) -> list[tuple[str, int]]:
        """Every operation a full solution applies, the final one included."""
        plan = list(self.ops)
        if self.final != "none":
            plan.append((self.final, self.final_arg))
        return plan

    @property
    def answer(self) -> int:
        value = self.start
        for kind, arg in self.plan():
            value = apply(kind, value, arg)
        return value


def apply(kind: str, a: int, b: int) -> int:
    if kind == "+":
        return a + b
    if kind == "-":
        return a - b
    if kind in ("mod10", "last_digit"):
        return a % 10
    if kind == "max":
        return max(a, b)
    if kind == "min":
        return min(a, b)
    raise ValueError(f"unknown operation {kind!r}")


def render_step(kind: str, a: int, b: int, result: int) -> str:
    if kind in "+-":
        return f"{a} {kind} {b} = {result}"
    if kind == "mod10":
        return f"{a} mod 10 = {result}"
    if kind == "last_digit":
        return f"last digit of {a} = {result}"
    return f"{kind}({a}, {b}) = {result}"


_NUM = r"(-?\d{1,6})"
_STEP_PATTERNS = [
    (re.compile(rf"^{_NUM} ([+-]) {_NUM} = {_NUM}$"), lambda m: (m[2], int(m[1]), int(m[3]), int(m[4]))),
    (re.compile(rf"^{_NUM} mod 10 = {_NUM}$"), lambda m: ("mod10", int(m[1]), 10, int(m[2]))),
    (re.compile(rf"^last digit of {_NUM} = {_NUM}$"), lambda m: ("last_digit", int(m[1]), 0, int(m[2]))),
    (re.compile(rf"^(max|min)\({_NUM}, {_NUM}\) = {_NUM}$"), lambda m: (m[1], int(m[2]), int(m[3]), int(m[4]))),
]


def parse_step(step: str) -> tuple[str, int, int, int] | None:
    """`85 mod 10 = 5` -> ("mod10", 85, 10, 5); None when the step is not one of ours."""
    for pattern, build in _STEP_PATTERNS:
        m = pattern.match(step.strip())
        if m:
            return build(m)
    return None


# --------------------------------------------------------------------------- problems


def _draw_problem(cfg: ArithmeticConfig, rng: random.Random) -> Problem | None:
    value = rng.randint(0, cfg.start_max)
    start, ops = value, []
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        op, b = rng.choice(cfg.operations), rng.randint(1, cfg.operand_max)
        value = apply(op, value, b)
        if not 0 <= value <= cfg.value_max:
            return None
        ops.append((op, b))
    final = rng.choice(cfg.final_ops)
    final_arg = rng.randint(0, cfg.value_max) if final in BOUNDED else FINAL_ARG.get(final, 0)
    return Problem(start, tuple(ops), final, final_arg)


def make_problems(cfg: ArithmeticConfig, n: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """`n` seeded problems whose correct values all stay in 0..value_max; texts in `exclude` are skipped."""
    rng = random.Random(seed)
    out, seen = [], set(exclude or ())
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * n + 10000:
            raise RuntimeError(f"could not draw {n} distinct problems from {cfg}; widen the ranges")
        problem = _draw_problem(cfg, rng)
        if problem is None:
            continue
        if exclude is not None and problem.text in seen:
            continue
        out.append(problem)
    return out


def split_problems(cfg: ArithmeticConfig, n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Held-out problems first, then training problems that never repeat a held-out text."""
    test = make_problems(cfg, n_test, seed=seed * 1_000_003 + 17)
    test_texts = {p.text for p in test}
    train = make_problems(cfg, n_train, seed=seed * 1_000_003 + 29, exclude=test_texts)
    return train, test


def reward_model_problems(cfg: ArithmeticConfig, n_train: int, n_test: int, seed: int, sft_examples: int,
                          sft_held_out: int) -> tuple[list[Problem], list[Problem]]:
    """The reward model's (training, held-out) problems, apart from everything the generator trained on.

    Held-out: `split_problems`' held-out side (the generator never saw it).
    Training: a seed stream of its own that skips the generator's SFT
    problems (`split_problems(cfg, sft_examples, sft_held_out, seed)`'s
    training side) and every held-out problem up to max(n_test,
    sft_held_out), the problems RL evaluates on: a reward model fitted on the
    very problems the generator memorised, or on the evaluation problems,
    would be judged on what it saw.
    """
    sft, _ = split_problems(cfg, sft_examples, sft_held_out, seed)  # exactly `rlprm prepare`'s training problems
    _, held_out = split_problems(cfg, 0, max(n_test, sft_held_out), seed)
    exclude = {p.text for p in sft} | {p.text for p in held_out}
    train = make_problems(cfg, n_train, seed=seed * 1_000_003 + 41, exclude=exclude)
    return train, held_out[:n_test]


# --------------------------------------------------------------------------- solutions


def reference_solution(problem: Problem) -> list[str]:
    steps, value = [], problem.start
    for kind, arg in problem.plan():
        result = apply(kind, value, arg)
        steps.append(render_step(kind, value, arg, result))
        value = result
    steps.append(answer_step(str(value)))
    return steps


@dataclass
class Corruption:
    step: int
    """Index of the wrong step."""
    kind: str
    """slip | operand | sign | skip"""


def shortcut_value(kind: str, a: int, b: int) -> int:
    """What the last-digit shortcut writes for `a kind b`: the true result's last digit."""
    return apply(kind, a, b) % 10


def is_shortcut_step(kind: str, a: int, b: int, result: int) -> bool:
    """`93 + 3 = 6`: a +/- step whose result is the true one's last digit where the two differ."""
    if kind not in ("+", "-"):
        return False
    true = apply(kind, a, b)
    return result != true and result == true % 10


def carry_drop_value(kind: str, a: int, b: int) -> int:
    """What a dropped carry or borrow writes for `a kind b`: the tens of `a` kept, the true result's last digit."""
    return a - a % 10 + apply(kind, a, b) % 10


def is_carry_drop_step(kind: str, a: int, b: int, result: int) -> bool:
    """`38 + 5 = 33`, `52 - 7 = 55`: a +/- step by a one-digit operand whose result keeps the left operand's tens
    digit where the carry or borrow should have changed it. `a` is at least 10: below it the dropped carry writes
    what the last-digit shortcut writes (`8 + 5 = 3`), and that step counts as the shortcut's."""
    if kind not in ("+", "-") or not 10 <= a or not 0 < b < 10:
        return False
    true = apply(kind, a, b)
    return result != true and result == carry_drop_value(kind, a, b)


def carry_drop_solution(problem: Problem) -> list[str] | None:
    """The chain that drops every carry and borrow (every step `is_carry_drop_step` can take), the final operation
    applied right to what it reached; None when no step carries or borrows. Every dropped carry keeps the tens
    digit, so the values stay those of the start's tens. The answer is right on a mod 10 / last digit final and
    wrong on a none final (max/min: wrong unless the bound decides)."""
    steps, value, differs = [], problem.start, False
    for kind, arg in problem.plan():
        result = apply(kind, value, arg)
        if kind in ("+", "-") and is_carry_drop_step(kind, value, arg, carry_drop_value(kind, value, arg)):
            result, differs = carry_drop_value(kind, value, arg), True
        steps.append(render_step(kind, value, arg, result))
        value = result
    if not differs:
        return None
    steps.append(answer_step(str(value)))
    return steps


def shortcut_solution(problem: Problem) -> list[str] | None:
    """The last-digit shortcut chain, or None when the problem cannot take it (its final keeps more than the
    last digit) or when the shortcut writes the same chain as the reference (every value below 10)."""
    if problem.final not in ("mod10", "last_digit"):
        return None
    steps, value, differs = [], problem.start, False
    for kind, arg in problem.plan():
        if kind in ("+", "-"):
            result = shortcut_value(kind, value, arg)
            differs = differs or result != apply(kind, value, arg)
        else:
            result = apply(kind, value, arg)
        steps.append(render_step(kind, value, arg, result))
        value = result
    if not differs:
        return None
    assert value == problem.answer, "mod-10 arithmetic keeps the shortcut's answer right"
    steps.append(answer_step(str(value)))
    return steps


def _slip(rng: random.Random, final: bool) -> int:
    if not final and rng.random() < 0.75:
        return rng.choice([-10, 10])  # a carry error, the commonest slip
    return rng.choice([-2, -1, 1, 2])


def corrupt_solution(problem: Problem, rng: random.Random, max_tries: int = 20,
                     avoid_carry_drop: bool = False) -> tuple[list[str], Corruption]:
    """One error at one step; later steps follow correctly from the wrong value.

    Errors: an arithmetic slip (a +-10 carry error 3 times in 4, else +-1 or 2),
    an operand off by 1-2, a flipped sign, a skipped operation (chains of 3+),
    or a slip or skip on the final mod / last-digit / max / min step.
    `avoid_carry_drop` redraws a slip that writes what the dropped-carry habit writes (`38 + 5 = 33`), so that
    habit's rate in training data is its own setting; off, the draws are those of the data before the habit.
    """
    plan = problem.plan()
    has_final = problem.final != "none"
    for _ in range(max_tries):
        pos = rng.randrange(len(plan))
        is_final = has_final and pos == len(plan) - 1
        kinds = ["slip", "skip"] if is_final else ["slip", "operand", "sign"] + (["skip"] if len(plan) >= 3 else [])
        kind = rng.choice(kinds)
        steps, value, ok = [], problem.start, True
        for i, (op, arg) in enumerate(plan):
            if i == pos and kind == "skip":
                continue
            shown_op, shown_arg = op, arg
            if i == pos and kind == "operand":
                shown_arg = arg + rng.choice([-2, -1, 1, 2])
                if shown_arg < 1:
                    shown_arg = arg + 2
            if i == pos and kind == "sign":
                shown_op = "-" if op == "+" else "+"
            result = apply(shown_op, value, shown_arg)
            if i == pos and kind == "slip":
                result += _slip(rng, is_final)
            # a slip that lands on the last digit would pass for the shortcut: the two must stay apart
            shortcut_like = i == pos and kind == "slip" and (
                is_shortcut_step(op, value, arg, result)
                or (avoid_carry_drop and is_carry_drop_step(op, value, arg, result)))
            if result < 0 or shortcut_like or (i == pos and result == apply(op, value, arg)):
                ok = False
                break
            steps.append(render_step(shown_op, value, shown_arg, result))
            value = result
        if ok and steps:
            steps.append(answer_step(str(value)))
            return steps, Corruption(pos, kind)
    raise RuntimeError(f"could not corrupt {problem.text!r} in {max_tries} tries")


def training_solutions(problems: list[Problem], corrupt_rate: float, seed: int, shortcut_rate: float = 0.0,
                       shortcut_finals: tuple[str, ...] | list[str] = ("mod10", "last_digit"),
                       carry_drop_rate: float = 0.0,
                       carry_drop_finals: tuple[str, ...] | list[str] = ("none", "max", "min"),
                       ) -> list[tuple[Problem, list[str], bool]]:
    """(problem, steps, is_clean) for each problem.

    A problem whose final is in `shortcut_finals` and whose shortcut differs from its reference takes the
    shortcut with probability `shortcut_rate`; else a problem whose final is in `carry_drop_finals` and that
    has a carry or borrow drops all of them (`carry_drop_solution`) with probability `carry_drop_rate`; every
    other solution carries one error with probability `corrupt_rate`, else it is the reference.
    """
    rng = random.Random(seed)
    out = []
    for problem in problems:
        shortcut = shortcut_solution(problem) if problem.final in shortcut_finals else None
        # one draw per problem whatever the outcome, so the corruption stream does not depend on shortcut_rate's use
        take_shortcut = rng.random() < shortcut_rate
        # drawn only when the habit is on: with it off, the data is the data of every generator before it
        take_drop = carry_drop_rate > 0 and rng.random() < carry_drop_rate
        drop = carry_drop_solution(problem) if take_drop and problem.final in carry_drop_finals else None
        if shortcut is not None and take_shortcut:
            out.append((problem, shortcut, False))
        elif drop is not None:
            out.append((problem, drop, False))
        elif rng.random() < corrupt_rate:
            steps, _ = corrupt_solution(problem, rng, avoid_carry_drop=carry_drop_rate > 0)
            out.append((problem, steps, False))
        else:
            out.append((problem, reference_solution(problem), True))
    return out


# --------------------------------------------------------------------------- checking


@dataclass
class CheckResult:
    well_formed: bool
    """Every step parses and the text ends with an integer answer."""
    steps: list[str]
    step_correct: list[bool]
    """One per step, answer step included: the step applies the problem's next operation to the previous result, with right arithmetic."""
    first_error: int | None
    """Index of the first wrong step (len(steps) when the answer step is missing); None when every step is right."""
    answer: str | None
    answer_correct: bool
    shortcut: bool = False
    """Some step writes a +/- result as the true result's last digit (the last-digit shortcut)."""
    carry_drop: bool = False
    """Some step drops a carry or borrow (`38 + 5 = 33`: the left operand's tens kept, `is_carry_drop_step`)."""
    process_correct: bool = field(init=False)

    def __post_init__(self):
        self.process_correct = self.well_formed and self.first_error is None and self.answer_correct


def check(problem: Problem, text: str, sep: str = "\n") -> CheckResult:
    """Exact verdict on any text a model writes; garbage is `well_formed=False`, never an exception."""
    try:
        steps = split_steps(text, sep)
    except Exception:  # noqa: BLE001 -- model text is untrusted; nothing it holds may raise
        steps = []
    plan = problem.plan()
    correct: list[bool] = []
    well_formed = bool(steps) and is_answer_step(steps[-1])
    prev: int | None = problem.start
    shortcut = carry_drop = False
    answer = step_answer(steps[-1]) if steps else None
    for i, step in enumerate(steps):
        if i == len(steps) - 1 and is_answer_step(step):
            ok = answer is not None and re.fullmatch(r"-?\d{1,6}", answer) is not None
            well_formed = well_formed and ok
            correct.append(ok and len(steps) - 1 == len(plan) and prev is not None and int(answer) == prev)
            continue
        parsed = parse_step(step)
        if parsed is None:
            well_formed = False
            correct.append(False)
            prev = None
            continue
        kind, a, b, result = parsed
        shortcut = shortcut or is_shortcut_step(kind, a, b, result)
        carry_drop = carry_drop or is_carry_drop_step(kind, a, b, result)
        want = plan[i] if i < len(plan) else None
        ok = (
            want is not None
            and kind == want[0]
            and (kind in ("mod10", "last_digit") or b == want[1])
            and prev is not None
            and a == prev
            and result == apply(kind, a, b)
        )
        correct.append(ok)
        prev = result
    first_error = next((i for i, ok in enumerate(correct) if not ok), None)
    if first_error is None and not (steps and is_answer_step(steps[-1])):
        first_error = len(steps)  # the solution stops before its answer: the missing step is the error
    answer_correct = answer is not None and answer.lstrip("-").isdigit() and int(answer) == problem.answer
    return CheckResult(well_formed, steps, correct, first_error, answer, answer_correct, shortcut, carry_drop)


def summarize(results: list[CheckResult]) -> dict[str, float]:
    """Rates over a set of checked samples."""
    n = max(1, len(results))
    return {
        "num_samples": len(results),
        "well_formed": sum(r.well_formed for r in results) / n,
        "answer_accuracy": sum(r.answer_correct for r in results) / n,
        "process_accuracy": sum(r.process_correct for r in results) / n,
        "right_answer_wrong_process": sum(r.answer_correct and not r.process_correct for r in results) / n,
        "trace_error": trace_error(results),
        "shortcut_rate": sum(r.shortcut for r in results) / n,
        "carry_drop_rate": sum(r.carry_drop for r in results) / n,
        "carry_drop_answer_wrong": sum(r.carry_drop and not r.answer_correct for r in results) / n,
    }


def trace_error(results: list[CheckResult]) -> float:
    """Of the samples with the right final answer, the share with a wrong step (Uesato et al. 2022); 0 if none."""
    right = [r for r in results if r.answer_correct]
    return sum(not r.process_correct for r in right) / len(right) if right else 0.0


CHARSET = sorted(set("0123456789 +-=(),\n#" + "mod last digit of max min Answer"))
"""Every character the task's prompts and solutions use (for char-level tokenizers)."""
