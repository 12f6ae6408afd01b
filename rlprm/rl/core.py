"""Pure tensor math of the RL algorithms: no models, no tokenizers, no config.

Shapes use B for the batch (one row per sampled response), T for response
tokens, V for the vocabulary, G for the group size of GRPO and S for steps.
Response tensors are `(B, T)` with a `mask` of the same shape marking the real
response tokens (1/True) against padding (0/False). Each row's real tokens must
be one contiguous run (right padding is the convention here; left padding also
works); a hole in the middle would be read as the end of one episode and the
start of another.

Everything here is checked against hand-computed tensors in
tests/test_rl_core.py; the trainers in `rl/ppo.py` and `rl/grpo.py` only wire
these functions together.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

# generic LM math, re-exported here beside the RL math that uses it (rlprm/logprobs.py sits below reward models
# and evaluation, which use it too)
from rlprm.logprobs import LOGIT_CHUNK_ELEMENTS, entropy_from_logits, logprobs_from_logits, token_logprobs

KL_KINDS = ("k1", "k3", "abs", "mse")

PROCESS_FORMS = ("min", "mean", "sum")
"""How GRPO's process advantages aggregate the step rewards from a token on (`process_token_advantages`)."""

FARMABLE_PROCESS_FORMS = ("sum",)
"""Process forms that pay for more steps: a sample raises its advantage by padding with sure steps."""


# --------------------------------------------------------------------------- masked statistics


def _as_weights(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is set.

    x, mask: same shape (e.g. (B, T)). dim=None gives a scalar; an int reduces
    that dimension only. An all-masked slice has mean 0 rather than NaN, so one
    empty response cannot poison a batch statistic.
    """
    w = _as_weights(mask, x)
    x = torch.where(w > 0, x, torch.zeros_like(x))  # padding may hold NaN/inf: never multiply it
    if dim is None:
        return (x * w).sum() / w.sum().clamp(min=1)
    return (x * w).sum(dim) / w.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the masked positions (shapes as `masked_mean`).

    `unbiased` applies Bessel's correction n/(n-1) where n > 1 (with a single
    position the variance is 0 either way).
    """
    mean = masked_mean(x, mask, dim) if dim is None else masked_mean(x, mask, dim).unsqueeze(dim)
    var = masked_mean((x - mean) ** 2, mask, dim)
    if unbiased:
        n = _as_weights(mask, x).sum() if dim is None else _as_weights(mask, x).sum(dim)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """How much of the returns' variance the critic explains: 1 - Var(returns - values) / Var(returns), over the
    masked positions (population variances; cleanrl logs the same for its PPO critics).

    1: the values predict the returns exactly; 0: no better than their mean; below 0: worse than predicting the
    mean. NaN when the returns do not vary (nothing to explain). values, returns, mask: (B, T).
    """
    var_returns = float(masked_var(returns.float(), mask, unbiased=False))
    if var_returns == 0.0:
        return math.nan
    return 1.0 - float(masked_var(returns.float() - values.float(), mask, unbiased=False)) / var_returns


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """`x` standardised with the mean and unbiased variance of its masked positions.

    x, mask: (B, T) -> (B, T). The statistics are taken over the whole batch
    (all masked positions together). `shift_mean=False` keeps the original mean,
    i.e. only rescales (used for rewards, whose sign carries meaning). Padding
    comes out as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# --------------------------------------------------------------------------- padding


def length_groups(prompt_lengths: Tensor, response_lengths: Tensor, group_cost: float | None,
                  max_area: int | None = None) -> list[Tensor]:
    """Rows cut into groups of similar length, so that each group can run padded to its own longest row only.

    prompt_lengths, response_lengths: (B,) long, each row's real tokens on either side of the prompt/response
    boundary (prompts are left-padded, responses right-padded, so a group's width is its longest prompt plus its
    longest response). A group costs rows * width + `group_cost` (a pass's fixed cost, in token columns); the
    rows are sorted by response length (then prompt length) and cut where the total cost is least (dynamic
    programming over the cut points; O(B^2)), with no group of several rows over `max_area` columns (a pass
    whose activations outgrow the CPU's caches costs more per token). `group_cost` None keeps one group of every
    row in its order (on an accelerator, or where every rank must make the same passes). Returns (n_g,) long
    tensors of row indices that together hold every row once, the shortest responses first.
    """
    B = int(response_lengths.shape[0])
    if group_cost is None or B <= 1:
        return [torch.arange(B)]
    order = sorted(range(B), key=lambda i: (int(response_lengths[i]), int(prompt_lengths[i])))
    prompts = [int(prompt_lengths[i]) for i in order]
    responses = [int(response_lengths[i]) for i in order]
    best = [0.0] + [math.inf] * B  # best[j]: the least cost of the first j sorted rows
    cut = [0] * (B + 1)
    for j in range(1, B + 1):
        # sorted by response length: rows i..j-1 are padded to response j-1 and to the longest prompt among them
        prompt = 0
        for i in range(j - 1, -1, -1):
            prompt = max(prompt, prompts[i])
            area = (j - i) * (prompt + responses[j - 1])
            if max_area is not None and area > max_area and i < j - 1:
                break  # more rows only widen the group
            cost = best[i] + area + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], B
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [torch.tensor(order[a:b], dtype=torch.long) for a, b in reversed(bounds)]


# --------------------------------------------------------------------------- advantages


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T),
    with returns = advantages + values, and 0 at masked positions.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1},
    where V_{t+1} and A_{t+1} count as 0 after a row's last response token: the
    episode ends there (EOS or the length cap), so nothing is bootstrapped past
    it. Rewards and values at masked positions are ignored, even NaN ones.
    gamma = lam = 1 gives reward-to-go minus V_t; lam = 0 gives the one-step TD error.
    """
    m = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(m, rewards, zeros)
    values = torch.where(m, values, zeros)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_adv = values.new_zeros(B)
    next_value = values.new_zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = torch.where(m[:, t], delta + gamma * lam * next_adv, values.new_zeros(B))
        advantages[:, t] = adv
        # a masked position passes on zeros, which is what ends the episode at the last real token
        next_adv = adv
        next_value = values[:, t]
    returns = torch.where(m, advantages + values, zeros)
    return advantages, returns


def group_normalize(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath).

    scores: (B,), B = number_of_groups * G, each group being G consecutive
    samples of one prompt. Returns (B,): (score - group mean) / (group std + eps),
    with the unbiased std. A group whose scores are all equal gets 0 (there is
    nothing to prefer), and so does a group of one.
    """
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores cannot be split into groups of {group_size}")
    grouped = scores.reshape(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).reshape(scores.shape)


def group_normalize_steps(step_rewards: Tensor, step_mask: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Process-supervised GRPO: step rewards normalised over all steps of a group.

    step_rewards, step_mask: (B, S), the rewards of each sample's steps, padded
    to S steps. DeepSeekMath normalises each step reward with the mean and std
    of every step reward of every output in the group (not per position).
    Returns (B, S), 0 at padding. Unbiased std; a group with fewer than two
    steps in all, or all-equal rewards, gets 0.
    """
    B, S = step_rewards.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"{B} samples cannot be split into groups of {group_size}")
    r = step_rewards.reshape(-1, group_size * S)
    m = step_mask.reshape(-1, group_size * S)
    mean = masked_mean(r, m, dim=1).unsqueeze(1)
    std = masked_var(r, m, dim=1).sqrt().unsqueeze(1)
    out = torch.where(m.bool(), (r - mean) / (std + eps), torch.zeros_like(r))
    return out.reshape(B, S)


def step_rewards_to_token_advantages(step_rewards_normalized: Tensor, step_end_positions: Tensor, T: int) -> Tensor:
    """Per-token advantages from per-step rewards (process supervision, DeepSeekMath).

    step_rewards_normalized: (B, S) float; step_end_positions: (B, S) long, the
    response-token index of each step's last token, -1 for padding steps.
    Returns (B, T): a token's advantage is the sum of the rewards of the steps
    that end at or after it. Tokens after a row's last step end (e.g. EOS) get 0.
    This sum pays for more steps: see `process_token_advantages` (its `sum` form).
    """
    pos = step_end_positions.long()
    valid = pos >= 0
    if bool((pos >= T).any()):
        raise ValueError(f"a step ends at token {int(pos.max())}, beyond the {T} response tokens")
    placed = torch.zeros(pos.shape[0], T, dtype=step_rewards_normalized.dtype, device=step_rewards_normalized.device)
    rewards = torch.where(valid, step_rewards_normalized, torch.zeros_like(step_rewards_normalized))
    # scatter_add: two steps that end in one (merged) token both count there
    placed.scatter_add_(1, pos.clamp(min=0), rewards)
    # advantage at t = sum of placed[t:], a reverse cumulative sum
    return placed.flip(1).cumsum(1).flip(1)


def event_returns(values: Tensor, pos: Tensor, valid: Tensor, outcome: Tensor, form: str,
                  width: int) -> tuple[Tensor, Tensor, Tensor]:
    """`process_token_advantages`' returns at each event, `min` or `mean` of the events at or after it plus the
    outcome: (positions, valid, returns), each (B, S), the events sorted into token order, padding last."""
    # a stable sort keeps step order within a shared token
    order = torch.where(valid, pos, torch.full_like(pos, width)).argsort(dim=1, stable=True)
    pos, values, valid = pos.gather(1, order), values.gather(1, order), valid.gather(1, order)
    if form == "min":
        inf = torch.full_like(values, float("inf"))
        suffix = torch.where(valid, values, inf).flip(1).cummin(dim=1).values.flip(1)
    else:
        total = values.flip(1).cumsum(dim=1).flip(1)  # padding values are 0
        count = valid.to(values.dtype).flip(1).cumsum(dim=1).flip(1)
        suffix = total / count.clamp(min=1)
    return pos, valid, torch.where(valid, suffix + outcome.unsqueeze(1), torch.zeros_like(values))


def process_token_advantages(event_values: Tensor, event_positions: Tensor, group_size: int, width: int,
                             form: str = "min", outcome: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """Process-supervised GRPO: per-token advantages from each sample's step rewards, normalised in its group.

    event_values: (B, S) float, each sample's reward events (its step rewards,
    e.g. PRM probabilities; a missing answer's penalty as its only event);
    event_positions: (B, S) long, the response-token index of each event, -1
    for padding (any order; two events may share a token). outcome: (B,) float
    or None, a whole-solution term (`outcome_coef * verdict`; 0 where none).
    B = number_of_groups * group_size, each group being consecutive samples of
    one prompt. Returns (B, width) float: 0 at tokens after a sample's last
    event, and everywhere for a sample with no events.

    `reward.tokens.TokenRewards.event_tensors()` gives the three inputs.

    `min` (the default) and `mean`: a token's return is the min (or the mean)
    of the rewards of the events at or after it, plus the sample's outcome:
    G(t) = agg{v_k : pos_k >= t} + outcome. The returns at every event of every
    sample of a group (each sample's G at each of its events) are pooled, and
    A(t) = (G(t) - mean) / (unbiased std + eps) with that pool's statistics
    (DeepSeekMath pools the step rewards of the group in the same way). Every
    G(t) is a member of the pool, so |A| stays bounded when a group's values
    are nearly equal; a group with one event, or all-equal returns, gets 0.
    The first token's G is the solution's value: its worst step (`min`) or its
    average step (`mean`), plus the outcome.
    - `min` cannot be farmed by step count: an extra step can only lower the
      min, so padding with sure steps or repeating a step never raises a
      solution's value, and an all-correct 5-step and 3-step solution get the
      same advantage (PURE's min-form credit assignment, Cheng et al. 2025).
    - `mean` gives equal step counts of equal steps equal advantages, but it
      can be farmed by dilution: a solution with a weak step raises its mean by
      adding sure steps (tests/test_reward_hacking.py pins this).
    - `sum`: DeepSeekMath's process supervision: each event reward is
      normalised with the mean and std of all event rewards of the group
      (`group_normalize_steps`) and a token's advantage is the sum of the
      normalised rewards at or after it (`step_rewards_to_token_advantages`);
      a nonzero outcome is one more event at the sample's last event. WARNING:
      every step whose reward is above the group's mean adds to every earlier
      token's advantage, so more, smaller steps pay: an all-correct 5-step
      solution outranks an all-correct 3-step one (the reward hacking PURE
      documents); and a long, unsure answered solution can end below a
      missing answer's single penalty, so not answering can pay (the floor
      of reward/tokens.py does not survive the sum). Kept for comparison with
      DeepSeekMath; it warns (`FARMABLE_PROCESS_FORMS`).
    """
    if form not in PROCESS_FORMS:
        raise ValueError(f"process advantage form must be one of {', '.join(PROCESS_FORMS)}, got {form!r}")
    B, S = event_values.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"{B} samples cannot be split into groups of {group_size}")
    pos = event_positions.long()
    valid = pos >= 0
    if bool((pos >= width).any()):
        raise ValueError(f"an event sits at token {int(pos.max())}, beyond the {width} response tokens")
    values = torch.where(valid, event_values, torch.zeros_like(event_values))
    outcome = values.new_zeros(B) if outcome is None else outcome.to(values.dtype)
    if form == "sum":
        warnings.warn("GRPO process advantages with form `sum` (DeepSeekMath) pay for more steps: padding a "
                      "solution with sure steps raises its advantage; `min` cannot be farmed that way",
                      stacklevel=2)
        return summed_process_advantages(values, pos, outcome, group_size, width, eps)

    pos, valid, returns = event_returns(values, pos, valid, outcome, form, width)
    pooled, pool_mask = returns.reshape(-1, group_size * S), valid.reshape(-1, group_size * S)
    mean = masked_mean(pooled, pool_mask, dim=1).unsqueeze(1)
    std = masked_var(pooled, pool_mask, dim=1).sqrt().unsqueeze(1)
    normalized = torch.where(pool_mask, (pooled - mean) / (std + eps), torch.zeros_like(pooled)).reshape(B, S)

    # token t takes the return of the first event at or after it: the number of events before t indexes it
    t = torch.arange(width, device=pos.device).view(1, 1, width)
    first = (valid.unsqueeze(-1) & (pos.unsqueeze(-1) < t)).sum(dim=1)  # (B, width)
    adv = normalized.gather(1, first.clamp(max=S - 1))
    return torch.where(first < valid.sum(dim=1, keepdim=True), adv, torch.zeros_like(adv))


def summed_process_advantages(values: Tensor, positions: Tensor, outcome: Tensor, group_size: int, width: int,
                              eps: float = 1e-4) -> Tensor:
    """`process_token_advantages` form `sum` (DeepSeekMath): every event normalised over its group's events, a
    nonzero outcome one more event at the sample's last event, a token's advantage the sum from it on.

    values, positions: (B, S), padding at position -1 with value 0; outcome: (B,). Returns (B, width)."""
    valid = positions >= 0
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1)
    extra = torch.where(valid.any(dim=1) & (outcome != 0), last, torch.full_like(last, -1))
    values = torch.cat([values, outcome.unsqueeze(1)], dim=1)
    positions = torch.cat([positions, extra.unsqueeze(1)], dim=1)
    return step_rewards_to_token_advantages(group_normalize_steps(values, positions >= 0, group_size, eps),
                                            positions, width)


# --------------------------------------------------------------------------- KL


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    logprobs, ref_logprobs: (B, T) -> (B, T), with d = logprobs - ref_logprobs:
    - k1: d (unbiased, can be negative per token)
    - k3: exp(-d) - 1 + d (unbiased and never negative; Schulman's "approximating KL")
    - abs: |d|
    - mse: d^2 / 2 (Schulman's k2)
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k3":
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d**2
    raise ValueError(f"kl kind must be one of {', '.join(KL_KINDS)}, got {kind!r}")


def add_kl_penalty(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                   kind: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token KL penalty against the reference model.

    rewards, logprobs, ref_logprobs, mask: (B, T). Returns (shaped, kl), both
    (B, T) and 0 at masked positions: kl = `kl_penalty(logprobs,
    ref_logprobs, kind)` and shaped = rewards - kl_coef * kl. Every response
    token pays for drifting from the reference, not just the last one, so the
    critic sees where the drift happened.
    """
    m = mask.bool()
    zeros = torch.zeros_like(rewards)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, kind).to(rewards.dtype), zeros)
    shaped = torch.where(m, rewards - kl_coef * kl, zeros)
    return shaped, kl


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, "Fine-tuning LMs from human preferences").

    After each batch: e = clip(KL / target - 1, -0.2, 0.2), and the coefficient
    is multiplied by 1 + e * n_steps / horizon. So a KL 20% or more above target
    raises the coefficient by 0.2 * n_steps / horizon per update; horizon sets how
    many samples it takes to react.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# --------------------------------------------------------------------------- losses


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over all response tokens.

    logprobs (with grad), old_logprobs, advantages, mask: (B, T). With ratio
    rho = exp(logprobs - old_logprobs), the per-token loss is
    max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)). Returns (loss scalar, stats)
    with detached scalars: `clipfrac` (share of tokens where the clipped term is
    the larger one, i.e. whose gradient is cut), `approx_kl` (k3 estimate of
    KL(old || new) = mean(rho - 1 - log rho)) and `ratio` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: the new value may move at most `clip_range_value` from the rollout's.

    values (with grad), old_values, returns, mask: (B, T). Per token
    0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = old + clip(V - old, -c, c),
    averaged over response tokens. Stats: `vf_clipfrac` (share of tokens where
    the clipped error is the larger one) and `value_error` (mean (V - R)^2).
    """
    # clamp(V, old - c, old + c), not old + clamp(V - old, -c, c): the same numbers, but a V inside the range
    # comes back bit for bit, so that rounding never counts an unclipped token as clipped (without dropout an
    # update's first values equal the old ones up to the last bit)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask),
            "value_error": masked_mean(err, mask),
        }
    return loss, stats


__all__ = [
    "AdaptiveKLController", "FARMABLE_PROCESS_FORMS", "FixedKLController", "KL_KINDS", "LOGIT_CHUNK_ELEMENTS",
    "PROCESS_FORMS", "add_kl_penalty", "entropy_from_logits", "explained_variance", "gae", "group_normalize",
    "group_normalize_steps", "kl_penalty", "length_groups", "logprobs_from_logits", "masked_mean", "masked_var",
    "masked_whiten",
    "event_returns", "policy_loss", "process_token_advantages", "step_rewards_to_token_advantages", "summed_process_advantages",
    "token_logprobs", "value_loss",
]
