"""rewards.py: per-step scores -> token rewards, worked out by hand, on more than one tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from rlprm.config import RewardConfig
from rlprm.rewards import (
    PROB_FLOOR,
    RewardError,
    add_kl_penalty,
    dense_step_rewards,
    has_final_answer,
    step_token_ends,
    token_rewards,
)
from rlprm.steps import step_char_ends, token_char_ends

TEXT = "93 + 3 = 96\n96 - 4 = 92\n# Answer\n\n92\n"
# steps end (exclusive, separator included) at chars 12, 24 and 37 = len(TEXT)
NO_ANSWER = "93 + 3 = 96\n96 - 4 = 92\n"
PROBS = [0.9, 0.5, 0.8]


def dense(form, **kw):
    return RewardConfig(mode="dense", source="prm", dense_form=form, **kw)


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
    with pytest.raises(RewardError, match="log_prob"):
        dense_step_rewards(PROBS, "sum")


@pytest.mark.parametrize("probs", [[0.3], [0.9, 0.2, 0.7, 0.1, 1.0], [1.0, 1.0], [0.6, 0.6, 0.05, 0.99]])
def test_returns_equal_their_aggregates_and_extra_steps_never_pay(probs):
    assert sum(dense_step_rewards(probs, "log_prob")) == pytest.approx(math.log(math.prod(probs)))
    assert sum(dense_step_rewards(probs, "min_form")) == pytest.approx(min(probs))
    assert sum(dense_step_rewards(probs, "delta")) == pytest.approx(probs[-1])
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
    assert not has_final_answer(NO_ANSWER) and has_final_answer(TEXT)
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
    with pytest.raises(RewardError, match="ORM gives one"):
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
    # log_prob can go below the missing-answer reward: the stat flags that incentive
    bad = token_rewards(dense("log_prob"), [TEXT], [ids_of(char_tokenizer, TEXT)], scores=[[0.1, 0.1, 0.1]],
                        tokenizer=char_tokenizer)
    assert bad.stats["below_missing_answer"] == 1.0


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


@pytest.mark.parametrize("form", ["log_prob", "min_form", "delta"])
def test_same_rewards_whatever_the_policy_tokenizer(char_tokenizer, bpe_tokenizer, merging_bpe, form):
    cfg = dense(form, outcome_coef=0.25)
    sums, merged_seen = [], False
    for tok in (char_tokenizer, bpe_tokenizer, merging_bpe):
        ids = [ids_of(tok, text) for text in CROSS_TEXTS]
        out = token_rewards(cfg, CROSS_TEXTS, ids, scores=CROSS_SCORES, outcomes=[1, 0, 1], tokenizer=tok)
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
