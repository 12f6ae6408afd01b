"""`rlprm eval`: the job that samples a pool, scores it with every reward model, runs the search comparison when
eval.search asks for it, and writes the best-of-N curves. The statistics and plots it uses live in
`evaluation.evaluate` (which RL loops call between epochs) and `evaluation.search_report`; this module sits above
both, so neither imports it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlprm.evaluation.evaluate import (DIFFERENCES_KEY, bon_bootstrap, flat_metrics, markdown_table, plot_curves,
                                       powers_of_two, sample_pool, save_pool, score_pool, selector_scores)
from rlprm.evaluation.search_report import run_search_comparison
from rlprm.files import atomic_write_json, atomic_write_text

__all__ = ["run_eval"]


def run_eval(recipe, progress: bool = True) -> dict:
    """`rlprm eval`: pool, scores, curves and paired differences, table, plot, metrics; returns the curves.

    bon_curves.json: {selector: {N: {metric: {mean, lo, hi}}}, ..., "differences": {"A_minus_B": {N: ...}}}.
    """
    from rlprm.data.problems import eval_problems
    from rlprm.errors import loading
    from rlprm.models import load_causal_lm, load_tokenizer, resolve_device
    from rlprm.reward.adapters import check_reward_model, load_for_recipe
    from rlprm.rollout import sampler_for
    from rlprm.tracking import Tracker

    ev, sep = recipe.eval, recipe.task.step_separator
    run_dir = Path(recipe.run.output_dir)
    device = resolve_device(recipe.run.device)
    missing = [p for p in [recipe.model.generator, *ev.reward_models.values()]
               if p.startswith("/") and not Path(p).exists()]
    if missing:
        from rlprm.prerequisites import builder_hint, embedded_products

        how = {p: builder_hint(p) for p in missing}
        others = "" if all(how.values()) else ". The embedded recipes build: " + "; ".join(embedded_products())
        raise FileNotFoundError("missing checkpoint(s): " + ", ".join(
            f"{p} (build it with `{how[p]}`)" if how[p] else p for p in missing) + others)
    t0 = time.monotonic()
    # the run folder (recipe.yaml, metrics.jsonl) is created only once every model has loaded and scored: a folder
    # that passes the input checks but does not load leaves nothing behind (issue 24)
    tracker = None
    # what would keep a reward model from loading, found before sampling (each loads only after it, one at a time)
    for name, path in ev.reward_models.items():
        with loading(f"eval.reward_models.{name}", path):
            check_reward_model(path, ev.reward_model_adapters.get(name), recipe.task.step_separator)
    try:
        # 1. the pool: sampled once, reused by every selector
        problems = eval_problems(recipe, ev.num_problems)
        pool_path = run_dir / "pool.jsonl"
        with loading("model.generator", recipe.model.generator):
            tokenizer = load_tokenizer(recipe.model.generator, padding_side="left",
                                       trust_remote_code=recipe.model.trust_remote_code)
            model = load_causal_lm(recipe.model.generator, recipe.model.dtype, device, recipe.model.trust_remote_code)
        # eval.rollout: HF generate on `model`, or a vLLM engine loaded from the same folder (nothing to refresh)
        sampler = sampler_for(recipe, None, tokenizer, section="eval") if ev.rollout == "vllm" else None
        pool = sample_pool(model, tokenizer, problems, ev.n_max, ev.temperature, ev.max_new_tokens, ev.batch_size,
                           recipe.run.seed, sep, progress, sampler=sampler)
        del model
        t_sample = time.monotonic() - t0

        # 2. every reward model scores every sample, one forward pass each
        for name, path in ev.reward_models.items():
            # rlprm folders and public PRMs alike (family named in eval.reward_model_adapters, else detected)
            with loading(f"eval.reward_models.{name}", path):
                rm = load_for_recipe(recipe, path, ev.reward_model_adapters.get(name), device=device, dtype="float32")
            score_pool(pool, name, rm, sep=sep)
            del rm
        tracker = Tracker(run_dir, recipe, job="eval", tags=["eval"])
        save_pool(pool, pool_path)
        # eval.search: beam search / DVTS against best-of-N at equal generated tokens (search.md, .json, .png)
        search_metrics = {}
        if ev.search.method != "none":
            search_metrics = run_search_comparison(recipe, pool, tokenizer, device, t_sample, progress, sampler)

        # 3. selectors: a paired bootstrap over problems and the draws of N within them
        curves, differences = bon_bootstrap(pool, selector_scores(pool, ev.aggregations), powers_of_two(ev.n_max),
                                            ev.differences or None, ev.resamples, recipe.run.seed,
                                            ev.weighted_vote_by)

        # 4. report: table, plot, metrics, a sample table
        atomic_write_text(run_dir / "bon.md", markdown_table(curves, differences=differences))
        plot_curves(curves, run_dir / "bon.png", title=f"Best-of-N on {recipe.task.name} ({len(problems)} problems)")
        # one key per selector, as before, and the paired differences beside them
        atomic_write_json(run_dir / "bon_curves.json", {**curves, DIFFERENCES_KEY: differences})
        metrics = flat_metrics(curves)
        metrics.update(flat_metrics(differences, prefix="bon_diff"))
        metrics.update(search_metrics)
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
        if tracker is not None:
            tracker.finish()
