"""recipes/prm_dense_qwen_math.yaml as shipped (MATH prompts, dense PRM rewards, ZeRO-2, bf16) and its LoRA
(prm_dense_qwen_math_lora.yaml) and ZeRO-3 (prm_dense_qwen_math_zero3.yaml) variants, run on CPU with tiny
stand-ins for Qwen2.5-Math and the PRM800K PRM, and tiny budgets: every key of the recipes is exercised except the
model ids and the sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shared_file
from tests.real_scale import run_tiny, stand_ins

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "prm_dense_qwen_math.yaml"
LORA = ROOT / "recipes" / "prm_dense_qwen_math_lora.yaml"
ZERO3 = ROOT / "recipes" / "prm_dense_qwen_math_zero3.yaml"


def test_recipe_validates_without_the_data_and_names_missing_inputs(tmp_path):
    from rlprm.config import load_recipe
    from rlprm.prerequisites import PrerequisiteError, check_task_files, ensure_prerequisites

    recipe = load_recipe(RECIPE)
    assert recipe.model.generator == "Qwen/Qwen2.5-Math-1.5B-Instruct" and recipe.model.dtype == "bfloat16"
    assert recipe.deepspeed.name == "zero2.json" and recipe.reward.mode == "dense"
    assert recipe.task.prompt_template.format(problem="P").count("\\boxed{}") == 1
    stub = tmp_path / "train.jsonl"
    stub.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:35dc\nsize 446564\n")
    recipe = load_recipe(RECIPE, [f"task.train_path={stub}", f"task.test_path={tmp_path / 'absent.jsonl'}"])
    with pytest.raises(PrerequisiteError) as info:
        check_task_files(recipe)
    assert "Git LFS pointer stub" in str(info.value) and "task.test_path: file not found" in str(info.value)
    # the PRM is the output of prm_train_prm800k.yaml: never built automatically, and the message says how
    math = shared_file("math/math500_test.jsonl")
    recipe = load_recipe(RECIPE, [f"task.train_path={math}", f"task.test_path={math}"])
    if not Path(recipe.model.reward_model).exists():
        with pytest.raises(PrerequisiteError, match="prm_train_prm800k.yaml.*deepspeed --num_gpus 8"):
            ensure_prerequisites(recipe, log=lambda _: None)


def test_lora_and_zero3_variants_are_the_same_run_with_lora_or_zero3(tmp_path):
    """PPO accepts LoRA (it refused it before) and ZeRO-3; the variants differ from the ZeRO-2 recipe only there."""
    from rlprm.config import load_recipe
    from rlprm.rl.distributed import read_ds_config
    from rlprm.rl.ppo import PPO

    base, lora, zero3 = (load_recipe(r, [f"model.reward_model={tmp_path}"]) for r in (RECIPE, LORA, ZERO3))
    PPO().check(lora)  # no RLInputError: LoRA is trained, not refused
    assert lora.model.lora.enabled and 16 <= lora.model.lora.r <= 64 and lora.model.lora.dropout == 0.0
    assert lora.deepspeed.name == "zero2.json" and lora.rl.learning_rate == pytest.approx(10 * base.rl.learning_rate)
    assert not zero3.model.lora.enabled and read_ds_config(zero3)["zero_optimization"]["stage"] == 3
    base, lora, zero3 = (r.model_dump(exclude={"run", "tracking", "deepspeed"}) for r in (base, lora, zero3))
    assert zero3 == base  # the same run, sharded
    for settings in (base, lora):  # what LoRA changes: the adapters, their learning rate, a smaller critic
        settings["model"].pop("lora"), settings["rl"].pop("learning_rate"), settings["rl"].pop("value_layers")
    assert lora == base
    for path in (LORA, ZERO3):
        assert f"deepspeed --num_gpus 8 rlprm/train_rl.py recipes/{path.name}" in path.read_text()
        assert "UNTESTED ON GPUs" in path.read_text()


@pytest.mark.parametrize("recipe_path", [RECIPE, LORA, ZERO3], ids=["zero2", "lora", "zero3"])
def test_recipe_runs_with_tiny_stand_ins(tmp_path, recipe_path):
    math = shared_file("math/math500_test.jsonl")
    from rlprm.config import load_recipe

    gen, prm = stand_ins(tmp_path, math, load_recipe(recipe_path).task.prompt_template)
    run = run_tiny(recipe_path, gen, prm, math, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/answer_accuracy"] is not None and "rl/reward" in summary
    assert summary["dist/world_size"] == 1  # the recipe's DeepSpeed config made it train through an engine
    stage = 3 if recipe_path == ZERO3 else 2
    assert summary["dist/zero_stage"] == stage
    resolved = (run / "recipe.yaml").read_text()
    assert f"zero{stage}.json" in resolved and "dtype: bfloat16" in resolved and "mode: dense" in resolved
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model_type"] == "qwen2"  # the Qwen2.5-Math stand-in has its architecture
    assert not (run / "export" / "adapter_config.json").exists()  # LoRA merged: a plain HF folder
    adapters = (run / "checkpoints" / "epoch-0001" / "model" / "adapter_config.json").exists()
    assert adapters == (recipe_path == LORA)
