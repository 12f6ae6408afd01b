"""Per-step scores -> a `(batch, response_tokens)` reward tensor on the POLICY's tokens.

This is the one place where dense and sparse supervision differ (DESIGN.md
section 5); everything downstream (GAE, whitening, the losses) sees only a
reward tensor and a mask.

Modes (`RewardConfig.mode` / `.source`):
- sparse: one reward at the last response token: the grader's 1/0
  (`source: ground_truth`), the ORM's probability (`orm`), or a PRM's steps
  aggregated with `prod`, the paper's solution score (`prm`).
- dense (`source: prm`): a reward at the last token of each step, from the
  PRM's step probabilities p_1..p_K, in one of three forms:
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
  Optionally `outcome_coef * ground_truth` is added at the last response token.

Guards, in this order:
- a score that is NaN or infinite raises, naming the sample (and a reward-model
  probability outside [0, 1] too): a silent NaN reward destroys a run later.
- length cap (`max_tokens`): tokens beyond it are masked out. A response longer
  than the cap was cut before it finished, and its answer (if any) lies in
  tokens the policy will not be trained on, so it counts as having no final
  answer: it gets `missing_answer_reward` at its last KEPT token (index
  max_tokens - 1). A response exactly max_tokens long is judged as written.
- a response with no final answer (no `# Answer` step, see `steps.py`, unless
  the caller passes its own `has_answer`) gets `missing_answer_reward` at its
  last token and nothing else (step rewards and the outcome term are dropped).
  With `log_prob`, a long bad solution can return less than that reward (log
  of a small product); the `below_missing_answer` stat counts how often.

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
(EOS decodes to nothing, so no step ends in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from rlprm.config import RewardConfig
from rlprm.rl.core import kl_penalty
from rlprm.steps import (
    DEFAULT_SEPARATOR,
    char_ends_to_token_ends,
    split_steps,
    step_answer,
    step_char_ends,
    token_char_ends,
)

PROB_FLOOR = 1e-6
"""Smallest probability `log_prob` takes the log of (log(1e-6) = -13.8 per step)."""

DELTA_P0 = 0.0
"""The score before the first step in the `delta` form."""

DENSE_FORMS = ("log_prob", "min_form", "delta")


class RewardError(ValueError):
    """Scores or responses that cannot be turned into rewards (the message names the sample)."""


# --------------------------------------------------------------------------- per-sample pieces


def dense_step_rewards(probs: Sequence[float], form: str) -> list[float]:
    """Step probabilities p_1..p_K -> step rewards r_1..r_K (see the module docstring).

    Sums: `log_prob` -> log(prod p_k); `min_form` -> min p_k; `delta` -> p_K.
    """
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
    raise RewardError(f"dense form must be one of {', '.join(DENSE_FORMS)}, got {form!r}")


def has_final_answer(text: str, sep: str = DEFAULT_SEPARATOR) -> bool:
    """The text's last step is an answer step with a non-empty answer (`# Answer\\n\\n5`)."""
    steps = split_steps(text, sep)
    return bool(steps) and step_answer(steps[-1]) is not None


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
    """The response was longer than the cap."""
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def returns(self) -> Tensor:
        """(B,) undiscounted return of each sample: its rewards summed."""
        return self.rewards.sum(dim=1)


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


def _checked_scores(cfg: RewardConfig, scores, outcomes, tokenizer) -> tuple[list | None, list | None]:
    """The inputs this config needs, present and finite: (step probabilities, ground-truth verdicts)."""
    dense = cfg.mode == "dense"
    if dense and cfg.source != "prm":
        raise RewardError(f"dense rewards come from a PRM, but reward.source is {cfg.source!r}")
    if dense or cfg.source in ("prm", "orm"):
        _need("scores", scores, f"for reward.source {cfg.source!r}")
    if cfg.source == "ground_truth" or cfg.outcome_coef > 0:
        _need("outcomes", outcomes, "for ground-truth rewards (reward.source ground_truth or reward.outcome_coef > 0)")
    if dense:
        _need("tokenizer (the policy's)", tokenizer, "to place dense step rewards on the policy's tokens")
    # every score is checked, also for samples a guard overrides later: a NaN is an upstream bug either way
    probs = None if scores is None else [_check_values(i, s, "score of step", True) for i, s in enumerate(scores)]
    truths = None if outcomes is None else [_check_values(i, [o], "outcome", False)[0] for i, o in enumerate(outcomes)]
    if cfg.source == "orm" and probs is not None:
        for i, p in enumerate(probs):
            if len(p) != 1:
                raise RewardError(f"sample {i}: an ORM gives one final probability, got {len(p)} scores")
    return probs, truths


def _dense_row(i: int, row: list[float], text: str, ids: list[int], probs: list[float], form: str,
               tokenizer, sep: str) -> tuple[list[int], list[float], int]:
    """Adds sample i's step rewards into `row`; returns (rewarded step ends, their rewards, unscored steps)."""
    ends = step_token_ends(text, ids, tokenizer, sep)
    if len(probs) > len(ends):
        raise RewardError(f"sample {i}: the reward model scored {len(probs)} steps but the text has {len(ends)} "
                          f"with separator {sep!r}; it split the text differently (another separator?)")
    step_r = dense_step_rewards(probs, form)
    # += : with a merging tokenizer two step ends can share one token
    for end, r in zip(ends, step_r):
        row[end] += r
    return ends[: len(probs)], step_r, len(ends) - len(probs)


def token_rewards(
    cfg: RewardConfig,
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]] | Tensor,
    *,
    scores: Sequence[Sequence[float]] | None = None,
    outcomes: Sequence[float] | None = None,
    tokenizer=None,
    lengths: Sequence[int] | Tensor | None = None,
    has_answer: Sequence[bool] | None = None,
    max_tokens: int | None = None,
    width: int | None = None,
    sep: str = DEFAULT_SEPARATOR,
    sparse_aggregate: str = "prod",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TokenRewards:
    """Rewards on the policy's tokens for B sampled responses.

    texts: B response texts, each the decoding of its token ids (see `step_token_ends`).
    token_ids: B lists of the policy's generated ids (EOS included if generated), or a
        right-padded (B, T') tensor together with `lengths`.
    scores: per sample, the reward model's output: PRM step probabilities (one per step
        of `split_steps(text, sep)`), or an ORM's single final probability.
    outcomes: per sample, the ground-truth verdict 1/0 (the grader / arithmetic checker);
        needed by `source: ground_truth` and by `outcome_coef > 0`.
    tokenizer: the POLICY's tokenizer; needed by dense mode to place step ends.
    lengths: response tokens per sample (default: len of each id list).
    has_answer: per sample, whether a final answer was written (default: detected from the
        text with the step convention).
    max_tokens: the response length cap (None: no cap).
    width: T of the output (default: the longest kept response); at least that.
    sparse_aggregate: how a PRM's steps become one sparse reward (`prod`, the paper's).

    Returns `TokenRewards` with rewards and mask shaped (B, T).
    """
    from rlprm.reward_models import aggregate

    B = len(texts)
    seqs = _sequences(token_ids)
    lens = _lengths(token_ids, lengths)
    for name, seq in (("token_ids", seqs), ("lengths", lens), ("scores", scores), ("outcomes", outcomes),
                      ("has_answer", has_answer)):
        if seq is not None and len(seq) != B:
            raise RewardError(f"{B} texts but {len(seq)} {name}")
    if max_tokens is not None and max_tokens < 1:
        raise RewardError(f"max_tokens must be at least 1, got {max_tokens}")
    probs, truths = _checked_scores(cfg, scores, outcomes, tokenizer)

    kept = [n if max_tokens is None else min(n, max_tokens) for n in lens]
    T = max(kept, default=0)
    if width is not None:
        if width < T:
            raise RewardError(f"width {width} is shorter than the longest kept response ({T} tokens)")
        T = width
    rewards = [[0.0] * T for _ in range(B)]
    ends_out: list[list[int]] = [[] for _ in range(B)]
    step_out: list[list[float]] = [[] for _ in range(B)]
    truncated = [lens[i] > kept[i] for i in range(B)]
    missing = [truncated[i] or not (bool(has_answer[i]) if has_answer is not None else has_final_answer(texts[i], sep))
               for i in range(B)]
    unscored = 0
    for i in range(B):
        if kept[i] == 0:  # nothing generated (EOS stripped): no token can carry a reward
            continue
        row, last = rewards[i], kept[i] - 1
        if missing[i]:
            row[last] = cfg.missing_answer_reward
            continue
        if cfg.mode == "dense":
            ends_out[i], step_out[i], n = _dense_row(i, row, texts[i], seqs[i][: lens[i]], probs[i], cfg.dense_form,
                                                     tokenizer, sep)
            unscored += n
        elif cfg.source == "ground_truth":
            row[last] += truths[i]
        elif cfg.source == "orm":
            row[last] += probs[i][0]
        else:
            row[last] += aggregate(probs[i], sparse_aggregate)
        if cfg.outcome_coef > 0:
            row[last] += cfg.outcome_coef * truths[i]

    reward_t = torch.tensor(rewards, dtype=dtype, device=device).reshape(B, T)
    mask = torch.arange(T, device=device).unsqueeze(0) < torch.tensor(kept, dtype=torch.long, device=device).reshape(B, 1)
    out = TokenRewards(reward_t, mask, ends_out, step_out, missing, truncated)
    returns = out.returns
    answered = torch.tensor([not m for m in missing], dtype=torch.bool, device=device)
    n = max(B, 1)
    out.stats = {
        "return_mean": float(returns.mean()) if B else 0.0,
        "missing_answer_frac": sum(missing) / n,
        "truncated_frac": sum(truncated) / n,
        "empty_responses": float(sum(k == 0 for k in kept)),
        "unscored_steps": float(unscored),
        # answered samples that returned less than a missing answer would: an incentive to stop answering
        "below_missing_answer": float((answered & (returns < cfg.missing_answer_reward)).sum()),
    }
    return out


def add_kl_penalty(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                   kind: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token KL penalty against the reference model.

    rewards, logprobs, ref_logprobs, mask: (B, T). Returns (shaped, kl), both
    (B, T) and 0 at masked positions: kl = `rl.core.kl_penalty(logprobs,
    ref_logprobs, kind)` and shaped = rewards - kl_coef * kl. Every response
    token pays for drifting from the reference, not just the last one, so the
    critic sees where the drift happened.
    """
    m = mask.bool()
    zeros = torch.zeros_like(rewards)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, kind).to(rewards.dtype), zeros)
    shaped = torch.where(m, rewards - kl_coef * kl, zeros)
    return shaped, kl


__all__ = [
    "DELTA_P0", "DENSE_FORMS", "PROB_FLOOR", "RewardError", "TokenRewards", "add_kl_penalty", "dense_step_rewards",
    "has_final_answer", "step_token_ends", "token_rewards",
]
