"""Reward hacking: hand-made completions of one problem, every reward form, every algorithm's view of the reward.

One arithmetic problem (93 +3 -4 mod 10, answer 2) and eight completions of it:
the reference; the same padded with trivially true steps (`92 + 0 = 92`);
a repeated step; no final answer; an answer cut at the length cap (no EOS);
an empty response (EOS alone); one giant step holding the whole chain; and
the last-digit shortcut (`93 + 3 = 6`: every step wrong, the answer right;
tasks/arithmetic.py). Each is scored by hand-set PRM step probabilities (the
trivially true steps 1.0, the shortcut's wrong steps low, the giant step as
sure as its least sure part), a hand-set ORM probability, the exact checker
(`source: exact`) and the grader (`ground_truth`).

Views of the reward:
- PPO: the return of `rewards.token_rewards`, and the first token's GAE
  advantage with a zero critic and gamma = lam = 1 (which is that return).
- GRPO: sparse forms, `core.group_normalize` of the returns over the group of
  eight; dense forms, the first token's `core.process_token_advantages`
  (min / mean / sum) of the events `token_rewards(last_event_at_eos=True)` lists.
- Rejection sampling: the ranking `rejection.select_samples` keeps, scored by
  the sparse return, a missing answer not eligible.

Asserted orderings against the reference (EXPECT): where a form pays for
padding or repeating steps, merging them, or the shortcut, the test says so
and pins THAT ordering, so a change of behaviour shows up here:
- farmable by step count, by design: PPO's return with the `score` form (sum
  p_k; meant for GRPO), GRPO's `sum` (DeepSeekMath), and `mean` (sparse PRM
  mean, GRPO mean) by dilution, since the reference has steps below 1.0;
- product forms (`log_prob`, sparse `prod`) pay for merging steps into one
  giant step the PRM is as sure of as of its least sure part;
- outcome-only forms (`ground_truth`, an ORM) pay the shortcut as much as the
  reference: the paper's central problem, why process supervision exists;
- the exact checker pays the reference more than every other completion.
And everywhere: no answer, a truncated answer and an empty response pay less
than every answered completion, and the same as each other.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest

from tests.conftest import no_warning
import torch

from rlprm.config import RewardConfig
from rlprm.reward.sources import SOURCES
from rlprm.reward.tokens import prefix_correct_probs, token_rewards
from rlprm.rl.core import gae, group_normalize, process_token_advantages
from rlprm.rl.rejection import select_samples
from rlprm.steps import render_steps
from rlprm.tasks.arithmetic import Problem, check, reference_solution, shortcut_solution

PROBLEM = Problem(start=93, ops=(("+", 3), ("-", 4)), final="mod10")
REF = reference_solution(PROBLEM)  # 93 + 3 = 96 / 96 - 4 = 92 / 92 mod 10 = 2 / # Answer 2
PAD = ["92 + 0 = 92", "92 - 0 = 92"]  # trivially true, and no step of the plan


@dataclass(frozen=True)
class Completion:
    name: str
    text: str
    prm: tuple[float, ...]
    """Hand-set PRM probability of each step."""
    orm: float
    """Hand-set ORM probability."""
    eos: bool = True
    """The policy wrote EOS after the text (False: stopped at the length cap)."""


COMPLETIONS = [
    Completion("reference", render_steps(REF), (0.95, 0.9, 0.9, 0.95), 0.9),
    Completion("padded", render_steps(REF[:2] + PAD + REF[2:]), (0.95, 0.9, 1.0, 1.0, 0.9, 0.95), 0.9),
    Completion("repeated", render_steps(REF[:1] + REF), (0.95, 0.95, 0.9, 0.9, 0.95), 0.9),
    # one step with the whole chain, scored like its least sure part
    Completion("giant", render_steps([", ".join(REF[:3]), REF[3]]), (0.9, 0.95), 0.9),
    # the last-digit shortcut: every step wrong, the answer right; a PRM catches it, an ORM does not
    Completion("shortcut", render_steps(shortcut_solution(PROBLEM)), (0.1, 0.3, 0.6, 0.8), 0.9),
    Completion("no_answer", render_steps(REF[:3]), (0.95, 0.9, 0.9), 0.3),
    # longer than every other, with its answer written, stopped by the cap one character before its EOS
    Completion("truncated", render_steps(REF[:2] + PAD * 2 + REF[2:]).rstrip("\n"),
               (0.95, 0.9, 1.0, 1.0, 1.0, 1.0, 0.9, 0.95), 0.9, eos=False),
    Completion("empty", "", (), 0.05),
]
NAMES = [c.name for c in COMPLETIONS]
ANSWERED = ["reference", "padded", "repeated", "giant", "shortcut"]
GUARDED = ["no_answer", "truncated", "empty"]
MAX_TOKENS = len(COMPLETIONS[NAMES.index("truncated")].text)  # char tokenizer: one token per character
MISSING = -1.0

# --------------------------------------------------------------------------- what each form pays, vs the reference

SAME = {"padded": "==", "repeated": "==", "giant": "==", "shortcut": "=="}
WORST_STEP = {"padded": "==", "repeated": "==", "giant": "==", "shortcut": "<"}  # min, last: step count is moot
PRODUCT = {"padded": "==", "repeated": "<", "giant": ">", "shortcut": "<"}  # sure steps cost nothing; merging pays
DILUTED = {"padded": ">", "repeated": ">", "giant": "==", "shortcut": "<"}  # mean: sure steps dilute a weak one
SUMMED = {"padded": ">", "repeated": ">", "giant": "<", "shortcut": "<"}  # every step pays: farmable
CHECKED = {"padded": "<", "repeated": "<", "giant": "<", "shortcut": "<"}  # the checker rejects all but the reference

# (mode, source, dense form or sparse aggregate) -> the ordering of the PPO return (and of GRPO's outcome
# normalisation and of rejection sampling, for sparse forms)
RETURN_EXPECT = {
    ("sparse", "ground_truth", None): SAME,  # every answer is right: outcome supervision pays the shortcut
    ("sparse", "orm", None): SAME,  # the hand-set ORM is fooled the same way
    ("sparse", "prm", "prod"): PRODUCT,
    ("sparse", "prm", "min"): WORST_STEP,
    ("sparse", "prm", "last"): WORST_STEP,  # the answer step is the last; the shortcut's is scored lower
    ("sparse", "prm", "mean"): DILUTED,
    ("sparse", "exact", None): CHECKED,
    ("dense", "prm", "log_prob"): PRODUCT,
    ("dense", "prm", "min_form"): WORST_STEP,
    ("dense", "prm", "delta"): WORST_STEP,
    ("dense", "prm", "score"): SUMMED,  # sum p_k: GRPO's form; under PPO it pays for steps
    ("dense", "exact", "log_prob"): CHECKED,
    ("dense", "exact", "min_form"): CHECKED,
    ("dense", "exact", "delta"): CHECKED,
    ("dense", "exact", "score"): CHECKED,
}

# (source, dense form, process form) -> the ordering of GRPO's first-token process advantage
PROCESS_EXPECT = {
    ("prm", "score", "min"): WORST_STEP,
    ("prm", "score", "mean"): DILUTED,
    ("prm", "score", "sum"): SUMMED,  # DeepSeekMath: why it is not the default
    ("prm", "log_prob", "min"): WORST_STEP,  # min log p_k = log min p_k
    ("prm", "log_prob", "mean"): DILUTED,
    ("prm", "log_prob", "sum"): SUMMED,  # a sure step's log p = 0 is above the group's mean: it still pays
    ("exact", "score", "min"): CHECKED,
    ("exact", "score", "mean"): CHECKED,
    ("exact", "score", "sum"): CHECKED,
    ("exact", "log_prob", "min"): CHECKED,
    ("exact", "log_prob", "mean"): CHECKED,
    ("exact", "log_prob", "sum"): CHECKED,
}

OPS = {"<": operator.lt, ">": operator.gt}


# GRPO process forms under which NOT answering can pay: `sum` adds one normalised value per step, and log_prob values
# (<= 0, each floored at missing + 0.1) sit below the group's mean, so four of them sum below a missing answer's one
# penalty (core.process_token_advantages says so; it was hidden while the events were PPO's floored running sums,
# whose steps after the floor read as perfect 0s: issue 23 finding 2)
UNGUARDED = {("prm", "log_prob", "sum"), ("exact", "log_prob", "sum")}


def assert_orderings(values: dict[str, float], expect: dict[str, str], what: str, guarded: bool = True) -> None:
    ref = values["reference"]
    for name, rel in expect.items():
        if rel == "==":
            assert values[name] == pytest.approx(ref, abs=1e-6), f"{what}: {name} {values[name]} vs reference {ref}"
        else:
            assert OPS[rel](values[name], ref), f"{what}: expected {name} {rel} reference ({values[name]} vs {ref})"
    # not answering (however it happened) never pays more than any answered completion, and all alike
    answered_low = min(values[n] for n in ANSWERED)
    for name in GUARDED:
        assert (values[name] < answered_low - 1e-6) is guarded, f"{what}: {name} {values[name]} vs {answered_low}"
        assert values[name] == pytest.approx(values["no_answer"], abs=1e-6), what


# --------------------------------------------------------------------------- scoring the completions


def ids(tok, c: Completion) -> list[int]:
    body = tok(c.text, add_special_tokens=False)["input_ids"]
    return body + [tok.eos_token_id] if c.eos else body


def scored(tok, mode: str, source: str, form: str | None, outcome_coef: float = 0.0, last_event_at_eos=False,
           process_form: str | None = None):
    """token_rewards of the eight completions under one reward form (process_form: as GRPO's reward function asks)."""
    grades = [check(PROBLEM, c.text) for c in COMPLETIONS]
    if source == "prm":
        scores = [list(c.prm) for c in COMPLETIONS]
    elif source == "orm":
        scores = [[c.orm] for c in COMPLETIONS]
    elif source == "exact":
        scores = [prefix_correct_probs(g.step_correct) for g in grades]
    else:
        scores = None
    dense = mode == "dense"
    cfg = RewardConfig(mode=mode, source=source, outcome_coef=outcome_coef, missing_answer_reward=MISSING,
                       dense_form="min_form", sparse_aggregate=form if source == "prm" and not dense else "prod")
    return token_rewards(cfg, [c.text for c in COMPLETIONS], [ids(tok, c) for c in COMPLETIONS],
                         rule=SOURCES[source].rule(), scores=scores,
                         outcomes=[float(g.answer_correct) for g in grades],
                         has_answer=[g.answer is not None for g in grades], tokenizer=tok, max_tokens=MAX_TOKENS,
                         eos_token_id=tok.eos_token_id, dense_form=form if dense else None,
                         last_event_at_eos=last_event_at_eos, process_form=process_form)


def by_name(values) -> dict[str, float]:
    return dict(zip(NAMES, [float(v) for v in values]))


def test_the_completions_are_what_they_claim(char_tokenizer):
    grades = {c.name: check(PROBLEM, c.text) for c in COMPLETIONS}
    assert REF == ["93 + 3 = 96", "96 - 4 = 92", "92 mod 10 = 2", "# Answer\n\n2"]
    assert grades["reference"].process_correct
    assert all(grades[n].answer_correct for n in ANSWERED)  # every answered one reaches the right answer
    # wrong from its first step on (the checker judges each later step on the previous value)
    assert grades["shortcut"].shortcut and grades["shortcut"].first_error == 0 and grades["shortcut"].answer_correct
    tr = scored(char_tokenizer, "sparse", "ground_truth", None)
    assert [tr.missing_answer[NAMES.index(n)] for n in NAMES] == [n in GUARDED for n in NAMES]
    assert tr.truncated == [n == "truncated" for n in NAMES]
    for c in COMPLETIONS:
        assert len(c.prm) == len(check(PROBLEM, c.text).steps)
        assert len(ids(char_tokenizer, c)) <= MAX_TOKENS


# --------------------------------------------------------------------------- PPO, GRPO's outcome mode, rejection


@pytest.mark.parametrize("outcome_coef", [0.0, 0.5])
@pytest.mark.parametrize("mode, source, form", list(RETURN_EXPECT))
def test_ppo_returns_and_advantages(char_tokenizer, mode, source, form, outcome_coef):
    tr = scored(char_tokenizer, mode, source, form, outcome_coef)
    what = f"PPO {mode} {source} {form} outcome_coef={outcome_coef}"
    assert_orderings(by_name(tr.returns), RETURN_EXPECT[mode, source, form], what + " return")
    # a zero critic with gamma = lam = 1: every token's advantage is its reward-to-go, the first token's the return
    adv, _ = gae(tr.rewards, torch.zeros_like(tr.rewards), tr.mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv[:, 0], tr.returns, atol=1e-6)
    assert_orderings(by_name(adv[:, 0]), RETURN_EXPECT[mode, source, form], what + " GAE")
    assert tr.stats["below_missing_answer"] == 0.0


@pytest.mark.parametrize("outcome_coef", [0.0, 0.5])
@pytest.mark.parametrize("mode, source, form", [k for k in RETURN_EXPECT if k[0] == "sparse"])
def test_grpo_outcome_normalisation_and_rejection_sampling(char_tokenizer, mode, source, form, outcome_coef):
    tr = scored(char_tokenizer, mode, source, form, outcome_coef)
    expect = RETURN_EXPECT[mode, source, form]
    what = f"{source} {form} outcome_coef={outcome_coef}"
    assert_orderings(by_name(group_normalize(tr.returns, group_size=len(NAMES))), expect, "GRPO " + what)
    # rejection sampling ranks by the sparse score; a missing answer is not eligible (the grader's verdict with
    # ground-truth rewards); ties keep the sampling order, in which the reference comes first
    eligible = [not m for m in tr.missing_answer]
    keep = select_samples([tr.returns.tolist()], [eligible], [[c.text for c in COMPLETIONS]], top_k=len(NAMES))[0]
    kept = [NAMES[j] for j in keep]
    assert sorted(kept) == sorted(ANSWERED), what
    for name, rel in expect.items():
        before = kept.index(name) < kept.index("reference")
        assert before == (rel == ">"), f"rejection {what}: {name} {rel} reference, kept in order {kept}"


# --------------------------------------------------------------------------- GRPO's process advantages


@pytest.mark.parametrize("outcome_coef", [0.0, 0.5])
@pytest.mark.parametrize("source, dense_form, process_form", list(PROCESS_EXPECT))
def test_grpo_process_advantages(char_tokenizer, source, dense_form, process_form, outcome_coef):
    tr = scored(char_tokenizer, "dense", source, dense_form, outcome_coef, last_event_at_eos=True,
                process_form=process_form)
    values, positions, outcome = tr.event_tensors()
    with pytest.warns(UserWarning) if process_form == "sum" else no_warning():
        adv = process_token_advantages(values.double(), positions, group_size=len(NAMES), width=tr.rewards.shape[1],
                                       form=process_form, outcome=outcome.double())
    first = by_name(adv[:, 0])
    what = f"GRPO process {process_form} over {source} {dense_form} outcome_coef={outcome_coef}"
    assert_orderings(first, PROCESS_EXPECT[source, dense_form, process_form], what,
                     guarded=(source, dense_form, process_form) not in UNGUARDED)
    # the EOS token carries the last step's reward: it is never left without a signal
    lengths = tr.mask.sum(1)
    for i, name in enumerate(NAMES):
        if name in ANSWERED:
            assert adv[i, lengths[i] - 1] != 0, f"{what}: {name} has no advantage at its EOS"




def test_grpo_min_and_mean_need_value_forms_not_differences(char_tokenizer):
    """min_form and delta step rewards are differences that only mean something summed to a return: the min of
    the shortcut's min_form rewards (.1, 0, 0, 0) is 0, above the reference's (.95, -.05, 0, 0) at -.05. So GRPO's
    process advantages take `score` (or `log_prob`) step rewards, never min_form / delta (rewards.VALUE_FORMS)."""
    tr = scored(char_tokenizer, "dense", "prm", "min_form", last_event_at_eos=True)
    values, positions, outcome = tr.event_tensors()
    adv = process_token_advantages(values, positions, len(NAMES), tr.rewards.shape[1], form="min", outcome=outcome)
    first = by_name(adv[:, 0])
    assert first["shortcut"] > first["reference"]
