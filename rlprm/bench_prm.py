"""`rlprm bench-prm`: a PRM measured the way papers report it, whatever its family.

ProcessBench's metric, as its authors compute it (QwenLM/ProcessBench, code/run_eval_prm_*.py): a solution's
predicted error is its first step whose probability is below the threshold, -1 when there is none; "error
accuracy" is the share of erroneous solutions (label != -1) whose prediction equals the label exactly,
"correct accuracy" the share of error-free ones (label == -1) predicted -1, and F1 their harmonic mean, per
subset (one file each: gsm8k, math, ...). Reported in percent like the paper. Beside it:
- step AUROC over the labelled steps (those before the first error are right, the first error is wrong, the
  steps after it carry no label);
- first-error accuracy: the share of all solutions whose predicted index (or -1) is exactly the label.
The threshold is `bench.threshold`, or the one of `bench.tune_grid` with the best F1 on the separate file
`bench.tune_threshold_on` (never on the subsets it then reports).

Writes RUN_DIR/bench_prm.md (table), bench_prm.json (every number, per-solution predictions left out) and
bench_prm.png (grouped bars per subset), and the numbers to metrics.jsonl / W&B like every job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from rlprm.rm_metrics import auroc, first_error_f1, predict_first_error


def processbench_scores(labels: Sequence[int], step_probs: Sequence[Sequence[float]], threshold: float) -> dict:
    """ProcessBench's numbers for one subset. `labels[i]`: index of the first wrong step, -1 if none.

    error_acc / correct_acc / f1 are percentages (None when a group is empty); step_auroc over labelled steps;
    first_error_acc the exact-match share over every solution.
    """
    if len(labels) != len(step_probs):
        raise ValueError(f"{len(labels)} labels but {len(step_probs)} scored solutions")
    gold = [None if y == -1 else y for y in labels]
    predicted = [predict_first_error(p, threshold) for p in step_probs]
    fe = first_error_f1(gold, predicted)
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    probs, truth = [], []
    for y, ps in zip(labels, step_probs):
        last = len(ps) - 1 if y == -1 else y
        for k, p in enumerate(ps[:last + 1]):
            probs.append(p)
            truth.append(y == -1 or k < y)
    exact = sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else None
    return {"error_acc": pct(fe["error_accuracy"]), "correct_acc": pct(fe["correct_accuracy"]), "f1": pct(fe["f1"]),
            "num_error": fe["num_error"], "num_correct": fe["num_correct"], "step_auroc": auroc(probs, truth),
            "first_error_acc": pct(exact), "threshold": threshold}


def tune_threshold(labels: Sequence[int], step_probs: Sequence[Sequence[float]], grid: Sequence[float]) -> float:
    """The threshold of `grid` with the best F1 (ties: the smallest threshold)."""
    best, best_f1 = None, -1.0
    for t in sorted(grid):
        f1 = processbench_scores(labels, step_probs, t)["f1"]
        if f1 is not None and f1 > best_f1:
            best, best_f1 = t, f1
    if best is None:
        raise ValueError("cannot tune the threshold: the tuning file needs erroneous and error-free solutions")
    return best


def fitting(rm, records) -> tuple[list, int]:
    """The records the model has positions for, and how many were left out (counted, never silently)."""
    from rlprm.reward_models import RewardModel
    from rlprm.train_rm import _fitting

    if isinstance(rm, RewardModel):
        return _fitting(rm, records)
    limit = rm.max_positions()
    if not limit:
        return list(records), 0
    encoded = rm.encode([r.problem for r in records], [r.steps for r in records])
    kept = [r for r, e in zip(records, encoded) if len(e.input_ids) <= limit]
    return kept, len(records) - len(kept)


def score_file(rm, path: Path, limit: int, batch_size: int) -> tuple[list[int], list[list[float]], int]:
    """(labels, step probabilities, left out as too long) of one ProcessBench-format file."""
    from rlprm.data.processbench import load_processbench

    records, too_long = fitting(rm, load_processbench(path, limit))
    probs = rm.score_steps([r.problem for r in records], [r.steps for r in records], batch_size=batch_size)
    return [-1 if r.first_error is None else r.first_error for r in records], probs, too_long


def markdown(results: dict, model: str, adapter: str) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"# ProcessBench: {model} ({adapter})", "",
             f"threshold {results['threshold']:g} ({results['threshold_source']})", "",
             "| subset | error acc | correct acc | F1 | step AUROC | first-error acc | n error | n correct | too long |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["subsets"].items():
        lines.append(f"| {name} | {f(r['error_acc'])} | {f(r['correct_acc'])} | {f(r['f1'])} | "
                     f"{f(r['step_auroc'], '{:.3f}')} | {f(r['first_error_acc'])} | {r['num_error']} | "
                     f"{r['num_correct']} | {r['num_too_long']} |")
    if results.get("average_f1") is not None:
        lines += ["", f"average F1 over subsets: {results['average_f1']:.1f}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["subsets"])
    keys = [("error_acc", "error acc"), ("correct_acc", "correct acc"), ("f1", "F1")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.8), dpi=110)
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        values = [results["subsets"][n][key] or 0.0 for n in names]
        ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"ProcessBench, threshold {results['threshold']:g}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_bench(recipe, progress: bool = True) -> dict:
    """Load model.reward_model (family rm.adapter, else detected), score every bench file, write the report."""
    from rlprm.models import resolve_device
    from rlprm.prm_adapters import AdapterError, load_for_recipe
    from rlprm.tracking import Tracker

    cfg = recipe.bench
    if not cfg.processbench_paths:
        raise AdapterError("nothing to benchmark on: list ProcessBench files in bench.processbench_paths")
    missing = [str(p) for p in [*cfg.processbench_paths, cfg.tune_threshold_on] if p is not None and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError("bench file(s) not found: " + ", ".join(missing) + " (bench.processbench_paths, "
                                "bench.tune_threshold_on)")
    run_dir = Path(recipe.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rm = load_for_recipe(recipe, device=resolve_device(recipe.run.device))
    if rm.kind != "prm":
        raise AdapterError(f"{recipe.model.reward_model} is an {rm.kind}: ProcessBench needs step scores (a PRM)")
    adapter = getattr(rm, "adapter", "rlprm")
    threshold, source = cfg.threshold, "bench.threshold"
    if cfg.tune_threshold_on is not None:
        labels, probs, _ = score_file(rm, Path(cfg.tune_threshold_on), cfg.limit, cfg.batch_size)
        threshold = tune_threshold(labels, probs, cfg.tune_grid)
        source = f"best F1 on {Path(cfg.tune_threshold_on).name}"
    subsets = {}
    for path in cfg.processbench_paths:
        labels, probs, too_long = score_file(rm, Path(path), cfg.limit, cfg.batch_size)
        subsets[Path(path).stem] = {**processbench_scores(labels, probs, threshold), "num_too_long": too_long}
        if progress:
            r = subsets[Path(path).stem]
            print(f"{Path(path).stem}: F1 {r['f1'] if r['f1'] is None else round(r['f1'], 1)} "
                  f"({len(labels)} solutions, {too_long} too long)", flush=True)
    f1s = [r["f1"] for r in subsets.values() if r["f1"] is not None]
    results = {"model": str(recipe.model.reward_model), "adapter": adapter, "threshold": threshold,
               "threshold_source": source, "subsets": subsets,
               "average_f1": sum(f1s) / len(f1s) if f1s else None, "seconds": round(time.monotonic() - t0, 1)}
    (run_dir / "bench_prm.json").write_text(json.dumps(results, indent=1) + "\n")
    (run_dir / "bench_prm.md").write_text(markdown(results, results["model"], adapter))
    plot(results, run_dir / "bench_prm.png")
    metrics = {f"processbench/{name}/{k}": v for name, r in subsets.items() for k, v in r.items()
               if k != "threshold"}
    metrics.update({"processbench/average_f1": results["average_f1"], "processbench/threshold": threshold})
    with Tracker(run_dir, recipe, job="bench-prm", tags=["bench-prm"]) as tracker:
        tracker.log(metrics, step=0)
        tracker.summary(metrics)
    return results
