"""The demo's report: OUT/report/report.md, summary.json and the figures, from the demo's run folders.

What it reads (nothing here runs a model): the best-of-N folders of every generator (`pool.jsonl`, else
`bon_curves.json`), the RL run folders (`metrics.jsonl`: per-epoch `eval/*` records, epoch 0 the start, and
per-update `rl/kl_per_token`, `rl/kl_per_sample`, `rl/reward`), the reward models' `summary.json`, and the
generator's (prepare's) `summary.json`.

Statistics (docs/design.md section 9):
- best-of-N: a paired bootstrap over problems (`evaluation.evaluate.bon_bootstrap`) of each generator's pools; with several
  seeds, the seeds' pools together (`bon_curves_seeds`): one resample draws problem indices shared by every
  seed. The seeds' held-out problems differ (they follow run.seed), so a resampling unit is "problem i of every
  seed"; the units are independent of each other, which is what the bootstrap needs. Differences (prm_prod
  minus orm, majority, confidence, ...) are paired: the same resampled problems and draws for both selectors.
- RL: mean over seeds and a 95% t-interval (`compare.seed_interval`); one seed is reported as its value with
  n=1. Differences between arms are paired by seed (end values) and get a t-interval of their own; an interval
  that holds 0 is "not told apart".

summary.json (nested; every {mean, lo, hi} a fraction, not a percentage):
    wall_seconds, peak_rss_mib, seeds       the whole demo, as its runner measured it when the report ran
    bon.GEN.SEL.N.{accuracy, process_correct, right_answer_wrong_process}: {mean, lo, hi}
    bon_diff.GEN.A_minus_B.N.{accuracy, process_correct}: {mean, lo, hi}    A_minus_B for each BON_PAIRS pair
    bon_shape.GEN.{above_majority, above_orm, majority_gap_grows, n_max, ...}  the paper's Figure 3 shape (bon_shape)
    habit_auroc.HABIT.SCORE.{auroc, pairs, problems}   the start's pools: does a score tell a habit's samples
                                        (shortcut, carry_drop) from correct ones of the same problem (within_problem_auroc)
    rl.ARM.METRIC.{start, end, change}: {mean, lo, hi, n}     METRIC in RL_METRICS
    rl.ARM.{kl_per_token, kl_per_sample}.{end, max}: {mean, lo, hi, n}; rl.ARM.reward.{first, last}: ...
    rl_diff.A_minus_B.METRIC.end: {mean, lo, hi, n}           paired by seed
    rl_updates.ARM.METRIC.{per_update: [{mean, lo, hi, n}, ...], over_updates: {...}, halved_at: {...},
                           never_halved: int}   METRIC in UPDATE_METRICS, each update's own samples (rl/METRIC)
    rl_updates_diff.A_minus_B.METRIC.{per_update: [...], over_updates: {...}}   paired by seed
    prm.{step_auroc, first_error_f1, source}, orm.{solution_auroc, source}
    generator.{num_samples, shortcut_rate, carry_drop_rate, trace_error, confidence_auroc_shortcut,
               confidence_auroc_carry_drop, ...}   prepare's held-out check
    ood.{n, kind, intervals}; ood.{ood, in_distribution}.SEL.{accuracy, process_correct}: {mean, lo, hi};
    ood.{pool, in_distribution_pool}.{answer_accuracy, process_accuracy, well_formed, problems_with_a_correct_chain}
    ood.{ood_diff, in_distribution_diff}.{prm_prod_minus_majority, prm_prod_minus_orm}.{accuracy, ...}: at N=n,
                                            the start's best-of-N on OOD problems beside its in-distribution one
GEN is `start`, `start_t07` or an RL arm (`prm_dense`, ...); N a string key ("1", "2", ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlprm.files import atomic_write_json, atomic_write_text, save_figure

RL_METRICS = ["answer_accuracy", "process_accuracy", "trace_error", "shortcut_rate", "carry_drop_rate"]
RL_NAMES = {"answer_accuracy": "answer acc.", "process_accuracy": "process acc.", "trace_error": "trace error",
            "shortcut_rate": "shortcut rate", "carry_drop_rate": "dropped-carry rate"}
# the figure's selectors, in this order (the pools also have prm_min and weighted_majority: tables and summary)
FIGURE_SELECTORS = ["prm_prod", "orm", "majority", "confidence", "likelihood", "random", "pass@n"]
BON_PAIRS = [("prm_prod", "orm"), ("prm_prod", "majority"), ("prm_prod", "confidence"), ("prm_prod", "likelihood"),
             ("prm_prod", "random"), ("prm_min", "majority"), ("prm_min", "orm"), ("orm", "majority"),
             ("weighted_majority", "majority")]
# the paper's Figure 3 (bon_answers.png): every selector of the starting generator, answers and every step right
FIGURE3_SELECTORS = ["prm_prod", "prm_min", "orm", "weighted_majority", "majority", "confidence", "likelihood",
                     "random", "pass@n"]
# paired RL differences, where both arms ran: the oracle's process reward vs its outcome reward, learned process
# vs learned outcome, and every reward against the sharpening control
RL_PAIRS = [("exact_dense", "outcome_gt"), ("prm_dense", "orm_sparse"), ("prm_dense", "confidence_dense"),
            ("orm_sparse", "confidence_dense"), ("outcome_gt", "confidence_dense"), ("exact_dense", "prm_dense")]
BON_RESAMPLES = 1000
# read per update from each update's own samples (rl/METRIC): how many updates each reward takes to remove a habit;
# the held-out evaluation (RL_METRICS) runs only every rl.eval_every epochs (the demo: before and after RL)
UPDATE_METRICS = ["carry_drop_rate", "shortcut_rate", "answer_accuracy"]


@dataclass
class DemoLayout:
    """Where the demo's runs are: folders by generator and by RL arm, one per seed, in seed order."""

    seeds: int = 1
    generators: dict[str, list[Path]] = field(default_factory=dict)
    """best-of-N folders: `start`, `start_t07`, one per RL arm's final generator."""
    arms: dict[str, list[Path]] = field(default_factory=dict)
    """RL run folders by arm (`prm_dense`, ...)."""
    prm: Path | None = None
    orm: Path | None = None
    generator: Path | None = None
    """The prepare folder (its summary.json: the starting generator's held-out check)."""
    ood: list[Path] = field(default_factory=list)
    """best-of-N folders of the starting generator on out-of-distribution problems (recipes/ood_eval.yaml), per seed."""
    runs: list[Path] = field(default_factory=list)
    """Every run folder, for the all-runs view."""


# --------------------------------------------------------------------------- best-of-N


def bon_statistics(dirs: list[Path], resamples: int = BON_RESAMPLES, seed: int = 0) -> tuple[dict, dict, str]:
    """(curves, differences, how) of one generator over its seeds' best-of-N folders.

    Pools when every folder has one (a paired bootstrap over problems, seeds together); else, for one folder,
    its own bon_curves.json (the stage's bootstrap, fewer resamples). Raises FileNotFoundError otherwise."""
    from rlprm.evaluation.evaluate import DIFFERENCES_KEY, selector_curves, bon_bootstrap, load_pool, powers_of_two, \
        selector_scores

    pools_at = [Path(d) / "pool.jsonl" for d in dirs]
    if dirs and all(p.is_file() for p in pools_at):
        pools = [load_pool(p) for p in pools_at]
        scores = [selector_scores(pool, ("prod", "min")) for pool in pools]
        weighted = "prm_prod" if "prm_prod" in scores[0] else None
        present = set(scores[0]) | {"majority", "random", "pass@n"} | ({"weighted_majority"} if weighted else set())
        pairs = [(a, b) for a, b in BON_PAIRS if a in present and b in present]
        ns = powers_of_two(min(pool.n for pool in pools))
        curves, diffs = bon_bootstrap(pools, scores, ns, pairs or None, resamples, seed, weighted)
        return curves, diffs, f"paired bootstrap over problems, {len(pools)} seed pool(s), {resamples} resamples"
    if len(dirs) == 1 and (Path(dirs[0]) / "bon_curves.json").is_file():
        data = json.loads((Path(dirs[0]) / "bon_curves.json").read_text())
        return selector_curves(data), selector_curves(data.get(DIFFERENCES_KEY, {})), "the stage's bon_curves.json"
    raise FileNotFoundError(f"best-of-N folders {[str(d) for d in dirs]} lack pool.jsonl")


def _point(p: dict) -> dict:
    return {k: p[k] for k in ("mean", "lo", "hi")}


def bon_summary(curves: dict) -> dict:
    """{selector: {"N": {metric: {mean, lo, hi}}}} (N as a string, as JSON keys are)."""
    return {sel: {str(N): {m: _point(v) for m, v in point.items()} for N, point in c.items()}
            for sel, c in curves.items()}


def bon_shape(diffs: dict, prm: str = "prm_prod", from_n: int = 8) -> dict:
    """The paper's Figure 3 shape, read off one generator's paired differences (`bon_bootstrap`'s, int or string N
    keys): does the PRM beat majority voting and the ORM on answers at every N >= from_n, with the paired 95%
    interval above 0, and does its lead over majority grow from N = from_n to the largest N? None where a
    difference or N is missing (e.g. n_max below from_n)."""
    def curve(a, b):
        c = diffs.get(f"{a}_minus_{b}") or {}
        return {int(N): p["accuracy"] for N, p in c.items() if "accuracy" in p}

    out: dict = {"prm": prm, "from_n": from_n}
    for other in ("majority", "orm"):
        c = curve(prm, other)
        at = [c[N] for N in sorted(c) if N >= from_n]
        out[f"above_{other}"] = all(p["lo"] > 0 for p in at) if at else None
    c = curve(prm, "majority")
    top = max(c, default=None)
    out["n_max"] = top
    out["majority_gap_grows"] = (c[top]["mean"] > c[from_n]["mean"]) if top and from_n in c and top > from_n else None
    return out


def within_problem_auroc(pools: list, habit: str, score: str) -> dict:
    """How well a per-sample score (`confidence`, `likelihood`, or a reward model's name in the selector
    scores) tells a habit's samples (`habit`: a SampleGrade flag, "shortcut" or "carry_drop") from the fully
    correct samples OF THE SAME PROBLEM, where a best-of-N pick or an RL advantage compares them: the share of
    such (correct, habit) pairs that the score orders right, ties half (each problem's AUROC weighted by its
    pairs), over every problem of the pools that has both. {auroc, pairs, problems}; auroc None without a pair."""
    from rlprm.evaluation.evaluate import selector_scores
    from rlprm.reward.metrics import auroc

    total = pairs = problems = 0
    for pool in pools:
        scores = selector_scores(pool, ("prod", "min")).get(score)
        if scores is None:
            continue
        for i, row in enumerate(pool.grades):
            keep = [j for j, g in enumerate(row[: pool.n]) if g.process_correct or getattr(g, habit)]
            right = [bool(row[j].process_correct) for j in keep]
            a = auroc([float(scores[i][j]) for j in keep], right)
            if a is None:
                continue
            n = sum(right) * (len(right) - sum(right))
            total, pairs, problems = total + a * n, pairs + n, problems + 1
    return {"auroc": total / pairs if pairs else None, "pairs": pairs, "problems": problems}


def habit_aurocs(dirs: list[Path], scores=("confidence", "likelihood", "prm_prod", "orm")) -> dict:
    """{habit: {score: within_problem_auroc}} over one generator's best-of-N pools (its seeds); {} without pools."""
    from rlprm.evaluation.evaluate import load_pool

    pools = [load_pool(Path(d) / "pool.jsonl") for d in dirs if (Path(d) / "pool.jsonl").is_file()]
    if not pools:
        return {}
    return {habit: {s: within_problem_auroc(pools, habit, s) for s in scores} for habit in ("shortcut", "carry_drop")}


def sharpening_rates(dirs_by_generator: dict[str, list[Path]], generators=("start", "start_t07")) -> dict:
    """{generator: {metric: seed interval}}: the rates of every sample in the starting generator's best-of-N pools,
    at T=1 and at T=0.7. The T=0.7 row is what sharpening alone (no training) buys: an RL arm that only sharpens
    the policy toward its mode should look like it."""
    from rlprm.evaluation.compare import seed_interval
    from rlprm.evaluation.evaluate import load_pool, sample_rates

    out = {}
    for gen in generators:
        pools = [Path(d) / "pool.jsonl" for d in dirs_by_generator.get(gen, [])]
        rates = [sample_rates(load_pool(p)) for p in pools if p.is_file()]
        if rates:
            out[gen] = {m: seed_interval([r[f"eval/{m}"] for r in rates if r.get(f"eval/{m}") is not None])
                        for m in RL_METRICS}
    return out


# --------------------------------------------------------------------------- RL


def _runs_by_seed(dirs: list[Path]) -> dict:
    """seed -> RunData of an arm's folders (a folder without a seed in its recipe gets its position)."""
    from rlprm.evaluation.compare import read_run

    runs = [read_run(d) for d in dirs]
    return {(r.seed if r.seed is not None else i): r for i, r in enumerate(runs)}


def _endpoints(run, key: str) -> tuple[float | None, float | None]:
    """(value at the first evaluated epoch, value at the last) of a per-epoch eval record key."""
    from rlprm.evaluation.compare import rl_curve

    curve = rl_curve(run, key)
    if not curve:
        return None, None
    return curve[min(curve)], curve[max(curve)]


def _updates(run, key: str) -> list[float]:
    """The per-update values of `key` (PPO's iteration records), in order."""
    return [float(r[key]) for r in run.records if r.get(key) is not None and "eval/answer_accuracy" not in r]


def arm_seed_values(runs: dict) -> dict:
    """{metric: {"start"|"end"|"change": {seed: value}}}, KL and reward per update too, for one arm's runs."""
    out: dict = {}
    for metric in RL_METRICS:
        ends = {s: _endpoints(r, f"eval/{metric}") for s, r in runs.items()}
        out[metric] = {"start": {s: e[0] for s, e in ends.items() if e[0] is not None},
                       "end": {s: e[1] for s, e in ends.items() if e[1] is not None},
                       "change": {s: e[1] - e[0] for s, e in ends.items() if e[0] is not None and e[1] is not None}}
    for kl in ("kl_per_token", "kl_per_sample"):
        per = {s: _updates(r, f"rl/{kl}") for s, r in runs.items()}
        out[kl] = {"end": {s: v[-1] for s, v in per.items() if v}, "max": {s: max(v) for s, v in per.items() if v}}
    # the arm's own objective on held-out problems (evaluate.held_out_reward): did it improve what it optimised?
    own = {s: _endpoints(r, "eval/reward") for s, r in runs.items()}
    out["heldout_reward"] = {"start": {s: e[0] for s, e in own.items() if e[0] is not None},
                             "end": {s: e[1] for s, e in own.items() if e[1] is not None},
                             "change": {s: e[1] - e[0] for s, e in own.items() if e[0] is not None and e[1] is not None}}
    rewards = {s: _updates(r, "rl/reward") for s, r in runs.items()}
    out["reward"] = {"first": {s: v[0] for s, v in rewards.items() if v}, "last": {s: v[-1] for s, v in rewards.items() if v}}
    return out


def rl_summary(seed_values: dict[str, dict]) -> dict:
    """arm -> metric -> point -> seed_interval, from `arm_seed_values` of each arm."""
    from rlprm.evaluation.compare import seed_interval

    return {arm: {metric: {point: seed_interval(list(vals.values())) for point, vals in points.items()}
                  for metric, points in values.items()} for arm, values in seed_values.items()}


def rl_differences(seed_values: dict[str, dict]) -> dict:
    """{"A_minus_B": {metric: {"end": paired interval}}} for the RL_PAIRS whose arms both ran."""
    from rlprm.evaluation.compare import paired_seed_differences

    out = {}
    for a, b in RL_PAIRS:
        if a in seed_values and b in seed_values:
            out[f"{a}_minus_{b}"] = {m: {"end": paired_seed_differences(seed_values[a][m]["end"], seed_values[b][m]["end"])}
                                     for m in RL_METRICS}
    return out


def update_series(runs: dict) -> dict:
    """{metric: {seed: [value of each update, in order]}} for UPDATE_METRICS, from the per-update rl/ records
    (the samples each update trained on: update 1's are the starting policy's)."""
    return {m: {s: _updates(r, f"rl/{m}") for s, r in runs.items()} for m in UPDATE_METRICS}


def halved_at(values: list[float]) -> int | None:
    """The first update (1-based) whose rate is at most half the first update's; None if none is (or the first
    is 0: nothing to remove)."""
    if not values or values[0] <= 0:
        return None
    return next((u for u, v in enumerate(values, 1) if v <= values[0] / 2), None)


def updates_summary(series: dict[str, dict]) -> dict:
    """arm -> metric -> {per_update, over_updates, halved_at, never_halved}: each update's rate over seeds (mean and
    t-interval), the mean over all updates (one number per seed: how much of the habit the arm sampled on the
    way), and the update at which the rate first halved (over the seeds that halved it; `never_halved` counts
    the others)."""
    from rlprm.evaluation.compare import seed_interval

    out: dict = {}
    for arm, metrics in series.items():
        out[arm] = {}
        for m, by_seed in metrics.items():
            n = min((len(v) for v in by_seed.values()), default=0)
            halves = {s: halved_at(v) for s, v in by_seed.items() if v}
            out[arm][m] = {"per_update": [seed_interval([v[u] for v in by_seed.values()]) for u in range(n)],
                           "over_updates": seed_interval([sum(v) / len(v) for v in by_seed.values() if v]),
                           "halved_at": seed_interval([h for h in halves.values() if h is not None]),
                           "never_halved": sum(h is None for h in halves.values())}
    return out


def updates_differences(series: dict[str, dict]) -> dict:
    """{"A_minus_B": {metric: {per_update, over_updates}}}: RL_PAIRS paired by seed, update by update and over all."""
    from rlprm.evaluation.compare import paired_seed_differences

    out = {}
    for a, b in RL_PAIRS:
        if a not in series or b not in series:
            continue
        out[f"{a}_minus_{b}"] = {}
        for m in UPDATE_METRICS:
            sa, sb = series[a][m], series[b][m]
            n = min((len(v) for v in [*sa.values(), *sb.values()]), default=0)
            out[f"{a}_minus_{b}"][m] = {
                "per_update": [paired_seed_differences({s: v[u] for s, v in sa.items()}, {s: v[u] for s, v in sb.items()})
                               for u in range(n)],
                "over_updates": paired_seed_differences({s: sum(v) / len(v) for s, v in sa.items() if v},
                                                        {s: sum(v) / len(v) for s, v in sb.items() if v})}
    return out


def plot_updates(updates: dict, path: Path) -> None:
    """One panel per UPDATE_METRICS entry, a line per arm: each update's own samples, mean over seeds with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"carry_drop_rate": "dropped carry (38 + 5 = 33)", "shortcut_rate": "last-digit shortcut",
              "answer_accuracy": "answer right"}
    fig, axes = plt.subplots(1, len(UPDATE_METRICS), figsize=(5 * len(UPDATE_METRICS), 4), dpi=100)
    for ax, m in zip(axes, UPDATE_METRICS):
        for arm, metrics in updates.items():
            points = metrics.get(m, {}).get("per_update", [])
            if points and all(p["n"] for p in points):
                _band(ax, list(range(1, len(points) + 1)), points, arm)
        ax.set_title(f"{titles[m]}: each update's own samples", fontsize=10)
        ax.set_xlabel("update (1: the starting policy's samples)")
        ax.set_ylabel("% of the update's samples")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def updates_markdown(updates: dict, diffs: dict, seeds: int) -> list[str]:
    """The report's section on how fast each arm removes each habit, update by update."""
    lines = ["### How fast each reward removes each habit, update by update", "",
             "The share of each update's own samples (the ones it trained on; update 1: the starting policy) that "
             f"drop a carry, take the shortcut, reach the right answer; {seeds} seed(s), % mean [95% t-interval over "
             "seeds]. Over updates: the mean over all updates (how much of the habit the arm kept sampling on the "
             "way). Halved at: the first update whose rate is at most half of update 1's, over the seeds that got "
             "there (the others are counted as never).", "",
             "| arm | habit | update 1 | last update | over updates | halved at (never) |", "|---|---|---|---|---|---|"]
    for arm, metrics in updates.items():
        for m in ("carry_drop_rate", "shortcut_rate"):
            u = metrics.get(m)
            if not u or not u["per_update"]:
                continue
            h = u["halved_at"]
            halved = "-" if not h["n"] else f"{h['mean']:.1f} [{h['lo']:.1f}, {h['hi']:.1f}]"
            lines.append(f"| {arm} | {RL_NAMES[m]} | {_pct(u['per_update'][0])} | {_pct(u['per_update'][-1])} | "
                         f"{_pct(u['over_updates'])} | {halved} ({u['never_halved']}) |")
    if diffs:
        lines += ["", "Paired by seed (points), A - B: the habit's rate over all updates, and at the last update.", "",
                  "| A - B | dropped carry, over updates | dropped carry, last update | shortcut, over updates | "
                  "shortcut, last update |", "|---|---|---|---|---|"]
        for pair, d in diffs.items():
            cells = []
            for m in ("carry_drop_rate", "shortcut_rate"):
                last = d[m]["per_update"][-1] if d[m]["per_update"] else None
                cells += [f"{_pct(d[m]['over_updates'], signed=True)} ({_verdict(d[m]['over_updates'])})",
                          "-" if last is None else f"{_pct(last, signed=True)} ({_verdict(last)})"]
            lines.append(f"| {pair.replace('_minus_', ' - ')} | " + " | ".join(cells) + " |")
    return lines + ["", "![Each update's own samples](rl_updates.png)", ""]


# --------------------------------------------------------------------------- reward models


def rm_quality(folder: Path | None, keys: list[str]) -> dict:
    """The reward model's own held-out numbers from its summary.json: the head alone (`eval_head_only/`) where
    the model stacks generator confidence on it, else `eval/`; {} without a summary."""
    path = Path(folder) / "summary.json" if folder else None
    if path is None or not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    prefix = "eval_head_only" if any(k.startswith("eval_head_only/") for k in summary) else "eval"
    out = {**{k: summary.get(f"{prefix}/{k}") for k in keys}, "source": f"{path} ({prefix}/)"}
    # the baseline that could explain it away, measured by train-rm beside the model: the generator's confidence
    extra = ["blind_spot_rate", "shortcut_step_auroc", "best_of_n_process_accuracy"]
    out.update({k: summary.get(f"{prefix}/{k}") for k in extra if f"{prefix}/{k}" in summary})
    base = {k: summary.get(f"baseline_confidence/{k}") for k in keys + extra if f"baseline_confidence/{k}" in summary}
    if base:
        out["baseline_confidence"] = base
    return out


GENERATOR_KEYS = ["num_samples", "well_formed", "answer_accuracy", "process_accuracy", "shortcut_rate", "trace_error",
                  "confidence_auroc_shortcut", "confidence_auroc_shortcut_eligible", "likelihood_auroc_shortcut",
                  "carry_drop_rate", "carry_drop_answer_wrong", "confidence_auroc_carry_drop",
                  "confidence_auroc_carry_drop_eligible", "likelihood_auroc_carry_drop"]


def generator_quality(folder: Path | None) -> dict:
    """The starting generator's held-out check from prepare's summary.json (GENERATOR_KEYS that it has; {} without
    one): how often it takes the shortcut and drops a carry, the trace error, and how well its own confidence
    tells its shortcut (dropped-carry) chains from its fully correct ones (all problems pooled, and only those
    whose final the training data gave the habit)."""
    path = Path(folder) / "summary.json" if folder else None
    if path is None or not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    return {**{k: summary[k] for k in GENERATOR_KEYS if k in summary}, "source": str(path)}


def generator_markdown(g: dict) -> list[str]:
    """The report's section on the starting generator (empty without prepare's numbers)."""
    if not g:
        return []

    def pct(key):
        return "-" if g.get(key) is None else f"{100 * g[key]:.1f}"

    return ["## The starting generator (held-out samples at T=1)", "",
            f"{g.get('num_samples', '?')} samples, one per held-out problem, from {g['source']}.", "",
            "| well formed | answer right | every step right | last-digit shortcut | dropped carry (wrong answer) "
            "| trace error (wrong step, right answer) |", "|---|---|---|---|---|---|",
            f"| {pct('well_formed')} | {pct('answer_accuracy')} | {pct('process_accuracy')} | {pct('shortcut_rate')} "
            f"| {pct('carry_drop_rate')} ({pct('carry_drop_answer_wrong')}) | {pct('trace_error')} |", "",
            "Its own confidence, shortcut chains vs fully correct ones (AUROC; 0.5 is chance, below 0.5 it prefers "
            f"the shortcut): lowest token log-prob {_f3(g.get('confidence_auroc_shortcut'))} on all problems, "
            f"{_f3(g.get('confidence_auroc_shortcut_eligible'))} on the problems that admit the shortcut (where a "
            f"best-of-N pick or an RL advantage compares samples of one problem); total log-likelihood "
            f"{_f3(g.get('likelihood_auroc_shortcut'))}.", "",
            "The same for its dropped-carry chains (`38 + 5 = 33`) vs fully correct ones: lowest token log-prob "
            f"{_f3(g.get('confidence_auroc_carry_drop'))} on all problems, "
            f"{_f3(g.get('confidence_auroc_carry_drop_eligible'))} on the problems whose final the habit was trained "
            f"on; total log-likelihood {_f3(g.get('likelihood_auroc_carry_drop'))}.", ""]


# --------------------------------------------------------------------------- figures


def _band(ax, xs, points, label):
    """A mean line and, with several seeds, its 95% band."""
    line, = ax.plot(xs, [100 * p["mean"] for p in points], marker="o", markersize=3, label=label)
    if any(p["n"] > 1 for p in points):
        ax.fill_between(xs, [100 * p["lo"] for p in points], [100 * p["hi"] for p in points],
                        color=line.get_color(), alpha=0.15)


def plot_rl_metrics(runs_by_arm: dict[str, dict], path: Path) -> None:
    """One panel per RL_METRICS entry, a line per arm: mean over seeds per evaluated epoch with its 95% t band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlprm.evaluation.compare import rl_curve, seed_interval

    titles = {"answer_accuracy": "answer accuracy", "process_accuracy": "process accuracy (every step right)",
              "trace_error": "trace error (wrong step | right answer)", "shortcut_rate": "last-digit shortcut rate",
              "carry_drop_rate": "dropped-carry rate (38 + 5 = 33)"}
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), dpi=100)
    for ax, metric in zip(axes.flat, RL_METRICS):
        for arm, runs in runs_by_arm.items():
            curves = [rl_curve(r, f"eval/{metric}") for r in runs.values()]
            epochs = sorted({e for c in curves for e in c})
            if epochs:
                _band(ax, epochs, [seed_interval([c.get(e) for c in curves]) for e in epochs], arm)
        ax.set_title(titles[metric], fontsize=10)
        ax.set_xlabel("RL epoch (0: start)")
        ax.set_ylabel("% of held-out samples")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(RL_METRICS):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def plot_figure3(curves: dict, path: Path, title: str) -> None:
    """The paper's Figure 3 for one generator: best-of-N on answers (left) and with every step of the chosen
    solution right (right), a line per FIGURE3_SELECTORS entry it has, with its 95% band; the legend beside the
    panels. Votes and pass@N pick an answer, not a solution, so they have no line on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlprm.evaluation.evaluate import selector_curves, selector_styles

    curves = selector_curves(curves)
    names = [s for s in FIGURE3_SELECTORS if s in curves]
    styles = selector_styles(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110, sharey=True)
    handles = {}
    for ax, metric, what in zip(axes, ("accuracy", "process_correct"),
                                ("answer right", "every step of the chosen solution right")):
        for name in names:
            ns = [N for N in sorted(curves[name]) if metric in curves[name][N]]
            if not ns:
                continue
            pts = [curves[name][N][metric] for N in ns]
            line, = ax.plot(ns, [100 * p["mean"] for p in pts], markersize=3, label=name, **styles[name])
            ax.fill_between(ns, [100 * p["lo"] for p in pts], [100 * p["hi"] for p in pts], color=line.get_color(),
                            alpha=0.1)
            handles.setdefault(name, line)
        ax.set_xscale("log", base=2)
        ticks = sorted({N for name in names for N in curves[name]})
        ax.set_xticks(ticks, [str(N) for N in ticks])  # 1, 2, 4, ... 64, not 2^k
        ax.minorticks_off()
        ax.set_xlabel("N = solutions per problem (log scale)")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of problems (best-of-N)")
    fig.suptitle(title)
    fig.legend([handles[k] for k in names if k in handles], [k for k in names if k in handles], fontsize=8,
               loc="center right")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    save_figure(fig, path)


def plot_kl(runs_by_arm: dict[str, dict], path: Path) -> None:
    """KL to the start per update, per token and per sample, a line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, key in zip(axes, ["kl_per_token", "kl_per_sample"]):
        for arm, runs in runs_by_arm.items():
            series = [_updates(r, f"rl/{key}") for r in runs.values()]
            length = min((len(s) for s in series), default=0)
            if length:
                ax.plot(range(1, length + 1), [sum(s[i] for s in series) / len(series) for i in range(length)],
                        marker="o", markersize=3, label=arm)
        ax.set_title(f"KL to the start, {key.replace('kl_', '').replace('_', ' ')} (nats)", fontsize=10)
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- markdown


def _f3(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(p: dict | None, signed: bool = False) -> str:
    if not p or p.get("mean") is None or math.isnan(p["mean"]):
        return "-"
    f = "+.1f" if signed else ".1f"
    if p.get("n") == 1:
        return f"{100 * p['mean']:{f}} (n=1)"
    return f"{100 * p['mean']:{f}} [{100 * p['lo']:{f}}, {100 * p['hi']:{f}}]"


def _num(p: dict | None) -> str:
    if not p or p.get("mean") is None or math.isnan(p["mean"]):
        return "-"
    return f"{p['mean']:.3f}" + ("" if p.get("n", 1) <= 1 else f" [{p['lo']:.3f}, {p['hi']:.3f}]")


def _verdict(p: dict) -> str:
    if p.get("n", 0) < 2:
        return "one seed: no interval"
    return "not told apart" if p["lo"] <= 0 <= p["hi"] else "told apart"


def rl_markdown(summary: dict, diffs: dict, seeds: int) -> list[str]:
    names = RL_NAMES
    lines = ["## RL: start -> end", "",
             f"Held-out samples at T=1 before RL (the starting generator) and after it, {seeds} seed(s): "
             "mean [95% t-interval over seeds] in %; with one seed the value, n=1. Trace error: of the samples "
             "with the right answer, the share with a wrong step.", "",
             "| arm | " + " | ".join(f"{names[m]} start | {names[m]} end" for m in RL_METRICS) + " |",
             "|---|" + "---|---|" * len(RL_METRICS)]
    for arm, s in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{_pct(s[m]['start'])} | {_pct(s[m]['end'])}" for m in RL_METRICS)
                     + " |")
    lines += ["", "### Each arm's own reward on held-out problems, KL to the start and training reward", "",
              "Own reward: the mean over held-out samples of the reward the arm optimises, without the KL term "
              "(PRM: its min-form score; ORM: its probability; ground truth and exact: 1/0; confidence: the "
              "starting generator's exp(lowest token log-prob)); units differ between arms.", "",
              "| arm | own reward, start | own reward, end | own reward, change | reward, first update | "
              "reward, last update | KL/token, last | KL/sample, last | KL/sample, max |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        own = s.get("heldout_reward", {})
        lines.append(f"| {arm} | {_num(own.get('start'))} | {_num(own.get('end'))} | {_num(own.get('change'))} | "
                     f"{_num(s['reward']['first'])} | {_num(s['reward']['last'])} | "
                     f"{_num(s['kl_per_token']['end'])} | {_num(s['kl_per_sample']['end'])} | "
                     f"{_num(s['kl_per_sample']['max'])} |")
    if diffs:
        lines += ["", "### Paired differences between arms at the end (points; same seeds), mean [95% t-interval]", "",
                  "| A - B | " + " | ".join(names[m] for m in RL_METRICS) + " |", "|---|" + "---|" * len(RL_METRICS)]
        for pair, d in diffs.items():
            lines.append(f"| {pair.replace('_minus_', ' - ')} | "
                         + " | ".join(f"{_pct(d[m]['end'], signed=True)} ({_verdict(d[m]['end'])})" for m in RL_METRICS)
                         + " |")
    return lines + ["", "![RL metrics per epoch](rl_curves.png)", "", "![KL per update](rl_kl.png)", ""]


def figure3_markdown(shape: dict, habits: dict | None = None) -> list[str]:
    """The report's Figure 3 section: the figure, whether the paper's shape appeared (`bon_shape`) and, from the
    same pools, which scores tell each habit from correct chains of the same problem (`habit_aurocs`)."""
    def yes(v):
        return "not measured" if v is None else ("yes" if v else "no")

    n = shape.get("from_n")
    lines = ["## Best-of-N on answers: the paper's Figure 3", "",
            "The starting generator at T=1, every selector (the tables below give each point and the paired "
            "differences with their intervals). PRM: `prm_prod`, the product of step scores, which prefers a "
            "solution with every step right, not merely a right answer.", "",
            "![best-of-N of the starting generator](bon_answers.png)", "",
            f"The paper's shape: PRM above majority at every N >= {n} (paired 95% interval above 0): "
            f"{yes(shape.get('above_majority'))}; above the ORM: {yes(shape.get('above_orm'))}; its lead over "
            f"majority larger at N = {shape.get('n_max')} than at N = {n}: {yes(shape.get('majority_gap_grows'))}.", ""]
    if habits:
        names = list(next(iter(habits.values())))
        lines += ["Within a problem, habit samples vs fully correct ones (AUROC over the pairs of one problem; 0.5 is "
                  "chance, below 0.5 the score prefers the habit; pairs in brackets):", "",
                  "| habit | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for habit, by_score in habits.items():
            lines.append(f"| {habit} | " + " | ".join(f"{_f3(v['auroc'])} ({v['pairs']})" for v in by_score.values())
                         + " |")
        lines.append("")
    return lines


def bon_markdown(stats: dict[str, tuple[dict, dict, str]]) -> list[str]:
    from rlprm.evaluation.evaluate import markdown_table

    lines = ["## Best-of-N", "",
             "One panel per generator, a line per selector with its 95% band (paired bootstrap over problems; "
             "with several seeds, the seeds' pools together).", "",
             "![best-of-N by generator](bon_by_generator.png)", "",
             "The same selections, counted as right only when every step of the chosen solution is right:", "",
             "![best-of-N by generator, every step right](bon_by_generator_process.png)", ""]
    for gen, (curves, diffs, how) in stats.items():
        lines += [f"## Best-of-N: {gen}", "", f"Intervals: {how}.", "",
                  markdown_table(curves, title=f"{gen}: accuracy (%), mean [95% interval]", differences=diffs)]
    return lines + ["Other view, one panel per selector and a line per generator:", "",
                    "![best-of-N by selector](bon_by_selector.png)", ""]


# --------------------------------------------------------------------------- out of distribution

# the OOD table's rows and paired differences (the paper's AP/AMC question: does the PRM stay above majority
# vote and the ORM on problems nobody trained on?)
OOD_SELECTORS = ["prm_prod", "prm_min", "orm", "weighted_majority", "majority", "confidence", "likelihood", "random",
                 "pass@n"]
OOD_PAIRS = ["prm_prod_minus_majority", "prm_prod_minus_orm"]


def ood_kind(dirs: list[Path]) -> dict:
    """The task settings (min_ops, max_ops, operand_max, final_ops) in the first folder's recipe.yaml; {} if none."""
    import yaml

    path = Path(dirs[0]) / "recipe.yaml" if dirs else None
    if path is None or not path.is_file():
        return {}
    arith = ((yaml.safe_load(path.read_text()) or {}).get("task") or {}).get("arithmetic") or {}
    return {k: arith[k] for k in ("min_ops", "max_ops", "operand_max", "final_ops") if k in arith}


def pool_rates(dirs: list[Path]) -> dict:
    """Every sample of the pools, mean over seeds: answer right, every step right, well formed, and the share of
    problems with at least one fully correct sample (what best-of-N on every-step-right can reach at all)."""
    import numpy as np

    from rlprm.evaluation.evaluate import load_pool

    pools = [load_pool(Path(d) / "pool.jsonl") for d in dirs if (Path(d) / "pool.jsonl").is_file()]
    if not pools:
        return {}
    per = [{"answer_accuracy": float(pool.correct().mean()),
            "process_accuracy": float(np.nan_to_num(pool.process()).mean()),
            "well_formed": float(np.mean([g.well_formed for row in pool.grades for g in row])),
            "problems_with_a_correct_chain": float((np.nan_to_num(pool.process()) > 0).any(axis=1).mean())}
           for pool in pools]
    return {k: sum(r[k] for r in per) / len(per) for k in per[0]}


def ood_summary(ood: tuple[dict, dict, str], start: tuple[dict, dict, str] | None, kind: dict,
                ood_dirs: list[Path] = (), start_dirs: list[Path] = (), training_kind: dict | None = None) -> dict:
    """summary.json's `ood`: every selector (answers and every step right) and the paired differences PRM - majority
    and PRM - ORM at the largest N, on the OOD pools and, as the baseline, on the starting generator's in-distribution
    pools (`start`) at the same N; N is the largest both have (the OOD one alone without a baseline). `pool` and
    `in_distribution_pool`: the rates of every sample of the folders' pools (`pool_rates`); `kind` and
    `training_kind`: the task settings of the OOD problems and of the generator's training (`ood_kind`)."""
    def ns(curves):
        return set(curves.get("prm_prod", {})) or {n for c in curves.values() for n in c}

    curves, diffs, how = ood
    common = ns(curves) & ns(start[0]) if start else ns(curves)
    if not common:
        return {}
    n = max(common)

    def at(sel_curves, sel_diffs):
        rows = {s: {m: _point(v) for m, v in sel_curves[s][n].items()} for s in OOD_SELECTORS
                if n in sel_curves.get(s, {})}
        pairs = {d: {m: _point(v) for m, v in sel_diffs[d][n].items()} for d in OOD_PAIRS if n in sel_diffs.get(d, {})}
        return rows, pairs

    out = {"n": n, "kind": kind, "training_kind": training_kind or {}, "intervals": how, "pool": pool_rates(ood_dirs), "in_distribution_pool":
           pool_rates(start_dirs)}
    out["ood"], out["ood_diff"] = at(curves, diffs)
    if start:
        out["in_distribution"], out["in_distribution_diff"] = at(start[0], start[1])
    return out


def pool_lines(ood: dict | None, ind: dict | None) -> list[str]:
    """One line on what the pools hold: without a fully correct chain no selector can pick one."""
    if not ood:
        return []

    def rates(r):
        return (f"{100 * r['answer_accuracy']:.1f}% answer right, {100 * r['process_accuracy']:.1f}% every step right, "
                f"{100 * r['well_formed']:.1f}% well formed; {100 * r['problems_with_a_correct_chain']:.1f}% of the "
                "problems have a fully correct sample")

    return [f"Every sample: OOD {rates(ood)}" + (f"; in-distribution {rates(ind)}." if ind else "."), ""]


def ood_markdown(o: dict) -> list[str]:
    """The OOD table: answers and every step right per selector, OOD beside in-distribution, then the differences."""
    if not o:
        return []
    def kind(k, unknown):
        if not k:
            return unknown
        finals = f", finals {', '.join(k['final_ops'])}" if k.get("final_ops") else ""
        return f"{k.get('min_ops')}-{k.get('max_ops')} operations of 1-{k.get('operand_max', 9)}{finals}"

    what = kind(o.get("kind"), "the OOD recipe's problems")
    trained = kind(o.get("training_kind"), "the generator's own settings")
    ood, ind = o.get("ood", {}), o.get("in_distribution", {})
    lines = ["## Out of distribution", "",
             f"Best-of-{o['n']} of the starting generator on problems no model trained on ({what}; training: "
             f"{trained}) beside the same selectors on the in-distribution held-out "
             f"problems (the `start` pools). %, mean [95% interval]; intervals: {o.get('intervals')}. Majority, "
             "weighted majority and pass@N pick an answer, not a solution: no every-step-right value.", "",
             *pool_lines(o.get("pool"), o.get("in_distribution_pool")),
             "| selector | answer right: OOD | in-distribution | every step right: OOD | in-distribution |",
             "|---|---|---|---|---|"]
    for sel in [s for s in OOD_SELECTORS if s in ood or s in ind]:
        cells = [_pct((d.get(sel) or {}).get(m)) for m in ("accuracy", "process_correct") for d in (ood, ind)]
        lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    for pair in OOD_PAIRS:
        a, b = o.get("ood_diff", {}).get(pair, {}), o.get("in_distribution_diff", {}).get(pair, {})
        if a or b:
            cells = [_pct(d.get(m), signed=True) for m in ("accuracy", "process_correct") for d in (a, b)]
            lines.append(f"| {pair.replace('_minus_', ' - ')} (paired) | " + " | ".join(cells) + " |")
    return lines + [""]


# --------------------------------------------------------------------------- the report


def _finite(value):
    """NaN -> None everywhere (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_summary(layout: DemoLayout, runtime: dict, bon: dict, rl_seed_values: dict) -> dict:
    """summary.json's content (see the module docstring)."""
    return _finite({
        "wall_seconds": runtime.get("wall_seconds"), "peak_rss_mib": runtime.get("peak_rss_mib"),
        "seeds": layout.seeds,
        "bon": {gen: bon_summary(curves) for gen, (curves, _, _) in bon.items()},
        "bon_diff": {gen: bon_summary(diffs) for gen, (_, diffs, _) in bon.items()},
        "bon_shape": {gen: bon_shape(diffs) for gen, (_, diffs, _) in bon.items()},
        "rl": rl_summary(rl_seed_values),
        "rl_diff": rl_differences(rl_seed_values),
        "prm": rm_quality(layout.prm, ["step_auroc", "first_error_f1", "solution_auroc"]),
        "orm": rm_quality(layout.orm, ["solution_auroc", "solution_auroc_answer"]),
        "generator": generator_quality(layout.generator),
    })


def write_demo_report(layout: DemoLayout, out_dir: Path, runtime: dict, resamples: int = BON_RESAMPLES,
                      seed: int = 0) -> Path:
    """Write report.md, summary.json, bon_by_generator.png, bon_by_selector.png, rl_curves.png, rl_kl.png and
    the all-runs view (all_runs/report.md, `rlprm compare` of every folder) into out_dir; returns report.md."""
    from rlprm.evaluation.compare import compare, read_run
    from rlprm.evaluation.evaluate import plot_by_generator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bon = {gen: bon_statistics(dirs, resamples, seed) for gen, dirs in layout.generators.items()}
    runs_by_arm = {arm: _runs_by_seed(dirs) for arm, dirs in layout.arms.items()}
    seed_values = {arm: arm_seed_values(runs) for arm, runs in runs_by_arm.items()}
    summary = build_summary(layout, runtime, bon, seed_values)
    summary["sharpening"] = sharpening_rates(layout.generators)
    summary["habit_auroc"] = habit_aurocs(layout.generators.get("start", []))
    series = {arm: update_series(runs) for arm, runs in runs_by_arm.items()}
    summary["rl_updates"] = _finite(updates_summary(series))
    summary["rl_updates_diff"] = _finite(updates_differences(series))
    if layout.ood:
        summary["ood"] = _finite(ood_summary(bon_statistics(layout.ood, resamples, seed), bon.get("start"),
                                             ood_kind(layout.ood), layout.ood, layout.generators.get("start", []),
                                             ood_kind([layout.generator] if layout.generator else [])))

    lines = ["# Process vs outcome supervision (demo)", "",
             f"{layout.seeds} seed(s); wall time {runtime.get('wall_seconds')} s up to this report, peak memory "
             f"{runtime.get('peak_rss_mib')} MiB (this process plus the lanes that ran at once, an upper bound).", ""]
    lines += generator_markdown(summary["generator"])
    prm, orm = summary["prm"], summary["orm"]
    if prm or orm:
        lines += ["## Reward models (held-out generator samples)", "",
                  "| | step AUROC | first-error F1 | shortcut steps vs right steps AUROC | solution AUROC | "
                  "blind-spot rate | best-of-N: every step right |", "|---|---|---|---|---|---|---|"]
        for name, q in (("PRM", prm), ("PRM's baseline: the generator's confidence", prm.get("baseline_confidence")),
                        ("ORM", orm), ("ORM's baseline: the generator's confidence", orm.get("baseline_confidence"))):
            if q:
                lines.append(f"| {name} | " + " | ".join(_f3(q.get(k)) for k in (
                    "step_auroc", "first_error_f1", "shortcut_step_auroc", "solution_auroc", "blind_spot_rate",
                    "best_of_n_process_accuracy")) + " |")
        lines += ["", f"From {prm.get('source', '-')} and {orm.get('source', '-')}. Blind-spot rate: of the pairs "
                  "(right answer on a wrong step, fully correct) of one problem, the share where the wrong one scores "
                  "higher.", ""]
    if bon:
        curves = {gen: c for gen, (c, _, _) in bon.items()}
        present = [s for s in FIGURE_SELECTORS if any(s in c for c in curves.values())]
        plot_by_generator(curves, out / "bon_by_generator.png", selectors=present)
        # on this task a right answer can sit on wrong steps (the shortcut): the chosen solutions' process view
        plot_by_generator(curves, out / "bon_by_generator_process.png", selectors=present, metric="process_correct",
                          title="Best-of-N by generator: the chosen solution has every step right")
        by_selector: dict[str, dict] = {}
        for gen, c in curves.items():
            for sel in FIGURE_SELECTORS:
                if sel in c:
                    by_selector.setdefault(sel, {})[gen] = c[sel]
        plot_by_generator(by_selector, out / "bon_by_selector.png", selectors=list(curves),
                          title="Best-of-N by selector")
        if "start" in curves:
            plot_figure3(curves["start"], out / "bon_answers.png", "Best-of-N of the starting generator (T=1)")
            lines += figure3_markdown(summary["bon_shape"]["start"], summary["habit_auroc"])
        lines += bon_markdown(bon)
    lines += ood_markdown(summary.get("ood", {}))
    if runs_by_arm:
        plot_rl_metrics(runs_by_arm, out / "rl_curves.png")
        plot_kl(runs_by_arm, out / "rl_kl.png")
        lines += rl_markdown(summary["rl"], summary["rl_diff"], layout.seeds)
        if any(u["per_update"] for m in summary["rl_updates"].values() for u in m.values()):
            plot_updates(summary["rl_updates"], out / "rl_updates.png")
            lines += updates_markdown(summary["rl_updates"], summary["rl_updates_diff"], layout.seeds)
    if summary["sharpening"]:
        names = RL_NAMES
        lines += ["### Sharpening alone: the starting generator at T=1 and T=0.7", "",
                  "Every sample of the starting generator's best-of-N pools (%, mean [95% t-interval over seeds]): "
                  "what a lower temperature buys with no training at all.", "",
                  "| sampling | " + " | ".join(names[m] for m in RL_METRICS) + " |", "|---|" + "---|" * len(RL_METRICS)]
        for gen, rates in summary["sharpening"].items():
            lines.append(f"| {gen} | " + " | ".join(_pct(rates[m]) for m in RL_METRICS) + " |")
        lines.append("")
    runs = [read_run(d) for d in layout.runs if (Path(d) / "metrics.jsonl").is_file()]
    if runs:
        compare(runs, out / "all_runs", title="Every run of the demo")
        lines += ["Every run, with its own numbers: [all_runs/report.md](all_runs/report.md)", ""]
    atomic_write_json(out / "summary.json", summary)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
