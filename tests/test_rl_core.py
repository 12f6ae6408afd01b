"""rl/core.py against tensors worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlprm.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    group_normalize,
    group_normalize_steps,
    kl_penalty,
    length_groups,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    process_token_advantages,
    step_rewards_to_token_advantages,
    token_logprobs,
    value_loss,
)

NAN = float("nan")


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# --------------------------------------------------------------------------- masked statistics

X = t([[1, 2, 3, 4], [5, 6, 7, NAN]])
M = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
# masked values 1, 2, 5, 6, 7: sum 21, n 5, mean 4.2; squared deviations
# 10.24 + 4.84 + 0.64 + 3.24 + 7.84 = 26.8 -> biased 5.36, unbiased 6.7


def test_masked_mean_whole_and_per_row_ignores_padding_even_nan():
    assert close(masked_mean(X, M), 4.2)
    assert close(masked_mean(X, M, dim=1), [1.5, 6.0])
    # a float mask works the same; an all-masked row is 0, not NaN
    assert close(masked_mean(X, M.double(), dim=1), [1.5, 6.0])
    assert close(masked_mean(X, torch.zeros_like(M), dim=1), [0.0, 0.0])


def test_masked_var_unbiased_and_biased():
    assert close(masked_var(X, M), 6.7)
    assert close(masked_var(X, M, unbiased=False), 5.36)
    # per row: [1, 2] -> 0.5 unbiased; [5, 6, 7] -> 1.0 unbiased
    assert close(masked_var(X, M, dim=1), [0.5, 1.0])
    # a single position has variance 0, not NaN
    one = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert close(masked_var(X, one), 0.0)


def test_masked_whiten():
    w = masked_whiten(X, M)
    expected = t([[(1 - 4.2), (2 - 4.2), 0, 0], [(5 - 4.2), (6 - 4.2), (7 - 4.2), 0]]) / math.sqrt(6.7)
    assert close(w, expected)
    assert close(masked_mean(w, M), 0.0) and close(masked_var(w, M), 1.0)
    # shift_mean=False only rescales: the mean 4.2 is put back, padding stays 0
    kept = masked_whiten(X, M, shift_mean=False)
    assert close(kept, torch.where(M, expected + 4.2, torch.zeros_like(expected)))


# --------------------------------------------------------------------------- GAE

# row 0: 3 response tokens then padding (reward 99 and value NaN there must not leak)
# row 1: 4 response tokens
R = t([[1, 0, 2, 99], [0, 0, 0, 1]])
V = t([[0.5, 1.0, 1.5, NAN], [0.1, 0.2, 0.3, 0.4]])
GM = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    adv, ret = gae(R, V, GM, gamma=1.0, lam=1.0)
    # reward-to-go: row 0 [3, 2, 2], row 1 [1, 1, 1, 1]
    assert close(ret, [[3, 2, 2, 0], [1, 1, 1, 1]])
    assert close(adv, [[2.5, 1.0, 0.5, 0], [0.9, 0.8, 0.7, 0.6]])


def test_gae_lam0_is_one_step_td():
    adv, ret = gae(R, V, GM, gamma=1.0, lam=0.0)
    # delta_t = r_t + V_{t+1} - V_t, V after the last token = 0
    # row 0: 1 + 1.0 - 0.5, 0 + 1.5 - 1.0, 2 + 0 - 1.5
    # row 1: 0.2 - 0.1, 0.3 - 0.2, 0.4 - 0.3, 1 - 0.4
    assert close(adv, [[1.5, 0.5, 0.5, 0], [0.1, 0.1, 0.1, 0.6]])
    assert close(ret, [[2.0, 1.5, 2.0, 0], [0.2, 0.3, 0.4, 1.0]])


def test_gae_general_gamma_lambda():
    adv, _ = gae(R, V, GM, gamma=0.9, lam=0.5)
    # row 1, gamma*lam = 0.45: deltas t3 = 1 - 0.4 = 0.6, t2 = 0.9*0.4 - 0.3 = 0.06,
    # t1 = 0.9*0.3 - 0.2 = 0.07, t0 = 0.9*0.2 - 0.1 = 0.08
    # A3 = 0.6, A2 = 0.06 + 0.45*0.6 = 0.33, A1 = 0.07 + 0.45*0.33 = 0.2185, A0 = 0.08 + 0.45*0.2185 = 0.178325
    assert close(adv[1], [0.178325, 0.2185, 0.33, 0.6])


def test_gae_padding_does_not_leak():
    other_r, other_v = R.clone(), V.clone()
    other_r[0, 3], other_v[0, 3] = -1000.0, 1e9
    a1, r1 = gae(R, V, GM, 0.95, 0.9)
    a2, r2 = gae(other_r, other_v, GM, 0.95, 0.9)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    assert not torch.isnan(a1).any() and a1[0, 3] == 0 and r1[0, 3] == 0
    # row 0 alone in a batch of its own width gives the same numbers
    solo, _ = gae(R[:1, :3], V[:1, :3], GM[:1, :3], 0.95, 0.9)
    assert close(a1[0, :3], solo[0])


# --------------------------------------------------------------------------- KL


def test_kl_penalty_kinds():
    lp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])  # d = [0.5, -1.0]
    assert close(kl_penalty(lp, ref, "k1"), [[0.5, -1.0]])
    assert close(kl_penalty(lp, ref, "abs"), [[0.5, 1.0]])
    assert close(kl_penalty(lp, ref, "mse"), [[0.125, 0.5]])
    # k3 = exp(-d) - 1 + d: exp(-0.5) - 0.5 = 0.10653066, e - 2 = 0.71828183
    assert close(kl_penalty(lp, ref, "k3"), [[0.10653066, 0.71828183]])
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k9")


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12 is 100% over target, clipped to +20%: 0.1 * (1 + 0.2 * 256 / 10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * 1.00512)
    # KL 3 is 50% under, clipped to -20%
    ctl.value = 0.1
    assert ctl.update(3.0, 256) == pytest.approx(0.1 * (1 - 0.00512))
    # KL 6.6 is 10% over: not clipped, 1 + 0.1 * 1000 / 10000
    ctl.value = 0.1
    assert ctl.update(6.6, 1000) == pytest.approx(0.101)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --------------------------------------------------------------------------- losses


def test_policy_loss_clipping_by_hand():
    # clip range 0.2: the clipped term wins when A > 0 and ratio > 1.2, or A < 0 and ratio < 0.8
    ratios = t([[1.5, 0.5, 1.1, 0.7], [1.5, 0.5, 1.0, 9.0]])
    adv = t([[1, 1, -1, -1], [-1, -1, 2, 5]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    old = torch.zeros_like(ratios)
    logp = ratios.log().requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)):
    # row 0: max(-1.5, -1.2) = -1.2 (clip), max(-0.5, -0.8) = -0.5, 1.1 (inside), max(0.7, 0.8) = 0.8 (clip)
    # row 1: max(1.5, 1.2) = 1.5, max(0.5, 0.8) = 0.8 (clip), -2.0, masked
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8 + 1.5 + 0.8 - 2.0) / 7)
    assert stats["clipfrac"].item() == pytest.approx(3 / 7)
    kept = [1.5, 0.5, 1.1, 0.7, 1.5, 0.5, 1.0]
    assert stats["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in kept) / 7)
    assert stats["ratio"].item() == pytest.approx(sum(kept) / 7)
    assert not stats["clipfrac"].requires_grad
    loss.backward()
    # d/dlogp of -A r is -A r / 7 where unclipped, 0 where clipped or masked
    expected = t([[0, -0.5, 1.1, 0], [1.5, 0, -2.0, 0]]) / 7
    assert close(logp.grad, expected)


def test_explained_variance_by_hand():
    returns = t([[1, 2, 3, 100], [3, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # returns 1, 2, 3, 3, 1: mean 2, var 0.8
    # errors returns - values = 0.5, -0.5, 0, 1, -1 (mean 0, var (0.25 + 0.25 + 0 + 1 + 1) / 5 = 0.5); padding ignored
    values = t([[0.5, 2.5, 3, -50], [2, 2, 7, 7]])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - 0.5 / 0.8)
    assert explained_variance(returns, returns, mask) == 1.0  # a perfect critic
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)  # the mean only
    assert explained_variance(values - 5, returns, mask) == pytest.approx(1 - 0.5 / 0.8)  # blind to a constant offset
    assert explained_variance(-returns, returns, mask) == pytest.approx(1 - 4 * 0.8 / 0.8)  # worse than the mean
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))  # nothing to explain


def test_value_loss_clipping_by_hand():
    # clip 0.25; numbers chosen to be exact in binary so "which term is larger" is not a rounding question
    old = t([[1, 1, 1, 1], [0, 0, 0, 0]])
    values = t([[1.5, 0.875, 0.5, 1.125], [-0.5, 0.375, -0.5, 5.0]])
    returns = t([[2, 0, 1, 1.125], [1, 0, -1, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.25)
    # (V-R)^2 vs (Vclip-R)^2 per token:
    # row 0: 0.25 vs 0.5625 (clip) | 0.765625 both | 0.25 vs 0.0625 | 0 both
    # row 1: 2.25 vs 1.5625 | 0.140625 vs 0.0625 | 0.25 vs 0.5625 (clip) | masked
    assert loss.item() == pytest.approx(0.5 * (0.5625 + 0.765625 + 0.25 + 0 + 2.25 + 0.140625 + 0.5625) / 7)
    assert stats["vf_clipfrac"].item() == pytest.approx(2 / 7)
    assert stats["value_error"].item() == pytest.approx((0.25 + 0.765625 + 0.25 + 0 + 2.25 + 0.140625 + 0.25) / 7)


def test_entropy_from_logits():
    logits = torch.zeros(2, 4, 3)
    logits[0, 1] = torch.tensor([0.0, -math.inf, -math.inf])  # certain: 0, and no NaN from 0 * -inf
    logits[0, 2] = torch.tensor([0.5, 0.25, 0.25]).log()  # 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ent = entropy_from_logits(logits, mask)
    ln3 = math.log(3)
    assert close(ent, [[ln3, 0, 1.5 * math.log(2), 0], [ln3, ln3, 0, 0]], tol=1e-5)
    assert entropy_from_logits(logits).shape == (2, 4)
    assert entropy_from_logits(logits.bfloat16(), mask).dtype == torch.float32


# --------------------------------------------------------------------------- GRPO


def test_group_normalize_known_numbers():
    eps = 1e-4
    scores = t([1, 0, 0, 1, 2, 2, 2, 2])
    out = group_normalize(scores, group_size=4, eps=eps)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2: all equal -> 0
    s = math.sqrt(1 / 3)
    assert close(out, [0.5 / (s + eps), -0.5 / (s + eps), -0.5 / (s + eps), 0.5 / (s + eps), 0, 0, 0, 0])
    # G = 2: [3, 1] -> mean 2, std sqrt(2)
    assert close(group_normalize(t([3, 1]), 2, eps), [1 / (math.sqrt(2) + eps), -1 / (math.sqrt(2) + eps)])
    assert close(group_normalize(t([3, 1]), 1), [0, 0])
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalize(scores, 3)


def test_group_normalize_steps_pools_every_step_of_the_group():
    eps = 1e-4
    # one group of 2 samples: steps [1, 0] and [1, pad]; pooled 1, 0, 1: mean 2/3,
    # unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3
    rewards = t([[1.0, 0.0], [1.0, 99.0]])
    smask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    out = group_normalize_steps(rewards, smask, group_size=2, eps=eps)
    s = math.sqrt(1 / 3)
    assert close(out, [[(1 / 3) / (s + eps), (-2 / 3) / (s + eps)], [(1 / 3) / (s + eps), 0]])


def test_step_rewards_to_token_advantages_by_hand():
    rewards = t([[0.5, -1.0], [2.0, 99.0], [1.0, 2.0]])
    ends = torch.tensor([[1, 4], [2, -1], [3, 3]])  # -1 is a padding step; row 2: two steps end in one token
    adv = step_rewards_to_token_advantages(rewards, ends, T=6)
    # a token's advantage = sum of the rewards of steps ending at or after it
    assert close(adv, [[-0.5, -0.5, -1.0, -1.0, -1.0, 0.0], [2, 2, 2, 0, 0, 0], [3, 3, 3, 3, 0, 0]])
    with pytest.raises(ValueError, match="beyond"):
        step_rewards_to_token_advantages(rewards, torch.tensor([[1, 6], [2, -1], [0, 0]]), T=6)


# --------------------------------------------------------------------------- GRPO's process advantages

# one group of 2: sample 0 has steps ending at tokens 1, 3, 4 (rewards 0.8, 0.5, 0.9), sample 1 one step at token 2
EV = t([[0.8, 0.5, 0.9], [0.6, 7.0, 7.0]])  # 7.0 sits at padding events: never read
EP = torch.tensor([[1, 3, 4], [2, -1, -1]])
EPS = 1e-4


def z(pool):
    """x -> (x - mean) / (unbiased std + eps) over `pool`: the group statistics of process_token_advantages."""
    mean, std = statistics.mean(pool), statistics.stdev(pool)
    return lambda x: (x - mean) / (std + EPS)


def test_process_min_by_hand():
    adv = process_token_advantages(EV, EP, group_size=2, width=6, form="min", eps=EPS)
    # returns at the events: sample 0 min(.8,.5,.9) = .5, min(.5,.9) = .5, .9; sample 1 .6
    # pool {.5, .5, .9, .6}: mean .625, unbiased var (.015625 * 2 + .075625 + .000625) / 3 = .0358333
    n = z([0.5, 0.5, 0.9, 0.6])
    assert statistics.mean([0.5, 0.5, 0.9, 0.6]) == pytest.approx(0.625)
    assert statistics.variance([0.5, 0.5, 0.9, 0.6]) == pytest.approx(0.1075 / 3)
    # a token takes the return of the first event at or after it; after the last event: 0
    assert close(adv, [[n(0.5), n(0.5), n(0.5), n(0.5), n(0.9), 0], [n(0.6), n(0.6), n(0.6), 0, 0, 0]])


def test_process_min_adds_the_outcome_to_every_return():
    adv = process_token_advantages(EV, EP, group_size=2, width=6, form="min", outcome=t([0.5, 0.0]), eps=EPS)
    # sample 0's returns +.5: pool {1.0, 1.0, 1.4, .6}
    n = z([1.0, 1.0, 1.4, 0.6])
    assert close(adv, [[n(1.0), n(1.0), n(1.0), n(1.0), n(1.4), 0], [n(0.6), n(0.6), n(0.6), 0, 0, 0]])


def test_process_mean_by_hand():
    adv = process_token_advantages(EV, EP, group_size=2, width=6, form="mean", eps=EPS)
    # returns: sample 0 mean(.8,.5,.9) = 2.2/3, mean(.5,.9) = .7, .9; sample 1 .6
    pool = [2.2 / 3, 0.7, 0.9, 0.6]
    n = z(pool)
    assert close(adv, [[n(2.2 / 3), n(2.2 / 3), n(0.7), n(0.7), n(0.9), 0], [n(0.6), n(0.6), n(0.6), 0, 0, 0]])


def test_process_sum_is_deepseekmath_and_warns():
    with pytest.warns(UserWarning, match="pay for more steps"):
        adv = process_token_advantages(EV, EP, group_size=2, width=6, form="sum", eps=EPS)
    # each step reward normalised over the group's step rewards {.8, .5, .9, .6}, summed from the token on
    n = z([0.8, 0.5, 0.9, 0.6])
    s0 = n(0.8) + n(0.5) + n(0.9)
    assert close(adv, [[s0, s0, n(0.5) + n(0.9), n(0.5) + n(0.9), n(0.9), 0], [n(0.6), n(0.6), n(0.6), 0, 0, 0]])
    # the same as the two DeepSeekMath pieces it is built of
    legacy = step_rewards_to_token_advantages(group_normalize_steps(EV, EP >= 0, 2, EPS), EP, 6)
    assert close(adv, legacy)
    # a nonzero outcome is one more event, at the sample's last event (token 4); a zero one adds none
    with pytest.warns(UserWarning):
        with_outcome = process_token_advantages(EV, EP, 2, 6, form="sum", outcome=t([0.5, 0.0]), eps=EPS)
    n = z([0.8, 0.5, 0.9, 0.5, 0.6])
    s4 = n(0.9) + n(0.5)
    assert close(with_outcome[0], [n(0.8) + n(0.5) + s4, n(0.8) + n(0.5) + s4, n(0.5) + s4, n(0.5) + s4, s4, 0])


def test_process_events_in_any_order_and_sharing_a_token():
    # sample 0's events listed out of order give the same advantages
    shuffled = process_token_advantages(t([[0.9, 0.8, 0.5], [0.6, 0, 0]]), torch.tensor([[4, 1, 3], [2, -1, -1]]),
                                        2, 6, form="min", eps=EPS)
    assert close(shuffled, process_token_advantages(EV, EP, 2, 6, form="min", eps=EPS))
    # two steps ending in one (merged) token: the token sees both, so its min is the lower one
    adv = process_token_advantages(t([[0.9, 0.3], [0.6, 0]]), torch.tensor([[2, 2], [1, -1]]), 2, 4, "min", eps=EPS)
    n = z([0.3, 0.3, 0.6])  # sample 0's returns at its two events are min(.9, .3) and .3
    assert close(adv, [[n(0.3), n(0.3), n(0.3), 0], [n(0.6), n(0.6), 0, 0]])


@pytest.mark.parametrize("form", ["min", "mean", "sum"])
def test_process_groups_are_normalised_apart_and_empty_samples_get_zero(form):
    values = torch.cat([EV, t([[1.0, 0, 0], [0.0, 0, 0], [0.3, 0, 0], [0.0, 0, 0]])])
    positions = torch.cat([EP, torch.tensor([[0, -1, -1], [1, -1, -1], [0, -1, -1], [-1, -1, -1]])])
    with warnings_if(form == "sum"):
        adv = process_token_advantages(values, positions, group_size=2, width=6, form=form, eps=EPS)
        alone = process_token_advantages(EV, EP, group_size=2, width=6, form=form, eps=EPS)
    # group 1 is what it is alone; group 2: returns {1, 0}: mean .5, std sqrt(.5)
    assert close(adv[:2], alone)
    h = 0.5 / (math.sqrt(0.5) + EPS)
    assert close(adv[2:4], [[h, 0, 0, 0, 0, 0], [-h, -h, 0, 0, 0, 0]])
    # group 3: one event in all (its std is 0) and a sample with no events at all: 0 everywhere
    assert close(adv[4:], torch.zeros(2, 6))


def warnings_if(sum_form: bool):
    import contextlib

    return pytest.warns(UserWarning) if sum_form else contextlib.nullcontext()


@pytest.mark.parametrize("form", ["min", "mean"])
def test_the_issue_example_more_steps_do_not_pay_under_min_and_mean(form):
    """Fails on the old code (only the sum existed): a 5-step all-correct sample got 2.43 at its first token
    and a 3-step all-correct one 1.46 in the same group."""
    # one group of 4: A five steps scored 1, B three steps scored 1, two wrong samples [1, 1, 1, 1, 0, 0]
    values = t([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    positions = torch.tensor([[1, 3, 5, 7, 9, -1], [1, 3, 5, -1, -1, -1], [0, 2, 4, 6, 8, 9], [0, 2, 4, 6, 8, 9]])
    adv = process_token_advantages(values, positions, group_size=4, width=10, form=form, eps=EPS)
    assert adv[0, 0] == pytest.approx(adv[1, 0].item(), abs=1e-9) and adv[0, 0] > 0
    assert adv[2, 0] < adv[0, 0]  # the wrong samples are below the all-correct ones
    with pytest.warns(UserWarning, match="more steps"):
        summed = process_token_advantages(values, positions, group_size=4, width=10, form="sum", eps=EPS)
    # why sum is not the default: pool of 16 ones and 4 zeros, (1 - .8) / (std .4104 + eps) = .487 per step
    per_step = z([1.0] * 16 + [0.0] * 4)(1.0)
    assert summed[0, 0].item() == pytest.approx(5 * per_step) and summed[1, 0].item() == pytest.approx(3 * per_step)
    assert (round(summed[0, 0].item(), 2), round(summed[1, 0].item(), 2)) == (2.44, 1.46)


@pytest.mark.parametrize("form", ["min", "mean", "sum"])
def test_process_not_answering_never_pays_more_than_answering_except_under_sum(form):
    # one group of 4: A answered in 16 unsure steps (0.1 each), B wrote no answer (its -1 penalty alone),
    # C two sure steps, D one
    S, width = 16, 20
    values, positions = torch.zeros(4, S, dtype=torch.float64), torch.full((4, S), -1)
    values[0], positions[0] = 0.1, torch.arange(S)
    values[1, 0], positions[1, 0] = -1.0, 3
    values[2, :2], positions[2, :2] = 1.0, torch.tensor([1, 3])
    values[3, 0], positions[3, 0] = 1.0, 2
    with warnings_if(form == "sum"):
        first = process_token_advantages(values, positions, group_size=4, width=width, form=form, eps=EPS)[:, 0]
    if form == "sum":
        # 16 steps each normalised below the pool's mean add up below the missing answer's single -1:
        # with sum, a long unsure answer pays less than not answering (the floor of reward/tokens.py does not hold)
        assert first[0] < first[1]
    else:
        # min / mean: the answered solution's value (.1) stays above the penalty (-1), whatever its step count
        assert first[1] < first[0] < first[3] == pytest.approx(first[2].item())


def test_process_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="form"):
        process_token_advantages(EV, EP, 2, 6, form="max")
    with pytest.raises(ValueError, match="groups of 3"):
        process_token_advantages(EV, EP, 3, 6)
    with pytest.raises(ValueError, match="beyond"):
        process_token_advantages(EV, EP, 2, 4)


def test_logprobs_from_logits_divides_by_the_sampling_temperature():
    # z = [0, log 3]: at T = 1 softmax is [1/4, 3/4]; at T = 0.5, z / T = [0, 2 log 3] gives [1/10, 9/10]
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    assert torch.allclose(logprobs_from_logits(logits, tokens), torch.tensor([[math.log(0.75), math.log(0.25)]]))
    got = logprobs_from_logits(logits, tokens, temperature=0.5)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor([[math.log(0.9), math.log(0.1)]]))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, temperature=0.0)


# --------------------------------------------------------------------------- chunked log-probs (no full (B, T, V) copy)


def _plain(logits, tokens, temperature):
    """The one-piece computation the chunks must equal: log_softmax and entropy over all of (B, T, V)."""
    z = logits.double() / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_token_logprobs_on_hand_computed_rows():
    # row [0, log 3]: p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - 3/4 ln 3; at T = 0.5: p = [1/10, 9/10]
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [1.0, 1.0]]])
    tokens = torch.tensor([[1, 0, 0]])
    for chunk in (1, 2, 4, 1 << 20):  # one row per chunk, rows split unevenly, all at once
        lp, ent = token_logprobs(logits, tokens, entropy=True, chunk_elements=chunk)
        assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (1, 3)
        assert close(lp, [[math.log(0.75), math.log(0.25), math.log(0.5)]])
        assert close(ent, [[math.log(4) - 0.75 * math.log(3)] * 2 + [math.log(2)]])
        lp, none = token_logprobs(logits, tokens, temperature=0.5, chunk_elements=chunk)
        assert none is None and close(lp, [[math.log(0.9), math.log(0.1), math.log(0.5)]])


def test_token_logprobs_through_a_head_equal_the_full_logits_computation_and_its_gradient():
    """hidden (B, T, H) and an output layer: chunks of rows give the one-piece log-probs and entropy, and the
    gradients (with respect to the hidden states and the head's weight) of a loss on them."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 5, 4, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=True).double()
    tokens = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g, dtype=torch.float64)
    want_lp, want_ent = _plain(head(hidden), tokens, 0.7)
    (want_lp * weights).sum().backward()
    want_grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for chunk in (V, 2 * V, 4 * V, 100 * V):  # 1, 2 (uneven: 15 rows), 4 rows per chunk, all at once
        hidden.grad, head.weight.grad, head.bias.grad = None, None, None
        lp, ent = token_logprobs(hidden, tokens, head=head, temperature=0.7, entropy=True, chunk_elements=chunk)
        assert torch.allclose(lp.double(), want_lp, atol=1e-6) and torch.allclose(ent.double(), want_ent, atol=1e-6)
        (lp * weights).sum().backward()
        for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], want_grads):
            assert torch.allclose(got, want, atol=1e-6)


def test_token_logprobs_make_one_chunk_of_logits_at_a_time():
    """The head is called on at most chunk_elements // V rows at once (what bounds the float32 memory)."""
    H, V = 3, 10
    linear = torch.nn.Linear(H, V)
    rows = []

    def head(x):
        rows.append(x.shape[0])
        return linear(x)

    with torch.no_grad():
        token_logprobs(torch.randn(4, 6, H), torch.zeros(4, 6, dtype=torch.long), head=head, chunk_elements=5 * V)
    assert rows[-5:] == [5, 5, 5, 5, 4] and max(rows) == 5


def test_token_logprobs_of_bf16_logits_are_float32_and_a_banned_token_gives_no_nan():
    logits = torch.tensor([[[0.0, -math.inf, 1.0]]], dtype=torch.bfloat16)
    lp, ent = token_logprobs(logits, torch.tensor([[2]]), entropy=True)
    assert lp.dtype == torch.float32 and torch.isfinite(ent).all()
    assert close(lp, [[-math.log(1 + math.exp(-1))]], tol=1e-6)


def test_value_loss_counts_no_clipping_inside_the_range():
    """Values within clip_range_value of the old ones are not clipped: no rounding of old + (V - old) may count
    a token as clipped (an update's first values equal the old ones up to the last bit, without dropout)."""
    g = torch.Generator().manual_seed(0)
    # values of other magnitudes than the old ones: V - old is rounded, and old + (V - old) may miss V by an ulp
    old, values = 0.1 * torch.randn(64, 32, generator=g), 0.1 * torch.randn(64, 32, generator=g)
    returns = torch.randn(64, 32, generator=g)
    mask = torch.ones(64, 32, dtype=torch.bool)
    loss, stats = value_loss(values, old, returns, mask, 10.0)
    assert stats["vf_clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * ((values - returns) ** 2).mean().item(), rel=1e-6)


def test_length_groups_cut_where_padding_plus_pass_cost_is_least():
    # prompts 2 tokens each; responses 1, 10, 2, 9 -> sorted rows 0 (1), 2 (2), 3 (9), 1 (10).
    # A group costs rows * (longest prompt + longest response) + cost. At cost 5:
    # one group 4 * 12 + 5 = 53; {0,2} {3,1}: 2 * 4 + 5 + 2 * 12 + 5 = 42; {0,2} {3} {1}: 13 + 16 + 17 = 46;
    # {0} {2} {3,1}: 8 + 9 + 29 = 46; all apart: 8 + 9 + 16 + 17 = 50 -> two groups
    prompts, responses = torch.tensor([2, 2, 2, 2]), torch.tensor([1, 10, 2, 9])
    assert [g.tolist() for g in length_groups(prompts, responses, 5)] == [[0, 2], [3, 1]]
    # cost 0: apart (3 + 4 + 11 + 12 = 30) beats any pair ({3,1}: 24 > 23); cost 100: one group, sorted
    assert [g.tolist() for g in length_groups(prompts, responses, 0)] == [[0], [2], [3], [1]]
    assert [g.tolist() for g in length_groups(prompts, responses, 100)] == [[0, 2, 3, 1]]
    # None: one group in the rows' own order (an accelerator, DeepSpeed)
    assert [g.tolist() for g in length_groups(prompts, responses, None)] == [[0, 1, 2, 3]]
    # the longest prompt counts too: row 2's 9-token prompt makes {0,2} cost 2 * (9 + 2) + 5 = 27, apart 8 + 16
    got = length_groups(torch.tensor([2, 2, 9, 2]), responses, 5)
    assert [g.tolist() for g in got] == [[0], [2], [3, 1]]
