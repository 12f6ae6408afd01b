"""ProcessBench (Qwen's benchmark of first-error identification) -> records for evaluation.

A ProcessBench file is a JSON list of `{id, generator, problem, steps,
final_answer_correct, label}`, where `label` is the index of the earliest wrong
step, or -1 when every step is right. Each item becomes a `LabelledSolution`
with `first_error` (None for -1), step labels up to and including it, and the
outcome flags. The metric (`rlprm.reward.metrics.first_error_f1`) asks a PRM to find
exactly that step.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlprm.data.stepwise import LabelledSolution, labels_up_to_first_error
from rlprm.errors import InputError
from rlprm.files import json_problem, not_text


class ProcessBenchError(InputError, ValueError):
    """The file is not ProcessBench data (the message says where and why)."""


def load_processbench(path: str | Path, limit: int = 0) -> list[LabelledSolution]:
    """Records of one ProcessBench JSON file; with `limit` > 0, that many items evenly spaced through it.

    Evenly spaced, not the first ones: the files list all solutions with an error before the
    error-free ones, so a prefix would hold only one kind and first-error F1 would be undefined.
    """
    path = Path(path)
    if not path.is_file():
        raise ProcessBenchError(f"{path}: ProcessBench file not found (point rm.data.processbench_paths at your copy)")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProcessBenchError(f"{path}:{exc.lineno}: not valid JSON ({json_problem(exc)})") from None
    except UnicodeDecodeError as exc:
        raise ProcessBenchError(f"{path}: {not_text(exc)}") from None
    if not isinstance(items, list):
        raise ProcessBenchError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    if 0 < limit < len(items):
        items = [items[i * len(items) // limit] for i in range(limit)]
    records = []
    for i, item in enumerate(items):
        where = f"{path}: item {i} (id {item.get('id', '?') if isinstance(item, dict) else '?'})"
        if not isinstance(item, dict):
            raise ProcessBenchError(f"{where}: an item must be an object")
        steps, label = item.get("steps"), item.get("label")
        if not isinstance(item.get("problem"), str) or not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise ProcessBenchError(f"{where}: needs `problem` (a string) and `steps` (a list of strings)")
        if not isinstance(label, int) or not -1 <= label < len(steps):
            raise ProcessBenchError(f"{where}: `label` must be -1 or a step index below {len(steps)}, got {label!r}")
        first_error = None if label == -1 else label
        answer_correct = item.get("final_answer_correct")
        records.append(LabelledSolution(
            problem=item["problem"],
            steps=list(steps),
            labels=labels_up_to_first_error(len(steps), first_error),
            answer_correct=bool(answer_correct) if answer_correct is not None else None,
            process_correct=first_error is None,
            first_error=first_error,
            group=item["problem"],
            source=f"{path.name}:{item.get('id', i)}",
            meta={"generator": item.get("generator")},
        ))
    return records
