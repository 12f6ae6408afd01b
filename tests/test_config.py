import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlprm.config import Recipe, RecipeError, explain, load_recipe, recipe_to_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(recipe):
    loaded = load_recipe(recipe)
    assert isinstance(loaded, Recipe)
    # a recipe's header says how to launch it
    assert recipe.read_text().startswith("#"), f"{recipe.name} needs a header comment saying how to launch it"


def test_there_are_recipes():
    assert RECIPES


def test_unknown_key_names_key_line_and_suggestion(tmp_path):
    path = write(tmp_path, """\
        run:
          name: x
          seeed: 3
        """)
    msg = error_of(path)
    assert f"{path}:3" in msg
    assert "run.seeed" in msg and "unknown key" in msg
    assert "Did you mean `run.seed`" in msg


def test_unknown_section(tmp_path):
    msg = error_of(write(tmp_path, "rewrd: {}\n"))
    assert "rewrd: unknown key" in msg and "Did you mean `reward`" in msg


def test_bad_choice_lists_the_choices(tmp_path):
    msg = error_of(write(tmp_path, "rl:\n  algorithm: ppoo\n"))
    assert "rl.algorithm: 'ppoo' is not one of ppo, grpo, rejection_sampling" in msg


def test_wrong_type(tmp_path):
    msg = error_of(write(tmp_path, "sft:\n  batch_size: lots\n"))
    assert "sft.batch_size" in msg and "expected an integer" in msg and "'lots'" in msg


def test_out_of_range(tmp_path):
    msg = error_of(write(tmp_path, "rl:\n  learning_rate: -1\n"))
    assert "rl.learning_rate: must be > 0" in msg


def test_missing_file_is_resolved_relative_to_recipe(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    msg = error_of(write(sub, "deepspeed: ../configs/nope.json\n"))
    assert "deepspeed" in msg and "file not found" in msg
    assert str(tmp_path / "configs" / "nope.json") in msg


def test_existing_file_resolves_relative_to_recipe(tmp_path, monkeypatch):
    (tmp_path / "ds.json").write_text("{}")
    sub = tmp_path / "recipes"
    sub.mkdir()
    monkeypatch.chdir("/")
    recipe = load_recipe(write(sub, "deepspeed: ../ds.json\nrun:\n  output_dir: ../runs/x\n"))
    assert recipe.deepspeed == tmp_path / "ds.json"
    assert recipe.run.output_dir == tmp_path / "runs" / "x"


def test_cross_field_check(tmp_path):
    msg = error_of(write(tmp_path, "task:\n  arithmetic:\n    min_ops: 4\n    max_ops: 2\n"))
    assert "task.arithmetic" in msg and "min_ops" in msg and "make min_ops <= max_ops" in msg


def test_dense_reward_needs_prm(tmp_path):
    msg = error_of(write(tmp_path, "reward:\n  mode: dense\n  source: orm\n"))
    assert "reward.source: prm" in msg


def test_all_problems_reported_at_once(tmp_path):
    msg = error_of(write(tmp_path, "rl:\n  algorithm: x\n  epochs: 0\nsft:\n  batch_size: y\n"))
    assert "3 problem(s)" in msg


def test_removed_sft_clock_keys_name_sft_steps_and_why(tmp_path):
    """An old recipe budgeted in seconds fails with what replaced each key, every problem at once, file:line."""
    path = write(tmp_path, """\
        sft:
          num_examples: 100
          time_budget_s: 300
          min_steps: 700
          max_steps: 5000
          batch_size: 0
        """)
    msg = error_of(path)
    assert "4 problem(s)" in msg and "sft.batch_size: must be >= 1" in msg
    for line, key in [(3, "time_budget_s"), (4, "min_steps"), (5, "max_steps")]:
        text = next(part for part in msg.splitlines() if f"sft.{key}:" in part)
        assert text.startswith(f"{path}:{line}: sft.{key}: removed:") and "Use `sft.steps`" in text
        assert "same number of steps on any machine" in text and "unknown key" not in text
    assert "Use `sft.steps`" in error_of(write(tmp_path, "run: {seed: 1}\n"), ["sft.time_budget_s=60"])


def test_invalid_yaml_names_the_line(tmp_path):
    msg = error_of(write(tmp_path, "run:\n  name: [unclosed\n  seed: 1\n"))
    assert "not valid YAML" in msg and str(tmp_path / "recipe.yaml") in msg


def test_recipe_must_be_a_mapping(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_missing_recipe_file(tmp_path):
    assert "recipe not found" in error_of(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\n")
    recipe = load_recipe(path, ["run.seed=7", "rl.algorithm=grpo", "tracking.tags=[a, b]", "eval.temperature=0.5"])
    assert (recipe.run.seed, recipe.rl.algorithm, recipe.tracking.tags, recipe.eval.temperature) == (7, "grpo", ["a", "b"], 0.5)
    assert "rl.algorithm: 'nope' is not one of" in error_of(path, ["rl.algorithm=nope"])
    assert "expected key=value" in error_of(path, ["rl.algorithm"])
    assert "unknown key" in error_of(path, ["rl.lr=1"])
    assert "is a value, not a section" in error_of(path, ["run.seed.x=1"])


def test_print_config_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "run:\n  name: abc\n"))
    again = write(tmp_path, recipe_to_yaml(recipe), name="resolved.yaml")
    assert load_recipe(again).model_dump() == recipe.model_dump()


def test_every_field_is_documented():
    text = explain()
    assert "rl.algorithm" in text and "task.arithmetic.corrupt_rate" in text
    for line in text.splitlines():
        assert not line.rstrip().endswith(":") and not line.rstrip().endswith("): "), f"undocumented: {line}"


def test_validation_imports_nothing_heavy(tmp_path):
    """Bad recipes must fail fast: validation may not import torch, transformers or deepspeed."""
    path = write(tmp_path, "rl:\n  algorithm: ppoo\n")
    code = (
        "import sys\nfrom rlprm.config import load_recipe, RecipeError\n"
        f"try:\n    load_recipe({str(path)!r})\nexcept RecipeError:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'wandb', 'trl') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_dense_rewards_from_the_exact_checker_and_the_start_confidence(tmp_path):
    for source in ("exact", "confidence"):
        for form in ("log_prob", "min_form", "delta"):
            recipe = load_recipe(write(tmp_path, f"reward:\n  mode: dense\n  source: {source}\n  dense_form: {form}\n"))
            assert recipe.reward.source == source and recipe.model.reward_model is None
        assert load_recipe(write(tmp_path, f"reward:\n  source: {source}\n")).reward.mode == "sparse"
    # grpo takes exact (its reward function scores steps with the checker)
    load_recipe(write(tmp_path, "rl:\n  algorithm: grpo\nreward:\n  mode: dense\n  source: exact\n"))


def test_reward_sources_refused_where_they_cannot_work(tmp_path):
    math_task = "task:\n  name: math\n  test_path: test.jsonl\nreward:\n  source: exact\n"
    msg = error_of(write(tmp_path, math_task))
    assert "exact step checker" in msg and "task `math` has no step checker" in msg
    msg = error_of(write(tmp_path, "rl:\n  algorithm: grpo\nreward:\n  source: confidence\n"))
    assert "confidence" in msg and "rl.algorithm ppo" in msg
    for source in ("exact", "confidence"):
        msg = error_of(write(tmp_path, f"rl:\n  algorithm: rejection_sampling\nreward:\n  source: {source}\n"))
        assert "rejection_sampling" in msg


def test_log_prob_needs_a_missing_answer_reward_below_the_answered_floor(tmp_path):
    msg = error_of(write(tmp_path, "reward:\n  mode: dense\n  source: exact\n  missing_answer_reward: 0.0\n"))
    assert "missing_answer_reward must be below -0.1" in msg
    # the other forms return at least 0 and take any missing-answer reward
    load_recipe(write(tmp_path, "reward:\n  mode: dense\n  source: exact\n  dense_form: min_form\n"
                                "  missing_answer_reward: 0.0\n"))
