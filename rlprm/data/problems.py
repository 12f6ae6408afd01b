"""The problem record every stage passes around, where problems come from, and how samples are graded.

A `TaskProblem` is a prompt and a gold answer; for the embedded arithmetic
task it also carries the `Problem`, so that every sample gets both verdicts
(answer right, every step right). For MATH / GSM8K only the answer can be
graded, through `rlprm.grading` (sandboxed workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rlprm.config import Recipe
from rlprm.errors import InputError
from rlprm.files import read_jsonl
from rlprm.tasks.arithmetic import Problem, check, split_problems


class ProblemFileError(InputError, ValueError):
    """A problems file is missing, unreadable or has a bad line (the message names file:line)."""


@dataclass(frozen=True)
class TaskProblem:
    id: str
    prompt: str
    """What the generator is given; its solution follows directly."""
    gold: str
    """The final answer, as text."""
    arith: Problem | None = None
    """The arithmetic problem, when step truth can be checked exactly."""
    text: str = ""
    """The bare problem statement (reward models format it with their own prompt template)."""


@dataclass
class SampleGrade:
    steps: list[str]
    answer: str | None
    answer_correct: bool
    well_formed: bool
    process_correct: bool | None
    """Every step right (arithmetic task only; None where steps cannot be checked)."""
    first_error: int | None = None
    step_correct: list[bool] | None = None
    shortcut: bool | None = None
    """Some step writes the last-digit shortcut (`93 + 3 = 6`; arithmetic task only, None elsewhere)."""
    carry_drop: bool | None = None
    """Some step drops a carry or borrow (`38 + 5 = 33`; arithmetic task only, None elsewhere)."""

    @property
    def answered(self) -> bool:
        """A final answer was written: THE definition of "answered" that rewards (the missing-answer guard),
        rejection sampling and evaluation share. It is the task's own answer reading (`grade_samples`): the
        arithmetic checker's `# Answer` step, `grading.extract_answer` (`# Answer`, the last `\\boxed{}`, GSM8K's
        `####`) for MATH / GSM8K / PRM800K, so a response counts as answered exactly when it has an answer to grade."""
        return self.answer is not None


def from_arithmetic(problems: list[Problem], prefix: str = "arith") -> list[TaskProblem]:
    return [TaskProblem(f"{prefix}-{i}", p.prompt, str(p.answer), p, p.text) for i, p in enumerate(problems)]


def held_out_arithmetic(recipe: Recipe, n: int) -> list[TaskProblem]:
    """The held-out arithmetic problems of this recipe's seed (never seen in generator training)."""
    _, test = split_problems(recipe.task.arithmetic, 0, n, recipe.run.seed)
    return from_arithmetic(test, prefix="test")


def reward_model_arithmetic(recipe: Recipe) -> tuple[list[Problem], list[Problem]]:
    """The reward model's (training, held-out) arithmetic problems for `rm.data`: none the generator trained on.

    The generator's SFT problems are named by this recipe's `sft.num_examples` and `prepare_eval.num_problems`
    with its seed; their defaults are recipes/arith_prepare.yaml's (see tasks.arithmetic.reward_model_problems).
    """
    from rlprm.tasks.arithmetic import reward_model_problems

    data = recipe.rm.data
    return reward_model_problems(recipe.task.arithmetic, data.train_problems, data.eval_problems, recipe.run.seed,
                                 sft_examples=recipe.sft.num_examples, sft_held_out=recipe.prepare_eval.num_problems)


def load_jsonl_problems(path: Path, limit: int | None = None, template: str = "{problem}\n") -> list[TaskProblem]:
    """MATH-style (`problem`, `answer`) or GSM8K (`question`, `answer` ending in `#### n`) JSONL.

    A whole file read once is kept (keyed by its path, size and modification time, and the template): the input
    check before a job (rlprm/inputs.py) reads it whole, and the job's reads (held-out problems, every RL epoch's
    draws) reuse that parse instead of reading it again; a file changed in between is read again."""
    path = Path(path)
    try:
        stat = path.stat()
        # the path as given, made absolute (not resolved): problem ids are built from the name it is read by
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, template)
    except OSError:
        key = None  # missing or unreadable: the reader below says so
    if key is not None and key in _PARSED:
        return list(_PARSED[key][:limit])
    out = _parse_problems(path, limit, template)
    if key is not None and limit is None:
        while len(_PARSED) >= _PARSED_FILES:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = tuple(out)
    return out


_PARSED: dict[tuple, tuple[TaskProblem, ...]] = {}
_PARSED_FILES = 4
"""How many parsed problem files are kept (a train and a test file, with room to spare)."""


def _parse_problems(path: Path, limit: int | None, template: str) -> list[TaskProblem]:
    out: list[TaskProblem] = []
    for lineno, row in read_jsonl(path, ProblemFileError):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, dict):
            raise ProblemFileError(f"{path}:{lineno}: expected a JSON object")
        text = row.get("problem", row.get("question"))
        answer = row.get("answer")
        if not isinstance(text, str) or not isinstance(answer, str):
            raise ProblemFileError(f"{path}:{lineno}: needs string fields `problem` (or `question`) and `answer`")
        if "####" in answer:  # GSM8K: the answer field is a worked solution ending in '#### n'
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        pid = str(row.get("unique_id", row.get("id", f"{path.stem}-{lineno}")))
        out.append(TaskProblem(pid, template.format(problem=text), answer, text=text))
    return out


def eval_problems(recipe: Recipe, n: int) -> list[TaskProblem]:
    """Held-out problems for evaluation, whatever the task."""
    if recipe.task.name == "arithmetic":
        return held_out_arithmetic(recipe, n)
    return load_jsonl_problems(recipe.task.test_path, limit=n, template=recipe.task.prompt_template)


def epoch_problems(recipe: Recipe, epoch: int, exclude: set[str]) -> list[TaskProblem]:
    """The RL training prompts of one epoch: a function of (seed, epoch) only, so that a resumed run replays them.

    Arithmetic: rl.problems_per_epoch fresh problems from a seed stream apart from prepare's
    (seed * 1_000_003 + 17 / + 29), the held-out ones (`exclude`, problem texts) left out. MATH / GSM8K:
    rl.problems_per_epoch draws (with replacement) from task.train_path.
    """
    rl = recipe.rl
    if recipe.task.name == "arithmetic":
        from rlprm.tasks.arithmetic import make_problems

        seed = recipe.run.seed * 1_000_003 + 1000 + epoch
        return from_arithmetic(make_problems(recipe.task.arithmetic, rl.problems_per_epoch, seed=seed, exclude=exclude),
                               prefix=f"rl{epoch}")
    if recipe.task.train_path is None:
        raise ProblemFileError(f"task `{recipe.task.name}` needs task.train_path (a JSONL of training problems) for RL")
    import random

    pool = load_jsonl_problems(recipe.task.train_path, template=recipe.task.prompt_template)
    rng = random.Random(recipe.run.seed * 7919 + epoch)
    return [pool[rng.randrange(len(pool))] for _ in range(rl.problems_per_epoch)]


def grade_samples(problems: list[TaskProblem], texts: list[list[str]], sep: str = "\n") -> list[list[SampleGrade]]:
    """Verdicts for texts[i][j], the j-th sample of problem i.

    The answer is read the way the task writes it: the arithmetic task's checker reads its last `# Answer` step
    (what its generators are trained to write); MATH / GSM8K / PRM800K texts go through `grading.extract_answer`,
    whose formats cover all three. `SampleGrade.answered` is derived from it and from nothing else.
    """
    from rlprm.steps import split_steps

    grades: list[list[SampleGrade | None]] = [[None] * len(row) for row in texts]
    pending: list[tuple[int, int, str | None, list[str]]] = []
    for i, (problem, row) in enumerate(zip(problems, texts)):
        for j, text in enumerate(row):
            if problem.arith is not None:
                r = check(problem.arith, text, sep)
                grades[i][j] = SampleGrade(r.steps, r.answer, r.answer_correct, r.well_formed, r.process_correct,
                                           r.first_error, r.step_correct, r.shortcut, r.carry_drop)
            else:
                from rlprm.grading import extract_answer

                pending.append((i, j, extract_answer(text), split_steps(text, sep)))
    if pending:
        from rlprm.grading import is_equiv_many

        verdicts = is_equiv_many([(answer, problems[i].gold) for i, _, answer, _ in pending])
        for (i, j, answer, steps), ok in zip(pending, verdicts):
            grades[i][j] = SampleGrade(steps, answer, bool(ok), answer is not None, None)
    return grades  # type: ignore[return-value]
