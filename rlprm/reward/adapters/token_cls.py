"""`pure_prm`: token classification at a plain-text separator, TRL PRMTrainer's layout (PURE-PRM-7B).

jinachris/PURE-PRM-7B is Qwen2.5-Math-7B fine-tuned on PRM800K with TRL's `PRMTrainer` (CJReinforce/PURE,
README "Training of PRM"). It differs from Qwen's PRMs (qwen_prm.py) in everything an adapter decides:
- a transformers-native `AutoModelForTokenClassification` (Qwen2ForTokenClassification: one Linear `score`
  with 2 outputs), not Qwen's PRM head (Linear -> ReLU -> Linear) under remote code;
- the step marker is the ordinary "\\n" token, not a special `<extra_0>`;
- no chat template: TRL's `PRMTrainer.tokenize_row` encodes BOS (when the tokenizer has one), the prompt, then
  each step followed by the separator's ids, each piece on its own, and supervises the separator's last token;
- the model card's step reward is p(+) - p(-) in [-1, 1] (softmax column 1 minus column 0), a step counting as
  correct when it is > 0. Here the score is p(+) = (1 + reward) / 2, the probability every family returns, so
  the card's "reward > 0" is "p(+) > 0.5" (bench.threshold 0.5).
The ids are the card's (huggingface.co/jinachris/PURE-PRM-7B, its transformers snippet): the question's ids
(no special tokens, no joiner), then each step with its trailing whitespace removed (`step.rstrip()`), its ids,
and the ids of "\\n"; the score is read at that "\\n". The card gets its steps by splitting the answer on
"\\n\\n"; here they come from rlprm's step convention (or the caller's list). BOS goes first when the tokenizer
defines one, as TRL's tokenize_row does in training (Qwen2.5-Math's tokenizer defines none, so for PURE this
is the card's input). Any other 2-label token-classification PRM trained with `PRMTrainer` (step_separator
"\\n") loads the same way.
"""

from __future__ import annotations

from rlprm.reward.adapters.common import (AdapterError, Plan, encode_text, pad_id_of, pad_right, read_index,
                                      realize, unflatten)

STEP_SEPARATOR = "\n"
"""TRL PRMConfig's default step_separator, the token PURE-PRM-7B's card puts after each step."""


def is_token_classification(architectures: list[str]) -> bool:
    return any(a.endswith("ForTokenClassification") for a in architectures)


class TokenClassificationPRM:
    """The family: BOS + problem + (step, separator id)*; softmax column 1 at each separator."""

    adapter = "pure_prm"

    def __init__(self, model, tokenizer, step_separator: str = STEP_SEPARATOR):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        if getattr(model.config, "num_labels", 2) != 2:
            raise AdapterError(f"the pure_prm family reads a 2-way head (p(-), p(+)); this model has "
                               f"{model.config.num_labels} labels")
        ids = encode_text(tokenizer, step_separator)
        if len(ids) != 1:
            raise AdapterError(f"the step separator {step_separator!r} is {len(ids)} tokens for this tokenizer; "
                               "the pure_prm family reads one token after each step")
        self.sep_id = ids[0]
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [bos] if bos is not None else []  # tokenize_row: BOS whenever the tokenizer defines one
        self.body = getattr(model, model.base_model_prefix, None)
        self.head = getattr(model, "score", None)

    def plan(self, problem: str, steps: list[str]) -> Plan:
        # the card: `steps = [i.rstrip() for i in answer.split("\n\n")]`
        return Plan(problem, [s.rstrip() for s in steps], marker_id=self.sep_id, bos=self.bos)

    def encode(self, problems, steps_lists):
        return realize(self.tokenizer, [self.plan(p, s) for p, s in zip(problems, steps_lists)])

    def score_batch(self, encoded):
        import torch

        device = next(self.model.parameters()).device
        ids, mask = pad_right([e.input_ids for e in encoded], pad_id_of(self.tokenizer), device)
        rows, cols = read_index(encoded, device)
        with torch.inference_mode():
            if self.body is not None and isinstance(self.head, torch.nn.Linear):
                # the head only where a step is read (dropout is off in eval mode)
                hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = self.head(hidden[rows, cols])
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        probs = torch.softmax(logits.float(), dim=-1)[:, 1]  # p(+); the card's reward is 2 p(+) - 1
        return unflatten(probs.cpu().tolist(), encoded)


def load(path: str, device: str, dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForTokenClassification

    from rlprm.models import load_tokenizer, torch_dtype
    from rlprm.reward.model import load_checked

    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    model = load_checked(AutoModelForTokenClassification, path, "pure_prm", AdapterError, dtype=torch_dtype(dtype),
                         trust_remote_code=trust_remote_code)
    return TokenClassificationPRM(model.to(device), tokenizer)
