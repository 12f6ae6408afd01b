"""Public PRM families through one API, each checked against its model card's own way of scoring.

Every family gets a tiny random stand-in (rlprm/testing/standins.py: the family's special tokens, chat
template, head shape, label order and weight names), saved to a temporary folder and loaded by
`load_reward_model`. The references below are written separately, the way each card's snippet scores: the
whole conversation or text built as a string, tokenized at once, one solution at a time, the model's weights
read back from the saved files where the card's code has its own head. `score_steps` (ids built piece by
piece, markers appended as token ids, one padded batch) must agree to 1e-5, batched and one by one.
"""

from __future__ import annotations

import typing

import pytest
import torch

from rlprm.reward.adapters import FAMILIES, AdapterError, HubPRM, detect_family, load_reward_model
from rlprm.testing.standins import save_standin

PROBLEMS = [
    "What is 12 + 5?",
    "Janet has 16 eggs and eats 3. How many are left?",
    "Solve 2x + 3 = 11.",
    "Start with 7. Add 5.",
]
SOLUTIONS = [
    ["Start with 12.", "Add 5 to get 17.", "# Answer\n\n17"],
    ["Step 1: Janet has 16 eggs per day.", "Step 2: She eats 3, so 16 - 3 = 13.", "Step 3: 13 - 1 = 12.",
     "The answer is \\boxed{12}."],
    ["Let x be the number.", "Then 2x = 8, so x = 4."],
    ["7 + 5 = 12", "12 mod 10 = 2", "# Answer\n\n2", "We compute the area: $\\frac{1}{2} \\cdot 6 \\cdot 4 = 12$."],
]
TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_prms")
    return {family: save_standin(family, root / family) for family in
            ("qwen_prm", "pure_prm", "math_shepherd", "rlhflow", "value_head", "implicit")}


def _load(folders, family, **kw):
    extra = {"reference": folders[family] / "reference", "beta": 0.5} if family == "implicit" else {}
    return load_reward_model(folders[family], family, **extra, **kw)


def _ids(out):
    """apply_chat_template(tokenize=True) gives a list or a BatchEncoding, by transformers version."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --------------------------------------------------------------------------- references, from the cards


def ref_qwen_prm(folder, problem, steps):
    """Qwen2.5-Math-PRM card: system + user + assistant "<extra_0>".join(steps) + "<extra_0>", rendered by the
    chat template, encoded whole; softmax of the 2-way head at <extra_0>, column 1. The head is applied by hand
    from the saved tensors `score.0.*` / `score.2.*` (the published names), the body is a plain Qwen2Model."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2Model

    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
                {"role": "user", "content": problem},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = torch.tensor([tok.encode(text)])
    w = _weights(folder)
    body = Qwen2Model(AutoConfig.from_pretrained(folder)).eval()
    body.load_state_dict({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")})
    with torch.no_grad():
        h = body(input_ids=ids).last_hidden_state[0]
        inner = torch.relu(torch.nn.functional.linear(h, w["score.0.weight"], w["score.0.bias"]))
        logits = torch.nn.functional.linear(inner, w["score.2.weight"], w["score.2.bias"])
    probs = torch.softmax(logits, dim=-1)[:, 1]
    sep = tok.encode("<extra_0>")[0]
    return probs[ids[0] == sep].tolist()


def ref_pure_prm(folder, problem, steps):
    """PURE-PRM-7B was trained by TRL's PRMTrainer, whose tokenize_row builds: BOS when the tokenizer has one, the
    prompt's ids, then each completion's ids followed by the ids of the separator "\\n", labelled at its last
    token. The card's step reward is p(+) - p(-) of AutoModelForTokenClassification's softmax; the adapter's
    probability is p(+) = (1 + reward) / 2."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    sep = tok.encode("\n", add_special_tokens=False)
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(problem, add_special_tokens=False)["input_ids"]
    reads = []
    for step in steps:
        ids += tok(step, add_special_tokens=False)["input_ids"] + sep
        reads.append(len(ids) - 1)
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)
    reward = probs[:, 1] - probs[:, 0]
    return ((1 + reward[reads]) / 2).tolist()


def ref_math_shepherd(folder, problem, steps):
    """math-shepherd card: f"{question} {output}", output = steps each ending in " ки", joined by "\\n";
    softmax over the logits of the +/- candidates at the positions of the tag id. The card takes the ids from
    Mistral's tokenizer, whose encodings start with a space (`encode("+ -")[1:]`, `encode("ки")[-1]`): the
    stand-in's byte-level BPE has no such prefix, so the space is written out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    output = "\n".join(f"{s} ки" for s in steps)
    ids = torch.tensor([tok.encode(f"{problem} {output}")])
    candidates = tok.encode(" + -", add_special_tokens=False)
    tag = tok.encode(" ки", add_special_tokens=False)[-1]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        scores = model(ids).logits[0][:, candidates].softmax(dim=-1)[:, 0]
    return scores[ids[0] == tag].tolist()


def ref_rlhflow(folder, problem, steps):
    """RLHFlow README / ProcessBench's run_eval_prm_rlhflow.py: the conversation up to step k (each step a user
    turn, each answered "+"), rendered and tokenized by the chat template; P(+) against P(-) from the logits at
    position -3 (the token before "+<|eot_id|>"), one conversation per step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    plus, minus = tok.encode("+")[-1], tok.encode("-")[-1]
    conversation, out = [], []
    for k, step in enumerate(steps):
        conversation.append({"role": "user", "content": problem + " " + step if k == 0 else step})
        conversation.append({"role": "assistant", "content": "+"})
        ids = torch.tensor([_ids(tok.apply_chat_template(conversation, tokenize=True))])
        with torch.no_grad():
            logits = model(ids).logits[0, -3, [plus, minus]]
        out.append(float(logits.softmax(-1)[0]))
    return out


def ref_value_head(folder, problem, steps):
    """Skywork's prepare_input, as written in tests/test_hub_parity.py from its card (every line of a step is a
    piece of its own, followed by the "\\n" id; a step's score is at the end of its last line)."""
    from .test_hub_parity import card_value_head

    return card_value_head(folder)(problem, steps)[2]


def ref_implicit(folder, problem, steps, beta=0.5):
    """EurusPRM's card snippet, as written in tests/test_hub_parity.py: the whole conversation encoded at once, the
    step boundaries from the card's step_last_tokens; P = sigmoid(q_k - q_(k-1))."""
    from .test_hub_parity import card_implicit

    return card_implicit(folder, beta=beta)(problem, steps)[2]


REFERENCES = {"qwen_prm": ref_qwen_prm, "pure_prm": ref_pure_prm, "math_shepherd": ref_math_shepherd, "rlhflow": ref_rlhflow,
              "value_head": ref_value_head, "implicit": ref_implicit}


def _max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", list(REFERENCES))
def test_family_matches_its_card_batched_and_alone(folders, family):
    rm = _load(folders, family)
    assert isinstance(rm, HubPRM) and rm.kind == "prm" and rm.adapter == family
    reference = [REFERENCES[family](folders[family], p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    batched = rm.score_steps(PROBLEMS, SOLUTIONS, batch_size=len(PROBLEMS))  # one padded batch
    alone = [rm.score_steps([p], [s])[0] for p, s in zip(PROBLEMS, SOLUTIONS)]
    assert _max_diff(batched, reference) < TOL
    assert _max_diff(alone, reference) < TOL
    flat = [x for ps in batched for x in ps]
    assert max(flat) - min(flat) > 1e-3, "a degenerate constant scorer would hide mistakes"


def test_texts_are_split_with_the_step_convention(folders):
    rm = _load(folders, "qwen_prm")
    # the first three round-trip through text (the fourth has a step after its answer step)
    texts = ["".join(s + "\n" for s in steps) for steps in SOLUTIONS[:3]]
    assert _max_diff(rm.score_steps(PROBLEMS[:3], texts, sep="\n"), rm.score_steps(PROBLEMS[:3], SOLUTIONS[:3])) < TOL
    assert rm.score(PROBLEMS[:1], SOLUTIONS[:1], aggregate="min")[0] == pytest.approx(
        min(rm.score_steps(PROBLEMS[:1], SOLUTIONS[:1])[0]))


def test_separator_is_a_token_id_not_text(folders):
    """A step whose text contains "<extra_0>" still gets one score: positions come from where ids were appended."""
    rm = _load(folders, "qwen_prm")
    tricky = [["Write <extra_0> here.", "Then stop."]]
    enc = rm.encode(PROBLEMS[:1], tricky)[0]
    assert len(enc.reads) == 2 and all(enc.input_ids[r] == rm.family.step_id for r in enc.reads)
    assert len(rm.score_steps(PROBLEMS[:1], tricky)[0]) == 2


def test_qwen_prm_weight_names_and_lm_head_ignored(folders, tmp_path):
    """The published names load as they are: body `model.*`, head score.0/score.2; an lm_head is ignored."""
    from safetensors.torch import save_file

    from rlprm.reward.adapters.qwen_arch import QwenProcessRewardModel

    w = _weights(folders["qwen_prm"])
    head = {k for k in w if not k.startswith("model.")}
    assert head == {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"}
    hidden = w["model.embed_tokens.weight"].shape[1]
    assert w["score.0.weight"].shape == (hidden, hidden) and w["score.2.weight"].shape == (2, hidden)
    # the same tensors under a copy that also carries an lm_head, as a published checkpoint might
    import shutil

    copy = tmp_path / "with_lm_head"
    shutil.copytree(folders["qwen_prm"], copy)
    save_file({**w, "lm_head.weight": torch.zeros_like(w["model.embed_tokens.weight"])},
              str(copy / "model.safetensors"), metadata={"format": "pt"})
    model = QwenProcessRewardModel.from_pretrained(str(copy))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in w.items())
    assert _max_diff(load_reward_model(copy).score_steps(PROBLEMS, SOLUTIONS),
                     _load(folders, "qwen_prm").score_steps(PROBLEMS, SOLUTIONS)) < TOL


def test_detection_and_errors(folders, tmp_path, char_tokenizer):
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

    assert detect_family(folders["qwen_prm"]) == "qwen_prm"
    assert detect_family(folders["value_head"]) == "value_head"
    assert detect_family(folders["pure_prm"]) == "pure_prm"  # transformers' own *ForTokenClassification
    for family in ("math_shepherd", "rlhflow", "implicit"):
        assert detect_family(folders[family]) is None
        with pytest.raises(AdapterError, match="reward.adapter.*qwen_prm.*math_shepherd.*rlhflow.*value_head.*implicit"):
            load_reward_model(folders[family])
    with pytest.raises(AdapterError, match="reward.reference_model"):
        load_reward_model(folders["implicit"], "implicit")
    with pytest.raises(AdapterError, match="unknown PRM adapter"):
        load_reward_model(folders["qwen_prm"], "qwen")
    # our own folders load as RewardModel, detected or named
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm

    conv = make_convention("prm", "\n")
    lm = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
                              char_tokenizer)
    RewardModel(reward_model_from_causal_lm(conv, lm, char_tokenizer), char_tokenizer, conv).save(tmp_path / "ours")
    assert isinstance(load_reward_model(tmp_path / "ours"), RewardModel)
    assert isinstance(load_reward_model(tmp_path / "ours", "rlprm"), RewardModel)
    with pytest.raises(AdapterError, match="rlprm reward model"):
        load_reward_model(tmp_path / "ours", "qwen_prm")
    with pytest.raises(AdapterError, match="not an rlprm reward model"):
        load_reward_model(folders["qwen_prm"], "rlprm")


def test_recipe_families_match_the_loader():
    from rlprm.config import PRMAdapter

    assert set(typing.get_args(PRMAdapter)) == set(FAMILIES)


@pytest.mark.parametrize("family", list(REFERENCES))
def test_single_pass_equals_scoring_each_prefix(folders, family):
    """A causal model's output at a step's read position has seen only the prefix: one pass = every prefix."""
    from rlprm.reward.adapters.common import score_steps_per_prefix

    rm = _load(folders, family)
    assert _max_diff(rm.score_steps(PROBLEMS, SOLUTIONS, batch_size=3),
                     score_steps_per_prefix(rm, PROBLEMS, SOLUTIONS, batch_size=5)) < TOL


def test_implicit_single_pass_equals_each_prefix_cumulative_too(folders):
    """The per-prefix reference reads only step k's tokens (or, cumulative, every token up to it)."""
    from rlprm.reward.adapters.common import score_steps_per_prefix

    rm = _load(folders, "implicit")
    rm.family.cumulative = True
    assert _max_diff(rm.score_steps(PROBLEMS, SOLUTIONS, batch_size=3),
                     score_steps_per_prefix(rm, PROBLEMS, SOLUTIONS, batch_size=5)) < TOL


@pytest.mark.parametrize("family", ["math_shepherd", "rlhflow", "implicit"])
def test_lm_families_never_materialise_full_vocabulary_logits(folders, family, monkeypatch):
    """The body runs once and the LM head only where read: the `+`/`-` rows at read positions (tag families), or
    chunks of positions (implicit, here 3 at a time); never (B x T x vocab). Scores stay the card's."""
    import rlprm.reward.adapters.implicit as implicit

    rm = _load(folders, family)
    models = [rm.family.model] + ([rm.family.reference] if family == "implicit" else [])
    vocab = models[0].get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(implicit, "HEAD_CHUNK_ELEMENTS", 3 * vocab, raising=False)
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
             for m in models]
    try:
        scores = rm.score_steps(PROBLEMS, SOLUTIONS, batch_size=len(PROBLEMS))
    finally:
        for h in hooks:
            h.remove()
    assert all(len(shape) == 2 and shape[0] <= 3 for shape in shapes), shapes
    assert bool(shapes) == (family == "implicit")
    reference = [REFERENCES[family](folders[family], p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    assert _max_diff(scores, reference) < TOL


def test_single_pass_stops_at_the_last_read_position(folders, monkeypatch):
    """rlhflow's last verdict and the template's closing tokens follow the last read: they are not run."""
    rm = _load(folders, "rlhflow")
    full = rm.encode(PROBLEMS, SOLUTIONS)
    assert all(len(e.input_ids) > e.reads[-1] + 1 for e in full)
    seen = []
    score_batch = rm.family.score_batch
    monkeypatch.setattr(rm.family, "score_batch", lambda batch: seen.extend(batch) or score_batch(batch))
    rm.score_steps(PROBLEMS, SOLUTIONS)
    assert sorted(len(e.input_ids) for e in seen) == sorted(e.reads[-1] + 1 for e in full)


def test_a_model_that_transforms_its_logits_is_refused(folders):
    """Applying the LM head alone at read positions would skip a logit soft-cap: refused, not silently wrong."""
    rm = _load(folders, "math_shepherd")
    rm.family.model.config.final_logit_softcapping = 30.0
    with pytest.raises(AdapterError, match="final_logit_softcapping"):
        rm.score_steps(PROBLEMS, SOLUTIONS)


@pytest.mark.parametrize("family", ["qwen_prm", "rlhflow"])
def test_one_ppo_iteration_with_dense_rewards_from_a_public_prm(family, folders, generator_dir, tmp_path, monkeypatch):
    """The RL reward loading goes through the loader: a public PRM (detected, or named by reward.adapter) scores the
    policy's steps, and the rewards land on the policy's own tokens (its tokenizer is another one)."""
    import rlprm.reward.tokens as rewards_module
    from rlprm.rl import ppo, train
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import render_step

    from .test_ppo import _fixed_rollouts, make_recipe

    text = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")])
    seen, original = [], rewards_module.token_rewards
    monkeypatch.setattr(ppo, "_generate", _fixed_rollouts(ppo, text))
    monkeypatch.setattr(rewards_module, "token_rewards", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    recipe = make_recipe(tmp_path, generator_dir, f"ppo_{family}", epochs=1, mode="dense", source="prm",
                         dense_form="min_form")
    recipe.model.reward_model = str(folders[family])
    recipe.reward.adapter = None if family == "qwen_prm" else family
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 64
    final = train(recipe, progress=False)
    assert all(len(r) == 3 for r in seen[0].step_rewards)
    assert all(1 <= k <= 3 for k in (seen[0].rewards != 0).sum(1).tolist())
    assert final["rl/steps_per_solution"] == 3 and 0.0 <= final["rl/reward"] <= 1.0


def test_every_family_selects_best_of_n(folders):
    """score_pool (what `rlprm eval` calls per reward model) takes any family: one PRM selector per aggregation."""
    from types import SimpleNamespace

    from rlprm.evaluation.evaluate import Pool, score_pool, selector_scores

    problems = [SimpleNamespace(text=p) for p in PROBLEMS[:2]]
    grades = [[SimpleNamespace(steps=s) for s in SOLUTIONS[:2]], [SimpleNamespace(steps=s) for s in SOLUTIONS[2:]]]
    pool = Pool(problems, [["a", "b"], ["c", "d"]], grades)
    for family in REFERENCES:
        score_pool(pool, family, _load(folders, family))
        assert [len(s) for row in pool.step_scores[family] for s in row] == [len(s) for s in SOLUTIONS]
    scores = selector_scores(pool, ("prod", "min"))
    assert {f"{f}_{a}" for f in REFERENCES for a in ("prod", "min")} <= set(scores)


@pytest.mark.parametrize("family", ["value_head", "math_shepherd"])
def test_one_grpo_iteration_with_dense_rewards_from_a_public_prm(family, folders, generator_dir, char_tokenizer,
                                                                 tmp_path, monkeypatch):
    """GRPO's process rewards from a public PRM (detected, or named by reward.adapter): the policy's completions are
    scored by the stand-in through the loader, its step scores become the token rewards, and TRL's loss gets
    per-token advantages. Rollouts are fixed answered solutions (a random tiny policy never writes `# Answer`)."""
    from trl import GRPOTrainer

    import rlprm.reward.tokens as rewards_module
    from rlprm.rl import grpo, train
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import render_step

    from .test_grpo import make_recipe

    texts = [render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")]),
             render_steps([render_step("+", 1, 2, 4), answer_step("4")])]
    rollouts = [char_tokenizer(t, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id] for t in texts]
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn",
                        lambda self, prompt_ids, *a, **k: ([list(rollouts[i % 2]) for i in range(len(prompt_ids))], None))
    scored, rewarded, handed = [], [], []
    real_score, real_rewards, real_loss = HubPRM.score_steps, rewards_module.token_rewards, GRPOTrainer._compute_loss

    def score_spy(self, problems, solutions, *a, **k):
        scored.append((self.adapter, list(problems), list(solutions), real_score(self, problems, solutions, *a, **k)))
        return scored[-1][-1]

    monkeypatch.setattr(HubPRM, "score_steps", score_spy)
    monkeypatch.setattr(rewards_module, "token_rewards",
                        lambda *a, **k: rewarded.append((k["scores"], real_rewards(*a, **k))) or rewarded[-1][1])
    monkeypatch.setattr(GRPOTrainer, "_compute_loss",
                        lambda self, model, inputs: handed.append(inputs["advantages"].detach().clone())
                        or real_loss(self, model, inputs))
    recipe = make_recipe(tmp_path, generator_dir, f"grpo_{family}", epochs=1, max_new_tokens=64, eval_n_max=0,
                         reward={"mode": "dense", "source": "prm", "dense_form": "log_prob"})
    recipe.model.reward_model = str(folders[family])
    recipe.reward.adapter = None if family == "value_head" else family
    final = train(recipe, progress=False)

    assert scored and all(adapter == family for adapter, *_ in scored)
    adapter, problems, solutions, probs = scored[0]
    assert sorted({len(p) for p in probs}) == [2, 3]  # one score per step of each completion
    fresh = _load(folders, family).score_steps(problems, solutions, sep="\n")
    assert _max_diff(probs, fresh) < TOL  # the stand-in's own scores, as loaded by any command
    scores, tr = rewarded[0]
    assert scores is probs and [len(r) for r in tr.step_rewards] == [len(p) for p in probs]
    assert handed and all(adv.dim() == 2 and torch.isfinite(adv).all() for adv in handed)
    assert final["rl/steps_per_solution"] == 2.5 and final["reward/missing_answer_frac"] == 0.0


# --------------------------------------------------------------------------- strict loading (issue 23 finding 8)


def _copy_with(folder, tmp_path, name, edit=None, architectures=None):
    """A copy of a stand-in folder with its weights edited (`edit(tensors) -> tensors`) and/or another
    `architectures` in config.json."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    if edit is not None:
        for f in copy.rglob("model.safetensors"):
            save_file(edit(load_file(str(f))), str(f), metadata={"format": "pt"})
    if architectures is not None:
        config = json.loads((copy / "config.json").read_text())
        config["architectures"] = architectures
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_qwen_prm_refuses_a_token_classification_checkpoint(folders):
    """Finding 8: a checkpoint whose head is one `score` Linear (TRL PRMTrainer / PURE), named as qwen_prm, loaded
    with score.0 / score.2 random and scored noise."""
    with pytest.raises(AdapterError, match=r"cannot be loaded as qwen_prm: it lacks 4 weight\(s\).*score\.0\.bias, "
                                           r"score\.0\.weight.*declares architectures \['Qwen2ForTokenClassification'\]"):
        load_reward_model(folders["pure_prm"], "qwen_prm")


def test_qwen_prm_refuses_a_head_of_another_shape(folders, tmp_path):
    copy = _copy_with(folders["qwen_prm"], tmp_path, "three_labels",
                      lambda w: {**w, "score.2.weight": torch.zeros(3, w["score.2.weight"].shape[1]),
                                 "score.2.bias": torch.zeros(3)})
    with pytest.raises(AdapterError, match=r"score\.2\.bias is \(3,\) in the checkpoint, \(2,\) in the qwen_prm model"):
        load_reward_model(copy, "qwen_prm")


def test_pure_prm_refuses_a_causal_lm(folders):
    with pytest.raises(AdapterError, match=r"as pure_prm: it lacks .*score\.weight.*\['LlamaForCausalLM'\]"):
        load_reward_model(folders["math_shepherd"], "pure_prm")


@pytest.mark.parametrize("family", ["math_shepherd", "rlhflow"])
def test_tag_families_refuse_a_checkpoint_without_an_lm_head(family, folders):
    """The +/- verdicts are read from the LM head; a token classifier has none (it would be random)."""
    with pytest.raises(AdapterError, match=rf"as {family}: it lacks .*lm_head\.weight.*Qwen2ForTokenClassification"):
        load_reward_model(folders["pure_prm"], family)


def test_value_head_refuses_a_missing_body_weight_or_a_wrong_head(folders, tmp_path):
    holed = _copy_with(folders["value_head"], tmp_path, "holed",
                       lambda w: {k: v for k, v in w.items() if "layers.1.mlp.down_proj" not in k})
    with pytest.raises(AdapterError, match=r"as value_head: it lacks .*layers\.1\.mlp\.down_proj\.weight"):
        load_reward_model(holed, "value_head")
    wide = _copy_with(folders["value_head"], tmp_path, "wide",
                      lambda w: {**w, "v_head.summary.weight": torch.zeros(2, w["v_head.summary.weight"].shape[1])})
    with pytest.raises(AdapterError, match=r"v_head\.summary\.weight is \(2, 32\) in the checkpoint, \(1, 32\)"):
        load_reward_model(wide, "value_head")


def test_implicit_refuses_a_reference_without_an_lm_head(folders, tmp_path):
    with pytest.raises(AdapterError, match=r"as implicit \(reference LM\): it lacks .*lm_head\.weight"):
        load_reward_model(folders["implicit"], "implicit", reference=folders["pure_prm"])
