"""Synthetic supervision: a large PRM labels data for small reward models ("Let's Verify Step by Step", section 5).

The paper's small-scale section separates the effect of the SUPERVISION from the effect of the DATA: a large
PRM (there PRM_large, here the best PRM the embedded budget trains) labels fresh generator samples, and small
reward models train on exactly those samples with different labels:

    process_large_prm   a PRM on the large PRM's step labels (up to the first step it judges wrong)
    outcome_large_prm   an ORM: a solution is right iff the large PRM judges every step right
    outcome_grader      an ORM on the final-answer grader's verdict (what outcome supervision sees in practice)
    process_checker     (optional) a PRM on the exact checker's step labels: the ceiling

Their best-of-N curves on the held-out pool are compared in ONE paired bootstrap over problems
(`rlprm.evaluation.evaluate.bon_bootstrap`, the small models' seeds pooled), with intervals for the differences, and every
labelling is scored against the exact checker: how often its label is wrong.

The large PRM labels through the files a person would use (unrated PRM800K lines -> `rlprm.reward.label` with the
loaded PRM -> the PRM800K loader): the same machinery as `rlprm label --with PRM_DIR` and the active-learning
loop's `active.labeller`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from rlprm.config import Recipe
from rlprm.errors import InputError
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
    from rlprm.evaluation.evaluate import bon_bootstrap, powers_of_two
    from rlprm.data.problems import reward_model_arithmetic
    from rlprm.reward.fit import BackboneCache, fit_lm_reward_model
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
    t0 = time.monotonic()
    run_dir = Path(recipe.run.output_dir)
    tracker = Tracker(run_dir, recipe, job="synthetic-supervision", tags=["synthetic-supervision"])
    try:
        # 1. the samples: the pool (checker-labelled; the checker's labels are only the reference) and held-out pool
        pool, eval_records, info = load_pools(recipe, progress)
        train_problems, _ = reward_model_arithmetic(recipe)
        large_texts = {p.text for p in train_problems[:cfg.large_problems]}
        fresh_texts = {p.text for p in train_problems[cfg.large_problems:cfg.large_problems + cfg.problems]}
        samples = [r for r in pool if r.group in fresh_texts]
        backbone = BackboneCache(recipe)
        # 2. the large PRM labels the fresh samples through the label files (rlprm.reward.label, as `label --with`)
        big, big_source = large_prm(recipe, backbone, train_problems, large_texts, pool, progress)
        groups = [[r] for r in samples]
        picks = [(i, 0, "synthetic", None) for i in range(len(samples))]
        prm_labelled = label_records(unrated_lines(groups, picks, 0), big, sep, rm_cfg.threshold,
                                     run_dir / "labels" / "large_prm_labels.jsonl")
        errors = label_errors(samples, prm_labelled)
        data = training_sets(samples, prm_labelled, cfg.labellings)
        # 3. the held-out best-of-N pool, scored by the large PRM and the generator's confidence once
        n = cfg.eval_n or rm_cfg.data.eval_samples_per_problem
        bon_pool, ordered = held_out_pool(eval_records, n, sep)
        shape = (len(bon_pool.problems), n)
        fixed = {"large_prm": score_matrix(big, ordered, shape, cfg.aggregate, rm_cfg.eval_batch_size),
                 "confidence": score_matrix(backbone.confidence_model(), ordered, shape, "min", rm_cfg.eval_batch_size)}
        del big
        # 4. small reward models: one per labelling and seed, the same samples and steps, only the labels differ
        per_seed = []
        for seed in cfg.seeds:
            scores = dict(fixed)
            for name in cfg.labellings:
                t = time.monotonic()
                rm = fit_lm_reward_model(recipe, backbone, data[name], KIND[name], cfg.train_steps, seed, progress)
                scores[name] = score_matrix(rm, ordered, shape, cfg.aggregate, rm_cfg.eval_batch_size)
                print(f"  seed {seed} {name:18s} ({KIND[name]}, {len(data[name])} solutions) "
                      f"{time.monotonic() - t:.0f} s", flush=True)
            per_seed.append(scores)
        # 5. one paired bootstrap over problems for every selector and the differences between labellings
        ns = powers_of_two(n)
        pairs = [(a, b) for a, b in PAIRS if a in cfg.labellings and b in cfg.labellings]
        weighted = PROCESS_LARGE if PROCESS_LARGE in cfg.labellings else None
        curves, diffs = bon_bootstrap([bon_pool] * len(per_seed), per_seed, ns, pairs or None, cfg.resamples, 0,
                                      weighted)
        summary = write_report(run_dir, cfg, curves, diffs, errors, ns, big_source, len(samples), info)
        summary["wall_seconds"] = round(time.monotonic() - t0, 1)
        tracker.summary(summary)
        tracker.image("synthetic/plot", run_dir / "synthetic_supervision.png")
        return summary
    finally:
        tracker.finish()


# --------------------------------------------------------------------------- report


def _point(p: dict) -> dict:
    return {k: (None if p[k] is None or math.isnan(p[k]) else p[k]) for k in ("mean", "lo", "hi")}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def write_report(run_dir: Path, cfg, curves: dict, diffs: dict, errors: dict, ns: list[int], big_source: str,
                 num_samples: int, info: dict) -> dict:
    """report.md, synthetic_supervision.png; returns the summary (summary.json)."""
    from rlprm.evaluation.evaluate import markdown_table

    names = list(cfg.labellings)
    lines = ["# Synthetic supervision: a large PRM labels for small reward models", "",
             f"Large PRM: {big_source}. It labelled {num_samples} fresh generator samples (the PRM800K phase-2 way: "
             f"up to its first judged error). Small reward models ({cfg.train_steps} optimizer steps each, seeds "
             f"{', '.join(map(str, cfg.seeds))}) trained on exactly those samples, one per labelling. Best-of-N on "
             f"the held-out pool: a paired bootstrap over problems ({cfg.resamples} resamples, the seeds pooled); "
             f"PRMs pick by the `{cfg.aggregate}` of their step probabilities. `large_prm` is the labeller itself, "
             "`confidence` the generator's lowest token log-probability.", "",
             "## How often each labelling is wrong (the exact checker as the reference)", "",
             "| labelling | model | label wrong vs every-step-right (%) | vs final answer right (%) | step labels wrong (%) |",
             "|---|---|---|---|---|"]
    for name in names:
        e = errors[name]
        lines.append(f"| {name} | {KIND[name].upper()} | {_pct(e['vs_process'])} | {_pct(e['vs_answer'])} | "
                     f"{_pct(e['step_error'])} |")
    lines += ["", "## Best-of-N", "", markdown_table(curves, differences=diffs)]
    text = "\n".join(lines)
    atomic_write_text(run_dir / "report.md", text)
    plot(curves, names + ["large_prm", "confidence", "majority", "random", "pass@n"],
         run_dir / "synthetic_supervision.png")
    print(text)
    point = lambda c: {str(N): {m: _point(v) for m, v in c[N].items()} for N in ns}  # noqa: E731
    return {"synthetic": {name: point(curves[name]) for name in names},
            "bon": {name: point(c) for name, c in curves.items()},
            "synthetic_diff": {name: point(c) for name, c in diffs.items()},
            "label_errors": {name: errors[name] for name in names},
            "large_prm": big_source, "samples": num_samples, "ns": ns, "seeds": list(cfg.seeds),
            "report": str(run_dir / "report.md"), "plot": str(run_dir / "synthetic_supervision.png"), **info}


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
