import subprocess
import sys
from pathlib import Path

import pytest

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


def test_explain_recipe_shows_the_recipes_values(tmp_path, capsys):
    """`rlprm explain RECIPE` prints what that recipe runs with, not only the schema's defaults."""
    from rlprm.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("run:\n  seed: 7\nrl:\n  algorithm: grpo\n  kl_coef: 0.123\n")
    assert main(["explain", str(recipe)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines["run.seed"].startswith("  run.seed = 7 (int, default 0)")
    assert "rl.kl_coef = 0.123" in lines["rl.kl_coef"] and "default 0.04" in lines["rl.kl_coef"]
    assert "task.name = 'arithmetic'" in lines["task.name"]  # a key the recipe leaves out: its default, as a value
    # without a recipe there is nothing to show but the defaults
    assert main(["explain"]) == 0
    assert "  run.seed (int, default 0)" in capsys.readouterr().out


# --------------------------------------------------------------------------- in process: the table and the wrapper


def test_flags_anywhere_and_print_config_for_recipe_commands(capsys):
    from rlprm.cli import main

    assert main(["prepare", str(RECIPE), "--print-config", "run.seed=9", "--no-progress"]) == 0
    assert "seed: 9" in capsys.readouterr().out
    # train-rl delegates to rlprm/train_rl.py's run, which loads the recipe itself
    assert main(["train-rl", str(ROOT / "recipes" / "prm_dense.yaml"), "--print-config", "run.seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out


def test_errors_become_exit_codes_and_one_line_on_stderr(capsys):
    from rlprm.experiments.demo import DemoError
    from rlprm.errors import run_reporting_errors
    from rlprm.experiments.prepare import PrepareError
    from rlprm.prerequisites import PrerequisiteError
    from rlprm.reward.model import RewardModelError
    from rlprm.rl.distributed import DistributedError
    from rlprm.rl.run import RLError, RLInputError

    class Stopped(RuntimeError):
        exit_code = 4

    def raising(exc):
        raise exc

    cases = [(PrerequisiteError("model.generator: missing"), 2), (RewardModelError("an ORM"), 2),
             (DistributedError("WORLD_SIZE"), 2), (FileNotFoundError("no checkpoint"), 2),
             (PrepareError("targets missed"), 3), (Stopped("non-finite loss"), 4), (DemoError("stage x failed"), 1),
             (RLInputError("needs --resume"), 2), (RLError("the PPO loss is not finite"), 4)]
    for exc, code in cases:
        assert run_reporting_errors(raising, exc) == code
        assert capsys.readouterr().err == f"error: {exc}\n"
    assert run_reporting_errors(lambda: None) == 0 and run_reporting_errors(lambda: 5) == 5
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_reporting_errors(lambda: 1 / 0)


def test_export_without_a_checkpoint_exits_2(tmp_path, capsys):
    from rlprm.cli import main

    assert main(["export", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} has no complete checkpoint")


def test_dependency_noise_is_dropped_and_their_other_warnings_kept():
    """Issue 24: every job printed DeepSpeed's 'Setting accelerator to CPU' warning (DeepSpeed guesses its
    accelerator at import; CPU is what the job runs on). The job's wrapper drops it; DeepSpeed's other warnings stay."""
    import logging

    from rlprm.errors import run_reporting_errors

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("DeepSpeed")
    keep = Keep()
    logger.addHandler(keep)
    try:
        def job():
            logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
            logger.warning("ZeRO-3 is gathering the weights")

        assert run_reporting_errors(job) == 0
    finally:
        logger.removeHandler(keep)
    assert seen == ["ZeRO-3 is gathering the weights"]


def test_dependency_deprecation_noise_is_ignored_and_other_future_warnings_kept():
    """Issue 24: GRPO jobs printed transformers' FutureWarnings about gradient checkpointing's new name, raised by
    TRL's own calls; the job's wrapper ignores those, and keeps every other FutureWarning."""
    import warnings

    from rlprm.errors import run_reporting_errors

    def job():
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
                      "`activation_checkpointing_enable` instead.", FutureWarning)
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`max_length` is deprecated", FutureWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_reporting_errors(job) == 0
    assert [str(w.message) for w in caught] == ["`max_length` is deprecated"]
