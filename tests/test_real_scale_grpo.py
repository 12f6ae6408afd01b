"""recipes/grpo_prm_dense_qwen_math.yaml (all weights) and recipes/grpo_prm_dense_qwen_math_lora.yaml (LoRA) as
shipped (MATH prompts, dense PRM process rewards, DDP, bf16), run on CPU with tiny stand-ins for Qwen2.5-Math and
the PRM800K PRM and tiny budgets, as tests/test_real_scale_rl.py does for the PPO recipe: every key of the recipes is
exercised except the model ids and the sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shared_file
from tests.real_scale import run_tiny, stand_ins

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"full": ROOT / "recipes" / "grpo_prm_dense_qwen_math.yaml",
           "lora": ROOT / "recipes" / "grpo_prm_dense_qwen_math_lora.yaml"}


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_recipe_validates_and_its_sizes_fit_eight_processes(variant, tmp_path):
    from rlprm.config import load_recipe
    from rlprm.rl.grpo import GRPO, check_sizes, grpo_args

    recipe = load_recipe(RECIPES[variant])
    assert recipe.model.generator == "Qwen/Qwen2.5-Math-1.5B-Instruct" and recipe.model.dtype == "bfloat16"
    assert recipe.rl.algorithm == "grpo" and recipe.reward.mode == "dense" and recipe.reward.source == "prm"
    assert recipe.deepspeed is None and recipe.model.lora.enabled is (variant == "lora")
    assert Path(recipe.model.reward_model).parts[-2:] == ("prm800k_prm", "reward_model")  # prm_train_prm800k.yaml's
    assert recipe.task.prompt_template.format(problem="P").count("\\boxed{}") == 1
    assert 8 <= recipe.rl.samples_per_problem <= 16
    for world in (1, 2, 4, 8):
        check_sizes(recipe, world)
    args = grpo_args(recipe, tmp_path, seed=0, world=8)
    assert args.per_device_train_batch_size == 8 and args.bf16 and args.num_generations == recipe.rl.samples_per_problem
    # the whole check but the models' presence (the PRM is built by prm_train_prm800k.yaml, never automatically)
    recipe.model.reward_model = str(tmp_path)
    GRPO().check(recipe)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_recipe_runs_with_tiny_stand_ins(variant, tmp_path):
    from rlprm.config import load_recipe

    math = shared_file("math/math500_test.jsonl")
    recipe_path = RECIPES[variant]
    gen, prm = stand_ins(tmp_path, math, load_recipe(recipe_path).task.prompt_template)
    run = run_tiny(recipe_path, gen, prm, math, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/answer_accuracy"] is not None and "rl/reward" in summary and "rl/kl" in summary
    resolved = (run / "recipe.yaml").read_text()
    assert "algorithm: grpo" in resolved and "dtype: bfloat16" in resolved and "mode: dense" in resolved
    model = run / "checkpoints" / "epoch-0001" / "model"
    assert (model / "adapter_config.json").is_file() is (variant == "lora")  # LoRA checkpoints hold the adapters
    export = run / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == "qwen2"  # the stand-in's architecture
    assert not (export / "adapter_config.json").exists()  # merged: a plain HF folder either way
