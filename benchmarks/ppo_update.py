"""CPU seconds of PPO's model passes, one full-width pass (before) against rows grouped by length (after); JSON.

    .venv/bin/python benchmarks/ppo_update.py --generator runs/demo/prepare/generator
    .venv/bin/python benchmarks/ppo_update.py --generator G --out benchmarks/ppo_update.json --rounds 9 --variants ""

The demo's shape (recipes/prm_dense.yaml with the demo's budgets): one rollout of 32 prompts x 4 samples sampled
by the generator at T = 1 (max_new_tokens 96), a policy with the generator's weights and a critic of its first 2
layers (rl.value_layers). Two measures, each in this one process, the two ways alternating round by round, the
median of the rounds' CPU seconds (time.process_time: load from other jobs does not count):

- `update`: one PPO minibatch step (rl.minibatch_size 32 rows): the policy's log-probs and the critic's values
  with gradients, the clipped losses, the backward pass, clipping and both AdamW steps. The demo's update makes
  8 of them per iteration (2 PPO epochs x 4 minibatches).
- `rollout`: the no-grad passes of one iteration's 128 rows: the old log-probs and entropy, the reference's
  log-probs, the critic's values.

`before` is one pass over the rows at the rollout's full width (the batch's longest response), as `ppo.py` ran
them before `by_length`; `after` is `ppo.by_length` with `ppo.GROUP_COST_CPU` and `ppo.MAX_AREA_CPU` (and, for
the choice of those constants, a few others: VARIANTS; `trim_only`: one pass of the minibatch's own width).
Also written: the token columns each way computes per real token (deterministic, whatever the load), and the
largest difference between the ways' outputs at a real token (float summation order only).
(CPU seconds still grow with load: other jobs on the same cores share the caches.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


# `ppo.by_length`'s settings timed beside `before` (one full-width pass): name -> (group_cost, max_area by
# gradients on/off); `after` (the shipped constants) and `no_area_cap` are added in main
VARIANTS: dict = {"trim_only": (None, None), "cost48": (48, {True: 1536, False: 3072}),
                  "area1024": (96, {True: 1024, False: 2048}), "area2048": (96, {True: 2048, False: 4096})}


def _rollout(generator: str, prompts: int, samples: int, seed: int):
    import torch

    from rlprm.config import load_recipe
    from rlprm.data.problems import epoch_problems
    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.rl.ppo import build_rollout

    recipe = load_recipe(ROOT / "recipes" / "prm_dense.yaml", [f"model.generator={generator}"])
    problems = epoch_problems(recipe, 0, set())[:prompts]
    tok = load_tokenizer(generator, padding_side="left")
    policy = load_causal_lm(generator, "float32", "cpu")
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = policy.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=96,
                              num_return_sequences=samples, pad_token_id=tok.pad_token_id)
    gen = out[:, enc["input_ids"].shape[1]:].tolist()
    return tok, policy, build_rollout(tok, enc["input_ids"], enc["attention_mask"], gen, samples)


def _critic(generator: str, layers: int):
    from transformers import AutoModelForTokenClassification

    from rlprm.models import disable_dropout
    from rlprm.rl.ppo import truncate_layers

    model = AutoModelForTokenClassification.from_pretrained(generator, num_labels=1)
    truncate_layers(model, layers)
    return disable_dropout(model)


def _values(critic, ids, att, p: int, t: int):
    """The critic's values at the positions that predict response tokens 0..t-1 (as PPO reads them), (n, t)."""
    position_ids = (att.cumsum(-1) - 1).clamp(min=0)
    return critic(input_ids=ids, attention_mask=att, position_ids=position_ids).logits[:, p - 1:p - 1 + t, 0].float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", default=str(ROOT / "runs" / "demo" / "prepare" / "generator"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="other settings to time beside before and after (comma-separated names of VARIANTS)")
    args = parser.parse_args(argv)
    import copy

    import torch

    from rlprm.rl import ppo
    from rlprm.rl.core import policy_loss, token_logprobs, value_loss

    torch.set_num_threads(1)
    tok, policy, ro = _rollout(args.generator, 32, 4, 0)
    reference = copy.deepcopy(policy).eval()
    critic = _critic(args.generator, 2)
    popt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    vopt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    P, (B, T) = ro.prompt_width, ro.response_mask.shape
    mask = ro.response_mask
    lengths = mask.sum(1).float()

    def update_pass(ids, att, p, t):
        features, head = ppo.response_features(policy, ids, att, p, t)
        logp = token_logprobs(features, ids[:, p:], head, 1.0)[0]
        return logp, _values(critic, ids, att, p, t)

    def rollout_pass(ids, att, p, t):
        features, head = ppo.response_features(policy, ids, att, p, t)
        (logp, ent), = ppo.features_logprobs(features, head, ids[:, p:], (1.0,), entropy=True)
        features, head = ppo.response_features(reference, ids, att, p, t)
        (ref, _), = ppo.features_logprobs(features, head, ids[:, p:], (1.0,))
        return logp, ent, ref, _values(critic, ids, att, p, t)

    def run(fn, ids, att, m, how):
        if how == "before":
            return fn(ids, att, P, T)
        cost, areas = VARIANTS[how]
        return ppo.by_length(fn, ids, att, P, m, cost, None if areas is None else areas[torch.is_grad_enabled()])

    g = torch.Generator().manual_seed(1)
    adv, old_v, ret = (torch.randn(B, T, generator=g) for _ in range(3))
    with torch.no_grad():
        old_lp = run(update_pass, ro.input_ids, ro.attention_mask, mask, "before")[0]

    def update(cost, idx):
        m = mask[idx]
        logp, values = run(update_pass, ro.input_ids[idx], ro.attention_mask[idx], m, cost)
        pl, _ = policy_loss(logp, old_lp[idx], adv[idx], m, 0.2)
        vl, _ = value_loss(values, old_v[idx], ret[idx], m, 0.2)
        popt.zero_grad(set_to_none=True)
        vopt.zero_grad(set_to_none=True)
        (pl + 0.5 * vl).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        popt.step()
        vopt.step()

    def rollout(cost):
        with torch.no_grad():
            return run(rollout_pass, ro.input_ids, ro.attention_mask, mask, cost)

    VARIANTS.update({"after": (ppo.GROUP_COST_CPU, ppo.MAX_AREA_CPU), "no_area_cap": (ppo.GROUP_COST_CPU, None)})
    costs = ["before", "after", *[v for v in args.variants.split(",") if v and v != "after"]]
    # the outputs agree at every real token (before any update changes the weights)
    policy.eval()
    want = rollout("before")
    diff = {str(c): max(float((w - h)[mask].abs().max()) for w, h in zip(want, rollout(c))) for c in costs[1:]}
    policy.train()
    critic.train()
    times: dict = {"update": {str(c): [] for c in costs}, "rollout": {str(c): [] for c in costs}}
    for r in range(args.rounds):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(r))
        for c in (costs if r % 2 == 0 else costs[::-1]):
            for start in range(0, B, 32):
                t0 = time.process_time()
                update(c, order[start:start + 32])
                times["update"][str(c)].append(time.process_time() - t0)
            t0 = time.process_time()
            rollout(c)
            times["rollout"][str(c)].append(time.process_time() - t0)
    from rlprm.rl.core import length_groups

    def columns(how, idx, grad):  # token columns the passes compute, per real token
        if how == "before":
            return len(idx) * (P + T)
        cost, areas = VARIANTS[how]
        groups = length_groups(prompt_lengths[idx], lengths[idx].long(), cost,
                               None if areas is None else areas[grad])
        return sum(len(g) * (int(prompt_lengths[idx][g].max()) + int(lengths[idx][g].max())) for g in groups)

    prompt_lengths = ro.attention_mask[:, :P].sum(1)
    real = float(prompt_lengths.sum() + lengths.sum())
    minibatches = torch.randperm(B, generator=torch.Generator().manual_seed(0)).split(32)
    padding = {c: {"update": round(sum(columns(c, i, True) for i in minibatches) / real, 3),
                   "rollout": round(columns(c, torch.arange(B), False) / real, 3)} for c in costs}
    med = {k: {c: round(statistics.median(v), 4) for c, v in d.items()} for k, d in times.items()}
    result = {
        "generator": args.generator, "rows": B, "prompt_width": P, "response_width": T,
        "response_length_mean": round(float(lengths.mean()), 1), "threads": 1, "rounds": args.rounds,
        "group_cost": ppo.GROUP_COST_CPU, "max_area": ppo.MAX_AREA_CPU, "variants": {c: VARIANTS[c] for c in costs[1:]},
        "cpu_seconds_median": med,
        "columns_per_real_token": padding,
        "speedup_update": round(med["update"]["before"] / med["update"]["after"], 3),
        "speedup_rollout_passes": round(med["rollout"]["before"] / med["rollout"]["after"], 3),
        # one iteration of the demo: the rollout's passes and 8 minibatch steps (2 PPO epochs x 4)
        "speedup_iteration": round((med["rollout"]["before"] + 8 * med["update"]["before"])
                                   / (med["rollout"]["after"] + 8 * med["update"]["after"]), 3),
        "max_abs_diff_at_real_tokens": diff,
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
