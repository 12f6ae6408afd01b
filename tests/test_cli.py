import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arith_prepare.yaml"


def rlprm(*args):
    return subprocess.run([sys.executable, "-m", "rlprm.cli", *map(str, args)], capture_output=True, text=True)


def test_help_lists_commands():
    out = rlprm("--help")
    assert out.returncode == 0 and "prepare" in out.stdout and "explain" in out.stdout
    sub = rlprm("prepare", "--help")
    assert sub.returncode == 0 and "--print-config" in sub.stdout and "key.sub=value" in sub.stdout


def test_bad_recipe_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  algorithm: ppoo\n")
    out = rlprm("prepare", bad)
    assert out.returncode == 2
    assert f"{bad}:2: rl.algorithm: 'ppoo' is not one of ppo, grpo, rejection_sampling" in out.stderr


def test_bad_override_exits_2():
    out = rlprm("check", RECIPE, "sft.batch_size=-4")
    assert out.returncode == 2 and "sft.batch_size: must be >= 1" in out.stderr


def test_check_and_print_config():
    assert rlprm("check", RECIPE).returncode == 0
    out = rlprm("prepare", RECIPE, "run.seed=9", "--print-config")
    assert out.returncode == 0 and "seed: 9" in out.stdout and str(ROOT / "runs" / "arith") in out.stdout


def test_explain_documents_every_key():
    out = rlprm("explain")
    assert out.returncode == 0 and "sft.steps" in out.stdout and "reward.dense_form" in out.stdout
