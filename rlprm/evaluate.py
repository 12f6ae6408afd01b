"""Best-of-N evaluation, the paper's main experiment (Lightman et al. 2023, section 3).

For every test problem, sample N_max solutions ONCE (batched, KV cache,
seeded) and keep them as a pool: grades, and per-step scores from every reward
model, stored as JSONL so that every selector and every later reward model
reuses the same samples. A selector then picks one solution among N; its
accuracy at N is estimated the paper's way, by repeatedly drawing N of the
N_max samples (here `eval.resamples` times) and averaging, with a 95%
interval from the spread of those draws.

Selectors: each reward model (a PRM under each aggregation, an ORM),
majority vote over final answers, reward-weighted majority vote, random
choice (= accuracy at N=1), and the oracle "any of the N is right" (pass@N).
On the arithmetic task the process-correct rate of the chosen solutions shows
how often a right answer was picked with wrong steps under it.

`best_of_n(...)` is the API RL loops call between epochs; `run_eval(recipe)`
is `rlprm eval`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlprm.problems import SampleGrade, TaskProblem

MAJORITY, WEIGHTED, RANDOM, ORACLE = "majority", "weighted_majority", "random", "pass@n"


@dataclass
class Pool:
    """N samples per problem, graded, with per-step scores by reward-model name."""

    problems: list[TaskProblem]
    texts: list[list[str]]
    grades: list[list[SampleGrade]]
    step_scores: dict[str, list[list[list[float]]]] = field(default_factory=dict)
    """name -> [problem][sample] -> per-step probabilities (an ORM: one number)."""
    kinds: dict[str, str] = field(default_factory=dict)
    """name -> `prm` | `orm`."""

    @property
    def n(self) -> int:
        return min((len(row) for row in self.texts), default=0)

    def correct(self) -> np.ndarray:
        return np.array([[g.answer_correct for g in row[: self.n]] for row in self.grades], dtype=bool)

    def process(self) -> np.ndarray:
        """(P, n) float: 1/0 per sample, NaN where steps cannot be checked."""
        return np.array([[np.nan if g.process_correct is None else float(g.process_correct) for g in row[: self.n]]
                         for row in self.grades], dtype=float)


# --------------------------------------------------------------------------- pool


def sample_pool(model, tokenizer, problems: list[TaskProblem], n: int, temperature: float = 1.0,
                max_new_tokens: int = 96, batch_size: int = 256, seed: int = 0, sep: str = "\n",
                progress: bool = True) -> Pool:
    """Sample `n` solutions per problem in pooled batches and grade them."""
    from rlprm.problems import grade_samples
    from rlprm.sampling import sample

    out = sample(model, tokenizer, [p.prompt for p in problems], n=n, temperature=temperature,
                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
                 desc=f"sampling {n} per problem")
    return Pool(problems, out.texts, grade_samples(problems, out.texts, sep))


def score_pool(pool: Pool, name: str, reward_model, sep: str = "\n", batch_size: int = 64) -> None:
    """Add `reward_model`'s per-step scores of every sample under `name` (one forward pass per sample)."""
    flat_problems, flat_steps, shape = [], [], []
    for problem, row in zip(pool.problems, pool.grades):
        shape.append(len(row))
        for g in row:
            flat_problems.append(problem.text)
            flat_steps.append(g.steps)
    scores = reward_model.score_steps(flat_problems, flat_steps, sep=sep, batch_size=batch_size)
    it = iter(scores)
    pool.step_scores[name] = [[next(it) for _ in range(k)] for k in shape]
    pool.kinds[name] = reward_model.kind


def save_pool(pool: Pool, path: Path) -> None:
    """JSONL, one problem a line, written to a temporary file and renamed."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"kinds": pool.kinds}) + "\n")
        for i, (problem, texts, grades) in enumerate(zip(pool.problems, pool.texts, pool.grades)):
            samples = []
            for j, (text, g) in enumerate(zip(texts, grades)):
                samples.append({
                    "text": text, "steps": g.steps, "answer": g.answer, "answer_correct": g.answer_correct,
                    "well_formed": g.well_formed, "process_correct": g.process_correct, "first_error": g.first_error,
                    "scores": {name: s[i][j] for name, s in pool.step_scores.items()},
                })
            f.write(json.dumps({"id": problem.id, "prompt": problem.prompt, "text": problem.text,
                                "gold": problem.gold, "samples": samples}) + "\n")
    tmp.replace(path)


def load_pool(path: Path) -> Pool:
    """Read a pool written by `save_pool` (arithmetic step checks are not re-run: the verdicts are stored)."""
    with open(path) as f:
        header = json.loads(f.readline())
        problems, texts, grades, scores = [], [], [], {}
        for i, line in enumerate(f):
            row = json.loads(line)
            problems.append(TaskProblem(row["id"], row["prompt"], row["gold"], text=row.get("text")))
            texts.append([s["text"] for s in row["samples"]])
            grades.append([SampleGrade(s["steps"], s["answer"], s["answer_correct"], s["well_formed"],
                                       s["process_correct"], s["first_error"]) for s in row["samples"]])
            for name in header["kinds"]:
                scores.setdefault(name, []).append([s["scores"][name] for s in row["samples"]])
    return Pool(problems, texts, grades, scores, header["kinds"])


# --------------------------------------------------------------------------- selection


def selector_scores(pool: Pool, aggregations=("prod", "min", "last", "mean")) -> dict[str, np.ndarray]:
    """Solution scores (P, n) for every reward-model selector: `NAME_AGG` for a PRM, `NAME` for an ORM."""
    from rlprm.reward_models import aggregate

    out = {}
    n = pool.n
    for name, per_problem in pool.step_scores.items():
        aggs = aggregations if pool.kinds.get(name) == "prm" else ("last",)
        for how in aggs:
            key = f"{name}_{how}" if pool.kinds.get(name) == "prm" else name
            out[key] = np.array([[aggregate(s, how) for s in row[:n]] for row in per_problem], dtype=float)
    return out


def _answer_ids(pool: Pool) -> tuple[np.ndarray, np.ndarray]:
    """(P, n) answer-class ids and (P, 2n) correctness per class.

    Every answer the grader accepted is one class (they all equal the gold);
    wrong answers group by their whitespace-free text; a missing answer is a
    class of its own per sample, so that blanks never win a vote together.
    """
    n = pool.n
    ids = np.zeros((len(pool.problems), n), dtype=np.int64)
    class_correct = np.zeros((len(pool.problems), 2 * n + 1), dtype=bool)
    for i, row in enumerate(pool.grades):
        classes: dict[str, int] = {}
        for j, g in enumerate(row[:n]):
            if g.answer_correct:
                key = "\0correct"
            elif g.answer is None:
                key = f"\0none{j}"
            else:
                key = "".join(g.answer.split())
            ids[i, j] = classes.setdefault(key, len(classes))
            class_correct[i, ids[i, j]] = g.answer_correct
    return ids, class_correct


def _interval(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return {"mean": float(values.mean()), "lo": float(np.percentile(values, 2.5)),
            "hi": float(np.percentile(values, 97.5))}


def bon_curves(pool: Pool, scores: dict[str, np.ndarray], ns: list[int], resamples: int = 200, seed: int = 0,
               weighted_by: str | None = None) -> dict:
    """Accuracy (and process-correct rate) of every selector at every N, mean and 95% interval over resamples.

    Returns {selector: {N: {"accuracy": {mean, lo, hi}, "process_correct": ..., "right_answer_wrong_process": ...}}}.
    """
    correct, process = pool.correct(), pool.process()
    P, n = correct.shape
    rng = np.random.default_rng(seed)
    # one random order of the n samples per (resample, problem); the first N of it is the draw at N
    perm = np.argsort(rng.random((resamples, P, n)), axis=-1)
    rows = np.arange(P)[None, :]
    ids, class_correct = _answer_ids(pool)
    if weighted_by is None:
        weighted_by = next((k for k in scores if k.endswith("_prod")), next(iter(scores), None))
    noise = rng.random((resamples, P, class_correct.shape[1])) * 1e-9  # random tie-breaking in votes

    checkable = not np.isnan(process).all()

    def picked(chosen):  # (R, P) chosen sample per problem -> metrics over resamples
        right, proc = correct[rows, chosen], process[rows, chosen]
        point = {"accuracy": _interval(right.mean(axis=1))}
        if checkable:
            point["process_correct"] = _interval(np.nanmean(proc, axis=1))
            point["right_answer_wrong_process"] = _interval((right & (proc == 0)).mean(axis=1))
        return point

    curves: dict[str, dict[int, dict]] = {}
    for N in ns:
        sub = perm[..., :N]  # (R, P, N)
        for name, s in scores.items():
            # argmax takes the first best in a random order: ties are broken at random
            best = np.argmax(s[rows[..., None], sub], axis=-1)
            chosen = np.take_along_axis(sub, best[..., None], -1)[..., 0]
            curves.setdefault(name, {})[N] = picked(chosen)
        curves.setdefault(RANDOM, {})[N] = picked(sub[..., 0])
        curves.setdefault(ORACLE, {})[N] = {"accuracy": _interval(correct[rows[..., None], sub].any(-1).mean(axis=1))}
        K = class_correct.shape[1]
        sub_ids = ids[rows[..., None], sub]  # (R, P, N)
        flat = (np.arange(resamples)[:, None, None] * P + rows[..., None]) * K + sub_ids
        for name, weights in [(MAJORITY, None), (WEIGHTED, scores.get(weighted_by) if weighted_by else None)]:
            if name == WEIGHTED and weights is None:
                continue
            w = None if weights is None else weights[rows[..., None], sub].ravel()
            votes = np.bincount(flat.ravel(), weights=w, minlength=resamples * P * K).reshape(resamples, P, K)
            winner = np.argmax(votes + noise, axis=-1)
            acc = class_correct[rows, winner].mean(axis=1)
            curves.setdefault(name, {})[N] = {"accuracy": _interval(acc)}
    return curves


def powers_of_two(n_max: int) -> list[int]:
    ns, k = [], 1
    while k < n_max:
        ns.append(k)
        k *= 2
    return ns + [n_max]


# --------------------------------------------------------------------------- reporting


def _fmt(point: dict | None) -> str:
    if not point or math.isnan(point["mean"]):
        return "-"
    return f"{100 * point['mean']:.1f} [{100 * point['lo']:.1f}, {100 * point['hi']:.1f}]"


def markdown_table(curves: dict, title: str = "Best-of-N accuracy (%), mean [95% interval]") -> str:
    ns = sorted({N for c in curves.values() for N in c})
    lines = [f"### {title}", "", "| selector | " + " | ".join(f"N={N}" for N in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for name, c in curves.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(c.get(N, {}).get("accuracy")) for N in ns) + " |")
    n_top = ns[-1]
    proc_rows = [(name, c[n_top]) for name, c in curves.items() if "process_correct" in c.get(n_top, {})
                 and not math.isnan(c[n_top]["process_correct"]["mean"])]
    if proc_rows:
        lines += ["", f"### Chosen solutions at N={n_top} (%): every step right / right answer with a wrong step", "",
                  "| selector | process correct | right answer, wrong step |", "|---|---|---|"]
        for name, point in proc_rows:
            lines.append(f"| {name} | {_fmt(point['process_correct'])} | {_fmt(point['right_answer_wrong_process'])} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict, path: Path, title: str = "Best-of-N") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, c in curves.items():
        ns = sorted(c)
        mean = [100 * c[N]["accuracy"]["mean"] for N in ns]
        lo = [100 * c[N]["accuracy"]["lo"] for N in ns]
        hi = [100 * c[N]["accuracy"]["hi"] for N in ns]
        style = "--" if name in (ORACLE, RANDOM) else "-"
        line, = ax.plot(ns, mean, style, marker="o", markersize=3, label=name)
        ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N = solutions per problem (log scale)")
    ax.set_ylabel("% problems solved (best-of-N)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def flat_metrics(curves: dict, prefix: str = "bon") -> dict:
    """{prefix/selector/N=k/accuracy: mean, ...} for metrics.jsonl and W&B."""
    out = {}
    for name, c in curves.items():
        for N, point in c.items():
            for metric, value in point.items():
                out[f"{prefix}/{name}/N={N}/{metric}"] = value["mean"]
    return out


# --------------------------------------------------------------------------- API and job


def best_of_n(model, tokenizer, problems: list[TaskProblem], reward_models: dict | None = None, n_max: int = 8,
              temperature: float = 1.0, max_new_tokens: int = 96, batch_size: int = 256, resamples: int = 100,
              seed: int = 0, sep: str = "\n", aggregations=("prod",), progress: bool = False) -> tuple[dict, Pool]:
    """Sample, score and select; returns (flat metrics, the pool). For RL loops between epochs."""
    pool = sample_pool(model, tokenizer, problems, n_max, temperature, max_new_tokens, batch_size, seed, sep, progress)
    for name, rm in (reward_models or {}).items():
        score_pool(pool, name, rm, sep=sep)
    curves = bon_curves(pool, selector_scores(pool, aggregations), powers_of_two(n_max), resamples, seed)
    return flat_metrics(curves), pool


def between_epochs(recipe, model, tokenizer, problems: list[TaskProblem], reward_model=None, epoch: int = 0) -> dict:
    """The RL loops' evaluation between epochs: best-of-`rl.eval_n` on held-out `problems`, scored by the run's own
    reward model if it has one, plus the answer and process accuracy of all samples; `{}` when rl.eval_n is 0.

    Sampling reseeds the global torch RNG (the same evaluation samples' seed every epoch, so epochs compare);
    the caller's stream is restored afterwards, or every epoch's rollouts would reuse one stream.
    """
    import torch

    rl = recipe.rl
    if not rl.eval_n:
        return {}
    t0 = time.monotonic()
    rms = {recipe.reward.source: reward_model} if reward_model is not None else {}
    rng = torch.get_rng_state()
    try:
        metrics, pool = best_of_n(model, tokenizer, problems, rms, n_max=rl.eval_n,
                                  temperature=recipe.eval.temperature, max_new_tokens=rl.max_new_tokens,
                                  batch_size=recipe.eval.batch_size, resamples=min(recipe.eval.resamples, 100),
                                  seed=recipe.run.seed, sep=recipe.task.step_separator, progress=False)
    finally:
        torch.set_rng_state(rng)
    process = pool.process()
    metrics.update({
        "epoch": epoch,
        "eval/answer_accuracy": float(pool.correct().mean()),
        "eval/process_accuracy": None if np.isnan(process).all() else float(np.nanmean(process)),
        "time/eval": round(time.monotonic() - t0, 2),
    })
    return metrics


def run_eval(recipe, progress: bool = True) -> dict:
    """`rlprm eval`: pool, scores, curves, table, plot, metrics; returns the curves."""
    from rlprm.models import load_causal_lm, load_tokenizer, resolve_device
    from rlprm.problems import eval_problems
    from rlprm.reward_models import RewardModel
    from rlprm.tracking import Tracker

    ev, sep = recipe.eval, recipe.task.step_separator
    run_dir = Path(recipe.run.output_dir)
    device = resolve_device(recipe.run.device)
    missing = [str(p) for p in [recipe.model.generator, *ev.reward_models.values()]
               if p.startswith("/") and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            "missing checkpoint(s): " + ", ".join(missing) + ". Build them first: `rlprm prepare "
            "recipes/arith_prepare.yaml` for the generator, `rlprm train-rm recipes/prm_train.yaml` and "
            "`recipes/orm_train.yaml` for the reward models.")
    t0 = time.monotonic()
    tracker = Tracker(run_dir, recipe, job="eval", tags=["eval"])
    try:
        # 1. the pool: sampled once, reused by every selector
        problems = eval_problems(recipe, ev.num_problems)
        pool_path = run_dir / "pool.jsonl"
        tokenizer = load_tokenizer(recipe.model.generator, padding_side="left",
                                   trust_remote_code=recipe.model.trust_remote_code)
        model = load_causal_lm(recipe.model.generator, recipe.model.dtype, device, recipe.model.trust_remote_code)
        pool = sample_pool(model, tokenizer, problems, ev.n_max, ev.temperature, ev.max_new_tokens, ev.batch_size,
                           recipe.run.seed, sep, progress)
        del model
        t_sample = time.monotonic() - t0

        # 2. every reward model scores every sample, one forward pass each
        for name, path in ev.reward_models.items():
            rm = RewardModel.load(path, device=device, step_separator=sep)
            score_pool(pool, name, rm, sep=sep)
            del rm
        save_pool(pool, pool_path)

        # 3. selectors over subsamples of the pool
        curves = bon_curves(pool, selector_scores(pool, ev.aggregations), powers_of_two(ev.n_max), ev.resamples,
                            recipe.run.seed, ev.weighted_vote_by)

        # 4. report: table, plot, metrics, a sample table
        (run_dir / "bon.md").write_text(markdown_table(curves))
        plot_curves(curves, run_dir / "bon.png", title=f"Best-of-N on {recipe.task.name} ({len(problems)} problems)")
        (run_dir / "bon_curves.json").write_text(json.dumps(curves, indent=1))
        metrics = flat_metrics(curves)
        metrics.update({"eval/sample_seconds": round(t_sample, 1), "eval/seconds": round(time.monotonic() - t0, 1),
                        "eval/problems": len(problems), "eval/n_max": ev.n_max})
        tracker.log(metrics, step=0)
        tracker.summary(metrics)
        rows = []
        for i, (problem, grades) in enumerate(zip(pool.problems, pool.grades)):
            for j, g in enumerate(grades):
                if len(rows) >= ev.log_samples:
                    break
                rows.append([problem.id, problem.text, pool.texts[i][j], g.answer, g.answer_correct, g.process_correct,
                             json.dumps({k: v[i][j] for k, v in pool.step_scores.items()})])
        tracker.table("samples", ["problem_id", "problem", "solution", "answer", "answer_correct",
                                  "process_correct", "step_scores"], rows)
        return curves
    finally:
        tracker.finish()
