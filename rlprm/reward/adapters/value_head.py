"""`value_head`: a scalar head at each step's last token, sigmoid (Skywork-o1-Open-PRM-Qwen-2.5-1.5B / -7B).

Convention, from SkyworkAI/skywork-o1-prm-inference (`prepare_input`, `PRM_MODEL`, `ValueHead`; read through
its copy in openreasoner/openr): the prompt is `tokenizer.bos_token + problem + "\\n"`, encoded whole; the
response is split on the step token "\\n" and every piece (an empty one included) is encoded on its own and
followed by the step token's id; the reward is `sigmoid(v_head(last_hidden_state))` at those step-token
positions. Here the response is the steps joined by "\\n" (the card's step token), so a step holding newlines
is several of the card's pieces, exactly as the card would encode it, and the step's score is the one at the
step token that ends its last line. The checkpoint is a causal LM plus `v_head.summary.weight` (1 x hidden) and
`v_head.summary.bias` (1): the body loads with `AutoModel` and the head is read from the weight files by
those names. A Qwen2.5 tokenizer has no BOS token: the prompt then starts with the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlprm.reward.adapters.common import (AdapterError, Plan, pad_id_of, pad_right, read_index, realize, single_token,
                                      unflatten)

HEAD_WEIGHT, HEAD_BIAS = "v_head.summary.weight", "v_head.summary.bias"


def weight_file_with(path: Path, key: str) -> Path | None:
    """The safetensors file of a checkpoint folder that holds tensor `key`, or None."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
        return path / shard if shard else None
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return single if key in f.keys() else None
    return None


class ValueHeadPRM:
    adapter = "value_head"

    def __init__(self, body, head, tokenizer, step_token: str = "\n"):
        self.model, self.head, self.tokenizer, self.config = body.eval(), head.eval(), tokenizer, body.config
        self.step_token = step_token
        self.step_id = single_token(tokenizer, step_token, "step token")

    def plan(self, problem: str, steps: list[str]) -> Plan:
        head = (self.tokenizer.bos_token or "") + problem + "\n"
        pieces, read = [], []
        for step in steps:
            lines = step.split(self.step_token)  # the card splits the response on the step token
            pieces += lines
            read += [False] * (len(lines) - 1) + [True]
        return Plan(head, pieces, marker_id=self.step_id, read=read)

    def encode(self, problems, steps_lists):
        return realize(self.tokenizer, [self.plan(p, s) for p, s in zip(problems, steps_lists)])

    def score_batch(self, encoded):
        import torch

        device = next(self.model.parameters()).device
        ids, mask = pad_right([e.input_ids for e in encoded], pad_id_of(self.tokenizer), device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            rows, cols = read_index(encoded, device)
            values = self.head(hidden[rows, cols].to(self.head.weight.dtype)).float().squeeze(-1)
        return unflatten(values.sigmoid().cpu().tolist(), encoded)


def load(path: str, device: str, dtype, trust_remote_code: bool = False):
    import torch
    from safetensors import safe_open
    from transformers import AutoModel

    from rlprm.models import load_tokenizer, torch_dtype
    from rlprm.reward.model import load_checked

    folder = Path(path)
    file = weight_file_with(folder, HEAD_WEIGHT) if folder.is_dir() else None
    if file is None:
        raise AdapterError(f"{path}: no {HEAD_WEIGHT} in its safetensors files; the value_head family needs a local "
                           "checkpoint folder with the Skywork-style value head")
    with safe_open(str(file), "pt") as f:
        weight = f.get_tensor(HEAD_WEIGHT)
        bias = f.get_tensor(HEAD_BIAS) if HEAD_BIAS in f.keys() else None
    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    # the v_head tensors are "unexpected" to the body (fine); a missing body weight is refused
    body = load_checked(AutoModel, path, "value_head", AdapterError, dtype=torch_dtype(dtype),
                        trust_remote_code=trust_remote_code)
    hidden = getattr(body.config, "hidden_size", None)
    wrong = [f"{key} is {tuple(t.shape)} in the checkpoint, {want} in the value_head model"
             for key, t, want in ((HEAD_WEIGHT, weight, (1, hidden)), (HEAD_BIAS, bias, (1,)))
             if t is not None and tuple(t.shape) != want]
    if wrong:  # one value from the body's hidden state
        raise AdapterError(f"{path} cannot be loaded as value_head: {'; '.join(wrong)}. The checkpoint declares "
                           f"architectures {list(getattr(body.config, 'architectures', None) or []) or ['none']}.")
    head = torch.nn.Linear(hidden, 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    # the head stays in float32: Skywork's ValueHead upcasts its input the same way
    return ValueHeadPRM(body.to(device), head.to(device), tokenizer)
