"""`+`/`-` verdict tokens of a causal LM: `math_shepherd` and `rlhflow`.

Both read, at one position per step, the LM's logits of the `+` and `-` token ids and take the softmax over
those two (index 0 = `+` = correct). Only the hidden states at the read positions go through the LM head
(a 7-8B model's vocabulary is 32k-128k wide: logits for every token would dominate memory).

math_shepherd (peiyi9979/math-shepherd-mistral-7b-prm, model card): the input is
`tokenizer.encode(f"{question} {output}")` with `output` the steps each followed by the step tag " ки" and
joined by "\\n" (`Step 1: ... ки\\nStep 2: ... ки`), encoded as ONE string, BOS first; candidate ids are those of
`+` and `-` as the card gets them (`tokenizer.encode("+ -")[1:]`), the tag id `tokenizer.encode("ки")[-1]`;
the score of a step is read at its tag. The string is encoded whole because Mistral's sentencepiece tokenizer
prefixes '▁' to every encoding: a "\\n"-started piece encoded alone gets '▁', '<0x0A>' where the card's string
has '<0x0A>' (found comparing ids with the card's). The tags are located by their character offsets and checked to be the tag
token; a step ending in whitespace makes the card's text tokenize the tag differently (no tag token: the card
itself would lose that step's score), and is refused with that reason: strip the step.

rlhflow (RLHFlow/Llama3.1-8B-PRM-Mistral-Data / -Deepseek-Data; RLHFlow/RLHF-Reward-Modeling math/README.md
and the ProcessBench repository's run_eval_prm_rlhflow.py): a multi-turn chat, each step a user turn (the
first prefixed by the problem), each answered by an assistant turn `+`, rendered by the chat template with the
real contents (Llama 3.1's template trims them) and encoded as one string, as `apply_chat_template` does; the
probability of `+` against `-` is read at the position that predicts the assistant's `+` (the card reads
logits[-3] of the conversation up to step k: the token before `+<|eot_id|>`). The problem and the first step
are joined with " " as RLHFlow's README shows (ProcessBench's script uses "\\n\\n"; `first_joiner` changes it).
The whole conversation is one forward pass: a causal model's output before turn k's `+` has seen only turns
up to k.
"""

from __future__ import annotations

from rlprm.reward.adapters.common import (SENTINEL, AdapterError, Encoded, Marked, last_hidden, output_head, pad_id_of,
                                      pad_right, read_index, realize_marked, single_token, split_template,
                                      unflatten)

STEP_TAG = " ки"


def verdict_probs(model, tokenizer, encoded: list[Encoded], good_id: int, bad_id: int) -> list[list[float]]:
    """softmax([logit(+), logit(-)])[0] at every read position of a right-padded batch.

    The body runs once; the head runs only where it is read, and only its `+`/`-` rows: (reads x 2) logits
    instead of (B x T x vocab), which for Llama 3's 128k vocabulary over 8 x 2k tokens would be 8 GB in fp32.
    """
    import torch

    device = next(model.parameters()).device
    ids, mask = pad_right([e.input_ids for e in encoded], pad_id_of(tokenizer), device)
    head = output_head(model)
    with torch.inference_mode():
        hidden = last_hidden(model, ids, mask)
        rows, cols = read_index(encoded, device)
        pair = torch.tensor([good_id, bad_id], device=device)
        logits = hidden[rows, cols] @ head.weight[pair].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[pair]
    probs = torch.softmax(logits.float(), dim=-1)[:, 0]
    return unflatten(probs.cpu().tolist(), encoded)


class MathShepherd:
    adapter = "math_shepherd"

    def __init__(self, model, tokenizer, step_tag: str = STEP_TAG):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.step_tag = step_tag
        self.tag_id = single_token(tokenizer, step_tag, "step tag")
        # the verdict follows the tag after a space in training data (`... ки` -> `... +`): the ids of " +"/" -"
        self.good_id = single_token(tokenizer, " +", "verdict")
        self.bad_id = single_token(tokenizer, " -", "verdict")
        if len({self.tag_id, self.good_id, self.bad_id}) < 3:
            raise AdapterError("the step tag and the +/- verdicts must be three different tokens")

    def marked(self, problem: str, steps: list[str]) -> Marked:
        """The card's string f"{question} {output}" and the character span of each step's tag in it."""
        text, marks = f"{problem} ", []
        for k, step in enumerate(steps):
            if step != step.rstrip():
                raise AdapterError(f"math_shepherd: step {k + 1} ends in whitespace ({step[-40:]!r}); the card's "
                                   f"text then puts the tag after it as other tokens than the tag {self.step_tag!r} "
                                   "the model was trained to score at. Strip the step's trailing whitespace.")
            text += ("\n" if k else "") + step
            marks.append((len(text), len(text) + len(self.step_tag)))
            text += self.step_tag
        return Marked(text, marks, self.tag_id, add_special_tokens=True)  # the card's encode adds BOS

    def encode(self, problems, steps_lists):
        return realize_marked(self.tokenizer, [self.marked(p, s) for p, s in zip(problems, steps_lists)],
                              self.adapter)

    def score_batch(self, encoded):
        return verdict_probs(self.model, self.tokenizer, encoded, self.good_id, self.bad_id)


class RLHFlow:
    adapter = "rlhflow"

    def __init__(self, model, tokenizer, first_joiner: str = " "):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.good_id = single_token(tokenizer, "+", "verdict")  # RLHFlow: tokenizer.encode('+')[-1]
        self.bad_id = single_token(tokenizer, "-", "verdict")
        self.first_joiner = first_joiner

    def marked(self, problem: str, steps: list[str]) -> Marked:
        """The rendered conversation with every verdict `+`, and the character span of each verdict."""
        messages = []
        for k, step in enumerate(steps):
            messages.append({"role": "user", "content": problem + self.first_joiner + step if k == 0 else step})
            messages.append({"role": "assistant", "content": SENTINEL})
        # the template renders the real steps (trimmed, if it trims); the verdicts go where its sentinels are
        parts = split_template(self.tokenizer, messages, self.adapter)
        text, marks = parts[0], []
        for part in parts[1:]:
            marks.append((len(text), len(text) + 1))
            text += "+" + part
        return Marked(text, marks, self.good_id, add_special_tokens=False, read_before=True)

    def encode(self, problems, steps_lists):
        return realize_marked(self.tokenizer, [self.marked(p, s) for p, s in zip(problems, steps_lists)],
                              self.adapter)

    def score_batch(self, encoded):
        return verdict_probs(self.model, self.tokenizer, encoded, self.good_id, self.bad_id)


def load(family: str, path: str, device: str, dtype, trust_remote_code: bool = False):
    from rlprm.models import load_tokenizer, torch_dtype
    from rlprm.reward.model import load_checked
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    # the verdicts are read from the LM head: a checkpoint without one (a classifier) is refused
    model = load_checked(AutoModelForCausalLM, path, family, AdapterError, dtype=torch_dtype(dtype),
                         trust_remote_code=trust_remote_code)
    model = model.to(device)
    return MathShepherd(model, tokenizer) if family == "math_shepherd" else RLHFlow(model, tokenizer)
