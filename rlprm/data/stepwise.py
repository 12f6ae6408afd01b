"""Step-labelled solutions: the one record form every reward-model loader returns.

A `LabelledSolution` is a problem, its steps, and one label per step: a class
id (`CORRECT`, `INCORRECT`, `NEUTRAL`) or None where the step is not
supervised. Following the paper, supervision runs up to and including the
first wrong step; the steps after it carry None. Outcome facts
(`answer_correct`, `process_correct`) travel along for ORMs and evaluation.

This module also produces such records for the embedded arithmetic task, the
paper's small-scale "synthetic supervision": sample the generator, then label
every step with the task's exact checker. Samples are cached as JSONL (first
line: the settings they were drawn with), written atomically, so a re-run with
the same generator and settings skips sampling, and a changed generator or
setting is resampled rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlprm.files import atomic_write_jsonl

INCORRECT, CORRECT, NEUTRAL = 0, 1, 2
LABEL_NAMES = ["incorrect", "correct", "neutral"]
"""Class id -> name; a 2-class PRM uses the first two."""


@dataclass
class LabelledSolution:
    problem: str
    """The problem text (a reward model formats it with its prompt template)."""
    steps: list[str]
    labels: list[int | None]
    """One per step: CORRECT, INCORRECT, NEUTRAL, or None (not supervised)."""
    answer_correct: bool | None = None
    """Final answer right (None: unknown)."""
    process_correct: bool | None = None
    """Every step right and the answer right (None: unknown)."""
    first_error: int | None = None
    """Index of the first wrong step; None when there is none (or process_correct is None)."""
    group: str = ""
    """Solutions of the same problem share a group (for per-problem comparisons)."""
    source: str = ""
    """Where the record came from, e.g. `arithmetic`, `prm800k/phase1.jsonl:12`."""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.labels) != len(self.steps):
            raise ValueError(f"{len(self.steps)} steps but {len(self.labels)} labels ({self.source or 'record'})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LabelledSolution":
        return cls(**data)


def labels_up_to_first_error(num_steps: int, first_error: int | None) -> list[int | None]:
    """CORRECT before the first error, INCORRECT at it, None after it (the paper's supervision)."""
    if first_error is None or first_error >= num_steps:
        return [CORRECT] * num_steps
    return [CORRECT] * first_error + [INCORRECT] + [None] * (num_steps - first_error - 1)


# --------------------------------------------------------------------------- JSONL with a settings header


def write_records(path: Path, records: list[LabelledSolution], meta: dict) -> None:
    """First line `{"meta": ...}`, then one record per line; written to a temporary file, then renamed."""
    atomic_write_jsonl(path, [{"meta": meta}, *(record.to_dict() for record in records)])


def read_records(path: Path) -> tuple[dict, list[LabelledSolution]]:
    with Path(path).open() as f:
        head = json.loads(f.readline())
        records = [LabelledSolution.from_dict(json.loads(line)) for line in f if line.strip()]
    return head.get("meta", {}), records


def model_fingerprint(path: str | Path) -> str:
    """Identifies a checkpoint folder's weights (names, sizes, modification times), to invalidate caches."""
    path = Path(path)
    if not path.is_dir():
        return str(path)
    parts = []
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- arithmetic


def label_arithmetic_sample(problem, text: str, sep: str) -> tuple[LabelledSolution | None, str]:
    """One sampled solution -> (record, status). Status: `ok`, `malformed`, `truncated` or `empty` (record None).

    A malformed sample (a step that does not parse) is kept: the checker marks the first
    unparseable step wrong, so it is the first error, exactly the kind of step a PRM must flag.
    A sample that stops before its answer step has all present steps labelled as the checker
    says and `first_error = len(steps)`: the missing answer is the error, and no step carries it.
    """
    from rlprm.tasks.arithmetic import check

    result = check(problem, text, sep)
    if not result.steps:
        return None, "empty"
    n = len(result.steps)
    labels = labels_up_to_first_error(n, result.first_error)
    status = "ok"
    if result.first_error is not None and result.first_error >= n:
        status = "truncated"
    elif not result.well_formed:
        status = "malformed"
    record = LabelledSolution(
        problem=problem.text,
        steps=result.steps,
        labels=labels,
        answer_correct=result.answer_correct,
        process_correct=result.process_correct,
        first_error=result.first_error,
        group=problem.text,
        source="arithmetic",
        meta={"shortcut": result.shortcut},
    )
    return record, status


def sample_arithmetic(model, tokenizer, problems, n: int, *, temperature: float, max_new_tokens: int, batch_size: int,
                      seed: int, sep: str, progress: bool = True, desc: str = "sampling") -> tuple[list[LabelledSolution], dict]:
    """Sample `n` solutions per problem and label them; returns the records and counts by status."""
    from rlprm.sampling import sample

    out = sample(model, tokenizer, [p.prompt for p in problems], n=n, temperature=temperature,
                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress, desc=desc)
    records: list[LabelledSolution] = []
    counts = {"samples": 0, "ok": 0, "malformed": 0, "truncated": 0, "empty": 0}
    for problem, texts in zip(problems, out.texts):
        for text in texts:
            counts["samples"] += 1
            record, status = label_arithmetic_sample(problem, text, sep)
            counts[status] += 1
            if record is not None:
                records.append(record)
    return records, counts


def problems_digest(problems) -> str:
    """A short sha256 of the problems' texts, in order: a cache of samples records which problems it holds."""
    return hashlib.sha256("\n".join(p.text for p in problems).encode()).hexdigest()[:16]


def load_or_sample(path: Path, meta: dict, make) -> tuple[list[LabelledSolution], dict, bool]:
    """Records cached at `path` when they were drawn with exactly `meta`; else `make()` -> (records, counts), cached.

    Returns (records, counts, from_cache).
    """
    path = Path(path)
    if path.exists():
        try:
            cached_meta, records = read_records(path)
        except (OSError, ValueError, TypeError, KeyError):
            cached_meta, records = None, []
        if cached_meta is not None and cached_meta.get("settings") == meta:
            return records, cached_meta.get("counts", {}), True
    records, counts = make()
    write_records(path, records, {"settings": meta, "counts": counts})
    return records, counts, False


def arithmetic_pool(recipe, cache_dir: Path, progress: bool = True, shared_dir: Path | None = None,
                    what: str = "solutions") -> dict[str, tuple[list[LabelledSolution], dict, bool, Path]]:
    """rm.data's training and held-out samples of model.generator on the arithmetic task, labelled by the checker.

    The one home of the reward-model sample pool: `rlprm train-rm`, active learning and synthetic supervision
    draw the same pool, and the settings record below names its cache, so a pool one job drew is found by the
    others. Per split ("train", "eval"): (records, counts, from_cache, path). `cache_dir/rm_samples_SPLIT.jsonl`
    is read when it was drawn with exactly these settings, else (re)written; a matching file in `shared_dir` is
    read first and never rewritten. `what` names the samples in the progress bar.
    """
    from rlprm.data.problems import reward_model_arithmetic

    data, sep, gen_path = recipe.rm.data, recipe.task.step_separator, recipe.model.generator
    # the held-out side is drawn like `rlprm prepare`'s (same seed): the generator never trained on it; the
    # training side skips the generator's SFT problems
    train_problems, eval_problems = reward_model_arithmetic(recipe)
    base = {"generator": str(gen_path), "fingerprint": model_fingerprint(gen_path), "seed": recipe.run.seed,
            "temperature": data.temperature, "max_new_tokens": data.max_new_tokens, "sep": sep,
            "task": recipe.task.arithmetic.model_dump(mode="json")}
    state: dict = {}
    out = {}
    for split, problems, n, seed in (("train", train_problems, data.samples_per_problem, recipe.run.seed * 7 + 1),
                                     ("eval", eval_problems, data.eval_samples_per_problem, recipe.run.seed * 7 + 2)):
        meta = dict(base, split=split, problems=len(problems), problems_sha256=problems_digest(problems),
                    samples_per_problem=n)
        name = f"rm_samples_{split}.jsonl"
        shared = Path(shared_dir) / name if shared_dir is not None else None
        if shared is not None and shared.is_file():
            try:
                cached_meta, records = read_records(shared)
            except (OSError, ValueError, TypeError, KeyError):
                cached_meta, records = {}, []
            if cached_meta.get("settings") == meta:
                out[split] = (records, cached_meta.get("counts", {}), True, shared)
                continue

        def make(problems=problems, n=n, seed=seed, split=split):
            if "model" not in state:  # loaded once, and only when a split is not cached
                from rlprm.models import load_causal_lm, load_tokenizer, quiet_transformers, resolve_device

                state["tokenizer"] = load_tokenizer(gen_path, padding_side="left")
                with quiet_transformers(report=False):
                    state["model"] = load_causal_lm(gen_path, device=resolve_device(recipe.run.device))
            return sample_arithmetic(state["model"], state["tokenizer"], problems, n, temperature=data.temperature,
                                     max_new_tokens=data.max_new_tokens, batch_size=data.sample_batch_size,
                                     seed=seed, sep=sep, progress=progress, desc=f"sampling {split} {what}")

        path = Path(cache_dir) / name
        records, counts, cached = load_or_sample(path, meta, make)
        out[split] = (records, counts, cached, path)
    state.clear()
    return out


def label_summary(records: list[LabelledSolution]) -> dict[str, float | int]:
    """Counts of records, labelled steps by class, and outcome rates (for logs)."""
    labels = [y for r in records for y in r.labels if y is not None]
    known_answer = [r for r in records if r.answer_correct is not None]
    known_process = [r for r in records if r.process_correct is not None]
    out: dict[str, float | int] = {
        "records": len(records),
        "labelled_steps": len(labels),
        "steps_correct": sum(y == CORRECT for y in labels),
        "steps_incorrect": sum(y == INCORRECT for y in labels),
        "steps_neutral": sum(y == NEUTRAL for y in labels),
    }
    if known_answer:
        out["answer_correct_rate"] = sum(r.answer_correct for r in known_answer) / len(known_answer)
    if known_process:
        out["process_correct_rate"] = sum(r.process_correct for r in known_process) / len(known_process)
        out["right_answer_wrong_process_rate"] = sum(
            bool(r.answer_correct) and not r.process_correct for r in known_process) / len(known_process)
    return out
