"""The LM-scored reward model (rlprm/reward/lm.py): pure functions on hand-computed tensors, the single pass
against per-prefix scoring, save/load, and training that separates right from wrong steps."""

import math

import pytest
import torch

from rlprm.reward.lm import head_logits, lm_loss, scored_spans, span_features, target_logprobs
from rlprm.steps import EncodedSolution


def test_target_logprobs_reads_the_next_token():
    # vocabulary of 2; position 0 predicts token 1 with logits [0, log 3] -> p = 3/4
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 0]])
    lp = target_logprobs(logits, ids)
    assert lp.shape == (1, 3)
    assert lp[0, 0] == 0.0
    assert lp[0, 1].item() == pytest.approx(math.log(3 / 4))
    assert lp[0, 2].item() == pytest.approx(math.log(4 / 5))


def test_spans_cover_each_step_and_the_orm_reads_the_whole_response():
    enc = EncodedSolution(input_ids=list(range(10)), step_ends=[4, 6, 9], prompt_len=3)
    assert scored_spans(enc, "prm") == [(3, 4), (5, 6), (7, 9)]
    assert scored_spans(enc, "orm") == [(3, 9)]
    assert scored_spans(EncodedSolution([1, 2], [], 2), "prm") == []


def test_span_features_and_head():
    lp = torch.tensor([[0.0, -9.0, -1.0, -3.0, -0.5, -0.5]])
    feats = span_features(lp, [[(2, 3), (4, 5)]])[0]
    assert feats.tolist() == [[-3.0, -2.0], [-0.5, -0.5]]  # the prompt's -9 is outside every span
    logits = head_logits(feats, torch.tensor([1.0, 0.5, 2.0]))
    assert logits.tolist() == pytest.approx([-3.0 - 1.0 + 2.0, -0.5 - 0.25 + 2.0])


def test_loss_is_bce_plus_lm_on_positive_spans_only():
    lp = torch.tensor([[0.0, -1.0, -2.0, -4.0]], requires_grad=True)
    head = torch.tensor([1.0, 0.0, 0.0])
    spans, labels = [[(1, 2), (3, 3)]], [[1, 0]]
    loss, parts = lm_loss(lp, spans, labels, head, lm_coef=0.5)
    z = torch.tensor([-2.0, -4.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor([1.0, 0.0]))
    assert parts["bce"] == pytest.approx(float(bce))
    assert parts["lm_nll"] == pytest.approx(1.5)  # tokens of the correct step only: -(-1 - 2) / 2
    assert float(loss) == pytest.approx(float(bce) + 0.75)
    # unlabelled spans contribute nothing
    loss2, _ = lm_loss(lp, [[(1, 2), (3, 3)]], [[1, None]], head, lm_coef=0.5)
    bce_only_first = torch.nn.functional.binary_cross_entropy_with_logits(z[:1], torch.tensor([1.0]))
    assert float(loss2) == pytest.approx(float(bce_only_first) + 0.75)


def _tiny_lm_rm(char_tokenizer, kind="prm"):
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention

    lm = build_tiny_causal_lm(TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
                              char_tokenizer, seed=0)
    conv = make_convention(kind, "\n")
    conv.scorer, conv.lm_head = "lm", [1.2, 0.3, 1.5]
    return RewardModel(lm.eval(), char_tokenizer, conv)


SOLUTIONS = [["93 + 3 = 96", "96 - 4 = 92", "92 mod 10 = 2", "# Answer\n\n2"],
             ["93 + 3 = 6", "6 - 4 = 2", "# Answer\n\n2"],
             ["5 + 1 = 6", "# Answer\n\n6"]]
PROBLEMS = ["93 +3 -4 mod 10", "93 +3 -4 last digit", "5 +1"]


def test_single_pass_equals_per_prefix_and_batching(char_tokenizer):
    from rlprm.reward.model import score_steps_per_prefix

    rm = _tiny_lm_rm(char_tokenizer)
    batched = rm.score_steps(PROBLEMS, SOLUTIONS, batch_size=8)
    one_by_one = [rm.score_steps([p], [s])[0] for p, s in zip(PROBLEMS, SOLUTIONS)]
    prefix = score_steps_per_prefix(rm, PROBLEMS, SOLUTIONS)
    for a, b, c, steps in zip(batched, one_by_one, prefix, SOLUTIONS):
        assert len(a) == len(steps)
        assert a == pytest.approx(b, abs=1e-5)
        assert a == pytest.approx(c, abs=1e-5)


def test_orm_gives_one_score_and_save_load_round_trip(char_tokenizer, tmp_path):
    from rlprm.reward.model import RewardModel

    orm = _tiny_lm_rm(char_tokenizer, "orm")
    before = orm.score_steps(PROBLEMS, SOLUTIONS)
    assert all(len(s) == 1 for s in before)
    orm.save(tmp_path / "orm")
    again = RewardModel.load(tmp_path / "orm", step_separator="\n")
    assert again.convention.scorer == "lm" and again.convention.lm_head == [1.2, 0.3, 1.5]
    assert [s[0] for s in again.score_steps(PROBLEMS, SOLUTIONS)] == pytest.approx([s[0] for s in before], abs=1e-6)


def test_training_learns_to_flag_wrong_steps(char_tokenizer):
    """A few hundred steps on checker-labelled solutions separate right steps from sign-flipped ones on held-out
    problems, which the untrained model does not (a fresh model cannot learn the arithmetic itself this fast:
    the shipped PRM starts from the generator)."""
    from rlprm.config import ArithmeticConfig
    from rlprm.data.stepwise import label_arithmetic_sample
    from rlprm.reward.lm import train_lm_scorer
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import Problem, make_problems, reference_solution

    cfg = ArithmeticConfig(min_ops=1, max_ops=1, final_ops=["none"], operations=["+"], start_max=80)
    problems = make_problems(cfg, 260, seed=3)

    def flipped(p: Problem) -> list[str]:
        b = p.ops[0][1]
        return [f"{p.start} - {b} = {p.start - b}", f"# Answer\n\n{p.start - b}"]

    records = [label_arithmetic_sample(p, render_steps(steps), "\n")[0]
               for p in problems[:200] for steps in (reference_solution(p), flipped(p))]
    assert [r.labels[0] for r in records[:2]] == [1, 0]
    rm = _tiny_lm_rm(char_tokenizer)
    held = problems[200:]

    def separation() -> float:
        right = [rm.score_steps([p.text], [reference_solution(p)])[0][0] for p in held]
        wrong = [rm.score_steps([p.text], [flipped(p)])[0][0] for p in held]
        return sum(r > w for r in right for w in wrong) / (len(right) * len(wrong))

    before = separation()
    fit = train_lm_scorer(rm.model, char_tokenizer, records, rm.convention, steps=150, batch_size=32,
                          learning_rate=3e-3, head_learning_rate=3e-2, lm_coef=1.0, weight_decay=0.0,
                          warmup_ratio=0.05, max_grad_norm=1.0, max_length=256, seed=0, progress=False)
    rm.convention.lm_head = fit["head"]
    after = separation()
    assert fit["steps"] == 150 and fit["examples"] == 400
    assert before < 0.8 and after > 0.95, (before, after)


def test_span_labels_follow_the_conventions_correct_classes():
    from rlprm.reward.lm import span_labels

    enc = EncodedSolution(list(range(8)), [3, 5, 7], 2)
    assert span_labels(enc, [1, 2, 0], "prm", None) == [1, 0, 0]
    assert span_labels(enc, [1, 2, None], "prm", None, correct_classes=(1, 2)) == [1, 1, None]
    assert span_labels(enc, [1, 1, 0], "orm", False) == [0]


def test_logging_the_head_does_not_warn(char_tokenizer):
    """The head's weights are logged every logging step: read as a trainable tensor they raised torch's
    "Converting a tensor with requires_grad=True to a scalar" UserWarning each time (the demo log repeated it)."""
    import warnings

    from rlprm.config import ArithmeticConfig
    from rlprm.data.stepwise import label_arithmetic_sample
    from rlprm.reward.lm import train_lm_scorer
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import make_problems, reference_solution

    problems = make_problems(ArithmeticConfig(min_ops=1, max_ops=1, final_ops=["none"], operations=["+"]), 8, seed=1)
    records = [label_arithmetic_sample(p, render_steps(reference_solution(p)), "\n")[0] for p in problems]
    rm = _tiny_lm_rm(char_tokenizer)
    logged = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lm_scorer(rm.model, char_tokenizer, records, rm.convention, steps=3, batch_size=4,
                        learning_rate=1e-3, head_learning_rate=1e-2, lm_coef=1.0, weight_decay=0.0,
                        warmup_ratio=0.0, max_grad_norm=1.0, max_length=256, seed=0, progress=False,
                        log=lambda record, step: logged.append(record), logging_steps=1)
    assert len(logged) == 3 and all(isinstance(r["train/head_b"], float) for r in logged)
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("groups", [1, 2, 3, 7])
def test_length_groups_give_the_one_pass_log_probs_in_batch_order(char_tokenizer, groups):
    """A training batch run in length-sorted slices (each padded to its own longest) reads every real token as one
    right-padded pass does, row for row in the batch's order, and its gradient is the one pass's."""
    from rlprm.reward.lm import batch_token_logprobs, pad_batch

    from .test_reward_models import tiny_lm

    model = tiny_lm(char_tokenizer, 0)
    texts = ["12 + 3 = 15\n", "7 - 2 = 5\n5 + 1 = 6\n", "9\n", "40 + 40 = 80\n80 - 1 = 79\n79 + 2 = 81\n", "3 + 3 = 6\n"]
    seqs = [char_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(s) for s in seqs}) == len(seqs)  # lengths differ, and are not in order
    pad = char_tokenizer.pad_token_id
    ids, mask = pad_batch(seqs, pad)
    one = target_logprobs(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids) * mask
    split = batch_token_logprobs(model, seqs, pad, groups=groups)
    assert split.shape == one.shape
    assert torch.allclose(split * mask, one, atol=1e-5)
    weights = torch.rand(one.shape, generator=torch.Generator().manual_seed(1)) * mask
    grads = []
    for lp in (one, split):
        model.zero_grad()
        (lp * weights).sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().sum() > 0
