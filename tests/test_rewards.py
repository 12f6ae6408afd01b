"""reward/tokens.py: per-step scores -> token rewards, worked out by hand, on more than one tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from rlprm.config import RewardConfig
from rlprm.reward.sources import GroundTruth
from rlprm.reward.tokens import (
    ANSWERED_MARGIN,
    PROB_FLOOR,
    RewardError,
    confidence_scores,
    dense_step_rewards,
    dense_step_values,
    floor_running_return,
    prefix_correct_probs,
    sequence_confidence,
    solution_value,
    step_confidence,
    step_token_ends,
)
from rlprm.reward.tokens import token_rewards as _token_rewards
from rlprm.rl.core import add_kl_penalty
from rlprm.steps import step_char_ends, token_char_ends

TEXT = "93 + 3 = 96\n96 - 4 = 92\n# Answer\n\n92\n"
# steps end (exclusive, separator included) at chars 12, 24 and 37 = len(TEXT)
NO_ANSWER = "93 + 3 = 96\n96 - 4 = 92\n"
PROBS = [0.9, 0.5, 0.8]


def token_rewards(cfg, texts, *args, **kw):
    """`rewards.token_rewards`, told which texts answered the way the arithmetic checker reads its `# Answer` step
    (`SampleGrade.answered`): every text of these cases is in the arithmetic task's format; and, as a run is, told
    the rule of `cfg.source`'s reward source."""
    from rlprm.data.problems import from_arithmetic, grade_samples
    from rlprm.reward.sources import SOURCES
    from rlprm.tasks.arithmetic import Problem

    kw.setdefault("rule", SOURCES[cfg.source].rule())
    if "has_answer" not in kw:
        arith = from_arithmetic([Problem(93, (("+", 3), ("-", 4)))])
        kw["has_answer"] = [g.answered for g in grade_samples(arith, [list(texts)], kw.get("sep", "\n"))[0]]
    return _token_rewards(cfg, texts, *args, **kw)


def dense(form, source="prm", **kw):
    # far below every log_prob return of these hand-computed cases (log 0.099 = -2.3 at worst), so the floor of
    # answered returns (missing_answer_reward + ANSWERED_MARGIN) does not bind; the floor has its own tests
    kw.setdefault("missing_answer_reward", -20.0)
    return RewardConfig(mode="dense", source=source, dense_form=form, **kw)


def ids_of(tok, text, eos=True):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if eos else ids


# --------------------------------------------------------------------------- the three dense forms


def test_dense_forms_by_hand():
    lp = dense_step_rewards(PROBS, "log_prob")
    assert lp == pytest.approx([math.log(0.9), math.log(0.5), math.log(0.8)])
    assert sum(lp) == pytest.approx(math.log(0.9 * 0.5 * 0.8))
    # running min 0.9, 0.5, 0.5 -> rewards 0.9, 0.5 - 0.9, 0.5 - 0.5
    mf = dense_step_rewards(PROBS, "min_form")
    assert mf == pytest.approx([0.9, -0.4, 0.0]) and sum(mf) == pytest.approx(min(PROBS))
    # p_0 = 0: 0.9 - 0, 0.5 - 0.9, 0.8 - 0.5; telescopes to the last score
    de = dense_step_rewards(PROBS, "delta")
    assert de == pytest.approx([0.9, -0.4, 0.3]) and sum(de) == pytest.approx(PROBS[-1])
    # p = 0 is floored, not -inf
    assert dense_step_rewards([0.0], "log_prob") == [math.log(PROB_FLOOR)]
    # score: each step's probability itself (DeepSeekMath's process reward); the sum grows with every step
    sc = dense_step_rewards(PROBS, "score")
    assert sc == pytest.approx(PROBS) and sum(sc) == pytest.approx(2.2)
    with pytest.raises(RewardError, match="log_prob"):
        dense_step_rewards(PROBS, "sum")


@pytest.mark.parametrize("probs", [[0.3], [0.9, 0.2, 0.7, 0.1, 1.0], [1.0, 1.0], [0.6, 0.6, 0.05, 0.99]])
def test_returns_equal_their_aggregates_and_extra_steps_never_pay(probs):
    assert sum(dense_step_rewards(probs, "log_prob")) == pytest.approx(math.log(math.prod(probs)))
    assert sum(dense_step_rewards(probs, "min_form")) == pytest.approx(min(probs))
    assert sum(dense_step_rewards(probs, "delta")) == pytest.approx(probs[-1])
    assert sum(dense_step_rewards(probs, "score")) == pytest.approx(sum(probs))
    for extra in (0.0, 0.5, 1.0):
        for form in ("log_prob", "min_form"):
            assert sum(dense_step_rewards(probs + [extra], form)) <= sum(dense_step_rewards(probs, form)) + 1e-12


# --------------------------------------------------------------------------- placement on tokens


def test_dense_rewards_land_on_step_ends_char_tokenizer(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)  # one token per char, then EOS at index 37
    out = token_rewards(dense("log_prob"), [TEXT], [ids], scores=[PROBS], tokenizer=char_tokenizer)
    assert out.rewards.shape == (1, 38) and out.mask.all()
    expected = torch.zeros(1, 38)
    expected[0, 11], expected[0, 23], expected[0, 36] = math.log(0.9), math.log(0.5), math.log(0.8)
    assert torch.allclose(out.rewards, expected)
    assert out.step_token_ends == [[11, 23, 36]]
    assert out.returns.item() == pytest.approx(math.log(0.36))
    assert out.missing_answer == [False] and out.truncated == [False]


def test_outcome_term_lands_on_last_response_token(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    out = token_rewards(dense("min_form", outcome_coef=0.5), [TEXT], [ids], scores=[PROBS], outcomes=[1],
                        tokenizer=char_tokenizer)
    assert out.rewards[0, 37].item() == pytest.approx(0.5)  # the EOS token
    assert out.rewards[0, [11, 23, 36]].tolist() == pytest.approx([0.9, -0.4, 0.0])
    assert out.returns.item() == pytest.approx(0.5 + 0.5)
    with pytest.raises(RewardError, match="outcomes"):
        token_rewards(dense("min_form", outcome_coef=0.5), [TEXT], [ids], scores=[PROBS], tokenizer=char_tokenizer)


@pytest.mark.parametrize("source, scores, outcomes, value", [
    ("ground_truth", None, [1], 1.0),
    ("ground_truth", None, [False], 0.0),
    ("orm", [[0.7]], None, 0.7),
    ("prm", [PROBS], None, 0.36),  # a PRM in sparse mode: the paper's product score
])
def test_sparse_puts_everything_on_the_last_token(char_tokenizer, source, scores, value, outcomes):
    ids = ids_of(char_tokenizer, TEXT)
    short = ids_of(char_tokenizer, "1 + 1 = 2\n# Answer\n\n2\n")
    cfg = RewardConfig(mode="sparse", source=source)
    out = token_rewards(cfg, [TEXT, "1 + 1 = 2\n# Answer\n\n2\n"], [ids, short],
                        scores=None if scores is None else scores * 2, outcomes=None if outcomes is None else outcomes * 2)
    assert out.rewards.shape == (2, len(ids))
    for row, n in ((0, len(ids)), (1, len(short))):
        assert out.rewards[row, n - 1].item() == pytest.approx(value)
        assert out.rewards[row].abs().sum().item() == pytest.approx(abs(value))
        assert out.mask[row].sum().item() == n
    assert not out.mask[1, len(short):].any() and (out.rewards[1, len(short):] == 0).all()


def test_padded_tensor_input_with_lengths_and_fixed_width(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    padded = torch.full((1, 50), char_tokenizer.pad_token_id)
    padded[0, : len(ids)] = torch.tensor(ids)
    cfg = RewardConfig(mode="sparse", source="ground_truth")
    out = token_rewards(cfg, [TEXT], padded, outcomes=[1], lengths=torch.tensor([len(ids)]), width=50)
    assert out.rewards.shape == (1, 50) and out.rewards[0, len(ids) - 1] == 1 and out.mask.sum() == len(ids)
    with pytest.raises(RewardError, match="lengths"):
        token_rewards(cfg, [TEXT], padded, outcomes=[1])
    with pytest.raises(RewardError, match="width"):
        token_rewards(cfg, [TEXT], [ids], outcomes=[1], width=5)


# --------------------------------------------------------------------------- guards


def test_missing_answer_replaces_every_other_reward(char_tokenizer):
    ids = ids_of(char_tokenizer, NO_ANSWER)
    cfg = dense("log_prob", outcome_coef=1.0, missing_answer_reward=-2.0)
    out = token_rewards(cfg, [NO_ANSWER], [ids], scores=[[0.9, 0.9]], outcomes=[0], tokenizer=char_tokenizer)
    assert out.rewards[0, -1].item() == -2.0 and out.rewards.abs().sum().item() == 2.0
    assert out.missing_answer == [True] and out.stats["missing_answer_frac"] == 1.0
    # the caller's own verdict overrides detection
    full = ids_of(char_tokenizer, TEXT)
    out = token_rewards(cfg, [TEXT], [full], scores=[PROBS], outcomes=[1], has_answer=[False], tokenizer=char_tokenizer)
    assert out.returns.item() == -2.0


def test_length_cap_masks_the_tail_and_counts_as_no_answer(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)  # 38 tokens
    cfg = RewardConfig(mode="sparse", source="ground_truth", missing_answer_reward=-1.0)
    out = token_rewards(cfg, [TEXT, TEXT], [ids, ids[:10]], outcomes=[1, 1], max_tokens=10,
                        has_answer=[True, True])
    # sample 0 was cut: masked after 10 tokens, -1 on its last KEPT token whatever the grader said
    assert out.rewards.shape == (2, 10) and out.mask.all()
    assert out.truncated == [True, False] and out.missing_answer == [True, False]
    assert out.rewards[0, 9].item() == -1.0 and out.rewards[0].abs().sum().item() == 1.0
    # sample 1 is exactly as long as the cap: judged as written (here by the caller's verdict)
    assert out.rewards[1, 9].item() == 1.0
    assert out.stats["truncated_frac"] == 0.5
    # a response of exactly max_tokens passes the cap untouched
    out = token_rewards(cfg, [TEXT], [ids], outcomes=[1], max_tokens=len(ids))
    assert out.truncated == [False] and out.returns.item() == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_name_the_sample(char_tokenizer, bad):
    ids = ids_of(char_tokenizer, TEXT)
    with pytest.raises(RewardError, match=r"sample 1: score of step 2 is"):
        token_rewards(dense("delta"), [TEXT, TEXT], [ids, ids], scores=[PROBS, [0.5, 0.5, bad]], tokenizer=char_tokenizer)
    with pytest.raises(RewardError, match=r"sample 0: outcome"):
        token_rewards(RewardConfig(), [TEXT], [ids], outcomes=[bad])
    # checked even when a guard would have replaced the sample's rewards
    with pytest.raises(RewardError, match="sample 0"):
        token_rewards(RewardConfig(mode="sparse", source="orm"), [NO_ANSWER], [ids], scores=[[bad]])


def test_scores_must_be_probabilities_and_orm_gives_one(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    with pytest.raises(RewardError, match=r"sample 0: .* probabilities"):
        token_rewards(dense("log_prob"), [TEXT], [ids], scores=[[0.5, 1.5, 0.5]], tokenizer=char_tokenizer)
    with pytest.raises(RewardError, match="orm in sparse mode gives one final probability"):
        token_rewards(RewardConfig(mode="sparse", source="orm"), [TEXT], [ids], scores=[PROBS])


def test_fewer_scores_reward_the_scored_prefix_more_scores_raise(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    out = token_rewards(dense("log_prob"), [TEXT], [ids], scores=[[0.9, 0.5]], tokenizer=char_tokenizer)
    assert out.step_token_ends == [[11, 23]] and out.rewards[0, 36].item() == 0.0
    assert out.returns.item() == pytest.approx(math.log(0.45)) and out.stats["unscored_steps"] == 1
    with pytest.raises(RewardError, match="scored 4 steps but the text has 3"):
        token_rewards(dense("log_prob"), [TEXT], [ids], scores=[PROBS + [0.5]], tokenizer=char_tokenizer)


def test_text_must_be_the_decoding_of_the_ids(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    with pytest.raises(RewardError, match="does not match the decoding"):
        token_rewards(dense("log_prob"), [TEXT.replace("96", "97", 1)], [ids], scores=[PROBS], tokenizer=char_tokenizer)


def test_empty_response_and_stats(char_tokenizer):
    cfg = RewardConfig(mode="sparse", source="ground_truth")
    out = token_rewards(cfg, ["", TEXT], [[], ids_of(char_tokenizer, TEXT)], outcomes=[0, 1])
    assert out.stats["empty_responses"] == 1 and out.mask[0].sum() == 0 and out.rewards[0].abs().sum() == 0
    # log_prob of an unsure solution (log 0.001 = -6.9) used to return below the missing-answer reward, an
    # incentive to stop answering that the stat flagged (it was 1 here); the answered floor now holds it at -0.9
    bad = token_rewards(dense("log_prob", missing_answer_reward=-1.0), [TEXT], [ids_of(char_tokenizer, TEXT)],
                        scores=[[0.1, 0.1, 0.1]], tokenizer=char_tokenizer)
    assert bad.stats["below_missing_answer"] == 0.0 and bad.returns.item() == pytest.approx(-0.9)


# --------------------------------------------------------------------------- KL penalty


def test_add_kl_penalty_numbers():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    shaped, kl = add_kl_penalty(rewards, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0]]))
    assert torch.allclose(shaped, torch.tensor([[-0.05, 0.1, 1.0, 0.0]]))
    shaped3, kl3 = add_kl_penalty(rewards, logp, ref, mask, kl_coef=0.1, kind="k3")
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0, 0.0]
    assert torch.allclose(kl3, torch.tensor([k3])) and torch.allclose(shaped3, rewards - 0.1 * torch.tensor([k3]))


# --------------------------------------------------------------------------- cross-tokenizer


@pytest.fixture(scope="module")
def merging_bpe(arith_corpus):
    """A byte-level BPE with no pre-tokenisation: its merges cross newlines (`6\\n`, `\\n# Answer\\n\\n`),
    so a step end falls inside a token, and two step ends can share one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlprm.models import SPECIAL_TOKENS, _wrap

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(arith_corpus, trainer=trainer)
    return _wrap(tok, 256)


CROSS_TEXTS = [
    TEXT,
    "93 + 3 = 96\n\n96 - 4 = 92\n92 mod 10 = 2\n# Answer\n\n2\n",  # a blank line between steps
    "5 + 4 = 9\nlast digit of 9 = 9\n# Answer\n\n9",  # no separator after the answer
]
CROSS_SCORES = [PROBS, [0.95, 0.4, 0.7, 0.6], [0.2, 0.99, 0.5]]


@pytest.mark.parametrize("form", ["log_prob", "min_form", "delta", "score"])
def test_same_rewards_whatever_the_policy_tokenizer(char_tokenizer, bpe_tokenizer, merging_bpe, form):
    cfg = dense("min_form", outcome_coef=0.25)
    sums, merged_seen = [], False
    for tok in (char_tokenizer, bpe_tokenizer, merging_bpe):
        ids = [ids_of(tok, text) for text in CROSS_TEXTS]
        out = token_rewards(cfg, CROSS_TEXTS, ids, scores=CROSS_SCORES, outcomes=[1, 0, 1], tokenizer=tok,
                            dense_form=form)
        for text, seq, ends in zip(CROSS_TEXTS, ids, out.step_token_ends):
            tok_ends = token_char_ends(tok, seq)
            for char_end, t in zip(step_char_ends(text), ends):
                # the decoded prefix up to the token reaches the step end; one token less does not
                assert tok_ends[t] >= char_end and (t == 0 or tok_ends[t - 1] < char_end)
                if tok is char_tokenizer:
                    assert tok_ends[t] == char_end
                merged_seen |= tok_ends[t] > char_end
            assert ends == step_token_ends(text, seq, tok)
        sums.append(out.returns)
    assert merged_seen, "the merging tokenizer should put some step end inside a token"
    for other in sums[1:]:
        assert torch.allclose(sums[0], other, rtol=0, atol=1e-6)
    expected = [sum(dense_step_rewards(p, form)) + 0.25 * o for p, o in zip(CROSS_SCORES, [1, 0, 1])]
    assert sums[0].tolist() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- answering never pays less than not


def test_floor_running_return_by_hand():
    # running sums -0.5, -2.5, -3.5 -> floored -0.5, -0.9, -0.9 -> differences
    assert floor_running_return([-0.5, -2.0, -1.0], -0.9) == pytest.approx([-0.5, -0.4, 0.0])
    # a sum that dips below the floor and comes back: -1.0 -> -0.9, then -0.5 (the sum is max(C_K, floor))
    assert floor_running_return([-1.0, 0.5], -0.9) == pytest.approx([-0.9, 0.4])
    # never below the floor: unchanged (the delta form's rewards)
    assert floor_running_return([0.9, -0.4, 0.3], -0.9) == pytest.approx([0.9, -0.4, 0.3])
    assert dense_step_rewards([0.1, 0.1], "log_prob", floor=-0.9) == pytest.approx([-0.9, 0.0])


@pytest.mark.parametrize("missing", [-1.0, 0.5])
@pytest.mark.parametrize("form", ["log_prob", "min_form", "delta", "score"])
@pytest.mark.parametrize("probs", [[0.1, 0.1, 0.1], [0.0, 1.0, 1.0], [0.9, 0.5, 0.8], [1.0, 1.0, 0.0], [0.5, 0.3, 0.2]])
def test_an_answered_return_never_falls_below_the_missing_answer_reward(char_tokenizer, form, probs, missing):
    """Fails on the old code for log_prob: log(0.001) = -6.9 and log(PROB_FLOOR) = -13.8 returned below -1.
    A positive missing-answer reward (0.5) floors every form, score and min_form included."""
    cfg = dense("min_form", missing_answer_reward=missing)
    ids = ids_of(char_tokenizer, TEXT)
    out = token_rewards(cfg, [TEXT], [ids], scores=[probs], tokenizer=char_tokenizer, dense_form=form)
    assert out.returns.item() >= missing + ANSWERED_MARGIN - 1e-6
    # above the floor the return is exactly the form's aggregate; below it, the floor
    exact = sum(dense_step_rewards(probs, form))
    assert out.returns.item() == pytest.approx(max(exact, missing + ANSWERED_MARGIN), abs=1e-6)
    # every extra step still cannot pay: the log_prob step rewards stay <= 0 (with a floor below 0: recipe
    # validation refuses log_prob with a missing-answer reward at or above -0.1)
    if form == "log_prob" and missing < 0:
        assert all(r <= 0 for r in out.step_rewards[0])
    assert out.stats["below_missing_answer"] == 0.0


def test_log_prob_floor_lands_on_the_step_that_crosses_it(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    out = token_rewards(dense("log_prob", missing_answer_reward=-1.0), [TEXT], [ids], scores=[[0.95, 0.01, 0.9]],
                        tokenizer=char_tokenizer)
    # log .95 = -0.051 at step 1; step 2 would go to -4.66: it gets -0.9 - (-0.051); step 3 gets 0
    assert out.step_rewards[0] == pytest.approx([math.log(0.95), -0.9 - math.log(0.95), 0.0])
    assert out.rewards[0, [11, 23, 36]].tolist() == pytest.approx(out.step_rewards[0])


# --------------------------------------------------------------------------- exact: the checker as an oracle PRM


def test_prefix_correct_probs_by_hand():
    assert prefix_correct_probs([True, True, True]) == [1.0, 1.0, 1.0]
    assert prefix_correct_probs([True, False, True]) == [1.0, 0.0, 0.0]  # wrong from the first error on
    assert prefix_correct_probs([False, True]) == [0.0, 0.0]
    assert prefix_correct_probs([]) == []


@pytest.mark.parametrize("form, right, wrong", [
    # wrong = [1, 0, 0]: the second step is the first wrong one (missing_answer_reward -1, floor -0.9)
    ("log_prob", [0.0, 0.0, 0.0], [0.0, -0.9, 0.0]),
    ("min_form", [1.0, 0.0, 0.0], [1.0, -1.0, 0.0]),
    ("delta", [1.0, 0.0, 0.0], [1.0, -1.0, 0.0]),
])
def test_exact_source_dense_by_hand(char_tokenizer, form, right, wrong):
    ids = ids_of(char_tokenizer, TEXT)
    cfg = RewardConfig(mode="dense", source="exact", dense_form=form, missing_answer_reward=-1.0)
    scores = [prefix_correct_probs([True, True, True]), prefix_correct_probs([True, False, True])]
    out = token_rewards(cfg, [TEXT, TEXT], [ids, ids], scores=scores, tokenizer=char_tokenizer)
    assert out.rewards[0, [11, 23, 36]].tolist() == pytest.approx(right)
    assert out.rewards[1, [11, 23, 36]].tolist() == pytest.approx(wrong)
    assert out.rewards.abs().sum(1).tolist() == pytest.approx([sum(map(abs, right)), sum(map(abs, wrong))])
    with pytest.raises(RewardError, match="scores"):
        token_rewards(cfg, [TEXT], [ids], tokenizer=char_tokenizer)


def test_exact_source_sparse_is_one_only_if_every_step_is_right(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    cfg = RewardConfig(mode="sparse", source="exact", sparse_aggregate="mean")  # the aggregate does not apply
    scores = [prefix_correct_probs([True, True, True]), prefix_correct_probs([True, True, False]),
              prefix_correct_probs([True, True])]
    out = token_rewards(cfg, [TEXT, TEXT, NO_ANSWER], [ids, ids, ids_of(char_tokenizer, NO_ANSWER)], scores=scores)
    assert out.returns.tolist() == pytest.approx([1.0, 0.0, -1.0])  # the third has no answer: the guard
    assert out.rewards[0, len(ids) - 1].item() == 1.0 and out.missing_answer == [False, False, True]


# --------------------------------------------------------------------------- confidence: the start's own confidence


def test_step_confidence_by_hand():
    logp = torch.tensor([[-0.1, -0.5, -0.2, -1.0, -0.3, -0.05]])
    got = step_confidence(logp, torch.tensor([[2, 4, -1]]))
    # step 1: tokens 0..2 (lowest -0.5), step 2: tokens 3..4 (lowest -1.0), padding: 0
    assert torch.allclose(got, torch.tensor([[math.exp(-0.5), math.exp(-1.0), 0.0]]))
    # two steps ending in one merged token: the second is read on that token alone
    assert torch.allclose(step_confidence(logp, torch.tensor([[2, 2, 5]])),
                          torch.tensor([[math.exp(-0.5), math.exp(-0.2), math.exp(-1.0)]]))
    with pytest.raises(RewardError, match="beyond"):
        step_confidence(logp, torch.tensor([[6]]))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    seq = sequence_confidence(torch.cat([logp, logp]), mask)
    assert torch.allclose(seq, torch.tensor([math.exp(-0.5), 0.0]))


@pytest.mark.parametrize("form", ["log_prob", "min_form", "delta"])
def test_confidence_source_dense_and_sparse(char_tokenizer, form):
    ids = ids_of(char_tokenizer, TEXT)  # 38 tokens; steps end at 11, 23, 36; EOS at 37
    logp = torch.full((1, 38), -0.01)
    logp[0, 5], logp[0, 20], logp[0, 30], logp[0, 37] = -0.2, -0.7, -0.4, -3.0
    mask = torch.ones(1, 38, dtype=torch.bool)
    dense_scores = confidence_scores([TEXT], [ids], logp, mask, char_tokenizer, dense=True)
    assert dense_scores == [pytest.approx([math.exp(-0.2), math.exp(-0.7), math.exp(-0.4)])]
    # sparse: the whole response, EOS included
    sparse_scores = confidence_scores([TEXT], [ids], logp, mask, char_tokenizer, dense=False)
    assert sparse_scores == [[pytest.approx(math.exp(-3.0))]]
    out = token_rewards(dense(form, source="confidence"), [TEXT], [ids], scores=dense_scores,
                        tokenizer=char_tokenizer)
    assert out.rewards[0, [11, 23, 36]].tolist() == pytest.approx(dense_step_rewards(dense_scores[0], form))
    sparse = token_rewards(RewardConfig(mode="sparse", source="confidence"), [TEXT], [ids], scores=[[0.3]])
    assert sparse.rewards[0, 37].item() == pytest.approx(0.3) and sparse.returns.item() == pytest.approx(0.3)
    with pytest.raises(RewardError, match="one final probability"):
        token_rewards(RewardConfig(mode="sparse", source="confidence"), [TEXT], [ids], scores=dense_scores)


# --------------------------------------------------------------------------- truncation at max_new_tokens


def test_a_response_stopped_at_the_cap_without_eos_is_truncated(char_tokenizer):
    """Fails on the old code: generate never returns more than max_new_tokens, so the old guard (longer than the
    cap) never fired and a response cut at the cap was judged as written."""
    eos = char_tokenizer.eos_token_id
    cut = ids_of(char_tokenizer, TEXT, eos=False)  # 37 tokens, an answer, no EOS: stopped at the cap
    done = ids_of(char_tokenizer, TEXT)  # 38 tokens, ends in EOS
    cfg = RewardConfig(mode="sparse", source="ground_truth", missing_answer_reward=-1.0)
    out = token_rewards(cfg, [TEXT], [cut], outcomes=[1], max_tokens=len(cut), eos_token_id=eos)
    assert out.truncated == [True] and out.missing_answer == [True] and out.returns.item() == -1.0
    assert out.rewards[0, len(cut) - 1].item() == -1.0 and out.stats["truncated_frac"] == 1.0
    # the same length with EOS as its last token finished within the cap: judged as written
    out = token_rewards(cfg, [TEXT], [done], outcomes=[1], max_tokens=len(done), eos_token_id=eos)
    assert out.truncated == [False] and out.returns.item() == 1.0
    # shorter than the cap without EOS (nothing cut it) is judged as written
    out = token_rewards(cfg, [TEXT], [cut], outcomes=[1], max_tokens=len(cut) + 5, eos_token_id=eos)
    assert out.truncated == [False] and out.returns.item() == 1.0
    # dense: no step rewards for a truncated response, only the penalty
    out = token_rewards(dense("min_form", missing_answer_reward=-1.0), [TEXT], [cut], scores=[PROBS],
                        tokenizer=char_tokenizer, max_tokens=len(cut), eos_token_id=eos)
    assert out.step_rewards == [[]] and out.rewards.abs().sum().item() == 1.0


# --------------------------------------------------------------------------- one placement for every consumer


def test_score_form_and_the_dense_form_argument(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    # the config says log_prob; the argument overrides it with score: each p_k at its step's end
    out = token_rewards(dense("log_prob"), [TEXT], [ids], scores=[PROBS], tokenizer=char_tokenizer, dense_form="score")
    assert out.rewards[0, [11, 23, 36]].tolist() == pytest.approx(PROBS)
    assert out.rewards[0].abs().sum().item() == pytest.approx(2.2) and out.returns.item() == pytest.approx(2.2)
    with pytest.raises(RewardError, match="dense_form must be one of log_prob, min_form, delta, score"):
        token_rewards(dense("log_prob"), [TEXT], [ids], scores=[PROBS], tokenizer=char_tokenizer, dense_form="sum")


@pytest.mark.parametrize("form", ["log_prob", "min_form", "delta", "score"])
def test_last_event_at_eos_moves_the_last_step_reward_and_keeps_the_return(char_tokenizer, form):
    ids = ids_of(char_tokenizer, TEXT)  # steps end at 11, 23, 36; EOS at 37
    cfg = dense("min_form", outcome_coef=0.5)
    at_ends = token_rewards(cfg, [TEXT], [ids], scores=[PROBS], outcomes=[1], tokenizer=char_tokenizer,
                            dense_form=form)
    at_eos = token_rewards(cfg, [TEXT], [ids], scores=[PROBS], outcomes=[1], tokenizer=char_tokenizer,
                           dense_form=form, last_event_at_eos=True)
    r = dense_step_rewards(PROBS, form)
    assert at_eos.rewards[0, 36].item() == 0.0
    assert at_eos.rewards[0, [11, 23, 37]].tolist() == pytest.approx([r[0], r[1], r[2] + 0.5])
    assert at_eos.returns.item() == pytest.approx(at_ends.returns.item())
    assert at_eos.step_token_ends == at_ends.step_token_ends == [[11, 23, 36]]  # where the steps end
    assert at_eos.event_positions == [[11, 23, 37]] and at_ends.event_positions == [[11, 23, 36]]
    assert at_eos.event_values == [pytest.approx(r)] and at_eos.outcome_rewards == [0.5]


def test_events_and_outcome_rebuild_the_reward_tensor(char_tokenizer):
    eos = char_tokenizer.eos_token_id
    texts = [TEXT, NO_ANSWER, "", TEXT]
    ids = [ids_of(char_tokenizer, TEXT), ids_of(char_tokenizer, NO_ANSWER), [eos], ids_of(char_tokenizer, TEXT)]
    cfg = dense("min_form", outcome_coef=0.5, missing_answer_reward=-1.0)
    out = token_rewards(cfg, texts, ids, scores=[PROBS, [0.9, 0.9], [], [0.2, 0.2, 0.2]], outcomes=[1, 0, 0, 0],
                        tokenizer=char_tokenizer, dense_form="score", last_event_at_eos=True)
    # answered: its steps (the last moved to EOS, 37); no answer / an EOS alone: the penalty alone at the last token
    assert out.event_positions == [[11, 23, 37], [24], [0], [11, 23, 37]]
    assert out.event_values == [pytest.approx(PROBS), [-1.0], [-1.0], pytest.approx([0.2, 0.2, 0.2])]
    assert out.outcome_rewards == [0.5, 0.0, 0.0, 0.0]  # the outcome term of a wrong answer is 0
    values, positions, outcome = out.event_tensors()
    assert values.shape == positions.shape == (4, 3) and outcome.tolist() == [0.5, 0.0, 0.0, 0.0]
    assert positions.tolist() == [[11, 23, 37], [24, -1, -1], [0, -1, -1], [11, 23, 37]]
    assert values[1].tolist() == [-1.0, 0.0, 0.0]
    rebuilt = torch.zeros_like(out.rewards)
    rebuilt.scatter_add_(1, positions.clamp(min=0), torch.where(positions >= 0, values, torch.zeros_like(values)))
    last = out.mask.sum(1) - 1
    rebuilt[torch.arange(4), last] += outcome
    assert torch.allclose(rebuilt, out.rewards)
    # sparse: one event at the last token, the outcome apart
    sparse = token_rewards(RewardConfig(mode="sparse", source="orm", outcome_coef=0.5), [TEXT], [ids[0]],
                           scores=[[0.7]], outcomes=[1])
    assert sparse.event_positions == [[37]] and sparse.event_values == [[pytest.approx(0.7)]]
    assert sparse.outcome_rewards == [0.5] and sparse.returns.item() == pytest.approx(1.2)
    # an empty response (EOS stripped) has no token and no event
    empty = token_rewards(RewardConfig(), [""], [[]], outcomes=[0])
    assert empty.event_positions == [[]] and empty.event_tensors()[1].tolist() == [[-1]]


# --------------------------------------------------------------------------- "answered": the task's own answer reading

MATH_TEXT = "We compute 2+3.\n\nThat gives 5.\n\nThe final answer is $\\boxed{5}$."


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE: any text (LaTeX, unicode) encodes and decodes back exactly."""
    from rlprm.models import build_bpe_tokenizer

    return build_bpe_tokenizer([MATH_TEXT, TEXT, "\\frac{1}{2} \\boxed{x} # Answer"], vocab_size=280,
                               model_max_length=4096)


def test_a_boxed_math_answer_is_answered_on_the_reward_path(byte_tokenizer):
    """Issue 23 finding 1: a MATH response that writes `\\boxed{5}` was rewarded as "missing answer" (-1)."""
    from rlprm.data.problems import TaskProblem, grade_samples

    grade = grade_samples([TaskProblem("p", "What is 2+3?\n", "5")], [[MATH_TEXT]], "\n\n")[0][0]
    assert grade.answer == "5" and grade.answered and grade.answer_correct
    ids = ids_of(byte_tokenizer, MATH_TEXT)
    kw = dict(outcomes=[float(grade.answer_correct)], has_answer=[grade.answered], tokenizer=byte_tokenizer,
              sep="\n\n", eos_token_id=byte_tokenizer.eos_token_id)
    out = token_rewards(dense("min_form", missing_answer_reward=-1.0), [MATH_TEXT], [ids], scores=[[.9, .8, .95]],
                        **kw)
    assert out.missing_answer == [False] and out.returns.item() == pytest.approx(0.8)
    out = token_rewards(RewardConfig(mode="sparse", source="ground_truth"), [MATH_TEXT], [ids], **kw)
    assert out.missing_answer == [False] and out.returns.item() == 1.0
    # no second rule hides in reward/tokens.py: whether a response answered is the caller's (the grade's) to say
    with pytest.raises(RewardError, match="has_answer"):
        _token_rewards(RewardConfig(mode="sparse", source="ground_truth"), [MATH_TEXT], [ids], outcomes=[1.0],
                       rule=GroundTruth.rule())


def test_answered_is_the_tasks_own_reading():
    """One definition: `SampleGrade.answered`, the answer the task reads (arithmetic: its `# Answer` step, as the
    demo's checker always read it; MATH / GSM8K / PRM800K: `grading.extract_answer`)."""
    from rlprm.data.problems import TaskProblem, from_arithmetic, grade_samples
    from rlprm.tasks.arithmetic import Problem

    arith = from_arithmetic([Problem(93, (("+", 3), ("-", 4)))])[0]
    texts = [TEXT, NO_ANSWER, "93 + 3 = 96\n# Answer\n\n", "#### 92\n", "93 + 3 = 96\n\\boxed{92}\n"]
    assert [g.answered for g in grade_samples([arith], [texts], "\n")[0]] == [True, False, False, False, False]
    math = TaskProblem("m", "?\n", "92")
    texts = [MATH_TEXT, "# Answer\n\n92", "so\n#### 92", "We compute 2+3.\n\nThat gives 5.", "\\boxed{5"]
    assert [g.answered for g in grade_samples([math], [texts], "\n\n")[0]] == [True, True, True, False, False]


# --------------------------------------------------------------------------- GRPO: each step's own value


def test_step_values_are_each_steps_own_not_a_floored_running_sum():
    """Issue 23 finding 2, by hand (missing -1, floor -0.9): the floored running sum (PPO's) gives [.6, .1, .1] and
    [.6, .5, .5] the same rewards [-0.511, -0.389, 0.0]; the values tell them apart."""
    floor = -1.0 + ANSWERED_MARGIN
    ppo = [dense_step_rewards(p, "log_prob", floor) for p in ([.6, .1, .1], [.6, .5, .5])]
    assert ppo[0] == pytest.approx(ppo[1]) and ppo[0] == pytest.approx([math.log(.6), -0.9 - math.log(.6), 0.0])
    assert dense_step_values([.6, .1, .1], "log_prob", floor) == pytest.approx([math.log(.6), -0.9, -0.9])
    assert dense_step_values([.6, .5, .5], "log_prob", floor) == pytest.approx([math.log(.6), math.log(.5),
                                                                                math.log(.5)])
    # the exact checker's [1, 0, 0, 0]: every step from the first wrong one on is worth the floor, not 0
    assert dense_step_rewards([1, 0, 0, 0], "log_prob", floor) == pytest.approx([0.0, -0.9, 0.0, 0.0])
    assert dense_step_values([1, 0, 0, 0], "log_prob", floor) == pytest.approx([0.0, -0.9, -0.9, -0.9])
    assert dense_step_values([.6, .1], "score", floor) == pytest.approx([.6, .1])  # p >= 0: the floor never binds
    assert dense_step_values([.6, .1], "log_prob") == pytest.approx([math.log(.6), math.log(.1)])
    for form in ("min_form", "delta"):
        with pytest.raises(RewardError, match="increments"):
            dense_step_values([.6, .1], form, floor)


def test_solution_value_is_the_objective_of_each_process_form():
    assert solution_value([-0.5, -0.9, -0.2], 0.5, "min") == pytest.approx(-0.4)
    assert solution_value([-0.5, -0.9, -0.2], 0.5, "mean") == pytest.approx(-1.6 / 3 + 0.5)
    assert solution_value([-0.5, -0.9, -0.2], 0.5, "sum") == solution_value([-0.5, -0.9, -0.2], 0.5, None) \
        == pytest.approx(-1.1)
    assert solution_value([], 0.0, "min") == 0.0


def test_token_rewards_with_a_process_form_places_step_values(char_tokenizer):
    ids = ids_of(char_tokenizer, TEXT)
    cfg = dense("log_prob", missing_answer_reward=-1.0)
    probs = [[.6, .1, .1], [.6, .5, .5]]
    out = token_rewards(cfg, [TEXT, TEXT], [ids, ids], scores=probs, tokenizer=char_tokenizer, process_form="min",
                        last_event_at_eos=True)
    assert out.event_values == [pytest.approx([math.log(.6), -0.9, -0.9]),
                                pytest.approx([math.log(.6), math.log(.5), math.log(.5)])]
    assert out.objective.tolist() == pytest.approx([-0.9, math.log(.5)])
    assert out.event_positions[0] == [11, 23, 37]  # the last value on EOS
    # without a process form: PPO's return, whose running sum is floored (unchanged): log(.6 * .5 * .5) < -0.9
    ppo = token_rewards(cfg, [TEXT, TEXT], [ids, ids], scores=probs, tokenizer=char_tokenizer)
    assert ppo.returns.tolist() == pytest.approx([-0.9, -0.9])
    assert torch.allclose(ppo.objective, ppo.returns, atol=1e-6)
    with pytest.raises(RewardError, match="increments"):
        token_rewards(dense("min_form"), [TEXT], [ids], scores=[PROBS], tokenizer=char_tokenizer, process_form="sum")


def test_arithmetic_answered_is_unchanged_on_random_texts():
    """The demo's behaviour is kept: on texts in the arithmetic task's alphabet (and fragments of its `# Answer`
    step), `SampleGrade.answered` is exactly the rule reward/tokens.py used to apply: the last step of `split_steps` is
    an answer step with a non-empty answer."""
    import random

    from rlprm.data.problems import from_arithmetic, grade_samples
    from rlprm.steps import split_steps, step_answer
    from rlprm.tasks.arithmetic import CHARSET, Problem

    rng = random.Random(0)
    pieces = CHARSET + ["# Answer", "# Answer\n\n", "\n# Answer\n\n5\n", "#### 5", "\n\n", "# Answer:", " 7"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(1000)]
    grades = grade_samples(from_arithmetic([Problem(93, (("+", 3),))]), [texts], "\n")[0]
    old = [bool(split_steps(t, "\n")) and step_answer(split_steps(t, "\n")[-1]) is not None for t in texts]
    assert [g.answered for g in grades] == old
    assert 0.1 < sum(old) / len(old) < 0.9  # both kinds are well represented


def test_the_sources_rule_not_its_name_decides_the_placing(char_tokenizer):
    """`token_rewards` reads the rule its source hands it (`RewardSource.rule`), never `cfg.source`: the same
    config and scores placed under another source's rule give that source's reward."""
    from rlprm.reward.sources import SOURCES

    ids = ids_of(char_tokenizer, TEXT)
    cfg = RewardConfig(mode="sparse", source="prm", sparse_aggregate="prod")
    kw = dict(scores=[PROBS], outcomes=[0.0], tokenizer=char_tokenizer)
    as_prm = token_rewards(cfg, [TEXT], [ids], **kw)
    as_exact = token_rewards(cfg, [TEXT], [ids], rule=SOURCES["exact"].rule(), **kw)
    as_truth = token_rewards(cfg, [TEXT], [ids], rule=SOURCES["ground_truth"].rule(), **kw)
    assert as_prm.returns.item() == pytest.approx(0.9 * 0.5 * 0.8)  # prod of the steps
    assert as_exact.returns.item() == pytest.approx(0.5)  # the lowest prefix-correctness
    assert as_truth.returns.item() == 0.0  # the outcome alone
    with pytest.raises(RewardError, match="orm in sparse mode gives one final probability"):
        token_rewards(cfg, [TEXT], [ids], rule=SOURCES["orm"].rule(), **kw)
    with pytest.raises(RewardError, match="step scores"):
        token_rewards(dense("min_form"), [TEXT], [ids], rule=SOURCES["orm"].rule(), **kw)
