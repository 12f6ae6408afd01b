"""Plain sampling through the KV-cache loop vs HF `generate`, side by side in one process, at the demo's shapes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py --generator runs/demo/prepare/generator \
        --recipe runs/demo/seed-0/rl_prm_dense/recipe.yaml [--rounds 3] [--out benchmarks/sampling_speed.json]

Shapes (prompts x samples each, sequences per batch): the RL held-out eval (256 x 4, 256) and the start of
best-of-N (64 x 64, 256), plus each with the loop at a larger batch (`--big-batch`). Each round runs every
variant once, the variants' order alternating between rounds; per variant, the median over rounds of samples per
second (wall) and of CPU seconds. The prompts are the recipe's held-out problems (its task and seed), else
`ArithmeticConfig()` problems. Target: the loop at least 1.7x `generate` at both shapes, 1 thread. Writes JSON
(and prints it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="runs/arith/generator", help="a causal-LM folder; built on the spot if absent")
    parser.add_argument("--recipe", default=None, help="a resolved RL recipe: its held-out problems are the prompts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--big-batch", type=int, default=1024, help="the loop's larger batch (sequences)")
    parser.add_argument("--shapes", default="256x4,64x64", help="prompts x samples, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default="benchmarks/sampling_speed.json")
    args = parser.parse_args()

    import torch

    from rlprm.config import ArithmeticConfig, TinyModelConfig, load_recipe
    from rlprm.data.problems import from_arithmetic, held_out_arithmetic
    from rlprm.models import build_char_tokenizer, build_tiny_causal_lm, load_causal_lm, load_tokenizer
    from rlprm.sampling import sample
    from rlprm.tasks.arithmetic import CHARSET, make_problems

    torch.set_num_threads(args.threads)
    if Path(args.generator).exists():
        tokenizer, model, source = load_tokenizer(args.generator), load_causal_lm(args.generator), args.generator
    else:
        tokenizer = build_char_tokenizer(CHARSET)
        model = build_tiny_causal_lm(TinyModelConfig(), tokenizer)
        source = "tiny random model (no generator found: rows never stop early)"
    model.eval()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    most = max(p for p, _ in shapes)
    if args.recipe:
        problems = held_out_arithmetic(load_recipe(Path(args.recipe)), most)
    else:
        problems = from_arithmetic(make_problems(ArithmeticConfig(), most, seed=99))
    prompts = [p.prompt for p in problems]
    sample(model, tokenizer, prompts[:2], n=2, max_new_tokens=8)  # warm-up: one-time costs
    sample(model, tokenizer, prompts[:2], n=2, max_new_tokens=8, via_generate=True)

    variants = [("generate", 256, True), ("kv loop", 256, False), (f"kv loop, batch {args.big_batch}",
                                                                   args.big_batch, False)]
    results = {}
    for P, n in shapes:
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, batch, via_generate in order:
                wall, cpu = time.perf_counter(), time.process_time()
                out = sample(model, tokenizer, prompts[:P], n=n, max_new_tokens=args.max_new_tokens,
                             batch_size=batch, seed=r, via_generate=via_generate)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                tokens = sum(len(i) for row in out.token_ids for i in row) / (P * n)
                runs[name].append((P * n / wall, cpu, tokens))
        base = runs["generate"]
        shape = {}
        for name, _, _ in variants:
            rate = statistics.median(x[0] for x in runs[name])
            cpu = statistics.median(x[1] for x in runs[name])
            shape[name] = {"samples_per_s": round(rate, 1), "cpu_s": round(cpu, 2),
                           "mean_tokens": round(statistics.mean(x[2] for x in runs[name]), 1),
                           "speedup_wall": round(rate / statistics.median(x[0] for x in base), 2),
                           "speedup_cpu": round(statistics.median(x[1] for x in base) / cpu, 2)}
        results[f"{P}x{n}"] = shape
    report = {"model": source, "threads": args.threads, "rounds": args.rounds,
              "max_new_tokens": args.max_new_tokens, "torch": torch.__version__, "shapes": results,
              "target": "kv loop >= 1.7x generate (samples/s) at every shape"}
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
