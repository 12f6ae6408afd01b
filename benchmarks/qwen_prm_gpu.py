"""qwen_prm adapter at real shape on a GPU: single pass vs per prefix, solutions/s and peak memory.

A Qwen2-shaped PRM of about 0.5B parameters (Qwen2.5-0.5B's config: hidden 896, 24 layers, 14 heads, 2 KV
heads, vocabulary 151,936) is built from a config with random weights (nothing is downloaded) and saved the
way Qwen2.5-Math-PRM is laid out (`QwenProcessRewardModel`: body `model.*`, head `score.0/score.2`), with the
stand-in tokenizer's `<extra_0>` and chat template. It scores `--solutions` MATH500-length solutions
(`--steps` steps of about `--step-tokens` tokens) through `load_reward_model(..., "qwen_prm")` in bfloat16,
one forward pass per solution, and again with every prefix as its own sequence. Prints one JSON object.

    python benchmarks/qwen_prm_gpu.py                  # on a GPU: 512 solutions, bf16
    python benchmarks/qwen_prm_gpu.py --tiny           # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("we compute the value of x so that 2x + 3 = 11 hence x = 4 and the area is 12 since the triangle has "
         "base 6 and height 4 therefore the answer follows").split()


def solutions(n: int, steps: int, words: int, seed: int):
    rng = random.Random(seed)
    problems = [f"Problem {i}: find x if {rng.randint(2, 9)}x + {rng.randint(1, 20)} = {rng.randint(30, 99)}."
                for i in range(n)]
    sols = [[" ".join(rng.choice(WORDS) for _ in range(words)) + f" = {rng.randint(1, 999)}." for _ in range(steps)]
            for _ in range(n)]
    return problems, sols


def build(folder: Path, tiny: bool) -> None:
    import torch
    from transformers import Qwen2Config

    from rlprm.reward.adapters.qwen_arch import QwenProcessRewardModel
    from rlprm.testing.standins import build_tokenizer

    tok = build_tokenizer("qwen", model_max_length=32768)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else dict(hidden_size=896, intermediate_size=4864,
                                                          num_hidden_layers=24, num_attention_heads=14,
                                                          num_key_value_heads=2)
    config = Qwen2Config(vocab_size=len(tok) if tiny else 151936, max_position_embeddings=32768,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **shape)
    config.architectures = ["Qwen2ForProcessRewardModel"]
    torch.manual_seed(0)
    QwenProcessRewardModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def timed(fn, device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return time.perf_counter() - t, out, peak


def main() -> None:
    import torch

    from rlprm.reward.adapters import load_reward_model
    from rlprm.reward.adapters.common import score_steps_per_prefix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-words", type=int, default=18, help="words per step (about 50 tokens here)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, 16 solutions (a smoke run)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    n = 16 if args.tiny else args.solutions
    problems, sols = solutions(n, args.steps, args.step_words, 0)
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "prm", args.tiny)
        rm = load_reward_model(Path(tmp) / "prm", "qwen_prm", device=device, dtype=dtype)
        tokens = [len(e.input_ids) for e in rm.encode(problems, sols)]
        rm.score_steps(problems[:4], sols[:4], batch_size=args.batch_size)  # warm-up
        single_s, single, single_mem = timed(lambda: rm.score_steps(problems, sols, batch_size=args.batch_size), device)
        prefix_s, prefix, prefix_mem = timed(
            lambda: score_steps_per_prefix(rm, problems, sols, batch_size=args.batch_size), device)
        params = sum(p.numel() for p in rm.family.model.parameters())
    diff = max(abs(a - b) for x, y in zip(single, prefix) for a, b in zip(x, y))
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
        "params": params, "solutions": n, "steps": args.steps,
        "tokens_per_solution_mean": round(sum(tokens) / len(tokens), 1), "tokens_max": max(tokens),
        "batch_size": args.batch_size,
        "single_pass": {"seconds": round(single_s, 3), "solutions_per_s": round(n / single_s, 1),
                        "peak_gib": None if single_mem is None else round(single_mem, 2)},
        "per_prefix": {"seconds": round(prefix_s, 3), "solutions_per_s": round(n / prefix_s, 1),
                       "peak_gib": None if prefix_mem is None else round(prefix_mem, 2)},
        "speedup": round(prefix_s / single_s, 2),
        "max_abs_diff": diff,  # bf16: padding and sequence length change the kernels' sums slightly
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
