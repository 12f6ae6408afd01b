"""`qwen_prm`: token classification at a step-separator token (Qwen2.5-Math-PRM-7B/-72B, Qwen2.5-Math-7B-PRM800K).

Convention, from the model card (huggingface.co/Qwen/Qwen2.5-Math-PRM-7B, "Quick Start"):
- messages: system "Please reason step by step, and put your final answer within \\boxed{}.", the user's
  problem, and an assistant turn whose content is every step followed by `<extra_0>`;
- the Qwen chat template renders them (add_generation_prompt=False);
- each step's reward is softmax over the 2-way head at the `<extra_0>` positions, column 1 = positive.
The ids are the card's: the template is rendered around a sentinel (so it stays the model's own), each step
is encoded with the `<extra_0>` id after it, and the first step together with the template text before it
(the card encodes the whole conversation, which the tokenizer splits only at special tokens: the text after
`<|im_start|>` and the first step are one piece there). Read positions are where the `<extra_0>` ids were
put, so a step whose text contains "<extra_0>" gets no second score (the card would give it one).

Architecture: qwen_arch.py (our own, on transformers' Qwen2 classes, under the published weight names).
"""

from __future__ import annotations

from rlprm.reward.adapters.common import (SENTINEL, AdapterError, Plan, pad_id_of, pad_right, read_index, realize,
                                      split_template, unflatten)

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
STEP_TOKEN = "<extra_0>"
ARCHITECTURES = ("Qwen2ForProcessRewardModel", "QwenProcessRewardModel")
"""config.json `architectures` that identify this family (the published name, and ours when saved)."""


class QwenPRM:
    """The family: encode with the chat template and `<extra_0>` ids; read softmax column 1 there."""

    adapter = "qwen_prm"

    def __init__(self, model, tokenizer, system_prompt: str | None = None, step_token: str = STEP_TOKEN):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.system_prompt = SYSTEM_PROMPT if system_prompt is None else system_prompt
        step_id = tokenizer.convert_tokens_to_ids(step_token)
        if step_id is None or step_id == tokenizer.unk_token_id:
            raise AdapterError(f"the tokenizer has no {step_token!r} token, which the qwen_prm family puts after "
                               "every step; is this a Qwen2.5-Math-PRM checkpoint?")
        self.step_id = step_id

    def plan(self, problem: str, steps: list[str]) -> Plan:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": problem}, {"role": "assistant", "content": SENTINEL}]
        head, tail = split_template(self.tokenizer, messages, self.adapter)
        return Plan(head, list(steps), tail, marker_id=self.step_id, join_head=True)

    def encode(self, problems, steps_lists):
        return realize(self.tokenizer, [self.plan(p, s) for p, s in zip(problems, steps_lists)])

    def score_batch(self, encoded):
        import torch

        device = next(self.model.parameters()).device
        ids, mask = pad_right([e.input_ids for e in encoded], pad_id_of(self.tokenizer), device)
        rows, cols = read_index(encoded, device)
        with torch.inference_mode():
            hidden = self.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            # the head (hidden x hidden, then 2) only where a step is read, not at every token
            logits = self.model.score(hidden[rows, cols])
        probs = torch.softmax(logits.float(), dim=-1)[:, 1]  # column 1: the positive class (card)
        return unflatten(probs.cpu().tolist(), encoded)


def load(path: str, device: str, dtype, system_prompt: str | None = None):
    from rlprm.models import load_tokenizer, torch_dtype
    from rlprm.reward.adapters.qwen_arch import QwenProcessRewardModel
    from rlprm.reward.model import load_checked

    tokenizer = load_tokenizer(path, padding_side="right")
    # refuses a checkpoint without the score.0/score.2 head (e.g. a single-Linear token classifier)
    model = load_checked(QwenProcessRewardModel, path, "qwen_prm", AdapterError, dtype=torch_dtype(dtype))
    return QwenPRM(model.to(device), tokenizer, system_prompt)
