"""`rlprm eval` with eval.search: step-level search against best-of-N at equal generated tokens.

For each budget (beam: 1, 2, 4, ... eval.search.n beams; dvts: width, 2 width, ... n candidates per step) the
search runs once on the held-out problems; best-of-N's points come from the eval pool (sampled once at
eval.n_max), at every N = 1, 2, 4, ..., n_max. Every method gets, per problem, its answer accuracy, its
every-step-right rate (where steps can be checked), its generated tokens and its scorer calls. Best-of-N's
per-problem values are expectations over `draws` random draws of N of the pool's samples (so they are not
noisier than they need be); its tokens, the N drawn samples' mean length times N (EOS counted); its seconds,
the pool's sampling time scaled by N / n_max (an estimate: the pool is sampled in one go).

Methods: best-of-N under the search's own scorer (`bon_<scorer>_<agg>`), under every other reward model of the
pool (PRM `_prod`, ORM), and majority vote (`bon_majority`); the search with the scorer's pick
(`<method>_<scorer>_<agg>`) and with a majority vote over its finished solutions (`<method>_majority`).

Statistics: one paired bootstrap over PROBLEMS (eval.resamples draws of the P problems with replacement, the same
draws for every method and budget): mean and 2.5/97.5 percentiles of each point, and of the paired difference
between the search at each budget and best-of-N under the same scorer at the N whose tokens per problem are
nearest (search minus best-of-N). Writes search.json, search.md and search.png.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np

from rlprm.files import atomic_write_json, atomic_write_text, save_figure


def budgets(method: str, n: int, width: int) -> list[int]:
    """The search's budgets: beam, 1, 2, 4, ... up to n beams, and n; dvts, width, 2 width, ... up to n, and n
    (at least one subtree)."""
    k = width if method == "dvts" else 1
    out = []
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def interval(values: np.ndarray) -> dict:
    """{mean, lo, hi}: the mean and 2.5 / 97.5 percentiles over resamples (NaN ones left out)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return {"mean": float(values.mean()), "lo": float(np.percentile(values, 2.5)),
            "hi": float(np.percentile(values, 97.5))}


def bootstrap(points: list[dict], pairs: list[tuple[int, int]], resamples: int, seed: int) -> tuple[list, list]:
    """Paired bootstrap over problems. points[k]: {"correct": (P,), "process": (P,) with NaN where unchecked,
    "tokens": (P,), ...}; pairs: (a, b) point indices whose difference a - b gets an interval. Every point and
    difference is computed on the same resampled problems. Returns (per point {accuracy, process_correct,
    tokens}, per pair {accuracy, process_correct})."""
    P = len(points[0]["correct"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, P, size=(resamples, P))

    def means(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)[idx]  # (R, P)
        ok = ~np.isnan(x)
        return np.where(ok.any(1), np.where(ok, x, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)

    per = [{m: means(pt[k]) for m, k in (("accuracy", "correct"), ("process_correct", "process"),
                                        ("tokens", "tokens"))} for pt in points]
    summary = [{m: interval(v) for m, v in p.items()} for p in per]
    diffs = [{m: interval(per[a][m] - per[b][m]) for m in ("accuracy", "process_correct")} for a, b in pairs]
    return summary, diffs


def bon_points(pool, selector_values: dict[str, np.ndarray], ns: list[int], draws: int, seed: int,
               t_sample: float) -> list[dict]:
    """Best-of-N's per-problem points at each N: expected accuracy / every-step-right of each selector over
    `draws` draws of N of the pool's samples (ties at random); `majority` votes over answer classes."""
    from rlprm.evaluation.search import answer_key, pick

    rng = random.Random(seed)
    correct, process = pool.correct(), pool.process()
    n = pool.n
    lengths = np.array([[len(ids) for ids in row[:n]] for row in pool.response_ids], dtype=float) \
        if pool.response_ids else np.full(correct.shape, np.nan)
    keys = [[answer_key(g.answer, g.answer_correct, j) for j, g in enumerate(row[:n])] for row in pool.grades]
    out = []
    for N in ns:
        for name, values in [*selector_values.items(), ("majority", None)]:
            acc = np.zeros(len(pool.problems))
            proc = np.zeros(len(pool.problems))
            tok = np.zeros(len(pool.problems))
            for i in range(len(pool.problems)):
                a = p = t = 0.0
                for _ in range(draws):
                    drawn = rng.sample(range(n), N)
                    if values is None:
                        k = pick([1.0] * N, [keys[i][j] for j in drawn], "majority", rng)
                    else:
                        k = pick([float(values[i, j]) for j in drawn], [""] * N, "score", rng)
                    j = drawn[k]
                    a += correct[i, j]
                    p += process[i, j]
                    t += lengths[i, drawn].sum()
                acc[i], proc[i], tok[i] = a / draws, p / draws, t / draws
            out.append({"method": f"bon_{name}", "budget": N, "correct": acc, "process": proc, "tokens": tok,
                        "seconds": t_sample * N / n, "scorer_calls": float(N)})
    return out


def make_scorer(recipe, tokenizer, model, device):
    """The eval.search.scorer: the checker, the generator's confidence, or a reward model of eval.reward_models."""
    from rlprm.evaluation.search import CheckerScorer, ConfidenceScorer, RewardModelScorer

    ev, sep = recipe.eval, recipe.task.step_separator
    name = ev.search.scorer
    if name == "checker":
        return CheckerScorer(sep)
    if name == "confidence":
        return ConfidenceScorer(model, tokenizer, sep, batch_size=min(ev.batch_size, 64))
    from rlprm.reward.adapters import load_for_recipe

    rm = load_for_recipe(recipe, ev.reward_models[name], ev.reward_model_adapters.get(name), device=device,
                         dtype="float32")
    return RewardModelScorer(rm, name, sep)


def run_search_comparison(recipe, pool, tokenizer, device, t_sample: float, progress: bool = True,
                          sampler=None) -> dict:
    """Search at every budget, best-of-N from `pool`, the paired bootstrap, and search.{json,md,png} in the run
    folder; returns flat metrics (`search/<method>/budget=<k>/<metric>`). sampler: the pool's (eval.rollout); a
    vLLM one generates the search's steps too (`VLLMStepGenerator`), else HF `generate` on the generator."""
    from rlprm.evaluation.evaluate import powers_of_two, selector_scores
    from rlprm.models import load_causal_lm
    from rlprm.reward.model import aggregate
    from rlprm.evaluation.search import HFStepGenerator, SearchSettings, VLLMStepGenerator, search, search_outcomes

    ev, cfg, sep = recipe.eval, recipe.eval.search, recipe.task.step_separator
    run_dir = Path(recipe.run.output_dir)
    model = load_causal_lm(recipe.model.generator, recipe.model.dtype, device, recipe.model.trust_remote_code)
    scorer = make_scorer(recipe, tokenizer, model, device)
    scorer_key = f"{scorer.name}_{cfg.aggregation}"

    # best-of-N: the search's scorer on the pool's samples (a reward model's scores are in the pool already)
    if scorer.name in pool.step_scores:
        steps = pool.step_scores[scorer.name]
    else:
        flat = scorer.score_prefixes([p for p, row in zip(pool.problems, pool.texts) for _ in row],
                                     [t for row in pool.texts for t in row])
        it = iter(flat)
        steps = [[next(it) for _ in row] for row in pool.texts]
    values = {scorer_key: np.array([[aggregate(s, cfg.aggregation) for s in row[:pool.n]] for row in steps])}
    for name, sc in selector_scores(pool, ("prod",)).items():
        if name.endswith("_prod") or pool.kinds.get(name) == "orm":
            values.setdefault(name, sc)
    points = bon_points(pool, values, powers_of_two(ev.n_max), draws=64, seed=recipe.run.seed, t_sample=t_sample)

    if getattr(sampler, "llm", None) is not None:
        generator = VLLMStepGenerator(sampler.llm, tokenizer, sep, batch_size=ev.batch_size)
    else:
        generator = HFStepGenerator(model, tokenizer, sep, batch_size=ev.batch_size)
    for budget in budgets(cfg.method, cfg.n, cfg.width):
        settings = SearchSettings(cfg.method, n=budget, width=cfg.width, lookahead=cfg.lookahead,
                                  aggregation=cfg.aggregation,
                                  max_steps=cfg.max_steps, max_step_tokens=cfg.max_step_tokens,
                                  max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, seed=recipe.run.seed)
        t0 = time.monotonic()
        result = search(pool.problems, generator, scorer, settings)
        if progress:
            print(f"{cfg.method} n={budget}: {sum(result.tokens) / len(pool.problems):.0f} tokens per problem, "
                  f"{time.monotonic() - t0:.1f} s", flush=True)
        for selector, out in search_outcomes(result, sep, ("score", "majority"), seed=recipe.run.seed).items():
            label = f"{cfg.method}_{scorer_key}" if selector == "score" else f"{cfg.method}_majority"
            points.append({"method": label, "budget": budget, "correct": np.array(out.correct),
                           "process": np.array(out.process), "tokens": np.array(out.tokens),
                           "seconds": out.seconds, "scorer_calls": float(np.mean(out.scorer_calls))})
    del model

    # each search point against best-of-N under the same scorer at the nearest tokens per problem
    bon_same = [k for k, p in enumerate(points) if p["method"] == f"bon_{scorer_key}"]
    pairs = []
    for k, p in enumerate(points):
        if p["method"] == f"{cfg.method}_{scorer_key}":
            near = min(bon_same, key=lambda b: abs(math.log(max(points[b]["tokens"].mean(), 1))
                                                   - math.log(max(p["tokens"].mean(), 1))))
            pairs.append((k, near))
    summary, diffs = bootstrap(points, pairs, ev.resamples, recipe.run.seed)
    rows = [{"method": p["method"], "budget": p["budget"], "seconds": round(p["seconds"], 3),
             "scorer_calls_per_problem": p["scorer_calls"], **s} for p, s in zip(points, summary)]
    differences = [{"a": points[a]["method"], "a_budget": points[a]["budget"], "b": points[b]["method"],
                    "b_budget": points[b]["budget"], **d} for (a, b), d in zip(pairs, diffs)]
    report = {"scorer": scorer.name, "method": cfg.method, "width": cfg.width, "lookahead": cfg.lookahead,
              "aggregation": cfg.aggregation, "problems": len(pool.problems), "rows": rows,
              "differences": differences}
    atomic_write_json(run_dir / "search.json", report)
    atomic_write_text(run_dir / "search.md", markdown(report))
    plot(report, run_dir / "search.png", title=f"{cfg.method} vs best-of-N on {recipe.task.name} "
                                               f"({len(pool.problems)} problems, scorer {scorer.name})")
    metrics = {}
    for r in rows:
        for m in ("accuracy", "process_correct", "tokens"):
            metrics[f"search/{r['method']}/budget={r['budget']}/{m}"] = r[m]["mean"]
    return metrics


def _fmt(point: dict, scale: float = 100, signed: bool = False) -> str:
    if math.isnan(point["mean"]):
        return "-"
    f = "+.1f" if signed else ".1f"
    return f"{scale * point['mean']:{f}} [{scale * point['lo']:{f}}, {scale * point['hi']:{f}}]"


def markdown(report: dict) -> str:
    lines = [f"### {report['method']} search (scorer {report['scorer']}, {report['aggregation']}, width "
             f"{report['width']}, lookahead {report['lookahead']}) vs best-of-N, {report['problems']} problems",
             "", "Mean [95% interval] over a paired bootstrap of problems; tokens: generated per problem.", "",
             "| method | budget | tokens / problem | answer accuracy (%) | every step right (%) "
             "| scorer calls / problem | seconds |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['budget']} | {r['tokens']['mean']:.0f} | {_fmt(r['accuracy'])} | "
                     f"{_fmt(r['process_correct'])} | {r['scorer_calls_per_problem']:.1f} | {r['seconds']:.1f} |")
    if report["differences"]:
        lines += ["", "### Search minus best-of-N (same scorer, nearest tokens per problem), points", "",
                  "| search | best-of-N | accuracy | every step right |", "|---|---|---|---|"]
        for d in report["differences"]:
            lines.append(f"| {d['a']} n={d['a_budget']} | {d['b']} N={d['b_budget']} | "
                         f"{_fmt(d['accuracy'], signed=True)} | {_fmt(d['process_correct'], signed=True)} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, title: str = "Search vs best-of-N") -> None:
    """Accuracy and every-step-right (columns) against generated tokens per problem and against wall seconds
    (rows; best-of-N's are the pool's sampling time scaled by N / n_max), log2 axes, one line per method with
    its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    for row, (xkey, xlabel) in enumerate([("tokens", "generated tokens per problem (log scale)"),
                                          ("seconds", "wall seconds, all problems (log scale)")]):
        for ax, metric, label in [(axes[row][0], "accuracy", "% answers right"),
                                  (axes[row][1], "process_correct", "% chosen solutions with every step right")]:
            for name in methods:
                rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["tokens"]["mean"])
                x = [r["tokens"]["mean"] if xkey == "tokens" else max(r["seconds"], 1e-3) for r in rows]
                y = [100 * r[metric]["mean"] for r in rows]
                if all(math.isnan(v) for v in y):
                    continue
                line, = ax.plot(x, y, "-" if name.startswith("bon_") else "--", marker="o", markersize=3,
                                label=name)
                ax.fill_between(x, [100 * r[metric]["lo"] for r in rows], [100 * r[metric]["hi"] for r in rows],
                                color=line.get_color(), alpha=0.12)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


__all__ = ["bootstrap", "bon_points", "budgets", "interval", "make_scorer", "markdown", "plot",
           "run_search_comparison"]
