"""`implicit`: implicit PRM, beta * log(pi / pi_ref) summed over each step (PRIME / EurusPRM-Stage1/2).

Convention, from the EurusPRM model cards (huggingface.co/PRIME-RL/EurusPRM-Stage2) and the Implicit PRM
paper (arXiv 2412.01981): the process reward of token t is beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t)),
pi the PRM (a causal LM trained as an ORM) and pi_ref its reference model; a step's reward is the sum over its
tokens; here P(step correct) = sigmoid(step reward). The input is the chat template with the problem as the
user turn and the steps, joined by "\\n\\n", as the assistant turn. beta: 0.001 in the cards' example (not
checked against the card text here: set rm.implicit_beta). `cumulative=True` gives instead the running sum up
to the step's end (the Q value q^t of the paper), which is what the cards' snippet prints per step.
Each step's tokens (its joiner included) are encoded on their own; one forward pass of each LM per solution.
"""

from __future__ import annotations

from rlprm.prm_adapters.common import SENTINEL, Plan, pad_id_of, pad_right, split_template

JOINER = "\n\n"


def token_logps(model, ids, mask):
    """(B, T) log p(ids[:, t] | ids[:, :t]); column 0 is 0."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


class ImplicitPRM:
    adapter = "implicit"

    def __init__(self, model, reference, tokenizer, beta: float = 0.001, cumulative: bool = False):
        self.model, self.reference = model.eval(), reference.eval()
        self.tokenizer, self.config = tokenizer, model.config
        self.beta, self.cumulative = beta, cumulative

    def plan(self, problem: str, steps: list[str]) -> Plan:
        messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": SENTINEL}]
        head, tail = split_template(self.tokenizer, messages, self.adapter)
        return Plan(head, [s + JOINER for s in steps[:-1]] + steps[-1:], tail)

    def score_batch(self, encoded):
        import torch

        device = next(self.model.parameters()).device
        ids, mask = pad_right([e.input_ids for e in encoded], pad_id_of(self.tokenizer), device)
        ratio = token_logps(self.model, ids, mask)
        ref_device = next(self.reference.parameters()).device
        ratio = ratio - token_logps(self.reference, ids.to(ref_device), mask.to(ref_device)).to(device)
        # every step's sum at once: a running sum read at each span's end minus the one before its start
        running = torch.nn.functional.pad((self.beta * ratio).double().cumsum(1), (1, 0)).cpu()
        rows = torch.tensor([row for row, e in enumerate(encoded) for _ in e.spans])
        starts = torch.tensor([a for e in encoded for a, _ in e.spans])
        ends = torch.tensor([b + 1 for e in encoded for _, b in e.spans])
        flat = (running[rows, ends] - running[rows, starts]).tolist()
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
    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.reward_models import _quiet_transformers

    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    with _quiet_transformers(report=False):
        model = load_causal_lm(path, dtype, device, trust_remote_code)
        ref = load_causal_lm(reference, dtype, device, trust_remote_code)
    return ImplicitPRM(model, ref, tokenizer, beta)
