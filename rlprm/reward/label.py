"""Labelling solutions in PRM800K's phase-2 format: by the exact checker, or by any PRM.

`rlprm select` writes the solutions it surfaces as PRM800K phase-2 lines that
nobody has rated yet: `question.pre_generated_steps` (the steps, the last one
`# Answer\\n\\n<answer>`), `pre_generated_answer`, `pre_generated_verifier_score`
(the selecting PRM's score), `generation`, and a `label` whose steps hold each
pre-generated step as the only completion with `rating: null`. A labeller
(a person in PRM800K's interface, or this module) fills the ratings the way
phase 2 does: the steps before the first error rated +1 and chosen, the first
wrong step rated -1 and not chosen, nothing after it, and `finish_reason`
`found_error`, `solution` (every step fine) or `give_up` (the solution stops
before an answer). `rlprm.data.prm800k.load_prm800k` reads the result back
as training records.

Labellers:

- the arithmetic task's exact checker (`--with checker`, the default): the
  problem is parsed back from its text, every step is checked exactly (the
  paper's small-scale "synthetic supervision", free here);
- a PRM (`--with PRM`): a step is wrong when its probability is below the
  threshold; the first such step is the error. This is how a large PRM
  supervises a small one (the paper's section 4 set-up): label with the large
  one, train the small one on the labels. The PRM is an rlprm folder or any
  public PRM (a folder or hub id, `--adapter FAMILY` where its files do not
  say it): it loads through `rlprm.reward.adapters.load_reward_model`, the one
  loader of every command that names a reward model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rlprm.errors import InputError
from rlprm.files import atomic_write_jsonl, read_jsonl
from rlprm.steps import is_answer_step, step_answer

UNRATED = None


class LabelError(InputError, ValueError):
    """A file or a line cannot be labelled (the message names the file and line and says why)."""


# --------------------------------------------------------------------------- arithmetic problems from text


def parse_problem_text(text: str):
    """`93 +3 -4 -7 mod 10` -> the arithmetic `Problem` (tasks/arithmetic.py owns the format); else LabelError."""
    from rlprm.tasks.arithmetic import Problem

    try:
        return Problem.parse(text)
    except ValueError as exc:
        raise LabelError(f"question.problem {exc}; the checker labels the arithmetic task's problems only: label "
                         "this file with a PRM instead (--with PRM_DIR)") from None


# --------------------------------------------------------------------------- PRM800K lines


def unlabelled_line(problem: str, steps: Sequence[str], *, verifier_score: float | None, generation: int,
                    ground_truth_answer: str | None = None, selection: str = "", extra: dict | None = None) -> dict:
    """One PRM800K phase-2 line, ready for labelling: every step a completion with `rating: null`."""
    steps = list(steps)
    answer = step_answer(steps[-1]) if steps and is_answer_step(steps[-1]) else None
    line = {
        "labeler": None,
        "timestamp": None,
        "generation": generation,
        "is_quality_control_question": False,
        "is_initial_screening_question": False,
        "question": {
            "problem": problem,
            "ground_truth_answer": ground_truth_answer,
            "pre_generated_steps": steps,
            "pre_generated_answer": answer,
            "pre_generated_verifier_score": verifier_score,
        },
        "label": {
            "steps": [{"completions": [{"text": s, "rating": UNRATED, "flagged": None}],
                       "human_completion": None, "chosen_completion": None} for s in steps],
            "total_time": None,
            "finish_reason": None,
        },
        # not PRM800K: why the line was surfaced (convincing_wrong_answer, convincing, uniform)
        "selection": selection,
    }
    if extra:
        line.update(extra)
    return line


def ratings_from_first_error(num_steps: int, first_error: int | None) -> tuple[list[int], str]:
    """(ratings of the steps a phase-2 labeller rates, finish_reason).

    No error: every step +1, `solution`. Error at k: k steps +1 then -1 (the labeller stops
    there), `found_error`. k >= num_steps (the solution stops before its answer): every step
    +1, `give_up`.
    """
    if first_error is None:
        return [1] * num_steps, "solution"
    if first_error >= num_steps:
        return [1] * num_steps, "give_up"
    return [1] * first_error + [-1], "found_error"


def apply_ratings(line: dict, first_error: int | None, labeler: str) -> dict:
    """A copy of an unlabelled line with phase-2 ratings for the given first error."""
    steps = line["question"]["pre_generated_steps"]
    ratings, finish = ratings_from_first_error(len(steps), first_error)
    out = json.loads(json.dumps(line))
    out["labeler"] = labeler
    out["label"] = {
        "steps": [{"completions": [{"text": steps[k], "rating": r, "flagged": False}],
                   "human_completion": None,
                   # phase 2: a +1 step is taken; the -1 step ends the trajectory unchosen
                   "chosen_completion": 0 if r == 1 else None} for k, r in enumerate(ratings)],
        "total_time": None,
        "finish_reason": finish,
    }
    return out


def first_error_from_probs(step_probs: Sequence[float], threshold: float = 0.5) -> int | None:
    """The first step a PRM scores below `threshold`; None when none is."""
    return next((k for k, p in enumerate(step_probs) if p < threshold), None)


def checker_first_error(problem_text: str, steps: Sequence[str], sep: str = "\n") -> int | None:
    """The exact checker's first wrong step (len(steps) when the answer step is missing)."""
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import check

    result = check(parse_problem_text(problem_text), render_steps(list(steps), sep), sep)
    if len(result.steps) != len(steps):
        # the steps were split differently than written: refused rather than guessed
        # the answer step (`# Answer\n\n2`) holds newlines by its format and is rendered whole
        inside = next((k for k, step in enumerate(steps)
                       if not is_answer_step(step) and (sep in step.strip(sep) or not step.strip())), None)
        what = (f"step {inside + 1} ({steps[inside]!r}) " + ("is empty" if not steps[inside].strip()
                                                             else f"holds the separator {sep!r}")
                if inside is not None else f"they do not split back apart at the separator {sep!r}")
        raise LabelError(f"question.pre_generated_steps of {problem_text!r}: {what}, so the checker would not see "
                         "the steps as written; give --sep a string no step holds")
    return result.first_error


# --------------------------------------------------------------------------- files


def read_lines(path: Path) -> list[dict]:
    """The lines of a label file, each checked to hold its steps; LabelError naming FILE:LINE otherwise."""
    return [obj for _, obj in read_numbered_lines(path)]


def read_numbered_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, line) of every line of a label file, as `read_lines` checks them."""
    out = []
    for lineno, obj in read_jsonl(path, LabelError):
        steps = (obj.get("question") or {}).get("pre_generated_steps") if isinstance(obj, dict) else None
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise LabelError(f"{path}:{lineno}: no `question.pre_generated_steps` (a list of step strings); "
                             "label files written by `rlprm select` or PRM800K phase-2 lines")
        out.append((lineno, obj))
    return out


def load_labeller(labeller: str, adapter: str | None = None, device: str = "cpu", **options):
    """The PRM named by `labeller` (a folder or hub id, family `adapter` or detected), refused if it is an ORM.

    `options` go to `load_reward_model` (reference / beta for the implicit family, system_prompt, dtype).
    """
    from rlprm.reward.adapters import load_reward_model

    rm = load_reward_model(labeller, adapter, device=device, **options)
    if rm.kind != "prm":
        raise LabelError(f"{labeller} is an ORM; labelling steps needs a PRM")
    return rm


def labeller_name(labeller) -> str:
    """What goes into a labelled line's `labeler` field: `checker`, or `prm:` + the folder (resolved) or hub id."""
    if labeller == "checker":
        return "checker"
    if hasattr(labeller, "score_steps"):  # a loaded model: a public PRM keeps its name, ours its config's path
        ref = str(getattr(labeller, "name", None) or labeller.model.config.name_or_path)
    else:
        ref = str(labeller)
    return f"prm:{Path(ref).resolve() if Path(ref).exists() else ref}"


def label_lines(lines: list[dict], labeller="checker", threshold: float = 0.5, sep: str = "\n",
                device: str = "cpu", batch_size: int = 64, adapter: str | None = None,
                where: Sequence[str] | None = None, **load_options) -> tuple[list[dict], dict]:
    """Labelled copies of `lines` and counts.

    `where`: each line's place (`FILE:LINE`), put before the checker's complaint about a line it cannot label.

    `labeller`: `checker`; a PRM by folder or hub id (loaded with `load_labeller(labeller, adapter, device,
    **load_options)`); or a reward model already loaded (anything with `score_steps`, e.g. when a loop labels
    many files with the same PRM).
    """
    from collections import Counter

    counts: Counter = Counter()
    name = labeller_name(labeller)
    if labeller == "checker":
        firsts = []
        for k, line in enumerate(lines):
            try:
                firsts.append(checker_first_error(line["question"]["problem"], line["question"]["pre_generated_steps"],
                                                  sep))
            except LabelError as exc:
                if where is None:
                    raise
                raise LabelError(f"{where[k]}: {exc}") from None
    else:
        rm = labeller if hasattr(labeller, "score_steps") else load_labeller(labeller, adapter, device,
                                                                               **load_options)
        probs = rm.score_steps([line["question"]["problem"] for line in lines],
                               [line["question"]["pre_generated_steps"] for line in lines], batch_size=batch_size)
        firsts = [first_error_from_probs(p, threshold) for p in probs]
    out = []
    for line, first in zip(lines, firsts):
        labelled = apply_ratings(line, first, name)
        counts[labelled["label"]["finish_reason"]] += 1
        out.append(labelled)
    counts["lines"] = len(out)
    return out, dict(counts)


def label_file(src: Path, dst: Path, labeller: str = "checker", threshold: float = 0.5, sep: str = "\n",
               device: str = "cpu", adapter: str | None = None, **load_options) -> dict:
    """`rlprm label`: read unlabelled (or labelled) PRM800K lines, rate every step, write them to `dst`.

    `adapter` / `load_options`: how a PRM labeller loads (see `load_labeller`)."""
    numbered = read_numbered_lines(src)
    lines = [line for _, line in numbered]
    labelled, counts = label_lines(lines, labeller, threshold, sep, device, adapter=adapter,
                                   where=[f"{src}:{lineno}" for lineno, _ in numbered], **load_options)
    atomic_write_jsonl(dst, labelled)
    return counts
