"""Pooled batched generation vs one sample at a time, same model, same run.

    .venv/bin/python benchmarks/bon_generation.py [--generator runs/arith/generator] [--n 16] [--problems 16]

Prints one JSON object: samples per second both ways and their ratio (target:
pooled at least 5x at N = 16). Uses the prepared generator when it exists
(realistic lengths: it stops at EOS), else a tiny random model built on the
spot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="runs/arith/generator", help="a causal-LM folder; built on the spot if absent")
    parser.add_argument("--n", type=int, default=16, help="samples per problem (N)")
    parser.add_argument("--problems", type=int, default=16, help="problems in the pool")
    parser.add_argument("--single", type=int, default=48, help="samples generated one at a time for the baseline")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    import torch

    from rlprm.config import ArithmeticConfig, TinyModelConfig
    from rlprm.models import build_char_tokenizer, build_tiny_causal_lm, load_causal_lm, load_tokenizer
    from rlprm.sampling import sample
    from rlprm.tasks.arithmetic import CHARSET, make_problems

    if Path(args.generator).exists():
        tokenizer = load_tokenizer(args.generator)
        model = load_causal_lm(args.generator)
        source = args.generator
    else:
        tokenizer = build_char_tokenizer(CHARSET)
        model = build_tiny_causal_lm(TinyModelConfig(), tokenizer)
        source = "tiny random model (no prepared generator found)"
    prompts = [p.prompt for p in make_problems(ArithmeticConfig(), args.problems, seed=99)]
    torch.set_num_threads(torch.get_num_threads())

    # warm-up: first calls pay one-time costs
    sample(model, tokenizer, prompts[:2], n=2, max_new_tokens=8, seed=0)

    t = time.perf_counter()
    pooled = sample(model, tokenizer, prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                    batch_size=args.n * args.problems, seed=1)
    pooled_s = time.perf_counter() - t
    n_pooled = sum(len(r) for r in pooled.texts)

    t = time.perf_counter()
    singles = 0
    for k in range(args.single):
        sample(model, tokenizer, [prompts[k % len(prompts)]], n=1, max_new_tokens=args.max_new_tokens, seed=k)
        singles += 1
    single_s = time.perf_counter() - t

    pooled_rate, single_rate = n_pooled / pooled_s, singles / single_s
    print(json.dumps({
        "model": source, "n": args.n, "problems": args.problems, "threads": torch.get_num_threads(),
        "pooled": {"samples": n_pooled, "seconds": round(pooled_s, 2), "samples_per_s": round(pooled_rate, 1)},
        "one_at_a_time": {"samples": singles, "seconds": round(single_s, 2), "samples_per_s": round(single_rate, 1)},
        "speedup": round(pooled_rate / single_rate, 2),
        "mean_tokens_per_sample": round(sum(len(i) for r in pooled.token_ids for i in r) / n_pooled, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
