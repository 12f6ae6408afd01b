"""Seconds per RL iteration, split into generate / score / update; prints JSON.

    flock /tmp/rlprm_cpu_lock .venv/bin/python benchmarks/rl_step.py            # the shipped recipes' sizes
    .venv/bin/python benchmarks/rl_step.py --iterations 2 --skip-trl            # quicker

Needs the prepared generator, PRM and ORM (runs/arith/generator, runs/arith_prm/reward_model,
runs/arith_orm/reward_model; see the recipes' headers): built first when missing, as `rlprm train-rl`
builds them (`rlprm.prerequisites.ensure_prerequisites`). Three comparisons, all in this one process:

1. PPO (rlprm/rl/ppo.py) with dense PRM rewards (recipes/prm_dense.yaml) against sparse outcome
   rewards, both from the ORM (recipes/orm_sparse.yaml: the same model cost, only the reward placement
   differs) and from the exact grader (recipes/outcome_gt.yaml: no reward model at all).
   Target: dense at most 1.3x sparse.
2. GRPO (rlprm/rl/grpo.py) with dense PRM rewards (recipes/grpo_prm_dense.yaml) against ground-truth
   outcome rewards (recipes/grpo_outcome.yaml).
3. Our GRPO with the outcome reward against TRL's plain `GRPOTrainer` with the same reward function,
   model, batch and GRPOConfig (target: at most 1.2x). Ours is timed by its own per-phase log (the
   rlprm loop's work included; best-of-N is off), TRL's by a callback around the same iterations.

Every run uses one epoch of `--iterations` iterations; the first iteration is dropped as warm-up
(allocator, first generate) when there are at least 2. Recipes keep their thread setting (1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import TrainerCallback  # noqa: E402  (a benchmark script: the import cost does not matter)


def _recipe(name: str, out: Path, iterations: int):
    from rlprm.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / name, [f"run.output_dir={out}", "rl.epochs=1", "rl.eval_n_max=0",
                                                   "tracking.wandb=disabled"])
    recipe.rl.problems_per_epoch = iterations * recipe.rl.prompts_per_iteration
    from contextlib import redirect_stdout

    from rlprm.prerequisites import ensure_prerequisites

    # a clean clone has no ORM yet (the main job builds only what its recipe reads); its lines go to stderr so
    # that stdout stays one JSON document
    with redirect_stdout(sys.stderr):
        ensure_prerequisites(recipe)
    return recipe


def _phases(records: list[dict]) -> dict:
    """Mean seconds per iteration of each phase, the first (warm-up) iteration dropped when there are 2+."""
    its = [r for r in records if "time/generate" in r]
    its = its[1:] if len(its) > 1 else its
    out = {k: round(statistics.mean(r[f"time/{k}"] for r in its), 3) for k in ("generate", "score", "update")}
    out["total"] = round(sum(out.values()), 3)
    out["iterations_timed"] = len(its)
    out["response_length"] = round(statistics.mean(r["rl/response_length"] for r in its), 1)
    return out


def run_loop(name: str, tmp: Path, iterations: int) -> dict:
    from rlprm.rl import train
    from rlprm.tracking import read_metrics

    out = tmp / name.replace(".yaml", "")
    recipe = _recipe(name, out, iterations)
    train(recipe, progress=False)
    res = _phases(read_metrics(out / "metrics.jsonl"))
    res["batch"] = recipe.rl.prompts_per_iteration * recipe.rl.samples_per_problem
    return res


class IterationTimer(TrainerCallback):
    """Wall seconds of each GRPO iteration (`steps_per_iteration` optimizer steps) of TRL's trainer, and the mean
    completion length the reward function saw in it."""

    def __init__(self, steps_per_iteration: int, reward):
        self.steps_per_iteration, self.reward = steps_per_iteration, reward
        self.start = 0.0
        self.walls: list[float] = []
        self.lengths: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step % self.steps_per_iteration == 0:
            self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.steps_per_iteration == 0:
            self.walls.append(time.monotonic() - self.start)
            self.lengths.append(statistics.mean(len(c) for c in self.reward.last["ids"]))


def run_trl_plain(tmp: Path, iterations: int) -> dict:
    """TRL's own GRPOTrainer on recipes/grpo_outcome.yaml's model, batch, config and our reward function."""
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer

    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.data.problems import epoch_problems, held_out_arithmetic
    from rlprm.rl.grpo import RewardFunction, grpo_args

    recipe = _recipe("grpo_outcome.yaml", tmp / "trl_plain", iterations)
    rl = recipe.rl
    exclude = {p.text for p in held_out_arithmetic(recipe, max(recipe.prepare_eval.num_problems, rl.eval_num_problems))}
    problems = epoch_problems(recipe, 0, exclude)
    tokenizer = load_tokenizer(recipe.model.generator, padding_side="left")
    torch.manual_seed(recipe.run.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.run.threads)
    policy = load_causal_lm(recipe.model.generator, "float32", "cpu")
    steps_per_iteration = rl.prompts_per_iteration * rl.samples_per_problem // rl.minibatch_size * rl.ppo_epochs

    reward = RewardFunction(recipe, problems, tokenizer)
    timer = IterationTimer(steps_per_iteration, reward)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward],
                          args=grpo_args(recipe, tmp / "trl_plain", seed=recipe.run.seed),
                          train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in problems],
                                                           "problem_index": list(range(len(problems)))}),
                          processing_class=tokenizer, callbacks=[timer],
                          optimizers=(torch.optim.AdamW(policy.parameters(), lr=rl.learning_rate, weight_decay=0.01),
                                      None))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    walls, lengths = timer.walls, timer.lengths
    timed = walls[1:] if len(walls) > 1 else walls
    kept = lengths[1:] if len(lengths) > 1 else lengths
    return {"total": round(statistics.mean(timed), 3), "iterations_timed": len(timed),
            "response_length": round(statistics.mean(kept), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="iterations per run (the first is warm-up)")
    parser.add_argument("--skip-trl", action="store_true", help="skip the TRL plain GRPOTrainer comparison")
    parser.add_argument("--skip-ppo", action="store_true", help="skip the PPO dense/sparse comparison")
    args = parser.parse_args(argv)
    import torch

    result: dict = {"torch_threads_per_run": 1, "cpu_count": os.cpu_count(), "iterations_per_run": args.iterations}
    with tempfile.TemporaryDirectory(prefix="rlprm_rl_step_") as d:
        tmp = Path(d)
        if not args.skip_ppo:
            ppo = {"dense_prm": run_loop("prm_dense.yaml", tmp, args.iterations),
                   "sparse_orm": run_loop("orm_sparse.yaml", tmp, args.iterations),
                   "sparse_ground_truth": run_loop("outcome_gt.yaml", tmp, args.iterations)}
            ppo["ratio_dense_over_sparse_orm"] = round(ppo["dense_prm"]["total"] / ppo["sparse_orm"]["total"], 3)
            ppo["ratio_dense_over_sparse_ground_truth"] = round(
                ppo["dense_prm"]["total"] / ppo["sparse_ground_truth"]["total"], 3)
            result["ppo"] = ppo
        grpo = {"dense_prm": run_loop("grpo_prm_dense.yaml", tmp, args.iterations),
                "sparse_ground_truth": run_loop("grpo_outcome.yaml", tmp, args.iterations)}
        grpo["ratio_dense_over_sparse_ground_truth"] = round(
            grpo["dense_prm"]["total"] / grpo["sparse_ground_truth"]["total"], 3)
        result["grpo"] = grpo
        if not args.skip_trl:
            trl_plain = run_trl_plain(tmp, args.iterations)
            result["grpo_vs_trl"] = {
                "ours_outcome": grpo["sparse_ground_truth"],
                "trl_plain_outcome": trl_plain,
                "ratio_ours_over_trl": round(grpo["sparse_ground_truth"]["total"] / trl_plain["total"], 3),
            }
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
