"""Shipped recipes (issue 24 row 15): run by name wherever rlprm is installed, and never write into the package.

The fast tests fake an installed package (a folder that is not a clone, holding recipes/) by pointing
rlprm.shipped's package folder at it; the last test builds the real wheel, installs it with `pip --target` and runs
the `rlprm` module from an empty working directory (about 5 s on 2 CPU cores, most of it pip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlprm import cli, shipped
from rlprm import prerequisites as pre
from rlprm.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_a_bare_name_is_the_shipped_recipe_in_a_clone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_recipe("prm_dense")
    by_file = load_recipe(ROOT / "recipes" / "prm_dense.yaml")
    # in a clone the link resolves to recipes/: paths stay relative to the recipe file, as they always were
    assert not shipped.is_shipped(by_name.source)
    assert by_name.run.output_dir == by_file.run.output_dir == ROOT / "runs" / "rl_prm_dense"
    assert load_recipe("prm_dense.yaml").model.generator == by_file.model.generator


def test_an_unknown_name_says_which_recipes_ship(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as err:
        load_recipe("prm_dens")
    assert "recipe not found: prm_dens" in str(err.value) and "did you mean prm_dense?" in str(err.value)
    assert "outcome_gt" in str(err.value)


def test_rlprm_recipes_lists_every_shipped_recipe(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert [line.split()[0] for line in out.splitlines() if line.strip()] == names
    assert "PPO on the arithmetic task with DENSE process rewards" in out


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A fake installed package (its recipes/ and deepspeed_configs/ real copies, not links into a clone) and an
    empty working directory."""
    package = tmp_path.resolve() / "site-packages" / "rlprm"
    shutil.copytree(ROOT / "recipes", package / "recipes")
    shutil.copytree(ROOT / "deepspeed_configs", package / "deepspeed_configs")
    monkeypatch.setattr(shipped, "package_dir", lambda: package)
    monkeypatch.setattr(pre, "package_dir", lambda: package)
    monkeypatch.setattr(pre, "RECIPES_DIR", package / "recipes")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return package, work


def test_a_shipped_recipe_writes_beside_the_working_directory(installed):
    package, work = installed
    recipe = load_recipe("prm_dense")
    assert shipped.is_shipped(recipe.source)
    # ../runs/... as if the recipe were ./recipes/prm_dense.yaml: nothing resolves into the package
    assert recipe.run.output_dir == work / "runs" / "rl_prm_dense"
    assert recipe.model.generator == str(work / "runs" / "arith" / "generator")
    assert recipe.model.reward_model == str(work / "runs" / "arith_prm" / "reward_model")
    # the embedded recipes' products resolve by the same rule, so the job finds who builds its generator
    builder, file, built = pre.find_builder(Path(recipe.model.generator), pre.recipe_folder(recipe))
    assert file == package / "recipes" / "arith_prepare.yaml" and built.run.output_dir == work / "runs" / "arith"
    assert builder.cli == "rlprm prepare arith_prepare"  # a name the installed command takes, not recipes/FILE


def test_a_shipped_recipe_reads_the_packages_deepspeed_config(installed):
    package, work = installed
    recipe = load_recipe("prm_dense_qwen_math")
    assert recipe.deepspeed == package / "deepspeed_configs" / "zero2.json"
    assert recipe.run.output_dir.is_relative_to(work)
    # the user's own config beside the working directory wins over the package's
    (work / "deepspeed_configs").mkdir()
    (work / "deepspeed_configs" / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_recipe("prm_dense_qwen_math").deepspeed == work / "deepspeed_configs" / "zero2.json"


def test_a_missing_file_of_a_shipped_recipe_states_the_rule(installed):
    package, work = installed
    (package / "recipes" / "odd.yaml").write_text("run:\n  output_dir: ../runs/odd\ndeepspeed: ../nowhere.json\n")
    with pytest.raises(RecipeError) as err:
        load_recipe("odd")
    assert "file not found: " + str(work / "nowhere.json") in str(err.value)
    assert "as if the recipe were ./recipes/NAME.yaml" in str(err.value)


def test_a_prerequisite_of_a_shipped_recipe_is_built_in_the_working_directory(installed, monkeypatch):
    package, work = installed
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(pre.subprocess, "run", fake_run)
    recipe = load_recipe("prm_dense")
    with pytest.raises(pre.PrerequisiteError, match="failed"):
        pre.ensure("model.generator", Path(recipe.model.generator), progress=False, near=pre.recipe_folder(recipe),
                   log=lambda line: None)
    cmd, kwargs = calls[0]
    assert cmd[-3:] == ["prepare", str(package / "recipes" / "arith_prepare.yaml"), "--no-progress"]
    # no cwd: the child runs where this job runs (so ../runs/ is ./runs/), importing this very package first
    assert kwargs.get("cwd") is None
    assert kwargs["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(package.parent)
    assert not (package / "runs").exists() and not (package.parent / "runs").exists()


def test_an_eval_of_a_shipped_recipe_names_outputs_in_the_working_directory(installed, capsys):
    package, work = installed
    assert cli.main(["eval", "bon_eval"]) == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith(f"error: model.generator: {work / 'runs' / 'arith' / 'generator'} does not exist")
    assert "`rlprm prepare arith_prepare`" in first
    assert str(package) not in err and not (work / "runs").exists()


def test_the_wheel_runs_shipped_recipes_by_name(tmp_path):
    """The real thing: `pip wheel` from a copy of the source, `pip install --target`, run from an empty folder."""
    # offline, so without build isolation: the build backend must be installed here (Python 3.12+ venvs lack it)
    pytest.importorskip("setuptools.build_meta", reason="setuptools is not installed: `pip install setuptools`")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("rlprm", "recipes", "deepspeed_configs"):  # rlprm/recipes stays a link into the copy
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("rlprm-*.whl")
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    assert (target / "rlprm" / "recipes" / "prm_dense.yaml").is_file()
    assert not (target / "rlprm" / "recipes").is_symlink()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}

    def rlprm(*args):
        return subprocess.run([sys.executable, "-m", "rlprm.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)

    assert rlprm("check", "prm_dense").stdout.strip() == "prm_dense: ok"
    config = yaml.safe_load(rlprm("check", "prm_dense", "--print-config").stdout)
    assert config["run"]["output_dir"] == str(work / "runs" / "rl_prm_dense")
    assert config["model"]["generator"] == str(work / "runs" / "arith" / "generator")
    config = yaml.safe_load(rlprm("check", "prm_dense_qwen_math", "--print-config").stdout)
    assert config["deepspeed"] == str(target / "rlprm" / "deepspeed_configs" / "zero2.json")
    proc = rlprm("eval", "bon_eval")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: model.generator: {work / 'runs' / 'arith' / 'generator'} does not exist; "
                                  "build it first with `rlprm prepare arith_prepare`")
    assert str(target) not in proc.stderr
    listing = rlprm("recipes")
    assert "prm_dense " in listing.stdout and "as if the recipe were ./recipes/NAME.yaml" in listing.stderr
    assert sorted(p.name for p in work.iterdir()) == [] and not (target / "runs").exists()


def test_a_shipped_recipes_missing_data_names_the_rule(installed):
    from rlprm.inputs import data_problems

    package, work = installed
    problems = data_problems(load_recipe("prm_dense_qwen_math"), "train-rl")
    # ../../prm800k/... of ./recipes/NAME.yaml: beside the working directory, where a clone's data would sit
    assert problems[0].startswith(f"task.train_path: file not found: {work.parent / 'prm800k'}")
    assert shipped.PATH_RULE in problems[0] and str(package) not in problems[0]
    with pytest.raises(pre.PrerequisiteError, match="as if the recipe were ./recipes/NAME.yaml"):
        pre.check_task_files(load_recipe("prm_dense_qwen_math"))
