"""Card-exact parity of every public PRM family, on real tokenizers and real solutions (issue 23, build item 3).

For each family a tiny stand-in is built with the real tokenizer of its published checkpoint
(tests/real_tokenizers.py: Qwen2.5 / Qwen2.5-Math-PRM, Mistral-7B v0.1, Llama 3.1) and that tokenizer's
vocabulary size, and scored on real solutions from ProcessBench (MATH and GSM8K) and PRM800K: LaTeX, unicode,
long steps, steps holding newlines, steps with trailing spaces. The references below are written from each
model card's own snippet (cited in each), independently of rlprm: the input ids and read positions rlprm
builds must be exactly the card's, and its scores (batched, and one solution at a time) equal to 1e-5.

A reference applies an LM head only at the positions it reads, or in chunks of positions, where the card
applies it to every position at once (`logits_to_keep` / a chunked log-softmax): the same numbers, without
(T x 152k) fp32 logits per sequence. Skips with a reason when a `dev` package or ../shared/data is absent.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests import real_tokenizers as rt

from .conftest import shared_file

TOL = 1e-5
SHAPE = {"hidden": 16, "layers": 2}


# --------------------------------------------------------------------------- real solutions


def real_solutions() -> list[tuple[str, list[str]]]:
    """(problem, steps) from ProcessBench and PRM800K, chosen to cover what breaks tokenization: steps with trailing
    whitespace, non-ASCII text, newlines inside a step, long steps, PRM800K's '# Answer\\n\\n...' last step."""
    out = []
    for name, n_plain in (("processbench/math.json", 14), ("processbench/gsm8k.json", 8)):
        items = json.loads(shared_file(name).read_text())
        trailing = [x for x in items if any(s != s.rstrip() for s in x["steps"])][:8]
        unicode = [x for x in items if any(ord(c) > 127 for s in x["steps"] for c in s) and x not in trailing][:6]
        newline = [x for x in items if any("\n" in s for s in x["steps"]) and x not in trailing + unicode][:4]
        chosen = trailing + unicode + newline
        plain = [x for x in items if x not in chosen][:n_plain]
        out += [(x["problem"], list(x["steps"])) for x in chosen + plain]
    for line in shared_file("prm800k/sample_phase2.jsonl").read_text().splitlines()[:8]:
        q = json.loads(line)["question"]
        out.append((q["problem"], list(q["pre_generated_steps"])))
    for line in shared_file("prm800k/sample_phase1.jsonl").read_text().splitlines()[:6]:
        d = json.loads(line)
        steps = []
        for step in d["label"]["steps"]:
            chosen = step.get("chosen_completion")
            text = step["completions"][chosen]["text"] if chosen is not None else (step.get("human_completion") or {}).get("text")
            if text:
                steps.append(text)
        if steps:
            out.append((d["question"]["problem"], steps))
    return out


@pytest.fixture(scope="module")
def solutions():
    sols = real_solutions()
    assert len(sols) >= 50
    return sols


def _no_trailing_space(solutions):
    return [(p, s) for p, s in solutions if all(x == x.rstrip() for x in s)]


# --------------------------------------------------------------------------- stand-ins on real tokenizers


TOKENIZERS = {"qwen_prm": rt.qwen_math_prm_tokenizer_dir, "pure_prm": rt.qwen2_tokenizer_dir,
              "value_head": rt.qwen2_tokenizer_dir, "implicit": rt.qwen2_tokenizer_dir,
              "math_shepherd": rt.mistral_tokenizer_dir, "rlhflow": rt.llama3_tokenizer_dir}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """family -> stand-in folder, built lazily (one real tokenizer and tiny model per family)."""
    from rlprm.testing.standins import save_standin

    root = tmp_path_factory.mktemp("parity")
    made = {}

    def get(family):
        if family not in made:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(TOKENIZERS[family]())
            if family == "value_head":
                # Skywork's prepare_input writes tokenizer.bos_token as text: its tokenizer has one (Qwen2.5's has
                # none); <|endoftext|> is assumed here, the check holds for any BOS text
                tok.bos_token = "<|endoftext|>"
            vocab = rt.QWEN_MODEL_VOCAB if "qwen" in TOKENIZERS[family].__name__ else None
            made[family] = save_standin(family, root / family, tokenizer=tok, vocab_size=vocab, **SHAPE)
        return made[family]

    return get


def _load(folder, family):
    from rlprm.reward.adapters import load_reward_model

    extra = {"reference": folder / "reference", "beta": 0.5} if family == "implicit" else {}
    return load_reward_model(folder, family, **extra)


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _ids(out):
    """apply_chat_template(tokenize=True) gives a list or a BatchEncoding, by transformers version."""
    out = out["input_ids"] if hasattr(out, "keys") else out
    out = out.tolist() if hasattr(out, "tolist") else out
    return list(out[0]) if out and isinstance(out[0], list) else list(out)


# --------------------------------------------------------------------------- the cards, written from their text


def card_qwen_prm(folder):
    """Qwen/Qwen2.5-Math-PRM-7B model card, "Quick Start": messages = system "Please reason step by step, and put
    your final answer within \\boxed{}.", user = query, assistant = "<extra_0>".join(steps) + "<extra_0>";
    apply_chat_template(tokenize=False, add_generation_prompt=False); tokenizer.encode(conversation);
    token_masks = input_ids == tokenizer.encode("<extra_0>")[0]; make_step_rewards: softmax over the 2 labels,
    column 1 at the masked positions. The head (Linear -> ReLU -> Linear, `score.0` / `score.2`) is applied by
    hand from the saved tensors on a plain Qwen2Model body."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2Model

    tok = _tokenizer(folder)
    w = load_file(str(folder / "model.safetensors"))
    body = Qwen2Model(AutoConfig.from_pretrained(folder)).eval()
    body.load_state_dict({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")})
    sep = tok.encode("<extra_0>")[0]

    def run(problem, steps, score=True):
        messages = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
        conversation = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = tok.encode(conversation)
        reads = [i for i, t in enumerate(ids) if t == sep]
        if not score:
            return ids, reads, None
        with torch.no_grad():
            h = body(input_ids=torch.tensor([ids])).last_hidden_state[0]
            inner = torch.relu(torch.nn.functional.linear(h, w["score.0.weight"], w["score.0.bias"]))
            logits = torch.nn.functional.linear(inner, w["score.2.weight"], w["score.2.bias"])
        return ids, reads, torch.softmax(logits, -1)[reads, 1].tolist()

    return run


def card_pure_prm(folder):
    """jinachris/PURE-PRM-7B model card snippet: question_ids = tokenizer(question, add_special_tokens=False);
    steps = [s.rstrip() for s in steps]; input_ids = question_ids, then per step tokenizer(step,
    add_special_tokens=False) + the ids of "\\n", score_ids = the "\\n" positions; AutoModelForTokenClassification,
    softmax, process_reward = p[:, 1] - p[:, 0]. rlprm's probability is (1 + reward) / 2. (The card gets its steps
    by splitting the answer on "\\n\\n"; here they are given as a list, the same `steps` the snippet then uses.)"""
    from transformers import AutoModelForTokenClassification

    tok = _tokenizer(folder)
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    sep = tok("\n", add_special_tokens=False)["input_ids"]

    def run(problem, steps, score=True):
        ids = tok(problem, add_special_tokens=False)["input_ids"]
        reads = []
        for step in [s.rstrip() for s in steps]:
            ids = ids + tok(step, add_special_tokens=False)["input_ids"] + sep
            reads.append(len(ids) - 1)
        if not score:
            return ids, reads, None
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0, reads].softmax(-1)
        reward = probs[:, 1] - probs[:, 0]
        return ids, reads, ((1 + reward) / 2).tolist()

    return run


def card_math_shepherd(folder):
    """peiyi9979/math-shepherd-mistral-7b-prm model card: output = each step followed by " ки", joined by "\\n";
    input_id = tokenizer.encode(f"{question} {output}"); candidate_tokens = tokenizer.encode("+ -")[1:];
    step_tag_id = tokenizer.encode("ки")[-1]; logits[:, :, candidate_tokens].softmax(-1)[:, :, 0] at
    input_id == step_tag_id."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    candidates = tok.encode("+ -")[1:]
    tag = tok.encode("ки")[-1]

    def run(problem, steps, score=True):
        output = "\n".join(f"{s} ки" for s in steps)
        ids = tok.encode(f"{problem} {output}")
        reads = [i for i, t in enumerate(ids) if t == tag]
        if not score:
            return ids, reads, None
        with torch.no_grad():
            scores = model(torch.tensor([ids])).logits[0][:, candidates].softmax(-1)[:, 0]
        return ids, reads, scores[reads].tolist()

    return run


def card_rlhflow(folder):
    """RLHFlow/Llama3.1-8B-PRM-Deepseek-Data card (RLHFlow/RLHF-Reward-Modeling math/README): per step k the
    conversation so far, every step a user turn (the first = question + " " + step), every answer "+";
    input_ids = tokenizer.apply_chat_template(conversation); logits[:, -3, [encode('+')[-1], encode('-')[-1]]]
    .softmax(-1)[:, 0]. Here logits_to_keep=3 gives that row without the full (T x 128k) logits."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    candidates = [tok.encode("+")[-1], tok.encode("-")[-1]]

    def run(problem, steps, score=True):
        conversation, scores, reads, ids = [], [], [], []
        for k, step in enumerate(steps):
            conversation.append({"content": problem + " " + step if k == 0 else step, "role": "user"})
            conversation.append({"content": "+", "role": "assistant"})
            ids = _ids(tok.apply_chat_template(conversation, tokenize=True))
            reads.append(len(ids) - 3)
            if score:
                with torch.no_grad():
                    logits = model(torch.tensor([ids]), logits_to_keep=3).logits[0, 0, candidates]
                scores.append(float(logits.softmax(-1)[0]))
        return ids, reads, scores if score else None

    return run


def card_value_head(folder):
    """Skywork-o1-Open-PRM (SkyworkAI/skywork-o1-prm-inference, prepare_input with step_token "\\n"): prompt_ids =
    encode(bos_token + problem + "\\n"); for each piece of response.split("\\n"): encode(piece) (nothing for an
    empty piece) + [encode("\\n")[-1]], a reward flag on that last id; reward = sigmoid(v_head(last hidden state))
    at the flags. The response here is the steps joined by "\\n"; a step's score is the flag that ends its last
    line. v_head (`v_head.summary.weight/bias`) is applied from the saved tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(folder)
    w = load_file(str(folder / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    nl = tok.encode("\n")[-1]

    def run(problem, steps, score=True):
        response = "\n".join(steps)
        ids = tok.encode((tok.bos_token or "") + problem + "\n")  # (a tokenizer without BOS: the card would fail)
        flags = []
        for piece in response.split("\n"):
            ids = ids + (tok.encode(piece) if piece != "" else []) + [nl]
            flags.append(len(ids) - 1)
        ends = []  # the flag closing each step's last line
        k = -1
        for step in steps:
            k += len(step.split("\n"))
            ends.append(flags[k])
        if not score:
            return ids, ends, None
        with torch.no_grad():  # the last hidden state (the card's AutoModel output), without the LM head
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            value = torch.nn.functional.linear(hidden, w["v_head.summary.weight"], w["v_head.summary.bias"])[:, 0]
        return ids, ends, value.sigmoid()[ends].tolist()

    return run


def card_implicit(folder, beta=0.5):
    """PRIME-RL/EurusPRM-Stage2 model card: input_ids = apply_chat_template([user query, assistant
    "\\n\\n".join(steps)], tokenize=True); step_last_tokens[k] = len(encode(conv_k.strip() (+ "\\n\\n" for
    0 < k < n))) - 2 with conv_k the template over the first k steps; label_mask = 1 from step_last_tokens[0] on;
    per-token log-prob ratio of the PRM and the reference, * coef * label_mask[:, 1:], cumsum, gathered at
    step_last_tokens[1:]: the Q value q_k after each step. rlprm's step score is sigmoid(q_k - q_(k-1)) (the
    process reward); `spans` = the tokens each q_k - q_(k-1) sums."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(folder)
    models = [AutoModelForCausalLM.from_pretrained(f).eval() for f in (folder, folder / "reference")]

    def logps(model, ids):
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
            out = []
            for a in range(0, hidden.shape[0], 256):  # the card's log_softmax, a chunk of positions at a time
                lp = model.lm_head(hidden[a:a + 256]).log_softmax(-1)
                out.append(lp.gather(-1, ids[0, 1 + a:1 + a + 256, None])[:, 0])
        return torch.cat(out)

    def run(problem, steps, score=True):
        ids = _ids(tok.apply_chat_template([{"role": "user", "content": problem},
                                            {"role": "assistant", "content": "\n\n".join(steps)}],
                                           tokenize=True, add_generation_prompt=False))
        last = []
        for k in range(len(steps) + 1):
            conv = tok.apply_chat_template([{"role": "user", "content": problem},
                                            {"role": "assistant", "content": "\n\n".join(steps[:k])}],
                                           tokenize=False, add_generation_prompt=False).strip()
            if k != 0 and k != len(steps):
                conv += "\n\n"
            last.append(len(tok.encode(conv, add_special_tokens=False)) - 2)
        # q_k sums the ratios of tokens last[0] .. last[k] + 1: step k's own tokens are last[k-1] + 2 .. last[k] + 1
        spans = [(last[0] if k == 0 else last[k] + 2, last[k + 1] + 1) for k in range(len(steps))]
        if not score:
            return ids, spans, None
        t = torch.tensor([ids])
        mask = torch.tensor([0] * last[0] + [1] * (len(ids) - last[0]))
        q = (beta * (logps(models[0], t) - logps(models[1], t)).double() * mask[1:]).cumsum(-1)[last[1:]]
        rewards = torch.diff(q, prepend=torch.zeros(1, dtype=q.dtype))
        return ids, spans, torch.sigmoid(rewards).tolist()

    return run


CARDS = {"qwen_prm": card_qwen_prm, "pure_prm": card_pure_prm, "math_shepherd": card_math_shepherd,
         "rlhflow": card_rlhflow, "value_head": card_value_head, "implicit": card_implicit}


def _cases(family, solutions):
    # math_shepherd: the card's text gives no tag token after a step ending in whitespace (see
    # test_math_shepherd_refuses_a_step_ending_in_whitespace); every other family takes every solution
    return _no_trailing_space(solutions) if family == "math_shepherd" else solutions


SCORED_EVERY = {"implicit": 24}
"""Scores are compared on every 4th solution in the default run (every 24th for the implicit family, whose two
LMs put a 152k-vocabulary head over every token: the cost); ids and read positions on all of them. The `slow`
test compares the scores on all of them."""


def _check(family, standins, solutions, every):
    folder = standins(family)
    cases = _cases(family, solutions)
    assert len(cases) >= 50, len(cases)
    card = CARDS[family](folder)
    expected = [card(p, s, score=False) for p, s in cases]
    rm = _load(folder, family)
    problems, steps = [p for p, _ in cases], [s for _, s in cases]
    for (ids, reads, _), e, (p, s) in zip(expected, rm.encode(problems, steps), cases):
        assert e.input_ids == ids, f"{family}: ids differ from the card's on {p[:60]!r}"
        got = e.spans if family == "implicit" else e.reads
        assert got == reads, f"{family}: read positions differ from the card's on {p[:60]!r}"
    scored = cases[::every]
    want = [card(p, s)[2] for p, s in scored]
    batched = rm.score_steps([p for p, _ in scored], [s for _, s in scored], batch_size=8)
    alone = [rm.score_steps([p], [s])[0] for p, s in scored[::2]]
    for got, ref in ((batched, want), (alone, want[::2])):
        assert [len(x) for x in got] == [len(x) for x in ref]
        assert max(abs(a - b) for u, v in zip(got, ref) for a, b in zip(u, v)) < TOL
    flat = [x for row in want for x in row]
    assert max(flat) - min(flat) > 1e-3, "a constant scorer would hide mistakes"
    return len(cases), len(scored)


@pytest.mark.parametrize("family", list(CARDS))
def test_ids_reads_and_scores_equal_the_card(family, standins, solutions):
    _check(family, standins, solutions, SCORED_EVERY.get(family, 4))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CARDS))
def test_scores_equal_the_card_on_every_solution(family, standins, solutions):
    _check(family, standins, solutions, 1)


def test_math_shepherd_sees_the_cards_newlines(standins):
    """Finding 7: each "\n" + step encoded on its own got sentencepiece's '▁' before the newline ('▁', '<0x0A>'),
    a sequence the card never produces; the card's string has '<0x0A>' right after the tag."""
    rm = _load(standins("math_shepherd"), "math_shepherd")
    e = rm.encode(["What is 2 + 3?"], [["Step 1: 2 + 3 = 5.", "Step 2: The answer is 5."]])[0]
    tokens = rm.tokenizer.convert_ids_to_tokens(e.input_ids)
    assert [tokens[r] for r in e.reads] == ["▁ки", "▁ки"] and tokens[e.reads[0] + 1] == "<0x0A>"
    assert "▁" not in [tokens[i] for i in range(len(tokens) - 1) if tokens[i + 1] == "<0x0A>"]
    assert e.input_ids == rm.tokenizer.encode("What is 2 + 3? Step 1: 2 + 3 = 5. ки\nStep 2: The answer is 5. ки")


def test_math_shepherd_refuses_a_step_ending_in_whitespace(standins):
    """The card's text f"{step} ки" after a trailing space has no tag token (the card would silently drop that
    step's score and shift the others): refused, with the fix in the message."""
    from rlprm.reward.adapters import AdapterError

    rm = _load(standins("math_shepherd"), "math_shepherd")
    with pytest.raises(AdapterError, match="step 1 ends in whitespace"):
        rm.score_steps(["Q?"], [["Step 1: x = 2. ", "Step 2: done."]])


def test_a_marker_inside_step_text_adds_no_read(standins):
    """Read positions come from where the family put its markers, never from searching the ids: a step whose text
    holds the tag (math_shepherd) or a "+" turn (rlhflow) still gets exactly one score."""
    for family, step in (("math_shepherd", "Write ки here."), ("rlhflow", "+")):
        rm = _load(standins(family), family)
        e = rm.encode(["Q?"], [[step, "Then stop."]])[0]
        assert len(e.reads) == 2 and len(rm.score_steps(["Q?"], [[step, "Then stop."]])[0]) == 2


def test_qwen_prm_first_step_is_encoded_with_the_template_text(standins):
    """The card encodes the whole conversation, which the tokenizer splits only at special tokens: the text after
    `<|im_start|>` ("assistant\\n") and the first step are one piece, so a step starting with a newline merges
    with it ("\\n\\n" is one token), as it must for the ids to be the card's."""
    folder = standins("qwen_prm")
    steps = ["\nLet x = 2.", " Then x + 1 = 3."]
    ids, reads, _ = card_qwen_prm(folder)("What is x + 1?", steps, score=False)
    e = _load(folder, "qwen_prm").encode(["What is x + 1?"], [steps])[0]
    assert (e.input_ids, e.reads) == (ids, reads)
