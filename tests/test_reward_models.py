"""PRM/ORM building, training examples, single-pass scoring, save/load; tiny models built in code."""

import json
import random

import pytest
import torch

from rlprm.config import ArithmeticConfig, LoraConfig, TinyModelConfig
from rlprm.data.stepwise import CORRECT, INCORRECT, NEUTRAL, LabelledSolution, labels_up_to_first_error
from rlprm.reward.model import (IGNORE_INDEX, RM_FILE, Collator, RewardModel, RewardModelError, SeparatorMismatch,
                                 aggregate, apply_lora, build_reward_model, encode_examples, make_convention, reward_loss,
                                 reward_model_from_causal_lm, score_steps_per_prefix)
from rlprm.reward.trainer import RewardModelTrainer
from rlprm.tasks.arithmetic import corrupt_solution, make_problems, reference_solution

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def problems():
    return make_problems(ArithmeticConfig(), 12, seed=5)


@pytest.fixture(scope="module")
def solutions(problems):
    rng = random.Random(0)
    return [reference_solution(p) if i % 2 else corrupt_solution(p, rng)[0] for i, p in enumerate(problems)]


def tiny_lm(tokenizer, seed=0):
    from rlprm.models import build_tiny_causal_lm

    return build_tiny_causal_lm(TINY, tokenizer, seed=seed)


def tiny_rm(tokenizer, kind="prm", sep="\n", neutral_as=None, seed=0):
    conv = make_convention(kind, sep, neutral_as=neutral_as)
    torch.manual_seed(seed)
    model = reward_model_from_causal_lm(conv, tiny_lm(tokenizer, seed), tokenizer)
    # a fresh head scores everything near 0.5; spread it so that differences would show
    with torch.no_grad():
        model.score.weight.normal_(0, 0.3)
    return RewardModel(model.eval(), tokenizer, conv)


def max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


# --------------------------------------------------------------------------- single pass


@pytest.mark.parametrize("tok", ["char_tokenizer", "bpe_tokenizer"])
def test_single_pass_equals_scoring_each_prefix(request, tok, problems, solutions):
    tokenizer = request.getfixturevalue(tok)
    rm = tiny_rm(tokenizer)
    texts = [p.text for p in problems]
    single = rm.score_steps(texts, solutions, batch_size=5)
    batched_prefixes = score_steps_per_prefix(rm, texts, solutions, batch_size=7)
    one_at_a_time = score_steps_per_prefix(rm, texts, solutions, batch_size=1)
    assert max_diff(single, batched_prefixes) < 1e-5
    assert max_diff(single, one_at_a_time) < 1e-5
    assert [len(s) for s in single] == [len(s) for s in solutions]
    spread = [p for ps in single for p in ps]
    assert max(spread) - min(spread) > 0.05  # not a degenerate constant scorer


@pytest.mark.parametrize("kind", ["prm", "orm"])
def test_padded_batch_scores_like_one_at_a_time(char_tokenizer, problems, solutions, kind):
    rm = tiny_rm(char_tokenizer, kind)
    texts = [p.text for p in problems]
    batched = rm.score_steps(texts, solutions, batch_size=len(texts))
    alone = [rm.score_steps([t], [s])[0] for t, s in zip(texts, solutions)]
    assert max_diff(batched, alone) < 1e-5
    if kind == "orm":
        assert all(len(p) == 1 for p in batched)  # an ORM scores the final answer only
        # its logit is read at the last real token, not at padding: changing the last step changes it
        changed = rm.score_steps([texts[0]], [solutions[0][:-1] + ["# Answer\n\n99"]])[0]
        assert changed != batched[0]


def test_text_solutions_are_split_with_the_saved_separator(char_tokenizer, problems, solutions):
    from rlprm.steps import render_steps

    rm = tiny_rm(char_tokenizer)
    texts = [p.text for p in problems]
    assert max_diff(rm.score_steps(texts, [render_steps(s) for s in solutions]), rm.score_steps(texts, solutions)) < 1e-6


def test_aggregations(char_tokenizer, problems, solutions):
    assert aggregate([0.5, 0.8, 0.25], "prod") == pytest.approx(0.1)
    assert aggregate([0.5, 0.8, 0.25], "min") == 0.25
    assert aggregate([0.5, 0.8, 0.25], "last") == 0.25
    assert aggregate([0.5, 0.8, 0.2], "mean") == pytest.approx(0.5)
    assert aggregate([], "prod") == 0.0  # no steps is no solution
    with pytest.raises(RewardModelError, match="aggregate must be one of"):
        aggregate([0.5], "max")
    rm = tiny_rm(char_tokenizer)
    texts = [p.text for p in problems]
    steps = rm.score_steps(texts, solutions)
    for how in ("prod", "min", "last", "mean"):
        assert rm.score(texts, solutions, aggregate=how) == pytest.approx([aggregate(s, how) for s in steps])
    orm = tiny_rm(char_tokenizer, "orm")
    final = [p[0] for p in orm.score_steps(texts, solutions)]
    assert orm.score(texts, solutions, "prod") == pytest.approx(final) == orm.score(texts, solutions, "min")


def test_three_class_prm_counts_neutral_as_not_wrong(char_tokenizer, problems, solutions):
    rm = tiny_rm(char_tokenizer, neutral_as="neutral")
    assert rm.convention.label_names == ["incorrect", "correct", "neutral"]
    assert rm.convention.correct_classes == [CORRECT, NEUTRAL] and rm.model.config.num_labels == 3
    texts = [p.text for p in problems[:2]]
    from rlprm.steps import encode_batch

    enc = encode_batch(char_tokenizer, [rm.convention.prompt(t) for t in texts], solutions[:2])
    logits = rm._forward([e.input_ids for e in enc])
    probs = torch.softmax(logits, -1)
    expected = [(probs[i, e.step_ends, 1] + probs[i, e.step_ends, 2]).tolist() for i, e in enumerate(enc)]
    assert max_diff(rm.score_steps(texts, solutions[:2]), expected) < 1e-6


def test_too_long_solution_is_refused_clearly(char_tokenizer, problems):
    rm = tiny_rm(char_tokenizer)
    with pytest.raises(RewardModelError, match="positions"):
        rm.score_steps([problems[0].text], [["1 + 1 = 2"] * 200])


# --------------------------------------------------------------------------- save / load and the separator


def test_save_load_round_trip_and_separator_refusal(char_tokenizer, problems, solutions, tmp_path):
    for kind in ("prm", "orm"):
        rm = tiny_rm(char_tokenizer, kind)
        texts = [p.text for p in problems]
        before = rm.score_steps(texts, solutions)
        path = rm.save(tmp_path / kind)
        assert not (tmp_path / f"{kind}.tmp").exists()
        meta = json.loads((path / RM_FILE).read_text())
        assert meta["kind"] == kind and meta["step_separator"] == "\n" and meta["prompt_template"] == "{problem}\n"
        loaded = RewardModel.load(str(path))  # a plain folder path is enough
        assert loaded.kind == kind and loaded.step_separator == "\n"
        assert max_diff(loaded.score_steps(texts, solutions), before) < 1e-6
        with pytest.raises(SeparatorMismatch, match="trained with step separator '\\\\n'"):
            RewardModel.load(path, step_separator=" ; ")
        with pytest.raises(SeparatorMismatch):
            loaded.score_steps(texts, solutions, sep="\n\n")
        assert max_diff(loaded.score_steps(texts[:1], solutions[:1], sep="\n"), before[:1]) < 1e-6


def test_plain_hf_folder_is_not_a_reward_model(char_tokenizer, tmp_path):
    tiny_lm(char_tokenizer).save_pretrained(tmp_path)
    with pytest.raises(RewardModelError, match="no rlprm_rm.json"):
        RewardModel.load(tmp_path)


def test_build_from_a_generator_folder(char_tokenizer, tmp_path, problems, solutions):
    lm = tiny_lm(char_tokenizer, seed=3)
    lm.save_pretrained(tmp_path / "gen")
    char_tokenizer.save_pretrained(tmp_path / "gen")
    for kind, cls in (("prm", "LlamaForTokenClassification"), ("orm", "LlamaForSequenceClassification")):
        conv = make_convention(kind, "\n")
        model = build_reward_model(conv, tmp_path / "gen", char_tokenizer)
        assert type(model).__name__ == cls and model.config.pad_token_id == char_tokenizer.pad_token_id
        # the body is the generator's
        assert torch.equal(model.model.embed_tokens.weight, lm.model.embed_tokens.weight)


# --------------------------------------------------------------------------- training examples and loss


def records_for(problems, solutions):
    from rlprm.tasks.arithmetic import check
    from rlprm.steps import render_steps

    out = []
    for p, s in zip(problems, solutions):
        result = check(p, render_steps(s))
        out.append(LabelledSolution(p.text, result.steps, labels_up_to_first_error(len(result.steps), result.first_error),
                                    result.answer_correct, result.process_correct, result.first_error, p.text))
    return out


def test_encode_examples_and_collator(char_tokenizer, problems, solutions):
    records = records_for(problems, solutions)
    conv = make_convention("prm", "\n")
    examples, counts = encode_examples(char_tokenizer, records, conv, max_length=256)
    assert counts["examples"] == len(records)
    from rlprm.steps import encode_batch

    for r, ex, enc in zip(records, examples, encode_batch(char_tokenizer, [conv.prompt(r.problem) for r in records],
                                                          [r.steps for r in records])):
        labelled = [(e, y) for e, y in zip(enc.step_ends, r.labels) if y is not None]
        assert list(zip(ex["step_ends"], ex["step_labels"])) == labelled
        # steps after the last labelled one are cut: they cannot change a causal model's labels
        assert ex["input_ids"] == enc.input_ids[: labelled[-1][0] + 1]
    batch = Collator(char_tokenizer.pad_token_id, "prm")(examples[:4])
    for i, ex in enumerate(examples[:4]):
        n = len(ex["input_ids"])
        assert batch["attention_mask"][i].sum() == n and batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert (batch["input_ids"][i, n:] == char_tokenizer.pad_token_id).all()  # right padding
        marked = (batch["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert marked == ex["step_ends"] and batch["labels"][i, marked].tolist() == ex["step_labels"]
    # a short max_length cuts after the last step end that fits
    short, counts = encode_examples(char_tokenizer, records, conv, max_length=40)
    assert counts["cut_too_long"] > 0 and all(len(e["input_ids"]) <= 40 for e in short)
    # ORM: the whole solution, the outcome as the label
    orm_examples, _ = encode_examples(char_tokenizer, records, make_convention("orm", "\n"), max_length=256)
    assert [e["label"] for e in orm_examples] == [float(r.answer_correct) for r in records]
    assert Collator(char_tokenizer.pad_token_id, "orm")(orm_examples[:3])["labels"].dtype == torch.float


def test_loss_is_cross_entropy_at_step_ends_only():
    logits = torch.randn(2, 5, 2)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2], labels[1, 4], labels[1, 1] = CORRECT, INCORRECT, CORRECT
    picked = torch.stack([logits[0, 2], logits[1, 1], logits[1, 4]])
    expected = torch.nn.functional.cross_entropy(picked, torch.tensor([CORRECT, CORRECT, INCORRECT]))
    assert reward_loss("prm", logits, labels).item() == pytest.approx(expected.item())
    orm_logits, y = torch.tensor([[2.0], [-1.0]]), torch.tensor([1.0, 0.0])
    assert reward_loss("orm", orm_logits, y).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(orm_logits.flatten(), y).item())


@pytest.mark.parametrize("kind,lora", [("prm", False), ("orm", False), ("prm", True)])
def test_trainer_learns_and_saved_model_scores_the_same(char_tokenizer, tmp_path, kind, lora):
    """Optimizer steps on one batch of labelled arithmetic: the loss falls (it can fit it); LoRA is merged on save."""
    from transformers import TrainingArguments

    rng = random.Random(1)
    probs = make_problems(ArithmeticConfig(), 16, seed=9)
    sols = [reference_solution(p) if rng.random() < 0.5 else corrupt_solution(p, rng)[0] for p in probs]
    records = records_for(probs, sols)
    conv = make_convention(kind, "\n")
    model = reward_model_from_causal_lm(conv, tiny_lm(char_tokenizer), char_tokenizer)
    model = apply_lora(model, LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0), kind)
    if lora:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("lora_A" in n for n in trainable) and any("score" in n and "lora" not in n for n in trainable)
        assert not any("embed_tokens" in n for n in trainable)  # the body itself stays frozen
    examples, _ = encode_examples(char_tokenizer, records, conv, 256)
    args = TrainingArguments(output_dir=str(tmp_path / "work"), per_device_train_batch_size=16, max_steps=25,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, label_names=["labels"], disable_tqdm=True, seed=0)
    trainer = RewardModelTrainer(model=model, args=args, train_dataset=examples,
                                 data_collator=Collator(char_tokenizer.pad_token_id, kind), rm_kind=kind)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    rm = RewardModel(trainer.model, char_tokenizer, conv)
    texts = [p.text for p in probs]
    before = rm.score_steps(texts, sols)
    loaded = RewardModel.load(rm.save(tmp_path / "rm"))
    assert type(loaded.model).__name__.startswith("Llama")  # merged: a plain HF model, no adapters
    assert max_diff(loaded.score_steps(texts, sols), before) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_identity_layers_start_as_the_backbone_and_save_as_plain_hf(char_tokenizer, problems, solutions, tmp_path,
                                                                    family):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlprm.reward.model import add_identity_layers, freeze_body

    if family == "qwen2":
        config = Qwen2Config(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=char_tokenizer.pad_token_id)
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config)
    else:
        lm = tiny_lm(char_tokenizer)
    rm = tiny_rm(char_tokenizer) if family == "llama" else None
    if rm is None:
        conv = make_convention("prm", "\n")
        rm = RewardModel(reward_model_from_causal_lm(conv, lm, char_tokenizer).eval(), char_tokenizer, conv)
    texts = [p.text for p in problems]
    before = rm.score_steps(texts, solutions)
    add_identity_layers(rm.model, 2)
    assert rm.model.config.num_hidden_layers == 4 and len(rm.model.model.layers) == 4
    assert max_diff(rm.score_steps(texts, solutions), before) < 1e-6  # new blocks start as the identity
    freeze_body(rm.model, 2)
    trainable = {n for n, p in rm.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "score")) for n in trainable)
    with torch.no_grad():  # give the new blocks something to do, then check it survives save/load
        rm.model.model.layers[3].mlp.down_proj.weight.normal_(0, 0.1)
    changed = rm.score_steps(texts, solutions)
    assert max_diff(changed, before) > 1e-4
    loaded = RewardModel.load(rm.save(tmp_path / "rm"))
    assert loaded.model.config.num_hidden_layers == 4 and type(loaded.model).__name__ == type(rm.model).__name__
    # (transformers reloads a char tokenizer saved beside a qwen2 model as Qwen2Tokenizer, which drops
    # newlines: steps.py refuses it; the weights are what this test is about, so score with the original)
    loaded = RewardModel(loaded.model, char_tokenizer, loaded.convention)
    assert max_diff(loaded.score_steps(texts, solutions), changed) < 1e-6


# --------------------------------------------------------------------------- confidence stacking


def test_step_min_logprobs_by_hand():
    from rlprm.reward.model import step_min_logprobs

    logps = [0.0, -0.1, -0.2, -3.0, -0.5, -0.4, -7.0, -0.1]
    # prompt = tokens 0..1; step 0 = tokens 2..4 (end 4); step 1 = tokens 5..7 (end 7)
    assert step_min_logprobs(logps, 2, [4, 7]) == [-3.0, -7.0]
    assert step_min_logprobs(logps, 2, [7]) == [-7.0]


def test_token_logprobs_match_the_lm_one_sequence_at_a_time(char_tokenizer):
    from rlprm.reward.model import token_logprobs

    lm = tiny_lm(char_tokenizer, seed=1).eval()
    seqs = [char_tokenizer("12 +3\n12 + 3 = 15\n")["input_ids"], char_tokenizer("7 -1\n")["input_ids"]]
    batched = token_logprobs(lm, seqs, char_tokenizer.pad_token_id, "cpu")
    for seq, got in zip(seqs, batched):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0], -1)
        want = [0.0] + [float(logp[t - 1, seq[t]]) for t in range(1, len(seq))]
        assert len(got) == len(seq) and max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_fit_confidence_learns_the_informative_feature():
    from rlprm.reward.model import fit_confidence, stack_confidence

    rng = random.Random(0)
    probs, mins, ys = [], [], []
    for _ in range(2000):
        wrong = rng.random() < 0.3
        mins.append(rng.uniform(-9, -4) if wrong else rng.uniform(-2, 0))  # wrong steps hold an unlikely token
        probs.append(rng.uniform(0.2, 0.8))                                # an uninformative head
        ys.append(not wrong)
    a, b, c = fit_confidence(probs, mins, ys)
    assert b > 0.5 and abs(a) < 0.5  # the log-probability carries the signal, the head does not
    assert stack_confidence(0.5, -0.5, [a, b, c]) > 0.9 > 0.1 > stack_confidence(0.5, -8.0, [a, b, c])
    with pytest.raises(RewardModelError):
        fit_confidence([], [], [])


@pytest.mark.parametrize("kind", ["prm", "orm"])
def test_stacked_model_single_pass_save_and_load(char_tokenizer, problems, solutions, tmp_path, kind):
    from rlprm.reward.model import CONFIDENCE_DIR

    rm = tiny_rm(char_tokenizer, kind)
    rm.convention.confidence = [0.5, 0.8, 1.0]
    with pytest.raises(RewardModelError, match="no confidence language model"):
        RewardModel(rm.model, char_tokenizer, rm.convention)
    rm.confidence_lm = tiny_lm(char_tokenizer, seed=7).eval()
    texts = [p.text for p in problems]
    stacked = rm.score_steps(texts, solutions, batch_size=5)
    head = rm.score_steps(texts, solutions, batch_size=5, head_only=True)
    assert max_diff(stacked, head) > 0.01
    if kind == "prm":
        assert max_diff(stacked, score_steps_per_prefix(rm, texts, solutions, batch_size=3)) < 1e-5
    path = rm.save(tmp_path / kind)
    assert (path / CONFIDENCE_DIR / "config.json").is_file()
    assert json.loads((path / RM_FILE).read_text())["confidence"] == [0.5, 0.8, 1.0]
    assert max_diff(RewardModel.load(path).score_steps(texts, solutions), stacked) < 1e-6
    import shutil

    shutil.rmtree(path / CONFIDENCE_DIR)
    with pytest.raises(RewardModelError, match="confidence_lm"):
        RewardModel.load(path)


# --------------------------------------------------------------------------- strict loading (issue 23 finding 8)


def _edit_weights(folder, edit):
    """Rewrite a saved folder's model.safetensors through `edit(tensors) -> tensors`."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["prm", "orm"])
def test_a_folder_without_its_head_is_refused(char_tokenizer, tmp_path, kind):
    """A reward-model folder whose score head is gone would load with a random head and score noise: refused,
    naming the missing keys, what it was loaded as and the architectures the checkpoint declares."""
    path = tiny_rm(char_tokenizer, kind).save(tmp_path / kind)
    _edit_weights(path, lambda w: {k: v for k, v in w.items() if not k.startswith("score.")})
    with pytest.raises(RewardModelError, match=rf"as rlprm {kind.upper()}: it lacks .*score\.weight.*declares architectures "
                                               r"\['LlamaFor(Token|Sequence)Classification'\]"):
        RewardModel.load(path)


def test_a_head_of_another_shape_is_refused_by_name(char_tokenizer, tmp_path):
    path = tiny_rm(char_tokenizer, "prm").save(tmp_path / "prm")
    _edit_weights(path, lambda w: {**w, "score.weight": torch.zeros(3, w["score.weight"].shape[1])})
    with pytest.raises(RewardModelError, match=r"score\.weight is \(3, 32\) in the checkpoint, \(2, 32\) in the rlprm PRM"):
        RewardModel.load(path)


def test_a_missing_body_weight_is_refused(char_tokenizer, tmp_path):
    path = tiny_rm(char_tokenizer, "prm").save(tmp_path / "prm")
    _edit_weights(path, lambda w: {k: v for k, v in w.items() if "layers.1.mlp.down_proj" not in k})
    with pytest.raises(RewardModelError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        RewardModel.load(path)
