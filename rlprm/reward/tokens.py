"""Per-step scores -> a `(batch, response_tokens)` reward tensor on the POLICY's tokens.

This is the one place where dense and sparse supervision differ (docs/design.md
section 5); everything downstream (GAE, whitening, the losses) sees only a
reward tensor and a mask.

Sources (`RewardConfig.source`; `rlprm/reward/sources.py` computes their scores, says what they are in a
`ScoreRule`, and builds the one `token_rewards` call of every consumer, `training_rewards`; this module reads the
rule, never the source's name), each giving step probabilities p_1..p_K (or one number):
- `prm`: a trained PRM's step probabilities; `orm`: an ORM's one final probability;
  `ground_truth`: the grader's 1/0 verdict on the final answer.
- `exact`: the arithmetic task's exact step checker as an ORACLE PRM (the
  paper's trusted labeller: it separates the effect of process supervision
  from the quality of a learned PRM). p_k = 1 for every step before the first
  wrong one and 0 from the first wrong step on (`prefix_correct_probs`;
  PRM800K's convention: a solution is wrong from its first error on). A
  missing answer is left to the missing-answer guard.
- `confidence`: the frozen STARTING generator's own token confidence (the RL
  control for "sharpening toward the start's mode"): p_k = exp(lowest token
  log-prob within step k) under the reference model at temperature 1
  (`step_confidence`); sparse: exp(lowest token log-prob over the whole
  response, EOS included; `sequence_confidence`). The caller computes the
  log-probs (PPO reuses its reference forward pass) and passes the p_k as scores.
- `python`: a user's function (`reward.function`): per step (dense) or one number (sparse), in [0, 1].

Modes (`RewardConfig.mode`):
- sparse: one reward at the last response token: the grader's 1/0
  (`ground_truth`), the ORM's probability (`orm`), a PRM's steps aggregated
  with `sparse_aggregate` (`prod` is the paper's solution score; `prm`), 1 if
  every step is right else 0 (`exact`), or the whole-response confidence
  (`confidence`).
- dense (`source: prm | exact | confidence | python`): a reward at the last token of
  each step, from the step probabilities p_1..p_K, in one of four forms
  (`RewardConfig.dense_form`, or `token_rewards(dense_form=...)`):
  - `log_prob`: r_k = log p_k. The return is log(p_1 * ... * p_K), the log of
    the paper's product score. Every r_k <= 0, so writing more steps can only
    lower it: padding a solution with steps cannot farm reward. p is floored at
    PROB_FLOOR so that a step scored exactly 0 gives a large finite penalty
    rather than -inf.
  - `min_form`: with m_k = min(p_1..p_k) the running minimum, r_1 = p_1 and
    r_k = m_k - m_{k-1} (<= 0) for k >= 2. The sum telescopes to m_K, so the
    return from the start is exactly min_k p_k: a solution is as good as its
    worst step, and an extra step can only lower it (the idea of PURE's
    min-form credit assignment, Cheng et al. 2025: summed process rewards invite
    hacking, a min does not). A step scored above the running minimum gets 0.
  - `delta`: r_k = p_k - p_{k-1} with p_0 = 0. The return telescopes to p_K,
    the last step's score (the `last` aggregation), so it lies in [0, 1] like
    a sparse ORM reward, does not depend on the number of steps, and the
    default missing-answer reward (-1) stays below every dense return. p_0 = 0
    rather than 0.5 so that the return is the score itself, not an offset one;
    the offset would change nothing for PPO's critic but would put the
    missing-answer guard on a different footing than in the other modes.
  - `score`: r_k = p_k, each step's probability at its end (DeepSeekMath's
    process reward). The step rewards are VALUES of the steps, not
    differences, so GRPO's process advantages (`rl.core.process_token_advantages`)
    can take their min or mean from each token on. Summed, as PPO's return
    does, they give sum p_k, which grows with every step: under PPO this form
    pays for padding a solution with sure steps (tests/test_reward_hacking.py
    pins that), so it is GRPO's form, not PPO's. `log_prob` is the other
    value form (`VALUE_FORMS`); min_form and delta are differences that only
    mean something summed to a return.
  Optionally `outcome_coef * ground_truth` is added at the last response token.

Answering always pays at least as much as not answering. `log_prob` returns
log(prod p_k), which for an unsure or wrong solution falls far below
`missing_answer_reward` (one step scored 0 gives log(PROB_FLOOR) = -13.8), so
the policy would learn to stop writing answers. So the running sum of an
answered sample's dense step rewards is floored at `missing_answer_reward +
ANSWERED_MARGIN` (`floor_running_return`): with C_k the running sum and D_k =
max(C_k, floor) (D_0 = 0), the step rewards become D_k - D_{k-1}. The return
is then max(sum r_k, floor): a solution better than the floor keeps its exact
return, every worse one returns the floor, strictly above a missing answer.
The floor keeps what made the forms safe: a non-increasing running sum stays
non-increasing (every log_prob r_k is still <= 0, extra steps still cannot
pay), and the penalty still lands on the step that crossed the floor (for
`exact`, the first wrong step). min_form, delta and score never go below 0, so
with a negative `missing_answer_reward` the floor leaves them unchanged. The
outcome term (>= 0) comes on top. Recipe validation refuses `log_prob` with a
`missing_answer_reward` at or above -ANSWERED_MARGIN, where every answered
return would be the floor and nothing would tell solutions apart.

GRPO reads VALUES, not a return (`process_form`, its `rl.process_advantage`).
Its process advantages normalise every event on its own and take the min or
mean of the events from each token on (or sum them, normalised), so each event
must be the step's own value: `dense_step_values`, log p_k (`log_prob`) or p_k
(`score`), each floored ON ITS OWN at the same floor, so that an answered
solution's min or mean never falls to a missing answer's penalty. The floored
running sum above would be wrong there: with missing -1, [.6, .1, .1] and
[.6, .5, .5] both become [-0.511, -0.389, 0.0], and the exact checker's
[1, 0, 0, 0] becomes [0, -0.9, 0, 0], wrong steps 3-4 worth a perfect 0
(found in review). min_form and delta have no step values and are refused there.
Under `sum` the floor does not protect the missing-answer ordering (four
values of -0.9 sum below one -1; `rl.core.process_token_advantages` warns).
`TokenRewards.objective` is each sample's value under the objective
(`solution_value`): the return, or for `min` / `mean` that of the events plus
the outcome; evaluation reports it on held-out problems.

Guards, in this order:
- a score that is NaN or infinite raises, naming the sample (and a reward-model
  probability outside [0, 1] too): a silent NaN reward destroys a run later.
- length cap (`max_tokens`): tokens beyond it are masked out. A response that
  was cut before it finished counts as having no final answer (it could
  otherwise be rewarded for a half-written one): it gets
  `missing_answer_reward` at its last KEPT token (index max_tokens - 1) and no
  step rewards. Cut means: longer than the cap, or (given `eos_token_id`)
  exactly max_tokens long without ending in EOS, which is how a response that
  `generate` stopped at max_new_tokens looks (generate never returns more). A
  response of max_tokens tokens whose last is EOS finished and is judged as
  written; without `eos_token_id` only the first rule applies.
- a response with no final answer gets `missing_answer_reward` at its last
  token and nothing else (step rewards and the outcome term are dropped).
  Whether it answered is the caller's `has_answer`, required: the task's own
  answer reading decides it (`data.problems.SampleGrade.answered`: the arithmetic
  checker's `# Answer` step; `grading.extract_answer` for MATH's `\\boxed{}`,
  GSM8K's `####` and PRM800K's `# Answer`), the one definition that grading,
  rewards and evaluation share. reward/tokens.py keeps no rule of its own: a
  `# Answer`-only rule here once rewarded every MATH response as missing.
  The `below_missing_answer` stat counts answered samples that returned less
  than that anyway (0 with the floor above; a check that it holds).

Step ends reach the policy's tokens through CHARACTER offsets
(`steps.step_char_ends` on the text, `steps.token_char_ends` on the policy's
ids, `steps.char_ends_to_token_ends`), so the reward model may use another
tokenizer than the policy. A step end inside a merged token lands on that
token: the first one that has seen the whole step.

A reward model that scored FEWER steps than the text has (a scorer that
truncated the solution) is handled explicitly: the scored steps get their
rewards and the unscored tail gets none (counted in the `unscored_steps`
stat). More scores than steps means the scorer split the text differently (a
different separator) and raises.

The EOS token belongs in the response ids when the policy generated one: it
is then the last response token, where sparse rewards land and the policy
learns to stop. Dense step rewards land on the text tokens, never on EOS
(EOS decodes to nothing, so no step ends in it), unless `last_event_at_eos`:
then the last step's reward moves to the last kept token (EOS when there is
one), so the final step's reward also teaches stopping there (what GRPO's
process supervision does). The return is the same either way.

Reward events. Besides the (B, T) tensor, `TokenRewards` lists each sample's
reward events, so that no consumer re-derives them from the tensor: the
positions and values of what was placed (`event_positions`, `event_values`:
the dense step rewards; a sparse reward; a missing answer's penalty, alone)
and the outcome term apart (`outcome_rewards`), because GRPO's process
advantages add it to a solution's value rather than treat it as a step. The
rewards tensor is exactly the events plus the outcome term at the last kept
token; `event_tensors()` pads them for `rl.core.process_token_advantages`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from rlprm.config import RewardConfig
from rlprm.steps import (
    DEFAULT_SEPARATOR,
    StepTokenError,
    char_ends_to_token_ends,
    step_char_ends,
    token_char_ends,
)

PROB_FLOOR = 1e-6
"""Smallest probability `log_prob` takes the log of (log(1e-6) = -13.8 per step)."""

DELTA_P0 = 0.0
"""The score before the first step in the `delta` form."""

DENSE_FORMS = ("log_prob", "min_form", "delta", "score")

VALUE_FORMS = ("log_prob", "score")
"""Dense forms whose step rewards are values of the steps (monotone in p_k), not differences: the ones whose
min or mean over steps means something (GRPO's process advantages, `rl.core.process_token_advantages`)."""

SPARSE_RULES = ("outcome", "final", "all_right", "aggregate")
"""How a source's scores become ONE sparse reward (`ScoreRule.sparse`): the grader's verdict alone, the one final
probability given, 1 only if every step's prefix-correctness is 1 (the min), `sparse_aggregate` of the steps."""


@dataclass(frozen=True)
class ScoreRule:
    """What a reward source's scores are, as `token_rewards` needs to know it: decided by the source
    (`reward.sources.RewardSource.rule`), so that this module places rewards without branching on a source's name.
    """

    name: str
    """The source's name (`reward.source`), for messages."""
    scores: bool
    """It gives per-sample scores (False: the ground-truth outcome alone decides)."""
    steps: bool
    """Its scores are one probability per step, so they can drive dense rewards."""
    sparse: str
    """How its scores become one sparse reward: one of SPARSE_RULES."""

    def __post_init__(self):
        if self.sparse not in SPARSE_RULES:
            raise ValueError(f"ScoreRule.sparse must be one of {', '.join(SPARSE_RULES)}, got {self.sparse!r}")

ANSWERED_MARGIN = 0.1
"""An answered sample's return is at least `missing_answer_reward + ANSWERED_MARGIN` (see the module docstring)."""


class RewardError(ValueError):
    """Scores or responses that cannot be turned into rewards (the message names the sample)."""


# --------------------------------------------------------------------------- per-sample pieces


def floor_running_return(step_rewards: Sequence[float], floor: float) -> list[float]:
    """Step rewards whose running sum never goes below `floor`: r'_k = D_k - D_{k-1}.

    With C_k = r_1 + ... + r_k, D_k = max(C_k, floor) and D_0 = 0, the sum of
    r' is max(C_K, floor). Where the running sum stays above the floor nothing
    changes; the step that crosses it gets what is left down to the floor, the
    steps after it get max(C_k, floor) - max(C_{k-1}, floor) (0 while below).
    E.g. [-0.5, -2.0, -1.0] with floor -0.9 -> [-0.5, -0.4, 0.0].
    """
    out, prev, running = [], 0.0, 0.0
    for r in step_rewards:
        running += float(r)
        now = max(running, floor)
        out.append(now - prev)
        prev = now
    return out


def dense_step_rewards(probs: Sequence[float], form: str, floor: float | None = None) -> list[float]:
    """Step probabilities p_1..p_K -> step rewards r_1..r_K (see the module docstring).

    Sums: `log_prob` -> log(prod p_k); `min_form` -> min p_k; `delta` -> p_K;
    `score` -> sum p_k (it grows with every step: see the module docstring).
    `floor` (None: none) floors the running sum (`floor_running_return`), so
    the sum becomes max(that, floor).
    """
    out = _dense_step_rewards(probs, form)
    return out if floor is None else floor_running_return(out, floor)


def dense_step_values(probs: Sequence[float], form: str, floor: float | None = None) -> list[float]:
    """Step probabilities p_1..p_K -> each step's OWN value v_1..v_K, what GRPO's process advantages read.

    `log_prob`: v_k = log p_k; `score`: v_k = p_k; each floored ON ITS OWN at `floor` (None: none), v_k =
    max(v_k, floor), so that the min or mean of an answered solution's values never falls to a missing answer's
    penalty. Not the running sum (`dense_step_rewards` floors that, for PPO's return): read as values, a floored
    running sum makes every step after the one that crossed the floor look perfect (0). E.g. log_prob, floor
    -0.9: [.6, .1, .1] -> [-0.511, -0.9, -0.9]; [.6, .5, .5] -> [-0.511, -0.693, -0.693]. min_form and delta
    have no step values (their r_k are increments of a running score) and raise.
    """
    if form not in VALUE_FORMS:
        raise RewardError(f"dense form {form!r} gives increments of a running score, not values of the steps; "
                          f"step values exist for {', '.join(VALUE_FORMS)}")
    out = _dense_step_rewards(probs, form)
    return out if floor is None else [max(v, floor) for v in out]


def solution_value(event_values: Sequence[float], outcome: float, process_form: str | None) -> float:
    """What the training objective makes of one sample: its events (`TokenRewards.event_values`) and outcome term.

    None or `sum`: their sum (the return: PPO's, GRPO's sparse reward, DeepSeekMath's summed process rewards);
    `min` / `mean`: the min / mean of the events plus the outcome, the value GRPO's process advantage gives the
    first token (`rl.core.process_token_advantages`, G(0)). No events (an empty response): the outcome, 0.
    """
    values = [float(v) for v in event_values]
    if process_form in (None, "sum") or not values:
        return sum(values) + outcome
    if process_form == "min":
        return min(values) + outcome
    if process_form == "mean":
        return sum(values) / len(values) + outcome
    raise RewardError(f"process form must be min, mean, sum or None, got {process_form!r}")


def _dense_step_rewards(probs: Sequence[float], form: str) -> list[float]:
    probs = [float(p) for p in probs]
    if form == "log_prob":
        return [math.log(max(p, PROB_FLOOR)) for p in probs]
    if form == "min_form":
        out, running = [], None
        for p in probs:
            new = p if running is None else min(running, p)
            out.append(new if running is None else new - running)
            running = new
        return out
    if form == "delta":
        prev = [DELTA_P0] + probs[:-1]
        return [p - q for p, q in zip(probs, prev)]
    if form == "score":
        return probs
    raise RewardError(f"dense form must be one of {', '.join(DENSE_FORMS)}, got {form!r}")


def prefix_correct_probs(step_correct: Sequence[bool]) -> list[float]:
    """The exact checker's step verdicts as an oracle PRM's step probabilities: prefix-correctness.

    1.0 for each step before the first wrong one, 0.0 from the first wrong step
    on (PRM800K's convention: the solution is wrong from its first error; a
    right step after a wrong one builds on a wrong value). E.g. [T, F, T] ->
    [1, 0, 0].
    """
    out, ok = [], True
    for c in step_correct:
        ok = ok and bool(c)
        out.append(1.0 if ok else 0.0)
    return out


def step_confidence(logprobs: Tensor, step_ends: Tensor) -> Tensor:
    """Per step, exp(the lowest token log-prob within the step): a model's own confidence in each step.

    logprobs: (B, T) float, log p of each response token (e.g. under the frozen
    starting generator at temperature 1). step_ends: (B, S) long, the token
    index of each step's last token (`step_token_ends`), -1 for padding steps.
    Returns (B, S) in [0, 1], 0 at padding. Step k covers the tokens after step
    k-1's end up to its own end (step 1 from token 0). When two steps end in
    one merged token, the later step's range is empty and it is read on that
    token alone: the token that completed it, rather than no token (which
    would read as full confidence).
    """
    B, T = logprobs.shape
    ends = step_ends.long()
    valid = ends >= 0
    if bool((ends >= T).any()):
        raise RewardError(f"a step ends at token {int(ends.max())}, beyond the {T} response tokens")
    prev = torch.cat([ends.new_full((B, 1), -1), ends[:, :-1]], dim=1)
    starts = torch.minimum(prev + 1, ends)  # an empty range (merged end) shrinks to the end token itself
    t = torch.arange(T, device=logprobs.device).view(1, 1, T)
    inside = (t >= starts.unsqueeze(-1)) & (t <= ends.unsqueeze(-1)) & valid.unsqueeze(-1)  # (B, S, T)
    lowest = torch.where(inside, logprobs.unsqueeze(1), torch.full_like(logprobs.unsqueeze(1), math.inf)).amin(-1)
    return torch.where(valid, torch.exp(lowest.clamp(max=0.0)), torch.zeros_like(lowest))


def sequence_confidence(logprobs: Tensor, mask: Tensor) -> Tensor:
    """exp(the lowest token log-prob over each response): the sparse `confidence` reward.

    logprobs, mask: (B, T) -> (B,) in [0, 1]; every masked-in token counts
    (EOS included). An empty response gets 0.
    """
    m = mask.bool()
    lowest = torch.where(m, logprobs, torch.full_like(logprobs, math.inf)).amin(-1)
    return torch.where(m.any(-1), torch.exp(lowest.clamp(max=0.0)), torch.zeros_like(lowest))


def confidence_scores(texts: Sequence[str], token_ids, logprobs: Tensor, mask: Tensor, tokenizer, dense: bool,
                      sep: str = DEFAULT_SEPARATOR) -> list[list[float]]:
    """The `confidence` source's scores for `token_rewards`: per sample, p_k per step (dense) or one number (sparse).

    texts, token_ids: as `token_rewards` takes them (ids: B lists, EOS included
    if generated). logprobs: (B, T) log p of each response token under the
    frozen starting generator at temperature 1; mask: (B, T) its real tokens.
    Step ends come from `step_token_ends` on the policy's tokenizer (the policy
    and the reference share it), the same placement the rewards then use.
    """
    if not dense:
        return [[float(c)] for c in sequence_confidence(logprobs, mask).tolist()]
    seqs = _sequences(token_ids)
    ends = []
    for i, (text, ids) in enumerate(zip(texts, seqs)):
        try:
            ends.append(step_token_ends(text, ids[: int(mask[i].sum())], tokenizer, sep))
        except StepTokenError as exc:
            raise RewardError(f"sample {i}: {exc}") from None
    S = max(1, max((len(e) for e in ends), default=0))
    padded = torch.full((len(ends), S), -1, dtype=torch.long, device=logprobs.device)
    for i, e in enumerate(ends):
        padded[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    conf = step_confidence(logprobs, padded).tolist()
    return [conf[i][: len(e)] for i, e in enumerate(ends)]


def step_token_ends(text: str, token_ids: Sequence[int], tokenizer, sep: str = DEFAULT_SEPARATOR) -> list[int]:
    """Index into `token_ids` of the token holding each step's last character.

    `text` must be what the policy's tokenizer decodes `token_ids` to (special
    tokens skipped, no clean-up), because the character offsets of the steps
    are read on `text` and those of the tokens on the decoding.
    """
    ids = list(token_ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if decoded != text:
        raise RewardError(
            f"the response text does not match the decoding of its token ids ({decoded[:60]!r} vs {text[:60]!r}); "
            "pass the text the policy's tokenizer decodes them to (skip_special_tokens=True, "
            "clean_up_tokenization_spaces=False), the way rlprm.sampling does"
        )
    return char_ends_to_token_ends(token_char_ends(tokenizer, ids), step_char_ends(text, sep))


def _check_values(i: int, values: Sequence[float], what: str, probability: bool) -> list[float]:
    out = []
    for k, v in enumerate(values):
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"sample {i}: {what} {k} is {v} (not finite); the reward model or grader produced a "
                              "bad score, fix it upstream rather than train on it")
        if probability and not 0.0 <= v <= 1.0:
            raise RewardError(f"sample {i}: {what} {k} is {v}, but reward-model scores must be probabilities in [0, 1]")
        out.append(v)
    return out


# --------------------------------------------------------------------------- the batch


@dataclass
class TokenRewards:
    """Rewards on the policy's response tokens, and what was decided per sample."""

    rewards: Tensor
    """(B, T) float; 0 at masked positions."""
    mask: Tensor
    """(B, T) bool: response tokens kept (within the length and the cap)."""
    step_token_ends: list[list[int]] = field(default_factory=list)
    """Per sample, the token index of each rewarded step's end (dense mode; [] otherwise)."""
    step_rewards: list[list[float]] = field(default_factory=list)
    """Per sample, the dense rewards placed at `step_token_ends`."""
    missing_answer: list[bool] = field(default_factory=list)
    """No final answer, or cut by the cap: the sample got `missing_answer_reward` (an empty response has no token to carry it)."""
    truncated: list[bool] = field(default_factory=list)
    """The response was cut by the cap: longer than it, or as long as it without ending in EOS (see the module docstring)."""
    stats: dict[str, float] = field(default_factory=dict)
    event_positions: list[list[int]] = field(default_factory=list)
    """Per sample, the token index of each reward event, in step order: the dense step rewards where they were
    placed (the last one on the last kept token with `last_event_at_eos`), or the last kept token alone (a sparse
    reward, or a missing answer's penalty); [] for an empty response."""
    event_values: list[list[float]] = field(default_factory=list)
    """Per sample, the reward of each event (`event_positions`); the outcome term is not among them."""
    outcome_rewards: list[float] = field(default_factory=list)
    """Per sample, the outcome term `outcome_coef * outcome` at the last kept token (0 when there is none,
    and for a missing answer or an empty response). rewards[i] = the events + this, placed."""
    objective: Tensor | None = None
    """(B,) each sample's value under the training objective (`solution_value`): the return, or for GRPO's
    `min` / `mean` process advantages the min / mean of the events plus the outcome. None: the returns."""

    def __post_init__(self):
        if self.objective is None:
            self.objective = self.rewards.sum(dim=1)

    @property
    def returns(self) -> Tensor:
        """(B,) undiscounted return of each sample: its rewards summed."""
        return self.rewards.sum(dim=1)

    def event_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The events padded for `rl.core.process_token_advantages`: (values (B, S), positions (B, S), outcome (B,)).

        S = the most events of a sample (at least 1); padding events have position -1 and value 0. On the
        rewards' device and dtype.
        """
        B = len(self.event_positions)
        S = max(1, max((len(e) for e in self.event_positions), default=0))
        kw = {"device": self.rewards.device}
        values = torch.zeros(B, S, dtype=self.rewards.dtype, **kw)
        positions = torch.full((B, S), -1, dtype=torch.long, **kw)
        for i, (pos, val) in enumerate(zip(self.event_positions, self.event_values)):
            if pos:
                positions[i, : len(pos)] = torch.tensor(pos, dtype=torch.long, **kw)
                values[i, : len(val)] = torch.tensor(val, dtype=self.rewards.dtype, **kw)
        outcome = torch.tensor(self.outcome_rewards, dtype=self.rewards.dtype, **kw).reshape(B)
        return values, positions, outcome


def _lengths(token_ids, lengths) -> list[int]:
    if lengths is not None:
        return [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    if isinstance(token_ids, Tensor):
        raise RewardError("token_ids is a padded tensor: pass lengths (e.g. response_mask.sum(-1)) too")
    return [len(ids) for ids in token_ids]


def _sequences(token_ids) -> list[list[int]]:
    return token_ids.tolist() if isinstance(token_ids, Tensor) else [list(ids) for ids in token_ids]


def _need(name: str, value, why: str):
    if value is None:
        raise RewardError(f"{name} are required {why}")
    return value


def _checked_scores(cfg: RewardConfig, rule: ScoreRule, scores, outcomes, tokenizer) -> tuple[list | None, list | None]:
    """The inputs this config and the source's rule need, present and finite: (step probabilities, ground-truth
    verdicts)."""
    dense = cfg.mode == "dense"
    if dense and not rule.steps:
        raise RewardError(f"dense rewards need step scores, but reward.source {rule.name!r} gives one score per "
                          "solution")
    if rule.scores:
        # exact: the caller's prefix_correct_probs; confidence: the caller's confidence_scores
        _need("scores", scores, f"for reward.source {rule.name!r}")
    if rule.sparse == "outcome" or cfg.outcome_coef > 0:
        _need("outcomes", outcomes, "for ground-truth rewards (reward.source ground_truth or reward.outcome_coef > 0)")
    if dense:
        _need("tokenizer (the policy's)", tokenizer, "to place dense step rewards on the policy's tokens")
    # every score is checked, also for samples a guard overrides later: a NaN is an upstream bug either way
    probs = None if scores is None else [_check_values(i, s, "score of step", True) for i, s in enumerate(scores)]
    truths = None if outcomes is None else [_check_values(i, [o], "outcome", False)[0] for i, o in enumerate(outcomes)]
    if probs is not None and rule.sparse == "final" and not dense:
        for i, p in enumerate(probs):
            if len(p) != 1:
                raise RewardError(f"sample {i}: reward.source {rule.name} in sparse mode gives one final probability, "
                                  f"got {len(p)} scores")
    return probs, truths


def _dense_steps(i: int, text: str, ids: list[int], probs: list[float], form: str, tokenizer, sep: str,
                 floor: float, values: bool) -> tuple[list[int], list[float], int]:
    """Sample i's (rewarded step ends, their rewards or, with `values`, their own values, unscored steps)."""
    ends = step_token_ends(text, ids, tokenizer, sep)
    if len(probs) > len(ends):
        raise RewardError(f"sample {i}: the reward model scored {len(probs)} steps but the text has {len(ends)} "
                          f"with separator {sep!r}; it split the text differently (another separator?)")
    rewards = dense_step_values(probs, form, floor) if values else dense_step_rewards(probs, form, floor)
    return ends[: len(probs)], rewards, len(ends) - len(probs)


def token_rewards(
    cfg: RewardConfig,
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]] | Tensor,
    *,
    rule: ScoreRule,
    scores: Sequence[Sequence[float]] | None = None,
    outcomes: Sequence[float] | None = None,
    tokenizer=None,
    lengths: Sequence[int] | Tensor | None = None,
    has_answer: Sequence[bool] | None = None,
    max_tokens: int | None = None,
    eos_token_id: int | None = None,
    width: int | None = None,
    sep: str = DEFAULT_SEPARATOR,
    sparse_aggregate: str | None = None,
    dense_form: str | None = None,
    last_event_at_eos: bool = False,
    process_form: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TokenRewards:
    """Rewards on the policy's tokens for B sampled responses.

    rule: what the source's scores are (`reward.sources.RewardSource.rule`): whether there are scores, whether per
        step, and how they become one sparse reward. The source decides; `cfg` gives the mode, forms and guards.
    texts: B response texts, each the decoding of its token ids (see `step_token_ends`).
    token_ids: B lists of the policy's generated ids (EOS included if generated), or a
        right-padded (B, T') tensor together with `lengths`.
    scores: per sample, the reward model's output: PRM step probabilities (one per step
        of `split_steps(text, sep)`), or an ORM's single final probability.
    outcomes: per sample, the ground-truth verdict 1/0 (the grader / arithmetic checker);
        needed by a rule whose sparse reward is the outcome (ground_truth) and by `outcome_coef > 0`.
    tokenizer: the POLICY's tokenizer; needed by dense mode to place step ends.
    lengths: response tokens per sample (default: len of each id list).
    has_answer: per sample, whether a final answer was written, as the task reads it
        (`data.problems.SampleGrade.answered`); required.
    max_tokens: the response length cap (None: no cap).
    eos_token_id: the policy's EOS id; with max_tokens, a response of max_tokens
        tokens that does not end in it was stopped by the cap, so is truncated
        (what `generate` returns at max_new_tokens). None: only longer responses are.
    width: T of the output (default: the longest kept response); at least that.
    sparse_aggregate: how a PRM's steps become one sparse reward (`prod`, the paper's); overrides
        `cfg.sparse_aggregate` (None: the config's).
    dense_form: one of DENSE_FORMS; overrides `cfg.dense_form` (None: the config's).
    last_event_at_eos: dense mode: the last step's reward lands on the sample's last kept
        token (its EOS) instead of the step's end, so the final step's reward also teaches
        stopping; the return does not change.
    process_form: None for a return (PPO, rejection sampling): dense step rewards whose running
        sum is floored (`dense_step_rewards`). GRPO's `rl.process_advantage` (`min`, `mean`,
        `sum`): its process advantages normalise each event on its own, so each dense event is
        the step's own value (`dense_step_values`, floored one by one; min_form / delta raise),
        and `objective` is the min / mean / sum of the events plus the outcome.

    Returns `TokenRewards` with rewards and mask shaped (B, T), and each sample's reward events.
    """
    from rlprm.reward.model import aggregate

    B = len(texts)
    seqs = _sequences(token_ids)
    lens = _lengths(token_ids, lengths)
    for name, seq in (("token_ids", seqs), ("lengths", lens), ("scores", scores), ("outcomes", outcomes),
                      ("has_answer", has_answer)):
        if seq is not None and len(seq) != B:
            raise RewardError(f"{B} texts but {len(seq)} {name}")
    if max_tokens is not None and max_tokens < 1:
        raise RewardError(f"max_tokens must be at least 1, got {max_tokens}")
    if has_answer is None:
        raise RewardError("has_answer is required: per sample, whether the task's own answer reading found a final "
                          "answer (`SampleGrade.answered` from `data.problems.grade_samples`)")
    form = cfg.dense_form if dense_form is None else dense_form
    if form not in DENSE_FORMS:
        raise RewardError(f"dense_form must be one of {', '.join(DENSE_FORMS)}, got {form!r}")
    probs, truths = _checked_scores(cfg, rule, scores, outcomes, tokenizer)
    if cfg.mode == "dense" and process_form is not None and form not in VALUE_FORMS:
        raise RewardError(f"GRPO's process advantages read each event as a step's value, but dense_form {form!r} "
                          f"gives increments of a running score; use one of {', '.join(VALUE_FORMS)}")

    kept = [n if max_tokens is None else min(n, max_tokens) for n in lens]
    T = max(kept, default=0)
    if width is not None:
        if width < T:
            raise RewardError(f"width {width} is shorter than the longest kept response ({T} tokens)")
        T = width
    rewards = [[0.0] * T for _ in range(B)]
    ends_out: list[list[int]] = [[] for _ in range(B)]
    step_out: list[list[float]] = [[] for _ in range(B)]
    event_pos: list[list[int]] = [[] for _ in range(B)]
    event_val: list[list[float]] = [[] for _ in range(B)]
    outcome_out = [0.0] * B
    # cut by the cap: longer than it, or stopped at it by generate (as long as the cap, no EOS at the end)
    truncated = [lens[i] > kept[i] or (eos_token_id is not None and max_tokens is not None and lens[i] == max_tokens
                                      and seqs[i][lens[i] - 1] != eos_token_id) for i in range(B)]
    missing = [truncated[i] or not bool(has_answer[i]) for i in range(B)]
    unscored = 0
    floor = cfg.missing_answer_reward + ANSWERED_MARGIN  # answering never pays less than not answering
    for i in range(B):
        if kept[i] == 0:  # nothing generated (EOS stripped): no token can carry a reward
            continue
        row, last = rewards[i], kept[i] - 1
        if missing[i]:
            event_pos[i], event_val[i] = [last], [cfg.missing_answer_reward]
        elif cfg.mode == "dense":
            ends_out[i], step_out[i], n = _dense_steps(i, texts[i], seqs[i][: lens[i]], probs[i], form, tokenizer,
                                                       sep, floor, values=process_form is not None)
            unscored += n
            event_pos[i], event_val[i] = list(ends_out[i]), list(step_out[i])
            if last_event_at_eos and event_pos[i]:
                event_pos[i][-1] = last
        elif rule.sparse == "outcome":
            event_pos[i], event_val[i] = [last], [truths[i]]
        elif rule.sparse == "final":
            event_pos[i], event_val[i] = [last], [probs[i][0]]
        elif rule.sparse == "all_right":
            # every step right: prefix-correctness ends at 1; any wrong step (or no step scored) gives 0
            event_pos[i], event_val[i] = [last], [min(probs[i]) if probs[i] else 0.0]
        else:
            event_pos[i], event_val[i] = [last], [aggregate(probs[i], sparse_aggregate or cfg.sparse_aggregate)]
        if not missing[i] and cfg.outcome_coef > 0:
            outcome_out[i] = cfg.outcome_coef * truths[i]
        # += : with a merging tokenizer two step ends can share one token (and the outcome shares the last)
        for p, r in zip(event_pos[i], event_val[i]):
            row[p] += r
        row[last] += outcome_out[i]

    reward_t = torch.tensor(rewards, dtype=dtype, device=device).reshape(B, T)
    mask = torch.arange(T, device=device).unsqueeze(0) < torch.tensor(kept, dtype=torch.long, device=device).reshape(B, 1)
    objective = torch.tensor([solution_value(event_val[i], outcome_out[i], process_form) for i in range(B)],
                             dtype=dtype, device=device).reshape(B)
    out = TokenRewards(reward_t, mask, ends_out, step_out, missing, truncated, event_positions=event_pos,
                       event_values=event_val, outcome_rewards=outcome_out, objective=objective)
    values = out.objective  # the return, or GRPO's min / mean value
    answered = torch.tensor([not m for m in missing], dtype=torch.bool, device=device)
    n = max(B, 1)
    out.stats = {
        "return_mean": float(values.mean()) if B else 0.0,
        "missing_answer_frac": sum(missing) / n,
        "truncated_frac": sum(truncated) / n,
        "empty_responses": float(sum(k == 0 for k in kept)),
        "unscored_steps": float(unscored),
        # answered samples that returned less than a missing answer would: an incentive to stop answering
        "below_missing_answer": float((answered & (values < cfg.missing_answer_reward)).sum()),
    }
    return out




__all__ = [
    "ANSWERED_MARGIN", "DELTA_P0", "DENSE_FORMS", "PROB_FLOOR", "SPARSE_RULES", "VALUE_FORMS", "RewardError",
    "ScoreRule", "TokenRewards",
    "confidence_scores", "dense_step_rewards", "dense_step_values", "floor_running_return",
    "prefix_correct_probs", "sequence_confidence", "solution_value", "step_confidence", "step_token_ends", "token_rewards",
]
