"""Peak CPU memory of PPO's step-4 log-prob / entropy pass at a 151,936-token vocabulary, before and after
`logprobs.token_logprobs` (re-exported as `rl.core.token_logprobs`); prints JSON.

    .venv/bin/python benchmarks/logprob_memory.py                      # 4 sequences x (32 prompt + 256 response)
    .venv/bin/python benchmarks/logprob_memory.py --batch 2 --response 64 --update

The model is a Qwen2-architecture causal LM with a tiny body (hidden 16, 2 layers) and Qwen2.5's vocabulary
size, so that the vocabulary-sized tensors are all that weighs. Each measurement runs in its own process
(torch's CPU allocator keeps no statistics, and tracemalloc does not see its buffers): the child builds the
model and the rollout, reads its peak resident set (`ru_maxrss`), runs one pass and reads it again; the pass's
cost is the difference.

- `before`: the code PPO ran until issue 23, kept here only as the baseline: the model's full logits over the
  prompt and the response, sliced to the response, then `log_softmax(logits.float() / T)` gathered at the
  tokens and the entropy (`softmax`, `logsumexp`, `probs * z`), each a float32 (B, T, V) buffer.
- `after`: `rlprm.rl.ppo.rollout_logprobs(..., entropy=True)`: the model is asked for its last position's
  logits only and the output layer runs over `core.LOGIT_CHUNK_ELEMENTS // V` rows at a time.
- with `--update`, the same for one update minibatch's forward and backward (log-probs only; the loss is
  their masked mean), before (full logits, `log_softmax`) and after (`ppo.response_features` and
  `core.token_logprobs`, each chunk recomputed in the backward pass).

The figures scale with B x T x V: one float32 (B, T, V) buffer at the real recipe's 32 x 1024 x 151,936 is
19.9 GB, which `bytes_per_logit_buffer` gives for the measured size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151_936


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _setup(batch: int, prompt: int, response: int, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlprm.rl.ppo import Rollout

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    ids = torch.randint(0, VOCAB, (batch, prompt + response))
    mask = torch.ones_like(ids)
    resp = torch.ones(batch, response, dtype=torch.bool)
    ro = Rollout(ids, mask, resp, prompt, [[0] * response] * batch, [""] * batch)
    return model, ro


def _before(model, ro, temperature: float, grad: bool):
    """The full-logits code path PPO ran before issue 23 (its `_forward`, `logprobs_from_logits` and
    `entropy_from_logits`), kept here as the baseline only."""
    import torch

    P, T = ro.prompt_width, ro.response_mask.shape[1]
    position_ids = (ro.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, P - 1:P - 1 + T]
    tokens = ro.input_ids[:, P:]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if grad:
        logprobs.mean().backward()
        return logprobs.detach(), None
    z = (logits.float() / temperature).clamp(min=torch.finfo(torch.float32).min)
    probs = torch.softmax(z, dim=-1)
    entropy = torch.logsumexp(z, dim=-1) - (probs * z).sum(-1)
    return logprobs, entropy


def _after(model, ro, temperature: float, grad: bool):
    from rlprm.rl.core import token_logprobs
    from rlprm.rl.ppo import response_features, rollout_logprobs

    if not grad:
        return rollout_logprobs(model, ro, temperature, entropy=True)
    P, T = ro.prompt_width, ro.response_mask.shape[1]
    features, head = response_features(model, ro.input_ids, ro.attention_mask, P, T)
    logprobs = token_logprobs(features, ro.input_ids[:, P:], head, temperature)[0]
    logprobs.mean().backward()
    return logprobs.detach(), None


def child(args) -> dict:
    import torch

    torch.set_num_threads(1)
    model, ro = _setup(args.batch, args.prompt, args.response, args.dtype)
    grad = args.phase == "update"
    if grad:
        model.train()
    # warm the allocator and the kernels on one row, so that the pass's delta is its own tensors
    one = type(ro)(ro.input_ids[:1, : ro.prompt_width + 2], ro.attention_mask[:1, : ro.prompt_width + 2],
                   ro.response_mask[:1, :2], ro.prompt_width, [[0, 0]], [""])
    with torch.set_grad_enabled(grad):
        (_before if args.code == "before" else _after)(model, one, args.temperature, grad)
    model.zero_grad(set_to_none=True)
    start = _rss_mb()
    with torch.set_grad_enabled(grad):
        logprobs, entropy = (_before if args.code == "before" else _after)(model, ro, args.temperature, grad)
    peak = _rss_mb()
    torch.save({"logprobs": logprobs, "entropy": entropy}, args.out)
    return {"rss_before_pass_mb": round(start, 1), "peak_rss_mb": round(peak, 1), "pass_mb": round(peak - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--update", action="store_true", help="also measure one update minibatch's forward + backward")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["step4", "update"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import tempfile

    import torch

    B, T = args.batch, args.response
    result = {"vocab": VOCAB, "batch": B, "prompt_tokens": args.prompt, "response_tokens": T, "dtype": args.dtype,
              "hidden_size": 16, "bytes_per_logit_buffer_mb": round(B * T * VOCAB * 4 / 2**20, 1),
              "real_size_logit_buffer_gb": round(32 * 1024 * VOCAB * 4 / 1e9, 1)}
    phases = ["step4"] + (["update"] if args.update else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            outs = {}
            for code in ("before", "after"):
                path = Path(tmp) / f"{phase}_{code}.pt"
                cmd = [sys.executable, __file__, "--child", "--code", code, "--phase", phase, "--out", str(path),
                       "--batch", str(B), "--prompt", str(args.prompt), "--response", str(T), "--dtype", args.dtype,
                       "--temperature", str(args.temperature)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    raise SystemExit(f"{phase} {code} failed:\n{done.stderr[-3000:]}")
                result[f"{phase}_{code}"] = json.loads(done.stdout.strip().splitlines()[-1])
                outs[code] = torch.load(path)
            result[f"{phase}_max_abs_logprob_diff"] = float((outs["before"]["logprobs"] - outs["after"]["logprobs"])
                                                            .abs().max())
            if outs["before"]["entropy"] is not None:
                result[f"{phase}_max_abs_entropy_diff"] = float((outs["before"]["entropy"] -
                                                                 outs["after"]["entropy"]).abs().max())
            b, a = result[f"{phase}_before"]["pass_mb"], result[f"{phase}_after"]["pass_mb"]
            result[f"{phase}_pass_ratio"] = round(b / max(a, 1.0), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
