"""`rlprm prepare` end to end, on a tiny budget (the full run is the slow test)."""

import json
from pathlib import Path

import pytest

from rlprm.config import load_recipe
from rlprm.prepare import PrepareError, prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "sft.num_examples=400", "sft.batch_size=16", "sft.warmup_steps=2", "prepare_eval.num_problems=12",
    "prepare_eval.max_new_tokens=40", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1", "model.tiny.num_heads=2", "tracking.wandb=disabled",
]


def test_prepare_saves_a_loadable_generator(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml",
                         TINY + [f"run.output_dir={tmp_path}", "sft.time_budget_s=3", "prepare_eval.enforce_targets=false"])
    rates = prepare(recipe, progress=False)
    assert set(rates) >= {"well_formed", "answer_accuracy", "process_accuracy", "right_answer_wrong_process"}
    assert rates["train_steps"] >= 1
    gen = tmp_path / "generator"
    tok = AutoTokenizer.from_pretrained(gen)
    model = AutoModelForCausalLM.from_pretrained(gen)
    out = model.generate(**tok("5 +3\n", return_tensors="pt"), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= 1
    assert (tmp_path / "recipe.yaml").exists() and json.loads((tmp_path / "summary.json").read_text())["train_steps"] >= 1
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("prepare/process_accuracy" in r for r in logged)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "sft_work").exists()


def test_prepare_refuses_a_generator_that_misses_targets(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml",
                         TINY + [f"run.output_dir={tmp_path}", "sft.time_budget_s=1", "sft.max_steps=2"])
    with pytest.raises(PrepareError, match="missed its targets: .*process accuracy"):
        prepare(recipe, progress=False)
    assert not (tmp_path / "generator").exists()
    assert (tmp_path / "generator.rejected" / "config.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["targets_met"] is False


def test_prepare_only_builds_the_tiny_arithmetic_generator(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml", [f"run.output_dir={tmp_path}", "model.generator=org/model"])
    with pytest.raises(PrepareError, match="model.generator: tiny"):
        prepare(recipe, progress=False)


@pytest.mark.slow
def test_full_prepare_meets_its_targets(tmp_path):
    """The real recipe: about 6 minutes on 2 cores."""
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml", [f"run.output_dir={tmp_path}", "tracking.wandb=disabled"])
    rates = prepare(recipe, progress=False)
    assert rates["well_formed"] >= 0.95
    assert 0.30 <= rates["process_accuracy"] <= 0.80
    assert (tmp_path / "generator" / "config.json").exists()


def test_schedule_follows_the_slower_of_time_and_steps():
    from rlprm.prepare import _schedule_progress

    now = {"t": 0.0}
    clock = lambda: now["t"]  # noqa: E731
    time_only = _schedule_progress(clock, 300.0, 0)
    both = _schedule_progress(clock, 300.0, 700)
    now["t"] = 150.0
    assert time_only(100) == 0.5 and both(100) == pytest.approx(100 / 700)  # a slow machine: steps lag behind
    assert both(600) == 0.5                                                    # a fast one: time lags behind
    now["t"] = 300.0
    assert time_only(10) == 1.0 and both(699) < 1.0 and both(700) == 1.0    # the budget alone does not stop it
    now["t"] = 900.0
    assert both(5000) == 1.0
