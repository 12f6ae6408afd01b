"""PRM800K (phase 1 and phase 2 JSONL) -> step-labelled records.

Each line of PRM800K is one labelled trajectory (schema: openai/prm800k's
README). How a line becomes records:

- The trajectory: at each step, the completion named by `chosen_completion`,
  else the `human_completion` (phase 1 lets a labeler write their own step when
  every candidate was rated -1; the README calls it a +1 step, so it is
  labelled correct although its `rating` field is null). The first step with
  neither ends the trajectory. In phase 2 that step's first completion is the
  pre-generated step where the labeler found the error (it matches
  `question.pre_generated_steps`), so it is the trajectory's last step.
- Labels from ratings: +1 correct, -1 incorrect, 0 by `neutral_as`
  (`positive`, the paper's choice; `negative`; `ignore`, no label; `neutral`,
  a third class), null skipped and counted. Supervision runs up to and
  including the first -1; later steps get no label.
- Alternatives (`alternatives=True`): every other rated completion of a step
  becomes one more record, the trajectory's prefix then the alternative, with
  a label on the alternative only (the prefix's labels are in the main record
  already). Alternatives after a -1 in the prefix are beyond supervision and
  skipped. Phase 1 has many; phase 2 has them only at the error step.
- Dropped by default, and counted: quality-control questions, initial-screening
  questions, and problems the labeler reported as broken (`bad_problem`).

A Git LFS pointer stub (what a clone without git-lfs holds) is recognised and
the error says how to get the real file. A malformed line raises with
`file:line` and the reason, or is skipped and counted with `on_bad_line="skip"`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rlprm.data.stepwise import CORRECT, INCORRECT, NEUTRAL, LabelledSolution
from rlprm.errors import InputError
from rlprm.files import json_problem, not_text

LFS_MARK = "version https://git-lfs.github.com/spec/v1"
NEUTRAL_CHOICES = ("positive", "negative", "ignore", "neutral")


class PRM800KError(InputError, ValueError):
    """The file is not usable PRM800K data (the message says where and why)."""


class _BadLine(ValueError):
    """A line that does not follow the PRM800K schema (the reason is the message)."""


def check_not_lfs_stub(path: Path) -> None:
    """Raise PRM800KError if `path` is missing, empty, or a Git LFS pointer instead of the data."""
    path = Path(path)
    if not path.is_file():
        raise PRM800KError(f"{path}: PRM800K file not found (point rm.data.train_paths / eval_paths at your copy)")
    with path.open("rb") as f:
        head = f.read(512)
    if not head.strip():
        raise PRM800KError(f"{path}: the file is empty")
    if head.startswith(LFS_MARK.encode()):
        size = next((line.split()[1] for line in head.decode(errors="replace").splitlines()
                     if line.startswith("size ") and len(line.split()) > 1), "?")
        raise PRM800KError(
            f"{path} is a Git LFS pointer stub, not the data (the real file is {size} bytes). "
            "Install git-lfs and fetch the files in your clone of openai/prm800k: "
            "`git lfs install && git lfs pull` (or re-clone after `git lfs install`)."
        )


def rating_label(rating, neutral_as: str) -> int | None:
    """A PRM800K rating -> class id, or None (no label)."""
    if rating is None:
        return None
    if rating == 1:
        return CORRECT
    if rating == -1:
        return INCORRECT
    if rating == 0:
        return {"positive": CORRECT, "negative": INCORRECT, "ignore": None, "neutral": NEUTRAL}[neutral_as]
    raise _BadLine(f"rating {rating!r} is not 1, 0, -1 or null")


def _completion(c, where: str) -> tuple[str, object]:
    if not isinstance(c, dict) or not isinstance(c.get("text"), str):
        raise _BadLine(f"{where}: a completion must be an object with a `text` string")
    return c["text"], c.get("rating")


def parse_line(obj, neutral_as: str = "positive", alternatives: bool = True, source: str = "",
               counts: Counter | None = None) -> list[LabelledSolution]:
    """One decoded PRM800K line -> its records (main trajectory first). Raises _BadLine on schema errors."""
    counts = Counter() if counts is None else counts
    if not isinstance(obj, dict):
        raise _BadLine("a line must be a JSON object")
    question, label = obj.get("question"), obj.get("label")
    if not isinstance(question, dict) or not isinstance(question.get("problem"), str):
        raise _BadLine("missing `question.problem`")
    if not isinstance(label, dict) or not isinstance(label.get("steps"), list):
        raise _BadLine("missing `label.steps` (a list)")
    problem = question["problem"]
    pre_generated = question.get("pre_generated_steps") or []
    finish = label.get("finish_reason")

    # 1. the trajectory: (text, rating, step index, completion index taken or None)
    taken: list[tuple[str, object]] = []
    taken_index: list[int | None] = []
    stop: int | None = None
    for k, step in enumerate(label["steps"]):
        if not isinstance(step, dict) or not isinstance(step.get("completions"), list):
            raise _BadLine(f"label.steps[{k}] must be an object with a `completions` list")
        completions = [_completion(c, f"label.steps[{k}].completions[{j}]") for j, c in enumerate(step["completions"])]
        chosen, human = step.get("chosen_completion"), step.get("human_completion")
        if chosen is not None:
            if not isinstance(chosen, int) or not 0 <= chosen < len(completions):
                raise _BadLine(f"label.steps[{k}].chosen_completion {chosen!r} is not an index into its {len(completions)} completions")
            taken.append(completions[chosen])
            taken_index.append(chosen)
        elif human is not None:
            text = human.get("text") if isinstance(human, dict) else human
            if not isinstance(text, str):
                raise _BadLine(f"label.steps[{k}].human_completion has no text")
            taken.append((text, 1))  # a labeler's own step, written because every candidate was -1
            taken_index.append(None)
            counts["human_steps"] += 1
        else:
            stop = k
            # phase 2: the pre-generated step where the error was found continues the trajectory
            if completions and k < len(pre_generated) and completions[0][0] == pre_generated[k]:
                taken.append(completions[0])
                taken_index.append(0)
            else:
                taken_index.append(None)
            break

    # 2. labels: supervise up to and including the first -1
    labels: list[int | None] = []
    first_error = None
    for i, (_, rating) in enumerate(taken):
        if first_error is not None:
            labels.append(None)
            continue
        if rating is None:
            counts["null_ratings"] += 1
        elif rating == 0:
            counts["neutral_ratings"] += 1
        labels.append(rating_label(rating, neutral_as))
        if rating == -1:
            first_error = i
    records: list[LabelledSolution] = []
    if taken:
        has_null = any(r is None for _, r in taken[: (first_error + 1) if first_error is not None else None])
        if first_error is not None:
            process_correct = False
        elif finish == "solution" and not has_null:
            process_correct = True
        else:
            process_correct = None
        records.append(LabelledSolution(
            problem=problem,
            steps=[t for t, _ in taken],
            labels=labels,
            answer_correct=True if finish == "solution" else None,  # "solution": the labeler reached the right answer
            process_correct=process_correct,
            first_error=first_error,
            group=problem,
            source=source,
            meta={"finish_reason": finish, "generation": obj.get("generation")},
        ))
        counts["trajectories"] += 1

    # 3. alternatives: prefix + another rated completion, labelled at its end only
    if alternatives:
        steps_json = label["steps"][: (stop + 1) if stop is not None else None]
        for k, step in enumerate(steps_json):
            if first_error is not None and k > first_error:
                break  # the prefix already holds a wrong step
            prefix = [t for t, _ in taken[:k]]
            used = taken_index[k] if k < len(taken_index) else None
            used_text = taken[k][0] if k < len(taken) else None
            for j, c in enumerate(step["completions"]):
                if j == used:
                    continue
                text, rating = _completion(c, f"label.steps[{k}].completions[{j}]")
                if text == used_text:
                    continue
                if rating is None:
                    counts["null_ratings"] += 1
                    continue
                if rating == 0:
                    counts["neutral_ratings"] += 1
                y = rating_label(rating, neutral_as)
                if y is None:
                    continue
                records.append(LabelledSolution(
                    problem=problem,
                    steps=prefix + [text],
                    labels=[None] * k + [y],
                    process_correct=False if y == INCORRECT else None,
                    first_error=k if y == INCORRECT else None,
                    group=problem,
                    source=source,
                    meta={"alternative_of_step": k},
                ))
                counts["alternatives"] += 1
    return records


def load_prm800k(
    path: str | Path,
    neutral_as: str = "positive",
    keep_quality_control: bool = False,
    keep_screening: bool = False,
    keep_bad_problems: bool = False,
    alternatives: bool = True,
    on_bad_line: str = "error",
) -> tuple[list[LabelledSolution], dict[str, int]]:
    """Records and counts from one PRM800K JSONL file (see the module docstring)."""
    if neutral_as not in NEUTRAL_CHOICES:
        raise ValueError(f"neutral_as must be one of {', '.join(NEUTRAL_CHOICES)}, got {neutral_as!r}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be `error` or `skip`, got {on_bad_line!r}")
    path = Path(path)
    check_not_lfs_stub(path)
    counts: Counter = Counter()
    records: list[LabelledSolution] = []
    with path.open("rb") as f:  # decoded line by line, so that a binary file's error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PRM800KError(f"{path}:{lineno}: {not_text(exc)}") from None
            if not line.strip():
                continue
            counts["lines"] += 1
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _BadLine(f"not valid JSON ({json_problem(exc)})") from None
                if isinstance(obj, dict) and obj.get("is_quality_control_question") and not keep_quality_control:
                    counts["dropped_quality_control"] += 1
                    continue
                if isinstance(obj, dict) and obj.get("is_initial_screening_question") and not keep_screening:
                    counts["dropped_screening"] += 1
                    continue
                if (isinstance(obj, dict) and isinstance(obj.get("label"), dict)
                        and obj["label"].get("finish_reason") == "bad_problem" and not keep_bad_problems):
                    counts["dropped_bad_problem"] += 1
                    continue
                line_counts: Counter = Counter()
                found = parse_line(obj, neutral_as, alternatives, f"{path.name}:{lineno}", line_counts)
            except _BadLine as exc:
                if on_bad_line == "skip":
                    counts["skipped_bad_lines"] += 1
                    continue
                raise PRM800KError(
                    f"{path}:{lineno}: {exc} (set rm.data.on_bad_line: skip to skip and count such lines)"
                ) from None
            counts.update(line_counts)
            records.extend(found)
    counts["records"] = len(records)
    counts["labelled_steps"] = sum(y is not None for r in records for y in r.labels)
    return records, dict(counts)


def load_many(paths, **kwargs) -> tuple[list[LabelledSolution], dict[str, int]]:
    """`load_prm800k` over several files; counts summed."""
    total: Counter = Counter()
    records: list[LabelledSolution] = []
    for path in paths:
        found, counts = load_prm800k(path, **kwargs)
        records.extend(found)
        total.update(counts)
    return records, dict(total)
