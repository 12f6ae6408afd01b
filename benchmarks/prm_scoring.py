"""PRM scoring speed: one forward pass per solution against one forward pass per prefix.

The same PRM scores the same solutions, in the same run, two ways:

* ``single_pass``: ``RewardModel.score_steps`` reads every step end of the
  whole solution in one forward pass;
* ``per_prefix``: ``score_steps_per_prefix``, every prefix (prompt + steps
  1..k) encoded and scored as its own sequence, the way a PRM is scored when the
  step ends are not known to be causal-safe.

Both are batched the same way (``--batch-size`` sequences, right padding,
lengths sorted), so the ratio is the cost of the prefixes themselves. The
solutions are the embedded task's 5-step solutions (3 chain operations, a final
mod 10 / last digit, the answer step): a reference solution or one with a single
corrupted step, half each. The PRM is the generator-sized tiny Llama (0.86M
parameters) with a fresh head, or a trained one with ``--model``. Each way is
timed ``--repeats`` times after a warm-up, the runs of both ways interleaved; the best time counts.

``--families`` adds one tiny stand-in of each public PRM family
(rlprm/testing/standins.py: qwen_prm, pure_prm, math_shepherd, rlhflow,
value_head, implicit), scored through ``load_reward_model`` both ways. How
each side computes, per family:

* both: the solutions' token form (``HubPRM.encode``, one batched tokenizer
  call) is built once; ``encode_seconds`` times it alone, and
  ``forward_speedup`` is the ratio with it taken out of both sides;
* single pass (``HubPRM.score_steps``): each solution cut after its last read
  position, one forward pass of the body, the head only where a step is read
  (qwen_prm / pure_prm / value_head: their head at the read positions;
  math_shepherd / rlhflow: the ``+``/``-`` rows of the output embedding at the
  read positions; implicit: both LMs' heads at every step token, chunked
  logsumexp, never the full B x T x vocab);
* per prefix (``rlprm.reward.adapters.common.score_steps_per_prefix``): each
  prefix is the same token form cut after step k's read position, run as its
  own sequence, and reads only step k (the head at one position, or for
  implicit at step k's tokens alone): the head work equals the single pass's,
  so the ratio measures the body's repeated prefixes, not a head trick.

``tokens_single_pass`` / ``tokens_per_prefix`` are the tokens each side runs
through the body, and ``tokens_per_prefix_ratio`` their ratio (3.5-4x on these
5-step solutions): the ceiling the speedup approaches once the linear layers
dominate. The stand-ins are far smaller than the generator-sized PRM (width
32, 2 layers; ``--standin-hidden 128 --standin-layers 4`` gives them the
generator's shape). At width 32 a forward pass costs little more than its
per-operation overhead and attention with 8-wide heads, and the shared token
form is a quarter of the single pass, so the ratio stays below the token ratio
(measured, two runs of 10 repeats on a shared 2-core machine: 2.6-2.9x at
width 32, 3.2-4.3x at the generator's shape).

Prints one JSON object. Usage::

    python benchmarks/prm_scoring.py                         # 512 solutions, about 20 s on 2 cores
    python benchmarks/prm_scoring.py --model runs/arith_prm/reward_model
    python benchmarks/prm_scoring.py --families all --solutions 128
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def five_step_solutions(n: int, seed: int):
    from rlprm.config import ArithmeticConfig
    from rlprm.tasks.arithmetic import corrupt_solution, make_problems, reference_solution

    cfg = ArithmeticConfig(min_ops=3, max_ops=3, final_ops=["mod10", "last_digit"])
    problems = make_problems(cfg, n, seed=seed)
    rng = random.Random(seed)
    solutions = []
    for i, p in enumerate(problems):
        steps = reference_solution(p)
        if i % 2:
            for _ in range(10):  # a corrupted one of the same length (a skipped step would shorten it)
                candidate, _ = corrupt_solution(p, rng)
                if len(candidate) == len(steps):
                    steps = candidate
                    break
        solutions.append(steps)
    return [p.text for p in problems], solutions


def build_prm(model_path: str | None):
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_char_tokenizer, build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm
    from rlprm.tasks.arithmetic import CHARSET

    if model_path:
        return RewardModel.load(model_path)
    tokenizer = build_char_tokenizer(CHARSET)
    convention = make_convention("prm", "\n")
    lm = build_tiny_causal_lm(TinyModelConfig(), tokenizer, seed=0)  # the generator's shape (docs/design.md section 8)
    return RewardModel(reward_model_from_causal_lm(convention, lm, tokenizer).eval(), tokenizer, convention)


def best_times(fns, repeats: int) -> list[tuple[float, object]]:
    """(best seconds, last result) of each function, their runs interleaved after one warm-up each: on a shared,
    noisy machine a burst of load then slows every side alike instead of one side's whole series."""
    outs = [fn() for fn in fns]  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            outs[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return list(zip(best, outs))


def main() -> None:
    import torch

    from rlprm.models import num_parameters
    from rlprm.reward.model import score_steps_per_prefix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="a saved PRM folder (default: a fresh generator-sized PRM)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="", help="comma-separated public PRM families to add, or `all`")
    parser.add_argument("--skip-rlprm", action="store_true", help="time only the --families stand-ins")
    parser.add_argument("--standin-hidden", type=int, default=32, help="width of the --families stand-ins")
    parser.add_argument("--standin-layers", type=int, default=2, help="layers of the --families stand-ins")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    problems, solutions = five_step_solutions(args.solutions, args.seed)
    families = _family_results(args, problems, solutions)
    if args.skip_rlprm:
        print(json.dumps({"solutions": len(solutions), "steps_per_solution": sorted({len(s) for s in solutions}),
                          "batch_size": args.batch_size, "standin_shape": [args.standin_hidden, args.standin_layers],
                          "families": families, "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, indent=2))
        return
    rm = build_prm(args.model)
    (single_s, single), (prefix_s, prefix) = best_times(
        [lambda: rm.score_steps(problems, solutions, batch_size=args.batch_size),
         lambda: score_steps_per_prefix(rm, problems, solutions, batch_size=args.batch_size)], args.repeats)
    diff = max(abs(a - b) for x, y in zip(single, prefix) for a, b in zip(x, y))
    tokens_single = sum(len(ids) for ids in _lengths(rm, problems, solutions, prefixes=False))
    tokens_prefix = sum(len(ids) for ids in _lengths(rm, problems, solutions, prefixes=True))
    print(json.dumps({
        "solutions": len(solutions),
        "steps_per_solution": sorted({len(s) for s in solutions}),
        "model": args.model or "fresh tiny Llama (hidden 128, 4 layers, char tokenizer)",
        "params": num_parameters(rm.model),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "single_pass_seconds": round(single_s, 4),
        "per_prefix_seconds": round(prefix_s, 4),
        "single_pass_solutions_per_s": round(len(solutions) / single_s, 1),
        "per_prefix_solutions_per_s": round(len(solutions) / prefix_s, 1),
        "speedup": round(prefix_s / single_s, 2),
        "tokens_single_pass": tokens_single,
        "tokens_per_prefix": tokens_prefix,
        "max_abs_diff": diff,
        "standin_shape": [args.standin_hidden, args.standin_layers],
        "families": families,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }, indent=2))


def _family_results(args, problems, solutions) -> dict:
    """Per public PRM family: single pass vs per prefix on its tiny stand-in (same solutions, same batching)."""
    import tempfile

    from rlprm.models import num_parameters
    from rlprm.reward.adapters import load_reward_model
    from rlprm.reward.adapters.common import score_steps_per_prefix
    from rlprm.testing.standins import save_standin

    from rlprm.reward.adapters import FAMILIES

    names = [f for f in FAMILIES if f != "rlprm"] if args.families == "all" else \
        [n for n in args.families.split(",") if n]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = save_standin(name, Path(tmp) / name, hidden=args.standin_hidden, layers=args.standin_layers)
            extra = {"reference": folder / "reference", "beta": 0.5} if name == "implicit" else {}
            rm = load_reward_model(folder, name, **extra)
            # the token form alone: a fixed cost both ways share (the per-prefix way cuts the same encodings)
            (single_s, single), (prefix_s, prefix), (encode_s, _) = best_times(
                [lambda: rm.score_steps(problems, solutions, batch_size=args.batch_size),
                 lambda: score_steps_per_prefix(rm, problems, solutions, batch_size=args.batch_size),
                 lambda: rm.encode(problems, solutions)], args.repeats)
            encoded = rm.encode(problems, solutions)
            tokens_single = sum(e.reads[-1] + 1 for e in encoded)  # cut after the last read, as score_steps does
            tokens_prefix = sum(r + 1 for e in encoded for r in e.reads)  # each prefix runs to its step's read
            out[name] = {
                "params": num_parameters(rm.family.model),
                "tokens_single_pass": tokens_single, "tokens_per_prefix": tokens_prefix,
                "tokens_per_prefix_ratio": round(tokens_prefix / tokens_single, 2),
                "single_pass_seconds": round(single_s, 4), "per_prefix_seconds": round(prefix_s, 4),
                "encode_seconds": round(encode_s, 4),
                "single_pass_solutions_per_s": round(len(solutions) / single_s, 1),
                "speedup": round(prefix_s / single_s, 2),
                "forward_speedup": round((prefix_s - encode_s) / (single_s - encode_s), 2),
                "max_abs_diff": max(abs(a - b) for x, y in zip(single, prefix) for a, b in zip(x, y)),
            }
    return out


def _lengths(rm, problems, solutions, prefixes: bool):
    from rlprm.steps import encode_batch

    prompts = [rm.convention.prompt(p) for p in problems]
    if prefixes:
        pairs = [(pr, s[: k + 1]) for pr, s in zip(prompts, solutions) for k in range(len(s))]
        prompts, solutions = [p for p, _ in pairs], [s for _, s in pairs]
    return [e.input_ids for e in encode_batch(rm.tokenizer, prompts, solutions, rm.step_separator)]


if __name__ == "__main__":
    main()
