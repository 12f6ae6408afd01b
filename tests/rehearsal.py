"""The rehearsal's pieces (tests/test_rehearsal.py): MATH training solutions rewritten into the real-size recipes'
format, the policy's fine-tuning on them, and the checks of what a user needs to be true of a run, read from what
tests/rehearsal_probe.py recorded. The checks are plain functions over records so that a fast test can show that a
degenerate run (nothing answered, every reward equal, advantages all zero) fails them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- MATH solutions in the recipes' format

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _unbox(text: str) -> str:
    """`\\boxed{X}` -> `X` everywhere (braces matched), so that the answer is boxed once, in the last step."""
    out, i = [], 0
    while True:
        j = text.find("\\boxed{", i)
        if j < 0:
            return "".join(out) + text[i:]
        out.append(text[i:j])
        depth, k = 1, j + len("\\boxed{")
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        out.append(text[j + len("\\boxed{"): k - 1])
        i = k


def recipe_steps(solution: str, answer: str) -> list[str]:
    """A MATH reference solution as the real-size recipes' prompt asks for it: steps (its paragraphs, or its
    sentences when it has one paragraph) and a last step with the answer in `\\boxed{}`, the form Qwen2.5-Math
    writes and the grader extracts."""
    body = _unbox(solution).strip()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    if len(paragraphs) == 1:
        paragraphs = [s.strip() for s in _SENTENCE_END.split(paragraphs[0]) if s.strip()]
    # a step must not hold the separator itself (a solution's own blank lines would split it again)
    steps = [re.sub(r"\n\s*\n", "\n", p) for p in paragraphs]
    return steps + [f"The final answer is $\\boxed{{{answer}}}$."]


def short_math_problems(path: Path, n: int, max_problem: int = 120, max_solution: int = 160) -> list[dict]:
    """The first `n` problems of MATH's training split with a short statement and solution and an answer: cheap to
    fine-tune on and to generate, so the policy can learn to write their solutions in a few hundred steps."""
    rows = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if row.get("answer") and len(row["problem"]) <= max_problem and len(row["solution"]) <= max_solution:
            rows.append(row)
        if len(rows) == n:
            break
    return rows


@dataclass
class FineTuned:
    folder: Path
    stats: dict
    """train_sft's (steps, losses, seconds), the problems' count and the greedy check's numbers."""


def fine_tune_policy(base, tokenizer, rows: list[dict], template: str, sep: str, folder: Path, steps: int,
                     batch_size: int = 8, learning_rate: float = 3e-3, seed: int = 0) -> dict:
    """Fine-tune `base` in place on `rows` written as `template.format(problem) + steps joined by sep` (loss on the
    completion and EOS) with rlprm's own SFT loop, then save it with the tokenizer to `folder`."""
    from rlprm.config import SFTConfig
    from rlprm.experiments.sft import encode_completions, train_sft

    prompts = [template.format(problem=r["problem"]) for r in rows]
    completions = [sep.join(recipe_steps(r["solution"], r["answer"])) for r in rows]
    encoded = encode_completions(tokenizer, prompts, completions)
    cfg = SFTConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=min(20, steps // 5),
                    logging_steps=max(1, steps // 10))
    stats = train_sft(base, encoded, cfg, pad_id=tokenizer.pad_token_id, seed=seed, progress=False)
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stats["tokens_per_example"] = sum(len(x) for x in encoded.ids) / len(encoded.ids)
    return stats


# --------------------------------------------------------------------------- reading a probed run


def read_probe(folder: Path, what: str) -> list[dict]:
    """Every record of kind `what` (grades, rewards, advantages) of every rank, rank 0's first."""
    out = []
    for path in sorted(Path(folder).glob(f"{what}_rank*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def independent_step_token_ends(text: str, ids: list[int], tokenizer, sep: str) -> list[int]:
    """Token index of each step's end in a generated response, worked out here without rlprm's step functions:
    a step ends after its separator (the last step, at its last non-space character); its token is the first whose
    decoded prefix reaches that character."""
    ends, pos = [], 0
    pieces = text.split(sep)
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        if piece.strip():
            ends.append(pos + len(piece.rstrip()) if last else pos + len(piece) + len(sep))
        pos += len(piece) + len(sep)
    reach = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False))
             for i in range(len(ids))]
    return [next(i for i, r in enumerate(reach) if r >= e) for e in ends]


@dataclass
class Signal:
    """What a run's rewards carried, from its probe records."""

    samples: int = 0
    answered: int = 0
    correct: int = 0
    returns: list[float] = field(default_factory=list)
    advantages_nonzero: int = 0
    advantages_count: int = 0
    problems: list[str] = field(default_factory=list)
    """Each disagreement found (grades vs the grader, answered vs the grader's extraction, PRM events vs the step
    ends, outcomes vs the grades), in words."""

    @property
    def answered_frac(self) -> float:
        return self.answered / self.samples if self.samples else 0.0

    @property
    def reward_std(self) -> float:
        if len(self.returns) < 2:
            return 0.0
        m = sum(self.returns) / len(self.returns)
        return (sum((r - m) ** 2 for r in self.returns) / (len(self.returns) - 1)) ** 0.5

    def as_dict(self) -> dict:
        return {"samples": self.samples, "answered_frac": self.answered_frac, "correct": self.correct,
                "reward_std": self.reward_std, "advantages_nonzero": self.advantages_nonzero,
                "advantages_count": self.advantages_count, "problems": self.problems[:20]}


def rl_signal(grades: list[dict], rewards: list[dict], advantages: list[dict], tokenizer=None,
              check_events: bool = True) -> Signal:
    """Check a run's records against the grader and the text, and sum up its reward signal.

    grades: `grade_samples` calls (texts, gold answers, the verdicts the run used); rewards: `token_rewards` calls;
    advantages: the advantages computed. With a tokenizer (the policy's), dense rewards' events are checked against
    every step end of each answered response, worked out independently (`independent_step_token_ends`)."""
    from rlprm.grading import extract_answer, is_equiv_many

    sig = Signal()
    verdict: dict[str, bool] = {}  # text -> the run's verdict (a text graded twice must get the same one)
    pairs, where = [], []
    for rec in grades:
        for gold, texts, answers, correct in zip(rec["golds"], rec["texts"], rec["answers"], rec["correct"]):
            for text, answer, ok in zip(texts, answers, correct):
                mine = extract_answer(text)
                if mine != answer:
                    sig.problems.append(f"the run extracted {answer!r}, the grader {mine!r} from {text[-80:]!r}")
                pairs.append((mine, gold))
                where.append((text, ok))
    for (text, ok), mine in zip(where, is_equiv_many(pairs) if pairs else []):
        if bool(mine) != bool(ok):
            sig.problems.append(f"the run graded {ok}, the grader {bool(mine)}: {text[-80:]!r}")
        verdict[text] = bool(ok)

    for rec in rewards:
        sep = rec["sep"]
        for i, text in enumerate(rec["texts"]):
            sig.samples += 1
            missing, truncated = rec["missing"][i], rec["truncated"][i]
            answered_by_grader = extract_answer(text) is not None and not truncated
            if missing == answered_by_grader:
                sig.problems.append(f"the reward path says {'missing' if missing else 'answered'}, the grader "
                                    f"{'answered' if answered_by_grader else 'missing'} (truncated {truncated}): "
                                    f"{text[-80:]!r}")
            if not missing:
                sig.answered += 1
            if rec["outcomes"] is not None:
                ok = rec["outcomes"][i] == 1.0
                sig.correct += ok
                if text in verdict and verdict[text] != ok:
                    sig.problems.append(f"the reward's outcome {ok} is not the grade {verdict[text]}: {text[-80:]!r}")
            sig.returns.append(rec["returns"][i])
            if rec["mode"] == "dense" and not missing and check_events and tokenizer is not None:
                ids = rec["ids"][i]
                kept = ids[: rec["max_tokens"]] if rec["max_tokens"] else ids
                ends = independent_step_token_ends(text, kept, tokenizer, sep)
                if rec["scores"] is not None and len(rec["scores"][i]) != len(ends):
                    sig.problems.append(f"the PRM scored {len(rec['scores'][i])} steps of {len(ends)}: {text[-80:]!r}")
                if rec["last_event_at_eos"] and ends:
                    ends[-1] = len(kept) - 1
                if rec["event_positions"][i] != ends:
                    sig.problems.append(f"PRM events at tokens {rec['event_positions'][i]}, step ends at {ends}: "
                                        f"{text[-80:]!r}")
    for rec in advantages:
        sig.advantages_nonzero += rec["nonzero"]
        sig.advantages_count += rec["count"]
    return sig


def assert_healthy(sig: Signal, min_answered: float = 0.5) -> None:
    """What a user needs of a run's reward signal: most responses answered, rewards that differ, advantages that are
    not all zero, and no disagreement with the grader or the text. Raises AssertionError naming what failed."""
    failures = []
    if sig.samples == 0:
        failures.append("no sample was rewarded")
    if sig.answered_frac <= min_answered:
        failures.append(f"only {sig.answered}/{sig.samples} responses answered (need more than {min_answered:.0%})")
    if sig.reward_std <= 0:
        failures.append(f"every reward is the same ({sig.returns[:1]}): nothing to learn from")
    if sig.advantages_nonzero == 0:
        failures.append(f"all {sig.advantages_count} advantages are 0")
    failures += sig.problems
    assert not failures, "; ".join(failures[:12])


def weights_moved(before: Path, after: Path) -> float:
    """The fraction of parameter tensors of `after` (an exported HF folder) that differ from `before`'s."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(before), tensors(after)
    shared = [k for k in a if k in b]
    assert shared, f"no parameter names shared between {before} and {after}"
    return sum(not a[k].float().equal(b[k].float()) for k in shared) / len(shared)


def export_generates(folder: Path, prompt: str, new_tokens: int = 4) -> str:
    """Load an exported policy as any user would (AutoModelForCausalLM / AutoTokenizer) and generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + new_tokens
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def greedy_check(model, tokenizer, rows: list[dict], template: str, max_new_tokens: int) -> dict:
    """Greedy solutions of `rows`' problems: how many write a `\\boxed{}` answer (the grader extracts one), how many
    are right, and one of the texts."""
    import torch

    from rlprm.grading import extract_answer, is_equiv_many

    tokenizer.padding_side = "left"
    batch = tokenizer([template.format(problem=r["problem"]) for r in rows], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    answers = [extract_answer(t) for t in texts]
    right = is_equiv_many([(a, r["answer"]) for a, r in zip(answers, rows)])
    return {"problems": len(rows), "answered": sum(a is not None for a in answers), "correct": int(sum(right)),
            "example": texts[0]}
