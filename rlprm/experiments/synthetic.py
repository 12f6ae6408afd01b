"""Synthetic supervision: a large PRM labels data for small reward models ("Let's Verify Step by Step", section 5).

The paper's small-scale section separates the effect of the SUPERVISION from the effect of the DATA: a large
PRM (there PRM_large, here the best PRM the embedded budget trains) labels fresh generator samples, and small
reward models train on exactly those samples with different labels:

    process_large_prm   a PRM on the large PRM's step labels (up to the first step it judges wrong)
    outcome_large_prm   an ORM: a solution is right iff the large PRM judges every step right
    outcome_grader      an ORM on the final-answer grader's verdict (what outcome supervision sees in practice)
    process_checker     (optional) a PRM on the exact checker's step labels: the ceiling

Label budgets (synthetic.budgets, the paper's Figure 4a): every small model is trained at each budget on a random
subset of that many labelled samples (drawn per seed, nested: a budget's subset holds every smaller one's), always for
synthetic.train_steps steps, so the curves measure labels, not compute. At each budget best-of-n on the held-out pool
is compared in ONE paired bootstrap over problems and seeds (`rlprm.evaluation.evaluate.bon_bootstrap`,
resample_seeds), with intervals for the differences between labellings; at the largest budget the whole curve over
N. Every labelling is scored against the exact checker: how often its label is wrong.

The large PRM labels through the files a person would use (unrated PRM800K lines -> `rlprm.reward.label` with the
loaded PRM -> the PRM800K loader): the same machinery as `rlprm label --with PRM_DIR` and the active-learning
loop's `active.labeller`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from rlprm.config import Recipe
from rlprm.errors import InputError
from rlprm.experiments.lanes import Lanes, PhaseClock
from rlprm.files import atomic_write_text, save_figure

PROCESS_LARGE, OUTCOME_LARGE, OUTCOME_GRADER, PROCESS_CHECKER = ("process_large_prm", "outcome_large_prm",
                                                                 "outcome_grader", "process_checker")
KIND = {PROCESS_LARGE: "prm", OUTCOME_LARGE: "orm", OUTCOME_GRADER: "orm", PROCESS_CHECKER: "prm"}
PAIRS = [(PROCESS_LARGE, OUTCOME_LARGE), (PROCESS_LARGE, OUTCOME_GRADER), (OUTCOME_LARGE, OUTCOME_GRADER),
         (PROCESS_CHECKER, PROCESS_LARGE)]


class SyntheticSupervisionError(InputError, RuntimeError):
    """The job cannot start or go on (the message says why and what to change)."""


# --------------------------------------------------------------------------- labels (pure)


def judged_all_correct(labelled, num_steps: int) -> bool:
    """A phase-2 labelled record (the labeller stops at its first judged error) says every one of the solution's
    `num_steps` steps is right."""
    from rlprm.data.stepwise import CORRECT

    return len(labelled.labels) == num_steps and all(y == CORRECT for y in labelled.labels)


def outcome_records(samples, verdicts) -> list:
    """Copies of `samples` (whole solutions) with no step labels and answer_correct = verdict: ORM training data."""
    from rlprm.data.stepwise import LabelledSolution

    return [LabelledSolution(problem=r.problem, steps=list(r.steps), labels=[None] * len(r.steps),
                             answer_correct=bool(v), group=r.group, source=f"{r.source}/outcome")
            for r, v in zip(samples, verdicts)]


def label_errors(samples, prm_labelled) -> dict:
    """How often each labelling is wrong against the exact checker, on the same samples (pure).

    samples: checker-labelled records; prm_labelled: the same solutions as the large PRM labelled them (phase 2:
    up to its first judged error). Per labelling: `vs_process` (share of solutions whose label disagrees with the
    checker's every-step-right verdict; for process labels, a different first error), `vs_answer` (disagreement
    with the final-answer verdict; process labels: n/a), and for process labels `step_error` (share of the steps
    both label where the labels differ).
    """
    from rlprm.data.stepwise import CORRECT

    n = len(samples)
    proc = [bool(r.process_correct) for r in samples]
    ans = [bool(r.answer_correct) for r in samples]
    judged = [judged_all_correct(lab, len(r.steps)) for r, lab in zip(samples, prm_labelled)]
    prm_first = [None if j else len(lab.labels) - 1 for j, lab in zip(judged, prm_labelled)]
    both = [(a == CORRECT, b == CORRECT) for r, lab in zip(samples, prm_labelled)
            for a, b in zip(r.labels, lab.labels) if a is not None and b is not None]

    def rate(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        PROCESS_LARGE: {"vs_process": rate([f != (None if r.process_correct else r.first_error)
                                            for f, r in zip(prm_first, samples)]),
                        "vs_answer": None, "step_error": rate([a != b for a, b in both]), "solutions": n,
                        "steps": len(both)},
        OUTCOME_LARGE: {"vs_process": rate([j != p for j, p in zip(judged, proc)]),
                        "vs_answer": rate([j != a for j, a in zip(judged, ans)]), "step_error": None, "solutions": n},
        OUTCOME_GRADER: {"vs_process": rate([a != p for a, p in zip(ans, proc)]), "vs_answer": 0.0,
                         "step_error": None, "solutions": n},
        PROCESS_CHECKER: {"vs_process": 0.0, "vs_answer": None, "step_error": 0.0, "solutions": n},
    }


def training_sets(samples, prm_labelled, labellings) -> dict:
    """{labelling: records} on the same solutions: the large PRM's step labels, its all-steps-right verdict,
    the grader's answer verdict, or the checker's own step labels."""
    out = {}
    for name in labellings:
        if name == PROCESS_LARGE:
            out[name] = list(prm_labelled)
        elif name == OUTCOME_LARGE:
            out[name] = outcome_records(samples, [judged_all_correct(lab, len(r.steps))
                                                  for r, lab in zip(samples, prm_labelled)])
        elif name == OUTCOME_GRADER:
            out[name] = outcome_records(samples, [bool(r.answer_correct) for r in samples])
        else:
            out[name] = list(samples)
    return out


def budget_subsets(num_samples: int, budgets: list[int], seed) -> list[list[int]]:
    """For each budget B, the indices (in pool order) of the B samples labelled at that budget: the first B of one
    seeded random order of the samples, so every budget's subset holds the smaller budgets' (nested). `seed`:
    anything np.random.default_rng takes (one order per seed)."""
    if any(b < 1 or b > num_samples for b in budgets):
        raise SyntheticSupervisionError(f"synthetic.budgets {list(budgets)}: every budget must be in 1..{num_samples} "
                                        "(the usable fresh samples)")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [sorted(int(i) for i in order[:b]) for b in budgets]


def usable_budgets(budgets: list[int], num_samples: int) -> list[int]:
    """synthetic.budgets as run on `num_samples` usable fresh samples: [] is one budget (all of them); a budget
    above them is lowered to them (samples the generator left unusable); refused if two budgets then meet."""
    if not budgets:
        return [num_samples]
    run = [min(b, num_samples) for b in budgets]
    if len(set(run)) < len(run):
        raise SyntheticSupervisionError(
            f"synthetic.budgets {list(budgets)}: only {num_samples} fresh samples are usable, so the budgets above "
            f"it meet; lower the largest budgets to at most {num_samples} or raise synthetic.problems")
    return run


# --------------------------------------------------------------------------- pool


def held_out_pool(eval_records, n: int, sep: str):
    """The held-out checker-labelled records as a best-of-N Pool (problems with at least n samples, first n each),
    and the records in pool order."""
    from rlprm.evaluation.evaluate import Pool
    from rlprm.reward.label import parse_problem_text
    from rlprm.data.problems import TaskProblem, grade_samples
    from rlprm.steps import render_steps

    groups: dict = {}
    for r in eval_records:
        groups.setdefault(r.group or r.problem, []).append(r)
    kept = [g[:n] for g in groups.values() if len(g) >= n]
    if not kept:
        raise SyntheticSupervisionError(f"no held-out problem has {n} samples: lower synthetic.eval_n or raise "
                                        "rm.data.eval_samples_per_problem")
    problems = []
    for i, g in enumerate(kept):
        arith = parse_problem_text(g[0].problem)
        problems.append(TaskProblem(f"test-{i}", arith.prompt, str(arith.answer), arith, arith.text))
    texts = [[render_steps(list(r.steps), sep) for r in g] for g in kept]
    return Pool(problems, texts, grade_samples(problems, texts, sep)), [r for g in kept for r in g]


def score_matrix(rm, records, shape: tuple[int, int], how: str, batch_size: int) -> np.ndarray:
    """(P, n) solution scores of a reward model on the pool's records (in pool order)."""
    from rlprm.reward.model import aggregate

    probs = rm.score_steps([r.problem for r in records], [r.steps for r in records], batch_size=batch_size)
    return np.array([aggregate(p, how if rm.kind == "prm" else "last") for p in probs], dtype=float).reshape(shape)


# --------------------------------------------------------------------------- the job


def large_prm(recipe: Recipe, backbone, train_problems, large_texts: set, pool, progress: bool):
    """(PRM, where it came from): synthetic.large_prm loaded, or trained here on the large PRM's problems (saved to
    RUN_DIR/large_prm and loaded back)."""
    from rlprm.reward.fit import fit_lm_reward_model
    from rlprm.train_rm import synthetic_records

    cfg = recipe.synthetic
    if cfg.large_prm:
        return load_labeller(recipe, cfg.large_prm, cfg.large_prm_adapter), str(cfg.large_prm)
    records = [r for r in pool if r.group in large_texts]
    if recipe.rm.data.synthetic_per_problem:
        records += synthetic_records(train_problems[:cfg.large_problems], recipe.rm.data.synthetic_per_problem,
                                     recipe.task.step_separator, seed=recipe.run.seed * 7 + 3)
    if not records:
        raise SyntheticSupervisionError("synthetic.large_prm is unset and synthetic.large_problems gives it no "
                                        "training samples: set one of them")
    print(f"training the large PRM: {len(records)} checker-labelled solutions, {recipe.rm.max_steps} steps", flush=True)
    rm = fit_lm_reward_model(recipe, backbone, records, "prm", recipe.rm.max_steps, recipe.run.seed, progress)
    # saved, then loaded back like any PRM folder: the labeller is what `rlprm label --with RUN_DIR/large_prm` uses
    folder = rm.save(Path(recipe.run.output_dir) / "large_prm")
    del rm
    return (load_labeller(recipe, str(folder), "rlprm"),
            f"trained here ({len(records)} solutions, {recipe.rm.max_steps} steps), saved to {folder}")


def load_labeller(recipe: Recipe, path: str, adapter):
    """A PRM folder or hub id loaded through the one loader of named reward models; refused if it is an ORM."""
    from rlprm.models import resolve_device
    from rlprm.reward.adapters import load_for_recipe
    from rlprm.reward.model import RewardModelError

    try:
        rm = load_for_recipe(recipe, path, adapter, device=resolve_device(recipe.run.device))
    except (RewardModelError, OSError) as exc:
        raise SyntheticSupervisionError(f"synthetic.large_prm: {path} does not load as a PRM: {exc}") from None
    if rm.kind != "prm":
        raise SyntheticSupervisionError(f"synthetic.large_prm: {path} is an ORM; labelling steps needs a PRM")
    return rm


def run_synthetic(recipe: Recipe, progress: bool = True) -> dict:
    """`rlprm synthetic-supervision`: label, train the small reward models, best-of-N, report. Returns the summary."""
    import torch

    from rlprm.experiments.active import label_records, load_pools, unrated_lines
    from rlprm.data.problems import reward_model_arithmetic
    from rlprm.reward.fit import shared_backbone
    from rlprm.tracking import Tracker

    cfg, rm_cfg, sep = recipe.synthetic, recipe.rm, recipe.task.step_separator
    if rm_cfg.scorer != "lm":
        raise SyntheticSupervisionError("synthetic supervision trains its reward models as the default one: set "
                                        "rm.scorer: lm (and rm.max_steps, the large PRM's budget)")
    if cfg.large_problems + cfg.problems > rm_cfg.data.train_problems:
        raise SyntheticSupervisionError(
            f"synthetic.large_problems ({cfg.large_problems}) + synthetic.problems ({cfg.problems}) exceed "
            f"rm.data.train_problems ({rm_cfg.data.train_problems}): raise it or lower them")
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    clock = PhaseClock()
    run_dir = Path(recipe.run.output_dir)
    tracker = Tracker(run_dir, recipe, job="synthetic-supervision", tags=["synthetic-supervision"])
    try:
        # 1. the samples: the pool (checker-labelled; the checker's labels are only the reference) and held-out pool
        clock.phase("samples: the pool and the held-out pool (read from the cache, or sampled once)")
        pool, eval_records, info = load_pools(recipe, progress)
        train_problems, _ = reward_model_arithmetic(recipe)
        large_texts = {p.text for p in train_problems[:cfg.large_problems]}
        fresh_texts = {p.text for p in train_problems[cfg.large_problems:cfg.large_problems + cfg.problems]}
        samples = [r for r in pool if r.group in fresh_texts]
        backbone = shared_backbone(recipe)
        n = cfg.eval_n or rm_cfg.data.eval_samples_per_problem
        bon_pool, ordered = held_out_pool(eval_records, n, sep)
        shape = (len(bon_pool.problems), n)
        budgets = usable_budgets(cfg.budgets, len(samples))
        subsets = [budget_subsets(len(samples), budgets, [recipe.run.seed, seed]) for seed in cfg.seeds]
        results: dict = {}
        cpu: list[dict] = []
        with Lanes(cfg.lanes, recipe.run.threads) as lanes:
            def submit(k, names, data):
                return budget_jobs(recipe, lanes, data, names, budgets[k], [s[k] for s in subsets], ordered, shape,
                                   progress and cfg.lanes <= 1)

            # lanes: every job is queued as soon as its labels exist, so no lane waits; the grader's labels need no
            # large PRM, so its small models run beside the large PRM's training (a given one loads at once, and a
            # bad one fails before anything starts). One lane: a budget at a time.
            early = ([OUTCOME_GRADER] if cfg.lanes > 1 and not cfg.large_prm and OUTCOME_GRADER in cfg.labellings
                     else [])
            pending = {k: submit(k, early, training_sets(samples, [], early)) for k in range(len(budgets))
                       if early}
            # 2. the large PRM labels the fresh samples through the label files (rlprm.reward.label, `label --with`)
            clock.phase("the large PRM" + ("" if cfg.large_prm else f" (trained here, {rm_cfg.max_steps} steps)")
                        + (f"; beside it, in the lanes: the {len(early) * len(budgets) * len(cfg.seeds)} small "
                           f"models on the grader's labels" if early else ""))
            big, big_source = large_prm(recipe, backbone, train_problems, large_texts, pool, progress)
            clock.phase(f"labelling: the large PRM labels {len(samples)} fresh samples")
            groups = [[r] for r in samples]
            picks = [(i, 0, "synthetic", None) for i in range(len(samples))]
            prm_labelled = label_records(unrated_lines(groups, picks, 0), big, sep, rm_cfg.threshold,
                                         run_dir / "labels" / "large_prm_labels.jsonl")
            errors = label_errors(samples, prm_labelled)
            data = training_sets(samples, prm_labelled, cfg.labellings)
            # 3. the held-out best-of-N pool, scored by the large PRM and the generator's confidence once
            clock.phase(f"held-out: the large PRM and the generator's confidence score {len(ordered)} samples")
            fixed = {"large_prm": score_matrix(big, ordered, shape, cfg.aggregate, rm_cfg.eval_batch_size),
                     "confidence": score_matrix(backbone.confidence_model(), ordered, shape, "min",
                                                rm_cfg.eval_batch_size)}
            del big
            # 4. small reward models: per budget, seed and labelling, the same samples and steps, only the labels
            # differ (smallest budget first; each budget's results are written as soon as its models are scored)
            clock.phase(f"small reward models: {len(budgets) * len(cfg.seeds) * len(cfg.labellings)} trainings of "
                        f"{cfg.train_steps} steps, each scoring the {len(ordered)} held-out samples, in {cfg.lanes} "
                        f"lane(s) of {recipe.run.threads or 'all'} thread(s)")
            rest = [name for name in cfg.labellings if name not in early]
            for k in range(len(budgets) if cfg.lanes > 1 else 0):
                pending[k] = pending.get(k, {}) | submit(k, rest, data)
            for k, b in enumerate(budgets):
                scores = collect_budget(cfg, pending.pop(k, None) or submit(k, cfg.labellings, data), fixed, cpu)
                # 5. per budget, one paired bootstrap over problems and seeds for every selector and the differences
                results.update(bootstrap_budgets(cfg, bon_pool, {b: scores}, budgets, n))
                write_budgets_so_far(run_dir, results, list(cfg.labellings), n)
        clock.phase("report")
        summary = write_report(run_dir, cfg, results, errors, big_source, len(samples), info)
        for b in budgets:
            means = {f"synthetic/{name}/{m}": p["mean"] for name, c in summary["synthetic_budget"][str(b)].items()
                     for m, p in c.items() if m in ("accuracy", "process_correct") and p["mean"] is not None}
            tracker.log(means, step=b)  # W&B's step: the label budget
        summary.update(clock.finish("synthetic-supervision"), lanes=cfg.lanes, threads=recipe.run.threads,
                       small_model_cpu_seconds={k: round(sum(c[k] for c in cpu), 1) for k in ("train", "score")})
        tracker.summary(summary)
        tracker.image("synthetic/plot", run_dir / "synthetic_supervision.png")
        return summary
    finally:
        tracker.finish()


def small_model_scores(recipe: Recipe, records, kind: str, seed: int, ordered, shape, label: str,
                       progress: bool = False) -> tuple[np.ndarray, dict]:
    """((P, n) held-out scores, CPU seconds {train, score}) of one small reward model trained
    synthetic.train_steps steps on `records`: one lane job (module level, so a child process can run it)."""
    from rlprm.reward.fit import fit_lm_reward_model, shared_backbone

    cfg = recipe.synthetic
    t, c0 = time.monotonic(), time.process_time()
    rm = fit_lm_reward_model(recipe, shared_backbone(recipe), records, kind, cfg.train_steps, seed, progress)
    c1 = time.process_time()
    scores = score_matrix(rm, ordered, shape, cfg.aggregate, recipe.rm.eval_batch_size)
    cpu = {"train": c1 - c0, "score": time.process_time() - c1}
    print(f"  {label} ({kind}) {time.monotonic() - t:.0f} s (CPU: train {cpu['train']:.0f} s, score "
          f"{cpu['score']:.0f} s)", flush=True)
    return scores, cpu


def budget_jobs(recipe: Recipe, lanes, data: dict, names: list[str], budget: int, subsets: list[list[int]], ordered,
                shape, progress: bool) -> dict:
    """{(seed index, labelling): Future of `small_model_scores`} at one label budget for the labellings `names`: one
    small reward model per labelling and seed, trained on that seed's subset (`budget_subsets`: indices into every
    labelling's records, the same solutions)."""
    cfg = recipe.synthetic
    if len({len(data[name]) for name in names}) > 1:
        raise SyntheticSupervisionError("the labellings hold different numbers of solutions; every labelling must "
                                        "label the same samples")
    return {(s, name): lanes.submit(small_model_scores, recipe, [data[name][i] for i in idx], KIND[name], seed,
                                    ordered, shape, f"budget {budget} seed {seed} {name:18s}", progress)
            for s, (seed, idx) in enumerate(zip(cfg.seeds, subsets)) for name in names}


def collect_budget(cfg, jobs: dict, fixed: dict, cpu: list[dict]) -> list[dict]:
    """[per seed: {selector: (P, n) held-out scores}] at one budget once its jobs (`budget_jobs`) are done, with the
    fixed selectors (`fixed`: the large PRM, the generator's confidence) beside them; each job's CPU seconds
    appended to `cpu`."""
    out = []
    for s in range(len(cfg.seeds)):
        scores = dict(fixed)
        for name in cfg.labellings:
            scores[name], used = jobs[(s, name)].result()
            cpu.append(used)
        out.append(scores)
    return out


def bootstrap_budgets(cfg, bon_pool, scores: dict, budgets: list[int], n: int) -> dict:
    """{budget: (curves, differences)} for the budgets in `scores` ({budget: [per seed: scores]}) of
    `bon_bootstrap` over problems AND seeds (the seeds' models differ in their batch order and their budget
    subset): N = 1, 2, 4, ..., n at the largest of `budgets`, N = n at the others. The same bootstrap seed at
    every budget: the same problem resamples."""
    from rlprm.evaluation.evaluate import bon_bootstrap, powers_of_two

    pairs = [(a, b) for a, b in PAIRS if a in cfg.labellings and b in cfg.labellings]
    weighted = PROCESS_LARGE if PROCESS_LARGE in cfg.labellings else None
    return {b: bon_bootstrap([bon_pool] * len(scores[b]), scores[b], powers_of_two(n) if b == budgets[-1] else [n],
                             pairs or None, cfg.resamples, 0, weighted, resample_seeds=True)
            for b in scores}


# --------------------------------------------------------------------------- report


def _point(p: dict) -> dict:
    return {k: (None if p[k] is None or math.isnan(p[k]) else p[k]) for k in ("mean", "lo", "hi")}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def write_report(run_dir: Path, cfg, results: dict, errors: dict, big_source: str, num_samples: int,
                 info: dict) -> dict:
    """report.md, synthetic_supervision.png (best-of-N over N at the largest budget), synthetic_budgets.png (at
    N = n over the budgets); returns the summary (summary.json)."""
    from rlprm.evaluation.evaluate import markdown_table

    names = list(cfg.labellings)
    budgets = sorted(results)
    curves, diffs = results[budgets[-1]]
    ns = sorted(curves[names[0]])
    n = ns[-1]
    at_n, diff_n = budget_points(results, names, n)
    lines = ["# Synthetic supervision: a large PRM labels for small reward models", "",
             f"Large PRM: {big_source}. It labelled {num_samples} fresh generator samples (the PRM800K phase-2 way: "
             f"up to its first judged error). Small reward models ({cfg.train_steps} optimizer steps each at every "
             f"budget, seeds {', '.join(map(str, cfg.seeds))}) trained on those samples, one per labelling: at each "
             f"label budget ({', '.join(map(str, budgets))} labelled solutions) on a random subset drawn per seed, "
             "nested across budgets. Best-of-N on the held-out pool: a paired bootstrap over problems and seeds "
             f"({cfg.resamples} resamples); PRMs pick by the `{cfg.aggregate}` of their step probabilities. "
             "`large_prm` is the labeller itself, `confidence` the generator's lowest token log-probability.", "",
             "## How often each labelling is wrong (the exact checker as the reference)", "",
             "| labelling | model | label wrong vs every-step-right (%) | vs final answer right (%) | step labels wrong (%) |",
             "|---|---|---|---|---|"]
    for name in names:
        e = errors[name]
        lines.append(f"| {name} | {KIND[name].upper()} | {_pct(e['vs_process'])} | {_pct(e['vs_answer'])} | "
                     f"{_pct(e['step_error'])} |")
    lines += ["", budget_table(at_n, diff_n, names, n), "",
              f"## Best-of-N at the largest budget ({budgets[-1]} labelled solutions)", "",
              markdown_table(curves, differences=diffs)]
    text = "\n".join(lines)
    atomic_write_text(run_dir / "report.md", text)
    plot(curves, names + ["large_prm", "confidence", "majority", "random", "pass@n"],
         run_dir / "synthetic_supervision.png")
    plot_budgets(at_n, {name: curves[name][n] for name in ("large_prm", "random") if name in curves}, names, n,
                 run_dir / "synthetic_budgets.png")
    print(text)
    point = lambda c: {str(N): {m: _point(v) for m, v in c[N].items()} for N in ns}  # noqa: E731
    return {"synthetic": {name: point(curves[name]) for name in names},
            "bon": {name: point(c) for name, c in curves.items()},
            "synthetic_diff": {name: point(c) for name, c in diffs.items()},
            "synthetic_budget": {str(b): at_n[b] for b in budgets},
            "synthetic_budget_diff": {str(b): diff_n[b] for b in budgets},
            "budgets": budgets, "budget_n": n, "train_steps": cfg.train_steps,
            "label_errors": {name: errors[name] for name in names},
            "large_prm": big_source, "samples": num_samples, "ns": ns, "seeds": list(cfg.seeds),
            "report": str(run_dir / "report.md"), "plot": str(run_dir / "synthetic_supervision.png"),
            "budget_plot": str(run_dir / "synthetic_budgets.png"), **info}


def budget_points(results: dict, names: list[str], n: int) -> tuple[dict, dict]:
    """({budget: {labelling: {metric: point}}}, {budget: {A_minus_B: {metric: point}}}) at N = n."""
    at_n = {b: {name: {m: _point(v) for m, v in results[b][0][name][n].items()} for name in names} for b in results}
    diff_n = {b: {pair: {m: _point(v) for m, v in c[n].items()} for pair, c in results[b][1].items()} for b in results}
    return at_n, diff_n


def write_budgets_so_far(run_dir: Path, results: dict, names: list[str], n: int) -> None:
    """RUN_DIR/budgets_so_far.json and the budget table on stdout, after each budget: a long run's finished
    budgets are kept even if it is stopped before the report."""
    at_n, diff_n = budget_points(results, names, n)
    atomic_write_text(run_dir / "budgets_so_far.json", json.dumps(
        {"budgets": sorted(results), "budget_n": n, "synthetic_budget": {str(b): v for b, v in at_n.items()},
         "synthetic_budget_diff": {str(b): v for b, v in diff_n.items()}}, indent=1))
    print(budget_table(at_n, diff_n, names, n), flush=True)


def budget_table(at_n: dict, diff_n: dict, names: list[str], n: int) -> str:
    """The markdown tables across budgets: per metric, each labelling and the process - outcome differences."""
    pairs = [f"{a}_minus_{b}" for a, b in PAIRS[:2] if a in names and b in names]
    out = [f"## Across label budgets: best-of-{n}, %, mean [95% interval over problems and seeds]"]
    for metric, what in (("process_correct", "every step right"), ("accuracy", "answer right")):
        out += ["", f"### {what}", "",
                "| labelled solutions | " + " | ".join(names + [p.replace("_minus_", " - ") for p in pairs]) + " |",
                "|---|" + "---|" * (len(names) + len(pairs))]
        for b in sorted(at_n):
            cells = [_fmt(at_n[b][name].get(metric)) for name in names]
            cells += [_fmt(diff_n[b].get(p, {}).get(metric), signed=True) for p in pairs]
            out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _fmt(p: dict | None, signed: bool = False) -> str:
    if not p or p["mean"] is None:
        return "-"
    f = "+.1f" if signed else ".1f"
    return f"{100 * p['mean']:{f}} [{100 * p['lo']:{f}}, {100 * p['hi']:{f}}]"


def plot_budgets(at_n: dict, flat: dict, names: list[str], n: int, path: Path) -> None:
    """Two panels (answer right, every step right) of best-of-n over the label budgets (log2 axis), one line and
    95% band per labelling; `flat` selectors that no budget changes (the large PRM, random) as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(at_n)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    for ax, (metric, title) in zip(axes, (("accuracy", "answer right"), ("process_correct", "every step right"))):
        for name in names:
            pts = [at_n[b][name].get(metric) for b in budgets]
            xs = [b for b, p in zip(budgets, pts) if p and p["mean"] is not None]
            ps = [p for p in pts if p and p["mean"] is not None]
            if not ps:
                continue
            line, = ax.plot(xs, [100 * p["mean"] for p in ps], "-", marker="o", markersize=3, label=name)
            ax.fill_between(xs, [100 * p["lo"] for p in ps], [100 * p["hi"] for p in ps], color=line.get_color(),
                            alpha=0.15)
        for name, point in flat.items():
            if metric in point and not math.isnan(point[metric]["mean"]):
                ax.axhline(100 * point[metric]["mean"], linestyle=":", color="grey" if name == "random" else "black",
                           linewidth=1, label=f"{name} (any budget)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled solutions")
        ax.set_title(f"best-of-{n}: {title} (%)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot(curves: dict, selectors: list[str], path: Path) -> None:
    """Two panels (answer right, every step right) of best-of-N curves with their 95% bands, log2 N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for ax, (metric, title) in zip(axes, (("accuracy", "answer right"), ("process_correct", "every step right"))):
        for name in selectors:
            c = curves.get(name, {})
            ns = [N for N in sorted(c) if metric in c[N] and not math.isnan(c[N][metric]["mean"])]
            if not ns:
                continue
            line, = ax.plot(ns, [100 * c[N][metric]["mean"] for N in ns], "--" if name in ("random", "pass@n") else "-",
                            marker="o", markersize=3, label=name)
            ax.fill_between(ns, [100 * c[N][metric]["lo"] for N in ns], [100 * c[N][metric]["hi"] for N in ns],
                            color=line.get_color(), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N = solutions per problem")
        ax.set_title(f"best-of-N: {title} (%)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
