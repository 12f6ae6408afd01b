"""Missing prerequisites: which embedded recipe builds a missing path, chaining, reuse, and clear failures.

The fast tests replace the build itself (a 5-minute SFT) with a stand-in that
writes the product's files; the slow one runs the real `rlprm prepare` and
`rlprm train-rm` on tiny recipes through the RL entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlprm import prerequisites as pre
from rlprm.config import load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]

TINY_PREPARE = """
run: {output_dir: ../runs/arith, seed: 0, threads: 1, device: cpu}
task: {name: arithmetic}
model:
  generator: tiny
  tiny: {hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 2}
sft: {num_examples: 64, steps: 2, batch_size: 8}
prepare_eval: {num_problems: 4, max_new_tokens: 24, enforce_targets: false}
tracking: {wandb: disabled}
"""

TINY_RM = """
run: {output_dir: ../runs/arith_KIND, seed: 0, threads: 1, device: cpu}
task: {name: arithmetic}
model: {generator: ../runs/arith/generator}
rm:
  kind: KIND
  backbone: generator
  data: {train_problems: 4, samples_per_problem: 2, eval_problems: 2, eval_samples_per_problem: 2, max_new_tokens: 24}
  max_steps: 2
  batch_size: 4
tracking: {wandb: disabled}
"""


@pytest.fixture
def tiny_recipes(tmp_path, monkeypatch):
    """Tiny stand-ins for the three embedded recipes, in tmp/recipes (products land in tmp/runs)."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "arith_prepare.yaml").write_text(TINY_PREPARE)
    for kind in ("prm", "orm"):
        (recipes / f"{kind}_train.yaml").write_text(TINY_RM.replace("KIND", kind))
    monkeypatch.setattr(pre, "RECIPES_DIR", recipes)
    return tmp_path


def rl_recipe(tmp: Path, source: str = "prm", **model):
    data = {"run": {"output_dir": str(tmp / "rl")},
            "model": {"generator": str(tmp / "runs" / "arith" / "generator"),
                      "reward_model": str(tmp / "runs" / f"arith_{source}" / "reward_model"), **model},
            "reward": {"mode": "sparse", "source": source}}
    return validate_recipe(data, tmp)


def fake_build(calls):
    """Writes what a complete product holds, and records which recipe would have run."""

    def build(builder, file, progress, log, wandb=None):
        built = load_recipe(file)
        out = Path(built.run.output_dir) / builder.product
        if builder.command == "train-rm":  # it reads the generator: that must have been built first
            assert pre.is_complete(Path(built.model.generator)), "the generator was not built before the RM"
        out.mkdir(parents=True, exist_ok=True)
        for name in (*builder.required_files, "model.safetensors"):
            (out / name).write_text("{}")
        calls.append(file.name)

    return build


def test_embedded_recipes_map_to_the_shipped_rl_recipes_paths():
    """Every model path a shipped RL recipe names is the product of an embedded recipe (a fresh clone can build it)."""
    rl_recipes = [ROOT / "recipes" / name for name in
                  ("prm_dense.yaml", "orm_sparse.yaml", "outcome_gt.yaml", "exact_dense.yaml", "confidence_dense.yaml",
                   "rejection_sampling.yaml")]
    for path in rl_recipes:
        for key, model in pre.required_models(load_recipe(path)):
            found = pre.find_builder(model)
            assert found is not None, f"{path.name}: {key} {model} has no builder"
    assert pre.find_builder(ROOT / "runs" / "arith" / "generator")[0].recipe == "arith_prepare.yaml"
    assert pre.find_builder(ROOT / "runs" / "arith_orm" / "reward_model")[0].recipe == "orm_train.yaml"
    assert pre.find_builder(ROOT / "runs" / "arith" / "elsewhere") is None


def test_error_hints_name_the_builder_from_the_table(tiny_recipes, monkeypatch):
    runs = tiny_recipes / "runs"
    assert pre.builder_hint(runs / "arith" / "generator") == "rlprm prepare recipes/arith_prepare.yaml"
    assert pre.builder_hint(runs / "arith_orm" / "reward_model") == "rlprm train-rm recipes/orm_train.yaml"
    assert pre.builder_hint(runs / "elsewhere") is None
    generator = runs / "arith" / "generator"
    assert pre.generator_hint() == f"`rlprm prepare recipes/arith_prepare.yaml` (it writes {generator})"
    # the table is the one source: a renamed builder recipe changes every hint
    renamed = pre.Builder("prepare", "gen.yaml", "generator", ("config.json",), 5.0)
    (tiny_recipes / "recipes" / "gen.yaml").write_text(TINY_PREPARE)
    monkeypatch.setattr(pre, "BUILDERS", (renamed, *pre.BUILDERS[1:]))
    assert pre.builder_hint(runs / "arith" / "generator") == "rlprm prepare recipes/gen.yaml"
    assert pre.generator_hint().startswith("`rlprm prepare recipes/gen.yaml`")


def test_train_rm_and_active_learning_take_their_hints_from_the_table(tiny_recipes, monkeypatch):
    from rlprm.experiments.active import ActiveLearningError, load_pools
    from rlprm.train_rm import TrainRMError, check_inputs

    renamed = pre.Builder("prepare", "gen.yaml", "generator", ("config.json",), 5.0)
    (tiny_recipes / "recipes" / "gen.yaml").write_text(TINY_PREPARE)
    monkeypatch.setattr(pre, "BUILDERS", (renamed, *pre.BUILDERS[1:]))
    recipe = load_recipe(tiny_recipes / "recipes" / "prm_train.yaml")
    with pytest.raises(TrainRMError, match="Make it with `rlprm prepare recipes/gen.yaml`"):
        check_inputs(recipe)
    with pytest.raises(ActiveLearningError, match="make one with `rlprm prepare recipes/gen.yaml`"):
        load_pools(recipe)


def test_missing_chain_is_built_in_order_then_reused(tiny_recipes, monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(pre, "_run_build", fake_build(calls))
    recipe = rl_recipe(tiny_recipes)
    assert pre.ensure_prerequisites(recipe, log=lines.append) == ["model.generator", "model.reward_model"]
    assert calls == ["arith_prepare.yaml", "prm_train.yaml"]
    assert any("model.generator" in ln and "building it with `rlprm prepare recipes/arith_prepare.yaml`" in ln
               for ln in lines)
    # complete products are never rebuilt; the ORM reuses the generator and builds only itself
    lines.clear()
    assert pre.ensure_prerequisites(recipe, log=lines.append) == []
    assert calls == ["arith_prepare.yaml", "prm_train.yaml"]
    assert all("not rebuilt" in ln for ln in lines)
    assert pre.ensure_prerequisites(rl_recipe(tiny_recipes, "orm"), log=lines.append) == ["model.reward_model"]
    assert calls[-1] == "orm_train.yaml" and len(calls) == 3


def test_incomplete_product_is_rebuilt_and_failed_build_is_reported(tiny_recipes, monkeypatch):
    calls = []
    monkeypatch.setattr(pre, "_run_build", fake_build(calls))
    gen = tiny_recipes / "runs" / "arith" / "generator"
    gen.mkdir(parents=True)
    (gen / "config.json").write_text("{}")  # no weights: an interrupted copy, not a model
    assert not pre.is_complete(gen)
    assert pre.ensure_prerequisites(rl_recipe(tiny_recipes, "ground_truth"), log=lambda _: None) == ["model.generator"]
    assert calls == ["arith_prepare.yaml"] and pre.is_complete(gen)
    import shutil

    shutil.rmtree(gen)

    def failing(builder, file, progress, log, wandb=None):
        raise pre.PrerequisiteError(f"building with `rlprm {builder.command} {file}` failed (exit code 3)")

    monkeypatch.setattr(pre, "_run_build", failing)
    with pytest.raises(pre.PrerequisiteError, match="arith_prepare.yaml` failed"):
        pre.ensure_prerequisites(rl_recipe(tiny_recipes, "ground_truth"), log=lambda _: None)

    def silent(builder, file, progress, log, wandb=None):  # exits 0 but writes nothing
        pass

    monkeypatch.setattr(pre, "_run_build", silent)
    with pytest.raises(pre.PrerequisiteError, match="still incomplete"):
        pre.ensure_prerequisites(rl_recipe(tiny_recipes, "ground_truth"), log=lambda _: None)


def test_missing_path_that_no_recipe_builds_exits_2_naming_the_key(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "config.json").write_text('{"model_type": "llama"}')
    (gen / "model.safetensors").write_text("{}")
    (gen / "tokenizer.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  generator: {gen}\n  reward_model: ./nowhere/prm\nreward:\n  source: prm\n"
                      "run:\n  output_dir: ./out\n")
    out = subprocess.run([sys.executable, str(ROOT / "rlprm" / "train_rl.py"), str(recipe), "--no-progress"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert f"model.reward_model: {tmp_path / 'nowhere' / 'prm'} does not exist" in out.stderr
    assert "rlprm train-rm recipes/prm_train.yaml" in out.stderr  # says how it could be made
    assert out.stdout == ""  # refused before the prerequisites are even looked at (rlprm/inputs.py)


@pytest.mark.slow
def test_real_builds_through_the_rl_entry_point(tiny_recipes):
    """`rlprm prepare` and `rlprm train-rm` really run (tiny budgets), chained, then the RL job uses their output."""
    rl = tiny_recipes / "recipes" / "rl.yaml"
    rl.write_text(
        "run: {output_dir: ../runs/rl, device: cpu, threads: 1}\n"
        "model: {generator: ../runs/arith/generator, reward_model: ../runs/arith_prm/reward_model}\n"
        "reward: {mode: sparse, source: prm}\n"
        "rl: {algorithm: rejection_sampling, epochs: 1, problems_per_epoch: 2, samples_per_problem: 2,\n"
        "     max_new_tokens: 16, eval_n_max: 0}\n"
        "tracking: {wandb: disabled}\n")
    code = ("import sys; from rlprm import prerequisites as p; from pathlib import Path; "
            f"p.RECIPES_DIR = Path({str(tiny_recipes / 'recipes')!r}); "
            "from rlprm.train_rl import main; sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(rl), "--no-progress"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "model.generator: " in out.stdout and "building it with `rlprm prepare" in out.stdout
    assert "building it with `rlprm train-rm recipes/prm_train.yaml`" in out.stdout
    assert pre.is_complete(tiny_recipes / "runs" / "arith_prm" / "reward_model", ("rlprm_rm.json",))
    assert (tiny_recipes / "runs" / "rl" / "export" / "config.json").is_file()
    again = subprocess.run([sys.executable, "-c", code, str(rl), "rl.epochs=2", "--resume", "--no-progress"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "building" not in again.stdout and again.stdout.count("not rebuilt") == 2


@pytest.mark.parametrize("source", ["exact", "confidence", "ground_truth"])
def test_sources_without_a_reward_model_need_none(tmp_path, source):
    """exact (the checker) and confidence (the start's own log-probs) load no reward model: a stale or missing
    model.reward_model is not read, not built, and not required by PPO's own check."""
    from rlprm.rl.ppo import PPO

    recipe = rl_recipe(tmp_path, source)
    assert [key for key, _ in pre.required_models(recipe)] == ["model.generator"]
    recipe.model.reward_model = None
    gen = tmp_path / "runs" / "arith" / "generator"
    gen.mkdir(parents=True)
    PPO().check(recipe)  # raises if it wanted a reward model


def test_a_build_runs_with_the_jobs_tracking_setting(tiny_recipes, monkeypatch):
    """Issue 24 row 14: a generator built for `train-rl ... tracking.wandb=disabled` still created a W&B offline run
    (the embedded recipe's own setting). The build's command line carries the job's setting."""
    from types import SimpleNamespace

    commands = []

    def fake_run(cmd, cwd=None, env=None):  # the child `rlprm CMD RECIPE ...`: writes what a complete product holds
        commands.append(cmd)
        builder = next(b for b in pre.BUILDERS if b.recipe == Path(cmd[4]).name)
        out = Path(load_recipe(cmd[4]).run.output_dir) / builder.product
        out.mkdir(parents=True)
        for name in (*builder.required_files, "model.safetensors"):
            (out / name).write_text("{}")
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(pre.subprocess, "run", fake_run)
    recipe = rl_recipe(tiny_recipes, "prm")
    recipe.tracking.wandb = "disabled"
    pre.ensure_prerequisites(recipe, log=lambda _: None)
    assert [Path(cmd[4]).name for cmd in commands] == ["arith_prepare.yaml", "prm_train.yaml"]
    assert all("tracking.wandb=disabled" in cmd for cmd in commands)


def test_embedded_recipes_are_found_beside_the_recipe_passed_in(tmp_path, monkeypatch):
    """Issue 24 row 15: the embedded recipes were looked up beside the installed package only, so a second checkout
    sharing the first one's virtualenv (or a wheel, with no recipes/ beside the package) could not build its own
    prerequisites. Here the package's recipes are the first checkout's; the job's recipe is the second's."""
    for checkout in ("first", "second"):
        recipes = tmp_path / checkout / "recipes"
        recipes.mkdir(parents=True)
        (recipes / "arith_prepare.yaml").write_text(TINY_PREPARE)
        for kind in ("prm", "orm"):
            (recipes / f"{kind}_train.yaml").write_text(TINY_RM.replace("KIND", kind))
    monkeypatch.setattr(pre, "RECIPES_DIR", tmp_path / "first" / "recipes")
    calls = []
    monkeypatch.setattr(pre, "_run_build", fake_build(calls))
    job = tmp_path / "second" / "recipes" / "rl.yaml"
    job.write_text("run: {output_dir: ../runs/rl}\nmodel: {generator: ../runs/arith/generator, "
                   "reward_model: ../runs/arith_prm/reward_model}\nreward: {source: prm}\n")
    assert pre.ensure_prerequisites(load_recipe(job), log=lambda _: None) == ["model.generator", "model.reward_model"]
    assert calls == ["arith_prepare.yaml", "prm_train.yaml"]
    assert pre.is_complete(tmp_path / "second" / "runs" / "arith_prm" / "reward_model")
    assert not (tmp_path / "first" / "runs").exists()  # nothing built into the other checkout
