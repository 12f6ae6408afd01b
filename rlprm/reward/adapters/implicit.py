"""`implicit`: implicit PRM, beta * log(pi / pi_ref) summed over each step (PRIME / EurusPRM-Stage1/2).

Convention, from the EurusPRM model cards (huggingface.co/PRIME-RL/EurusPRM-Stage2) and the Implicit PRM
paper (arXiv 2412.01981): the process reward of token t is beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t)),
pi the PRM (a causal LM trained as an ORM) and pi_ref its reference model. The cards' snippet encodes the chat
template over the problem (user) and the steps joined by "\\n\\n" (assistant) as one string, and finds where each
step ends by encoding the template over the first k steps (`.strip()`, plus "\\n\\n" when 0 < k < n):
step_last_tokens[k] = len(those ids) - 2. The ratios are summed (cumsum) from token step_last_tokens[0] on and
read at step_last_tokens[k] of the shifted log-prob array: the Q value q_k after step k. So step k's own tokens
(`Encoded.spans`) are step_last_tokens[k-1] + 2 .. step_last_tokens[k] + 1, the first step's from
step_last_tokens[0] (the template's newline after "assistant" included, as in the card), and q_k is the sum up
to step k. The ids and spans here are built exactly that way.

Here P(step correct) = sigmoid(q_k - q_(k-1)), the step's process reward r_k of the paper; `cumulative=True`
gives sigmoid(q_k), the running sum the cards' snippet prints per step. beta: 0.001 in the cards' example
(set reward.implicit_beta). One forward pass of each LM's body per solution, its head only at the step tokens'
predictions (`token_logps`).
"""

from __future__ import annotations

from rlprm.reward.adapters.common import (HEAD_CHUNK_ELEMENTS, AdapterError, Encoded, last_hidden, output_head,
                                      pad_id_of, pad_right)

JOINER = "\n\n"


def token_logps(model, ids, mask, rows, cols):
    """(N,) log p(ids[rows, cols] | ids[rows, :cols]) for N positions (cols >= 1) of a right-padded batch.

    The body runs once over the batch; the head runs only at the N outputs that predict the read tokens, in
    chunks of HEAD_CHUNK_ELEMENTS logits, each reduced at once to the token's logit minus the logsumexp: the
    same numbers as log_softmax over (B x T x vocab), never materialised (a 152k vocabulary x 8 x 2k tokens
    would be 10 GB in fp32).
    """
    import torch

    head = output_head(model)
    step = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    with torch.inference_mode():
        hidden = last_hidden(model, ids, mask)[rows, cols - 1]
        targets = ids[rows, cols]
        out = []
        for a in range(0, len(targets), step):
            logits = head(hidden[a:a + step]).float()
            out.append(logits.gather(-1, targets[a:a + step, None])[:, 0] - logits.logsumexp(-1))
    return torch.cat(out) if out else torch.zeros(0, device=ids.device)


class ImplicitPRM:
    adapter = "implicit"

    def __init__(self, model, reference, tokenizer, beta: float = 0.001, cumulative: bool = False):
        self.model, self.reference = model.eval(), reference.eval()
        self.tokenizer, self.config = tokenizer, model.config
        self.beta, self.cumulative = beta, cumulative

    def _render(self, problem: str, steps: list[str]) -> str:
        messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": JOINER.join(steps)}]
        if not getattr(self.tokenizer, "chat_template", None):
            raise AdapterError("the implicit family needs the tokenizer's chat template, and this tokenizer has none")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, problems, steps_lists):
        """The card's ids (the whole conversation) and, per step, the span of tokens whose ratios it sums."""
        texts = []
        for problem, steps in zip(problems, steps_lists):
            texts.append(self._render(problem, steps))
            for k in range(len(steps) + 1):  # the card's prefixes, whose lengths give step_last_tokens
                conv = self._render(problem, steps[:k]).strip()
                texts.append(conv + JOINER if 0 < k < len(steps) else conv)
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        out, at = [], 0
        for steps in steps_lists:
            full = list(ids[at])
            last = [len(x) - 2 for x in ids[at + 1:at + 2 + len(steps)]]
            at += 2 + len(steps)
            spans = [(last[0] if k == 0 else last[k] + 2, last[k + 1] + 1) for k in range(len(steps))]
            if spans and (spans[-1][1] >= len(full) or any(b < a - 1 for a, b in spans)):
                raise AdapterError("the implicit family's step boundaries (the card's step_last_tokens) do not fall "
                                   "inside the conversation's tokens: does the chat template change the content?")
            out.append(Encoded(full, [b for _, b in spans], spans))
        return out

    def prefix(self, e: Encoded, k: int) -> Encoded:
        """Step k's prefix as `score_steps_per_prefix` scores it: cut after the step, and only what step k's
        score reads (its own span, or with `cumulative` every token from the first step to it): the head then
        runs over the same tokens as in the single pass."""
        first, (start, end) = e.spans[0][0], e.spans[k]
        return Encoded(e.input_ids[:end + 1], [e.reads[k]], [(first if self.cumulative else start, end)])

    def score_batch(self, encoded):
        import torch

        device = next(self.model.parameters()).device
        ids, mask = pad_right([e.input_ids for e in encoded], pad_id_of(self.tokenizer), device)
        # every token of every step (position 0 has no prediction: it stays out, as log p = 0 did before)
        spans = [(row, a, b) for row, e in enumerate(encoded) for a, b in e.spans]
        tokens = [(row, t, j) for j, (row, a, b) in enumerate(spans) for t in range(max(a, 1), b + 1)]
        rows = torch.tensor([r for r, _, _ in tokens], dtype=torch.long, device=device)
        cols = torch.tensor([t for _, t, _ in tokens], dtype=torch.long, device=device)
        ratio = token_logps(self.model, ids, mask, rows, cols)
        ref_device = next(self.reference.parameters()).device
        ratio = ratio - token_logps(self.reference, ids.to(ref_device), mask.to(ref_device), rows.to(ref_device),
                                    cols.to(ref_device)).to(device)
        owner = torch.tensor([j for _, _, j in tokens], dtype=torch.long)
        flat = torch.zeros(len(spans), dtype=torch.float64).index_add_(0, owner, (self.beta * ratio).double().cpu())
        flat = flat.tolist()
        out, k = [], 0
        for e in encoded:
            sums = flat[k:k + len(e.spans)]
            k += len(e.spans)
            if self.cumulative:
                sums = [sum(sums[:j + 1]) for j in range(len(sums))]
            out.append([_sigmoid(r) for r in sums])
        return out


def _sigmoid(x: float) -> float:
    import math

    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def load(path: str, reference: str, device: str, dtype, beta: float, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from rlprm.models import load_tokenizer, torch_dtype
    from rlprm.reward.model import load_checked

    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    # both LMs' heads are read (log-probabilities of the step tokens): a checkpoint without one is refused
    model, ref = (load_checked(AutoModelForCausalLM, where, f"implicit ({role})", AdapterError,
                               dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code).to(device)
                  for where, role in ((path, "PRM"), (reference, "reference LM")))
    return ImplicitPRM(model, ref, tokenizer, beta)
