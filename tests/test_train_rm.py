"""`rlprm train-rm` end to end on tiny models: the shipped recipes, with small overrides."""

import json
import os
import subprocess
import sys

import pytest

from rlprm.config import load_recipe
from rlprm.tracking import read_metrics

from .conftest import RECIPES, ROOT, shared_file
SMALL = ["tracking.wandb=disabled", "run.device=cpu", "rm.data.train_problems=8", "rm.data.samples_per_problem=2",
         "rm.data.eval_problems=4", "rm.data.eval_samples_per_problem=2", "rm.data.max_new_tokens=40",
         "rm.epochs=1", "rm.batch_size=4", "rm.logging_steps=1"]


def run_job(recipe_name, tmp_path, generator, *extra):
    from rlprm.train_rm import train_rm

    recipe = load_recipe(RECIPES / recipe_name, [f"model.generator={generator}", f"run.output_dir={tmp_path / 'run'}",
                                                 f"rm.data.cache_dir={tmp_path / 'cache'}", *SMALL, *extra])
    return train_rm(recipe, progress=False)


HEAD = ["rm.scorer=head", "rm.max_steps=0", "rm.extra_layers=2", "rm.freeze_backbone=true"]
"""The classification-head reward model (the shipped recipes use the LM scorer)."""


@pytest.mark.parametrize("recipe_name,kind", [("prm_train.yaml", "prm"), ("orm_train.yaml", "orm")])
def test_shipped_lm_scored_recipes_end_to_end(tmp_path, generator, recipe_name, kind):
    from transformers import PreTrainedModel

    from rlprm.reward.model import RewardModel

    summary = run_job(recipe_name, tmp_path, generator, "rm.max_steps=3", "rm.data.synthetic_per_problem=3")
    rm = RewardModel.load(tmp_path / "run" / "reward_model", step_separator="\n")
    assert rm.kind == kind and rm.convention.scorer == "lm" and len(rm.convention.lm_head) == 3
    assert isinstance(rm.model, PreTrainedModel) and rm.model.config.architectures[0].endswith("ForCausalLM")
    assert summary["scorer"] == "lm" and summary["train_steps"] == 3 and summary["lm_head"] == rm.convention.lm_head
    # the task's own solutions join the samples: 8 problems x 3
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["data/synthetic_records"] == 24
    # the baseline that could explain a result away is measured beside it
    assert "baseline_confidence/solution_auroc" in summary and "eval/solution_auroc" in summary
    if kind == "prm":
        assert "eval/step_auroc" in summary and "baseline_confidence/step_auroc" in summary


@pytest.mark.parametrize("recipe_name,kind", [("prm_train.yaml", "prm"), ("orm_train.yaml", "orm")])
def test_arithmetic_job_end_to_end(tmp_path, generator, recipe_name, kind):
    from rlprm.data.stepwise import read_records
    from rlprm.reward.model import RewardModel, SeparatorMismatch

    summary = run_job(recipe_name, tmp_path, generator, *HEAD)
    run = tmp_path / "run"
    # a checkpoint, metrics and a summary
    rm = RewardModel.load(run / "reward_model", step_separator="\n")
    assert rm.kind == kind and not (run / "reward_model.tmp").exists() and not (run / "rm_trainer_work").exists()
    with pytest.raises(SeparatorMismatch):
        RewardModel.load(run / "reward_model", step_separator="\n\n")
    # the recipe's architecture: the generator's 2 layers, frozen, and 2 new ones on top
    import torch
    from transformers import AutoModelForCausalLM

    gen = AutoModelForCausalLM.from_pretrained(generator)
    assert rm.model.config.num_hidden_layers == 4 and summary["extra_layers"] == 2
    assert torch.equal(rm.model.model.layers[1].mlp.up_proj.weight, gen.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(rm.model.model.layers[3].mlp.down_proj.weight, torch.zeros_like(gen.model.layers[1].mlp.down_proj.weight))
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["kind"] == kind and summary["train_steps"] >= 1
    for key in ("eval/solution_auroc", "eval/blind_spot_rate", "eval/best_of_n_process_accuracy"):
        assert key in summary
    if kind == "prm":
        for key in ("eval/step_accuracy", "eval/step_auroc", "eval/first_error_f1", "eval/solution_auroc_min"):
            assert key in summary
    records = read_metrics(run / "metrics.jsonl")
    assert any("train/loss" in r for r in records) and any("eval/num_solutions" in r for r in records)
    first = records[0]
    assert first["data/train_samples"] == 16 and first["data/train_from_cache"] is False
    assert first["data/eval_samples"] == 8 and summary["eval/num_solutions"] == first["data/eval_records"]
    assert first["data/eval_records"] == 8 - first["data/eval_empty"]  # a sample with no step at all is dropped
    # the labelled samples are cached, with the settings they were drawn with
    meta, cached = read_records(tmp_path / "cache" / "rm_samples_train.jsonl")
    assert meta["settings"]["samples_per_problem"] == 2 and len(cached) == first["data/train_records"]
    assert all(len(r.labels) == len(r.steps) for r in cached)


def test_rerun_reuses_the_sample_cache_and_resamples_on_change(tmp_path, generator):
    run_job("prm_train.yaml", tmp_path, generator, "rm.max_steps=1")
    run_job("prm_train.yaml", tmp_path, generator, "rm.max_steps=1")
    starts = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "data/train_from_cache" in r]
    assert [r["data/train_from_cache"] for r in starts] == [False, True]
    assert starts[1]["data/eval_from_cache"] is True
    run_job("prm_train.yaml", tmp_path, generator, "rm.max_steps=1", "rm.data.temperature=0.7")
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "data/train_from_cache" in r][-1]
    assert last["data/train_from_cache"] is False


def test_reward_model_trains_on_no_problem_the_generator_trained_on(tmp_path, generator, monkeypatch):
    """`rlprm train-rm`'s problems vs `rlprm prepare`'s, with the shipped recipes' sizes (the sampler stubbed)."""
    import rlprm.data.stepwise as stepwise
    from rlprm.experiments.prepare import training_data
    from rlprm.train_rm import arithmetic_data

    sampled = {}

    def sample(model, tokenizer, problems, n, **kwargs):
        sampled[kwargs["desc"]] = problems
        return [], {}

    monkeypatch.setattr(stepwise, "sample_arithmetic", sample)
    recipe = load_recipe(RECIPES / "prm_train.yaml", [f"model.generator={generator}", "tracking.wandb=disabled",
                                                      f"run.output_dir={tmp_path / 'run'}",
                                                      f"rm.data.cache_dir={tmp_path / 'cache'}"])
    arithmetic_data(recipe, progress=False)
    train, held_out = sampled["sampling train solutions"], sampled["sampling eval solutions"]
    _, _, rows, generator_held_out = training_data(load_recipe(RECIPES / "arith_prepare.yaml"))
    sft = {problem.text for problem, _, _ in rows}
    assert len(train) == recipe.rm.data.train_problems == 512 and len(sft) > 25_000
    assert not sft & {p.text for p in train}  # the generator memorised its SFT problems: none of them here
    # held out: the generator's own held-out problems, which RL evaluates on and the reward model never trains on
    assert [p.text for p in held_out] == [p.text for p in generator_held_out[:128]]
    assert not {p.text for p in generator_held_out} & {p.text for p in train}
    # the cache names its problems: samples cached for the problems drawn before this change are not reused
    meta, _ = stepwise.read_records(tmp_path / "cache" / "rm_samples_train.jsonl")
    assert meta["settings"]["problems_sha256"] == stepwise.problems_digest(train)


def test_fresh_tiny_backbone_with_lora(tmp_path, generator):
    summary = run_job("prm_train.yaml", tmp_path, generator, *HEAD, "rm.backbone=tiny", "model.tiny.hidden_size=32",
                      "model.tiny.intermediate_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
                      "model.lora.enabled=true", "model.lora.r=4", "rm.max_steps=2", "rm.freeze_backbone=false",
                      "rm.extra_layers=0")
    assert summary["backbone"] == "tiny" and summary["train_steps"] == 2


def test_lora_and_a_frozen_backbone_are_refused_together(tmp_path, generator):
    from rlprm.train_rm import TrainRMError, check_inputs

    recipe = load_recipe(RECIPES / "prm_train.yaml", [f"model.generator={generator}", "model.lora.enabled=true",
                                                      *HEAD])
    with pytest.raises(TrainRMError, match="pick one"):
        check_inputs(recipe)


def test_missing_inputs_are_reported_before_any_work(tmp_path):
    from rlprm.train_rm import TrainRMError, check_inputs

    recipe = load_recipe(RECIPES / "prm_train.yaml", [f"model.generator={tmp_path / 'nope'}",
                                                      f"run.output_dir={tmp_path}"])
    with pytest.raises(TrainRMError, match="model.generator: no checkpoint at .*rlprm prepare"):
        check_inputs(recipe)
    recipe = load_recipe(RECIPES / "prm_train_prm800k.yaml",
                         [f"rm.data.train_paths=[{tmp_path / 'phase2_train.jsonl'}]", "rm.data.processbench_paths=[]",
                          f"rm.data.eval_paths=[{tmp_path / 'phase2_test.jsonl'}]"])
    with pytest.raises(TrainRMError) as info:
        check_inputs(recipe)
    assert "rm.data.train_paths: file not found" in str(info.value) and "rm.data.eval_paths" in str(info.value)
    zero3 = load_recipe(RECIPES / "prm_train_prm800k.yaml", [f"deepspeed={ROOT / 'deepspeed_configs' / 'zero3.json'}",
                                                             f"rm.data.train_paths=[{RECIPES / 'prm_train.yaml'}]",
                                                             "rm.data.eval_paths=[]", "rm.data.processbench_paths=[]"])
    with pytest.raises(TrainRMError, match="ZeRO-3 is not supported"):
        check_inputs(zero3)


def test_cli_exits_2_with_the_reason(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlprm.cli", "train-rm", str(RECIPES / "orm_train.yaml"),
                          f"model.generator={tmp_path / 'missing'}", f"run.output_dir={tmp_path}"],
                         capture_output=True, text=True)
    # judged before train-rm starts (rlprm/inputs.py): the first line names the key and the path
    assert out.returncode == 2 and out.stderr.startswith(f"error: model.generator: {tmp_path / 'missing'} does not exist")


def test_prm800k_recipe_runs_with_a_tiny_stand_in(tmp_path):
    """recipes/prm_train_prm800k.yaml as shipped (ZeRO-2, bf16, gradient checkpointing, ProcessBench), with a
    tiny stand-in backbone and the shared PRM800K lines: phase 1 to train, phase 2 to evaluate."""
    phase1, phase2 = shared_file("prm800k/sample_phase1.jsonl"), shared_file("prm800k/sample_phase2.jsonl")
    bench = shared_file("processbench/math.json")
    from rlprm.config import TinyModelConfig
    from rlprm.data.prm800k import load_prm800k
    from rlprm.models import build_bpe_tokenizer, build_tiny_causal_lm
    from rlprm.steps import render_steps

    # a byte-level BPE on the lines themselves; positions enough for the longest held-out trajectory
    records = load_prm800k(phase1)[0] + load_prm800k(phase2)[0]
    tokenizer = build_bpe_tokenizer([r.problem + "\n\n" + render_steps(r.steps, "\n\n") for r in records], 400, 8192)
    model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                                 max_positions=8192, tokenizer="bpe"), tokenizer)
    backbone = tmp_path / "stand_in"
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-m", "rlprm.cli", "train-rm", str(RECIPES / "prm_train_prm800k.yaml"),
         f"rm.backbone={backbone}", f"run.output_dir={tmp_path / 'run'}", f"rm.data.train_paths=[{phase1}]",
         f"rm.data.eval_paths=[{phase2}]", f"rm.data.processbench_paths=[{bench}]", "rm.data.processbench_max=12",
         "rm.max_steps=3", "rm.batch_size=2", "rm.gradient_accumulation_steps=2", "rm.max_length=256",
         "rm.eval_batch_size=4", "run.device=cpu", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_steps"] == 3 and summary["kind"] == "prm"
    assert summary["eval/num_solutions"] == 43  # 10 phase-2 trajectories + 33 alternatives
    assert summary["processbench/math/f1"] is not None and summary["eval/step_auroc"] is not None
    assert summary["processbench/math/num_error"] + summary["processbench/math/num_correct"] == 12
    start = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert start["data/train_lines"] == 10 and start["data/train_null_ratings"] == 9
    assert start["data/train_cut_too_long"] > 0  # long trajectories cut at a step end, not dropped
    from rlprm.reward.model import RewardModel

    rm = RewardModel.load(tmp_path / "run" / "reward_model", step_separator="\n\n")
    assert rm.convention.prompt_template == "{problem}\n\n" and rm.convention.neutral_as == "positive"
    assert "PRM saved to" in out.stdout and "processbench/math F1" in out.stdout


class FakeRM:
    """Scores from a table: the evaluation's wiring, tested without a model."""

    def __init__(self, kind, table, max_positions=None):
        from types import SimpleNamespace

        self.kind, self.table = kind, table
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=max_positions))

    def score_steps(self, problems, solutions, batch_size=64):
        return [self.table[tuple(s)] for s in solutions]


def test_evaluation_wiring_on_hand_made_scores():
    from rlprm.data.stepwise import LabelledSolution
    from rlprm.train_rm import evaluate_reward_model

    C, W = 1, 0
    records = [  # problem p: one fully correct, one right answer on a wrong step, one wrong answer
        LabelledSolution("p", ["a", "b", "ans"], [C, C, C], True, True, None, "p"),
        LabelledSolution("p", ["a", "x", "ans"], [C, W, None], True, False, 1, "p"),
        LabelledSolution("p", ["y", "z", "bad"], [W, None, None], False, False, 0, "p"),
    ]
    table = {("a", "b", "ans"): [0.9, 0.8, 0.9], ("a", "x", "ans"): [0.9, 0.3, 0.9], ("y", "z", "bad"): [0.6, 0.9, 0.9]}
    out = evaluate_reward_model(FakeRM("prm", table), records, threshold=0.5)
    # labelled steps: 0.9 0.8 0.9 (right) 0.9 (right) 0.3 (wrong) 0.6 (wrong): 5 of 6 on the right side of 0.5
    assert out["num_labelled_steps"] == 6 and out["step_accuracy"] == pytest.approx(5 / 6)
    assert out["step_auroc"] == 1.0  # every right step (0.8 and up) above both wrong ones (0.3, 0.6)
    # first errors predicted: none (right), 1 (right), none (wrong: 0.6 passes) -> accuracies 1/2 and 1/1
    assert out["first_error_error_accuracy"] == 0.5 and out["first_error_correct_accuracy"] == 1.0
    # prod scores: 0.648, 0.243, 0.486 -> the lucky solution is below the correct one
    assert out["blind_spot_rate"] == 0.0 and out["blind_spot_pairs"] == 1
    assert out["best_of_n_process_accuracy"] == 1.0 and out["solution_auroc"] == 1.0
    assert out["blind_spot_rate_last"] == 0.5  # `last` sees 0.9 for both: a tie counts half
    orm = FakeRM("orm", {k: [v[-1] if k != ("a", "x", "ans") else 0.95] for k, v in table.items()})
    out = evaluate_reward_model(orm, records)
    assert out["blind_spot_rate"] == 1.0 and "step_accuracy" not in out  # the ORM's blind spot
    assert out["num_too_long"] == 0


def test_evaluation_leaves_out_too_long_solutions(char_tokenizer):
    from rlprm.data.stepwise import LabelledSolution
    from rlprm.train_rm import evaluate_reward_model

    from .test_reward_models import tiny_rm

    rm = tiny_rm(char_tokenizer)
    rm.model.config.max_position_embeddings = 40
    short = LabelledSolution("1 +1", ["1 + 1 = 2", "# Answer\n\n2"], [1, 1], True, True, None, "1 +1")
    long = LabelledSolution("1 +1", ["1 + 1 = 2"] * 6 + ["# Answer\n\n2"], [1] * 7, True, False, None, "1 +1")
    out = evaluate_reward_model(rm, [short, long])
    assert out["num_solutions"] == 1 and out["num_too_long"] == 1


@pytest.mark.parametrize("recipe_name", ["prm_train.yaml", "orm_train.yaml"])
def test_confidence_stacking_is_fitted_saved_and_reported(tmp_path, generator, recipe_name):
    from rlprm.reward.model import CONFIDENCE_DIR, RewardModel

    summary = run_job(recipe_name, tmp_path, generator, *HEAD, "rm.confidence_features=true", "rm.max_steps=2")
    weights = summary["confidence_weights"]
    assert len(weights) == 3 and summary["confidence_fit_labels"] > 0
    rm = RewardModel.load(tmp_path / "run" / "reward_model")
    assert rm.convention.confidence == weights and rm.confidence_lm is not None
    assert (tmp_path / "run" / "reward_model" / CONFIDENCE_DIR / "model.safetensors").is_file()
    assert "eval/solution_auroc" in summary and "eval_head_only/solution_auroc" in summary
