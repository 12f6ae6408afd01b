"""Step-level beam search vs best-of-N at the same generated-token budget, same model, same run.

    .venv/bin/python benchmarks/search_throughput.py [--problems 16] [--n 4] [--width 4] [--scorer checker|prm]

Prints one JSON object. A tiny generator (width 32, 2 layers) is fitted on the spot on the reference solutions
of the benchmark's arithmetic problems (`--fit-steps` full-batch steps), so it writes step-shaped solutions that
stop at EOS, as a prepared generator does. Beam search (`--n` beams, `--width` next steps each) runs first; its
generated tokens per problem set best-of-N's N (N = those tokens / best-of-N's mean tokens per sample, rounded),
so both spend about the same tokens. Reported for each: generated tokens per problem, tokens/s over generation
alone and over generation + scoring, scorer calls per problem, and search's seconds per generated token over
best-of-N's (`overhead_per_token`; target within 1.5x). Scorer `checker`: the exact step checker (costs next to
nothing: the ratio is the generation's); `prm`: a tiny rlprm PRM on the generator's body (a forward pass per
partial solution, as a real PRM costs).

Search's step generator runs two ways, alternated in one run (`--repeats` rounds of each, medians reported):
`kv_cache` (the default: each partial solution's keys and values kept between rounds, finished rows leaving the
batch; rlprm/evaluation/kv_steps.py) and `generate` (`reuse_cache=False`: HF `generate` per round, the prefix
recomputed). Best-of-N's rounds are interleaved with them. `--out FILE` also writes the JSON there.
"""

from __future__ import annotations

import argparse
import json
import time


def fit_generator(tokenizer, problems, steps: int, seed: int = 0):
    """The tests' tiny generator, fitted on the reference solutions of `problems`."""
    from rlprm.testing.tiny import fit_generator as fit

    return fit(tokenizer, problems, steps, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="beams kept per problem")
    parser.add_argument("--width", type=int, default=4, help="next steps sampled per beam")
    parser.add_argument("--scorer", choices=("checker", "prm"), default="checker")
    parser.add_argument("--fit-steps", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-step-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternated; medians reported")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()

    import torch

    from rlprm.config import ArithmeticConfig
    from rlprm.models import build_char_tokenizer
    from rlprm.data.problems import from_arithmetic
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm
    from rlprm.sampling import sample
    from rlprm.evaluation.search import CheckerScorer, HFStepGenerator, RewardModelScorer, SearchSettings, search
    from rlprm.tasks.arithmetic import CHARSET, make_problems

    tokenizer = build_char_tokenizer(CHARSET)
    problems = from_arithmetic(make_problems(ArithmeticConfig(), args.problems, seed=99))
    t = time.perf_counter()
    model = fit_generator(tokenizer, [p.arith for p in problems], args.fit_steps)
    fit_s = time.perf_counter() - t
    if args.scorer == "prm":
        conv = make_convention("prm", "\n")
        scorer = RewardModelScorer(RewardModel(reward_model_from_causal_lm(conv, model, tokenizer), tokenizer, conv),
                                   "prm", "\n")
    else:
        scorer = CheckerScorer("\n")
    generators = {"kv_cache": HFStepGenerator(model, tokenizer, "\n", batch_size=256),
                  "generate": HFStepGenerator(model, tokenizer, "\n", batch_size=256, reuse_cache=False)}
    settings = SearchSettings("beam", n=args.n, width=args.width, max_steps=12, max_step_tokens=args.max_step_tokens,
                              max_new_tokens=args.max_new_tokens, seed=1)
    prompts = [p.prompt for p in problems]
    # forward passes of the generator: a count the machine's load does not change (the timings it does)
    forwards = {"n": 0}
    plain_forward = model.forward

    def counted_forward(*a, **k):
        forwards["n"] += 1
        return plain_forward(*a, **k)

    model.forward = counted_forward
    sample(model, tokenizer, prompts[:2], n=2, max_new_tokens=8, seed=0)  # warm-up: one-time costs
    for g in generators.values():
        search(problems[:2], g, scorer, SearchSettings("beam", n=2, width=2, max_steps=2, seed=0))

    def best_of(n: int, seed: int) -> dict:
        forwards["n"] = 0
        t0 = time.perf_counter()
        out = sample(model, tokenizer, prompts, n=n, max_new_tokens=args.max_new_tokens, batch_size=256, seed=seed)
        gen_s = time.perf_counter() - t0
        # EOS counts as generated, as in the search (the sampler strips it; shorter than the cap means it came)
        tokens = sum(len(ids) + (len(ids) < args.max_new_tokens) for row in out.token_ids for ids in row)
        texts = [t for row in out.texts for t in row]
        t0 = time.perf_counter()
        scorer.score_prefixes([p for p in problems for _ in range(n)], texts)
        score_s = time.perf_counter() - t0
        return {"n": n, "tokens": tokens, "generate_s": gen_s, "score_s": score_s, "calls": len(texts),
                "forwards": forwards["n"]}

    def search_run(name: str, seed: int) -> dict:
        settings.seed = seed
        forwards["n"] = 0
        calls = generators[name].calls
        res = search(problems, generators[name], scorer, settings)
        return {"tokens": sum(res.tokens), "generate_s": res.generate_seconds, "score_s": res.score_seconds,
                "calls": sum(res.scorer_calls), "seconds": res.seconds,
                "generate_calls": generators[name].calls - calls, "finished": sum(len(f) for f in res.finished), "forwards": forwards["n"]}

    # best-of-N's N from the default generator's first search: both spend about the same tokens
    first = search_run("kv_cache", 1)
    probe = best_of(16, seed=0)
    per_sample = probe["tokens"] / (16 * len(problems))
    n_match = max(1, round(first["tokens"] / len(problems) / per_sample))
    runs: dict[str, list[dict]] = {"kv_cache": [], "generate": [], "best_of_n": []}
    for r in range(args.repeats):
        order = ("kv_cache", "generate") if r % 2 else ("generate", "kv_cache")
        for name in order:
            runs[name].append(search_run(name, 1 + r))
        runs["best_of_n"].append(best_of(n_match, seed=1 + r))

    def per_token(x: dict, with_score: bool) -> float:
        return (x["generate_s"] + (x["score_s"] if with_score else 0.0)) / x["tokens"]

    def median(values: list[float]) -> float:
        v = sorted(values)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    def report(rows: list[dict]) -> dict:
        m = {k: median([x[k] for x in rows]) for k in ("tokens", "generate_s", "score_s", "calls", "forwards")}
        return {"tokens_per_problem": round(m["tokens"] / len(problems), 1),
                "generate_s": round(m["generate_s"], 3), "score_s": round(m["score_s"], 3),
                "tokens_per_s_generate": round(median([x["tokens"] / x["generate_s"] for x in rows]), 1),
                "tokens_per_s_total": round(median([x["tokens"] / (x["generate_s"] + x["score_s"]) for x in rows]), 1),
                "scorer_calls_per_problem": round(m["calls"] / len(problems), 1),
                "generator_forward_passes": m["forwards"],
                "runs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in x.items()} for x in rows]}

    bon = runs["best_of_n"]
    overhead = {}
    for name in ("kv_cache", "generate"):
        # per round r: search's seconds per token over the same round's best-of-N; median over rounds
        for with_score, key in ((False, "generate"), (True, "total")):
            overhead[f"{name}_{key}"] = round(median([per_token(a, with_score) / per_token(b, with_score)
                                                      for a, b in zip(runs[name], bon)]), 2)
    result = {
        "command": "benchmarks/search_throughput.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                  vars(args).items() if k != "out"),
        "model": f"tiny generator (width 32, 2 layers) fitted {args.fit_steps} steps on the problems' reference "
                 f"solutions ({fit_s:.1f} s)",
        "scorer": args.scorer, "problems": len(problems), "threads": torch.get_num_threads(),
        "beam": {"n": args.n, "width": args.width,
                 **{name: report(runs[name]) for name in ("kv_cache", "generate")}},
        "best_of_n": {"n": n_match, "mean_tokens_per_sample": round(per_sample, 1), **report(bon)},
        # seconds per generated token, search over best-of-N (target <= 1.5), median over alternated rounds
        "overhead_per_token": overhead,
        "target_overhead_per_token": 1.5,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
