"""`rlprm bench-prm`: a PRM measured the way papers report it, whatever its family.

ProcessBench's metric, as its authors compute it (QwenLM/ProcessBench, code/run_eval_prm_*.py): a solution's
predicted error is its first step whose probability is below the threshold, -1 when there is none; "error
accuracy" is the share of erroneous solutions (label != -1) whose prediction equals the label exactly,
"correct accuracy" the share of error-free ones (label == -1) predicted -1, and F1 their harmonic mean, per
subset. Reported in percent like the paper. Beside it:
- step AUROC over the labelled steps (those before the first error are right, the first error is wrong, the
  steps after it carry no label);
- first-error accuracy: the share of all solutions whose predicted index (or -1) is exactly the label.
The threshold is `bench.threshold`, or the one of `bench.tune_grid` with the best F1 on the separate file
`bench.tune_threshold_on` (never on the subsets it then reports).

Subsets, each scored the same way:
- ProcessBench files (`bench.processbench_paths`, one subset per file: gsm8k, math, ...);
- PRM800K files (`bench.prm800k_paths`, e.g. phase2_test.jsonl): human step ratings, the gold first error is
  the first step labelled wrong; a line whose ratings settle no gold answer is left out and counted;
- the arithmetic task (`bench.arithmetic_problems`): model.generator sampled on held-out problems, every step
  labelled by the exact checker (the same labels `rlprm train-rm` trains on), so a PRM is measured on the
  errors of the generator it would reward.

Writes RUN_DIR/bench_prm.md (table), bench_prm.json (every number, per-solution predictions left out) and
bench_prm.png (grouped bars per subset), and the numbers to metrics.jsonl / W&B like every job.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from rlprm.errors import InputError
from rlprm.files import atomic_write_json, atomic_write_text, save_figure
from rlprm.reward.metrics import auroc, first_error_f1, predict_first_error


class BenchError(InputError, ValueError):
    """The benchmark cannot run as the recipe says (the message names the key to change)."""


def processbench_scores(labels: Sequence[int], step_probs: Sequence[Sequence[float]], threshold: float,
                        step_truth: Sequence[Sequence[bool | None]] | None = None) -> dict:
    """ProcessBench's numbers for one subset. `labels[i]`: index of the first wrong step, -1 if none.

    error_acc / correct_acc / f1 are percentages (None when a group is empty); step_auroc over labelled steps
    (`step_truth[i][k]`: step k right, wrong, or None for no label; default: right before `labels[i]`, wrong at
    it, nothing after); first_error_acc the exact-match share over every solution.
    """
    if len(labels) != len(step_probs):
        raise ValueError(f"{len(labels)} labels but {len(step_probs)} scored solutions")
    gold = [None if y == -1 else y for y in labels]
    predicted = [predict_first_error(p, threshold) for p in step_probs]
    fe = first_error_f1(gold, predicted)
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    if step_truth is None:
        step_truth = [[(y == -1 or k < y) if (y == -1 or k <= y) else None for k in range(len(ps))]
                      for y, ps in zip(labels, step_probs)]
    probs, truth = [], []
    for ts, ps in zip(step_truth, step_probs):
        for t, p in zip(ts, ps):
            if t is not None:
                probs.append(p)
                truth.append(t)
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


def token_forms(rm, records) -> list[list[int]]:
    """Each record's token ids as the model reads them (an rlprm model's convention, or a family's plan)."""
    from rlprm.reward.model import RewardModel
    from rlprm.steps import encode_batch

    if not records:
        return []
    if isinstance(rm, RewardModel):
        encoded = encode_batch(rm.tokenizer, [rm.convention.prompt(r.problem) for r in records],
                               [r.steps for r in records], rm.step_separator)
    else:
        encoded = rm.encode([r.problem for r in records], [r.steps for r in records])
    return [e.input_ids for e in encoded]


def model_config(rm):
    from rlprm.reward.model import RewardModel

    return rm.model.config if isinstance(rm, RewardModel) else rm.family.config


def rotary(config) -> bool:
    """Whether the model's positions are rotary (computed for any index), not a learned table."""
    return any(getattr(config, key, None) for key in ("rope_parameters", "rope_theta", "rope_scaling"))


def fitting(rm, records, forms: list[list[int]], too_long: str = "skip") -> tuple[list, int, int]:
    """(records to score, left out as too long, scored past the model's positions): counted, never silent.

    A record longer than max_position_embeddings is left out with `too_long="skip"`, and scored anyway with
    `"extend"` when the positions are rotary (bench.too_long); a learned position table cannot extend.
    """
    config = model_config(rm)
    limit = getattr(config, "max_position_embeddings", None)
    long = [bool(limit) and len(ids) > limit for ids in forms]
    if too_long == "extend" and rotary(config):
        return list(records), 0, sum(long)
    return [r for r, x in zip(records, long) if not x], sum(long), 0


def gold(record) -> tuple[int, list[bool | None]] | None:
    """(first-error label or -1, per-step truth) of a step-labelled record, None when it settles no label.

    The label is the first step labelled wrong; with none, -1 when the record is known error-free
    (`process_correct`), else the record says nothing about where (or whether) it goes wrong: a PRM800K line
    with unrated steps or no finished solution, an arithmetic sample that stops before its answer.
    A neutral label (a 3-class PRM800K reading) counts as not wrong; unlabelled steps carry no truth.
    """
    from rlprm.data.stepwise import INCORRECT

    first = next((k for k, y in enumerate(record.labels) if y == INCORRECT), None)
    if first is None and record.process_correct is not True:
        return None
    last = len(record.labels) if first is None else first + 1
    truth = [None if y is None else y != INCORRECT for y in record.labels[:last]]
    return (-1 if first is None else first), truth + [None] * (len(record.labels) - last)


def evenly(items: list, limit: int) -> list:
    """`limit` items evenly spaced through `items` (all with limit 0), as load_processbench picks them."""
    return [items[i * len(items) // limit] for i in range(limit)] if 0 < limit < len(items) else list(items)


def score_records(rm, records, batch_size: int, too_long: str = "skip") -> dict:
    """Labels, step truth and step probabilities of the records that settle a gold label and fit the model.

    Returns {labels, truth, probs, num_too_long, num_beyond_positions, num_no_label, unknown_token_share}; what
    is left out is counted, never dropped silently. `unknown_token_share`: of the scored tokens, the share the
    tokenizer maps to its unknown token (text the model cannot even read; None for tokenizers without one).
    """
    settled = [(r, g) for r, g in ((r, gold(r)) for r in records) if g is not None]
    forms = token_forms(rm, [r for r, _ in settled])
    kept, num_too_long, beyond = fitting(rm, [r for r, _ in settled], forms, too_long)
    by_id = {id(r): g for r, g in settled}
    kept_ids = {id(r) for r in kept}
    scored_forms = [ids for (r, _), ids in zip(settled, forms) if id(r) in kept_ids]
    unk = getattr(rm.tokenizer, "unk_token_id", None)
    total = sum(len(ids) for ids in scored_forms)
    unknown = None if unk is None or not total else sum(ids.count(unk) for ids in scored_forms) / total
    probs = rm.score_steps([r.problem for r in kept], [r.steps for r in kept], batch_size=batch_size,
                           beyond_positions=beyond > 0) if kept else []
    return {"labels": [by_id[id(r)][0] for r in kept], "truth": [by_id[id(r)][1] for r in kept], "probs": probs,
            "num_too_long": num_too_long, "num_beyond_positions": beyond, "num_no_label": len(records) - len(settled),
            "unknown_token_share": unknown}


def score_file(rm, path: Path, limit: int, batch_size: int, too_long: str = "skip"
               ) -> tuple[list[int], list[list[float]], int]:
    """(labels, step probabilities, left out as too long) of one ProcessBench-format file."""
    from rlprm.data.processbench import load_processbench

    scored = score_records(rm, load_processbench(path, limit), batch_size, too_long)
    return scored["labels"], scored["probs"], scored["num_too_long"]


def prm800k_records(recipe, path: Path) -> list:
    """The trajectories of one PRM800K file (no alternatives), read with rm.data's PRM800K settings."""
    from rlprm.data.prm800k import load_prm800k

    data = recipe.rm.data
    records, _ = load_prm800k(path, neutral_as=data.neutral_as, keep_quality_control=data.keep_quality_control,
                              keep_screening=data.keep_screening, alternatives=False, on_bad_line=data.on_bad_line)
    return evenly(records, recipe.bench.limit)


def arithmetic_records(recipe, progress: bool = True) -> tuple[list, dict]:
    """model.generator's samples on held-out arithmetic problems, labelled by the exact checker, cached.

    The problems are `rlprm prepare`'s held-out set for run.seed (the generator never trained on them); the
    cache (RUN_DIR/bench_samples_arithmetic.jsonl) is reused only while generator and settings are the same.
    """
    from rlprm.data.stepwise import load_or_sample, model_fingerprint, sample_arithmetic
    from rlprm.models import load_causal_lm, load_tokenizer, resolve_device
    from rlprm.reward.model import quiet_transformers
    from rlprm.tasks.arithmetic import split_problems

    cfg, data, sep = recipe.bench, recipe.rm.data, recipe.task.step_separator
    gen = recipe.model.generator
    _, problems = split_problems(recipe.task.arithmetic, 0, cfg.arithmetic_problems, recipe.run.seed)
    meta = {"generator": str(gen), "fingerprint": model_fingerprint(gen), "seed": recipe.run.seed,
            "problems": cfg.arithmetic_problems, "samples_per_problem": cfg.arithmetic_samples_per_problem,
            "temperature": data.temperature, "max_new_tokens": data.max_new_tokens, "sep": sep,
            "task": recipe.task.arithmetic.model_dump(mode="json")}

    def make():
        tokenizer = load_tokenizer(gen, padding_side="left", trust_remote_code=recipe.model.trust_remote_code)
        with quiet_transformers(report=False):
            model = load_causal_lm(gen, device=resolve_device(recipe.run.device),
                                   trust_remote_code=recipe.model.trust_remote_code)
        return sample_arithmetic(model, tokenizer, problems, cfg.arithmetic_samples_per_problem,
                                 temperature=data.temperature, max_new_tokens=data.max_new_tokens,
                                 batch_size=data.sample_batch_size, seed=recipe.run.seed * 7 + 5, sep=sep,
                                 progress=progress, desc="sampling held-out arithmetic solutions")

    path = Path(recipe.run.output_dir) / "bench_samples_arithmetic.jsonl"
    records, counts, _ = load_or_sample(path, meta, make)
    return records, counts


def check_sources(recipe) -> list[tuple[str, str, object]]:
    """(subset name, source, what to load) of every subset the recipe asks for; errors name the key."""
    cfg = recipe.bench
    sources = [(Path(p).stem, "processbench", p) for p in cfg.processbench_paths]
    sources += [(Path(p).stem, "prm800k", p) for p in cfg.prm800k_paths]
    if cfg.arithmetic_problems:
        if recipe.task.name != "arithmetic":
            raise BenchError(f"bench.arithmetic_problems samples the arithmetic task, and task.name is "
                             f"{recipe.task.name!r}; set bench.arithmetic_problems=0")
        if recipe.model.generator == "tiny":
            raise BenchError("bench.arithmetic_problems samples model.generator: set it to a generator folder "
                             "(e.g. runs/arith/generator from `rlprm prepare`)")
        sources.append(("arithmetic", "arithmetic", None))
    if not sources:
        raise BenchError("nothing to benchmark on: list ProcessBench files in bench.processbench_paths, PRM800K "
                         "files in bench.prm800k_paths, or set bench.arithmetic_problems")
    names = [n for n, _, _ in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BenchError(f"two subsets would be called {', '.join(twice)}: give the files of bench.processbench_paths "
                         "and bench.prm800k_paths different names")
    missing = [str(p) for p in [*cfg.processbench_paths, *cfg.prm800k_paths, cfg.tune_threshold_on]
               if p is not None and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError("bench file(s) not found: " + ", ".join(missing) + " (bench.processbench_paths, "
                                "bench.prm800k_paths, bench.tune_threshold_on)")
    return sources


def markdown(results: dict, model: str, adapter: str) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"# PRM benchmark: {model} ({adapter})", "",
             f"ProcessBench's metric; threshold {results['threshold']:g} ({results['threshold_source']})", "",
             "| subset | source | error acc | correct acc | F1 | step AUROC | first-error acc | n error | n correct "
             "| past positions | too long | no label | unknown tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["subsets"].items():
        lines.append(f"| {name} | {r.get('source', 'processbench')} | {f(r['error_acc'])} | {f(r['correct_acc'])} | "
                     f"{f(r['f1'])} | {f(r['step_auroc'], '{:.3f}')} | {f(r['first_error_acc'])} | {r['num_error']} | "
                     f"{r['num_correct']} | {r.get('num_beyond_positions', 0)} | {r['num_too_long']} | "
                     f"{r.get('num_no_label', 0)} | {f(r.get('unknown_token_share'), '{:.1%}')} |")
    if results.get("average_f1") is not None:
        lines += ["", f"average F1 over subsets: {results['average_f1']:.1f}"]
    limit = results.get("max_positions")
    lines += ["", f"past positions: scored although longer than the model's {limit} positions (bench.too_long: "
              "extend; rotary positions are computed for any index, and the quality past the trained length is the "
              "model's own); too long: left out, beyond the model's positions; no label: the data settles no first "
              "error (PRM800K lines with unrated steps or no finished solution, arithmetic samples without an answer "
              "step); unknown tokens: the share of scored tokens the tokenizer maps to its unknown token."]
    if adapter == "rlprm" and any(r.get("source") != "arithmetic" for r in results["subsets"].values()):
        lines += ["", "An rlprm PRM knows only the data it was trained on (the embedded one: the arithmetic task's "
                  "chains, in its 39-symbol character vocabulary). On ProcessBench or PRM800K it is out of its "
                  "domain: these numbers measure how far it transfers, not what a PRM of its kind can do."]
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
    ax.set_title(f"ProcessBench's metric, threshold {results['threshold']:g}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def run_bench(recipe, progress: bool = True) -> dict:
    """Load model.reward_model (family reward.adapter, else detected), score every subset, write the report."""
    from rlprm.data.processbench import load_processbench
    from rlprm.models import resolve_device
    from rlprm.reward.adapters import AdapterError, load_for_recipe
    from rlprm.tracking import Tracker

    cfg = recipe.bench
    sources = check_sources(recipe)
    run_dir = Path(recipe.run.output_dir)
    t0 = time.monotonic()
    # ProcessBench / PRM800K items come split into steps: an rlprm PRM joins them with its own separator (one
    # trained on "\n\n" paragraphs by prm_train_prm800k.yaml was refused under bench_prm.yaml's default "\n"),
    # unless the recipe names one or samples the arithmetic task, whose texts are split with task.step_separator
    named = "step_separator" in recipe.task.model_fields_set or bool(cfg.arithmetic_problems)
    rm = load_for_recipe(recipe, device=resolve_device(recipe.run.device), task_separator=named)
    if rm.kind != "prm":
        raise AdapterError(f"{recipe.model.reward_model} is an {rm.kind}: ProcessBench needs step scores (a PRM)")
    run_dir.mkdir(parents=True, exist_ok=True)  # once the model is known to fit: a refused one leaves no folder
    adapter = getattr(rm, "adapter", "rlprm")
    threshold, source = cfg.threshold, "bench.threshold"
    if cfg.tune_threshold_on is not None:
        labels, probs, _ = score_file(rm, Path(cfg.tune_threshold_on), cfg.limit, cfg.batch_size, cfg.too_long)
        threshold = tune_threshold(labels, probs, cfg.tune_grid)
        source = f"best F1 on {Path(cfg.tune_threshold_on).name}"
    subsets, sampling = {}, {}
    for name, kind, where in sources:
        if kind == "processbench":
            records = load_processbench(where, cfg.limit)
        elif kind == "prm800k":
            records = prm800k_records(recipe, Path(where))
        else:
            records, sampling = arithmetic_records(recipe, progress)
        scored = score_records(rm, records, cfg.batch_size, cfg.too_long)
        subsets[name] = {**processbench_scores(scored["labels"], scored["probs"], threshold, scored["truth"]),
                         "source": kind, "num_scored": len(scored["labels"]),
                         **{k: scored[k] for k in ("num_too_long", "num_beyond_positions", "num_no_label",
                                                   "unknown_token_share")}}
        if progress:
            r = subsets[name]
            print(f"{name} ({kind}): F1 {r['f1'] if r['f1'] is None else round(r['f1'], 1)} "
                  f"({len(scored['labels'])} solutions, {r['num_beyond_positions']} of them past the model's "
                  f"positions, {r['num_too_long']} too long, {r['num_no_label']} without a label)", flush=True)
    f1s = [r["f1"] for r in subsets.values() if r["f1"] is not None]
    results = {"model": str(recipe.model.reward_model), "adapter": adapter, "threshold": threshold,
               "threshold_source": source, "too_long": cfg.too_long,
               "max_positions": getattr(model_config(rm), "max_position_embeddings", None),
               "rotary_positions": rotary(model_config(rm)), "subsets": subsets,
               "average_f1": sum(f1s) / len(f1s) if f1s else None, "seconds": round(time.monotonic() - t0, 1)}
    if sampling:
        results["arithmetic_sampling"] = {"generator": str(recipe.model.generator), **sampling}
    atomic_write_json(run_dir / "bench_prm.json", results)
    atomic_write_text(run_dir / "bench_prm.md", markdown(results, results["model"], adapter))
    plot(results, run_dir / "bench_prm.png")
    metrics = {f"processbench/{name}/{k}": v for name, r in subsets.items() for k, v in r.items()
               if k not in ("threshold", "source") and v is not None}
    metrics.update({"processbench/average_f1": results["average_f1"], "processbench/threshold": threshold})
    with Tracker(run_dir, recipe, job="bench-prm", tags=["bench-prm"]) as tracker:
        tracker.log(metrics, step=0)
        tracker.summary(metrics)
    return results
