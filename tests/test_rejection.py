"""Rejection sampling: the selection rule on hand-made rows, and the loop end to end on tiny models built in code.

The loop tests replace sampling with a fixed table (a random tiny policy never
writes a final answer, so nothing would be kept): each training problem gets its
reference solution twice, a corrupted one and an answerless one. Everything
else (grading, the reward model, selection, SFTTrainer, checkpoints, resume,
export) is the real code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlprm.config import TinyModelConfig, validate_recipe
from rlprm.rl.rejection import select_samples
from rlprm.tracking import read_metrics

from .conftest import save_tiny_generator

ROOT = Path(__file__).resolve().parents[1]

TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)


# --------------------------------------------------------------------------- selection (pure)


def test_select_best_distinct_eligible():
    scores = [[0.2, 0.9, 0.9, 0.5, 0.7], [0.1, 0.3]]
    eligible = [[True, True, True, True, False], [False, False]]
    texts = [["a", "b", "b", "c", "d"], ["x", "y"]]
    # problem 0: "b" (0.9) once, then "c" (0.5); "d" scores 0.7 but has no answer; problem 1: nothing eligible
    assert select_samples(scores, eligible, texts, top_k=2) == [[1, 3], []]
    assert select_samples(scores, eligible, texts, top_k=1) == [[1], []]
    assert select_samples(scores, eligible, texts, top_k=5) == [[1, 3, 0], []]
    assert select_samples(scores, eligible, texts, top_k=5, min_score=0.5) == [[1, 3], []]


def test_select_ties_keep_sample_order():
    # ground-truth mode: every accepted sample scores 1; the first distinct ones are kept
    assert select_samples([[1.0, 0.0, 1.0, 1.0]], [[True, False, True, True]], [["p", "q", "r", "p"]], 2) == [[0, 2]]


# --------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, char_tokenizer):
    return save_tiny_generator(tmp_path_factory.mktemp("gen") / "generator", char_tokenizer, TINY)


def _problems():
    from rlprm.config import ArithmeticConfig
    from rlprm.data.problems import from_arithmetic
    from rlprm.tasks.arithmetic import make_problems

    return from_arithmetic(make_problems(ArithmeticConfig(), 2, seed=99), prefix="fixed")


def _table(problems):
    import random

    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import corrupt_solution, reference_solution

    rng = random.Random(0)
    table = {}
    for p in problems:
        good = render_steps(reference_solution(p.arith))
        bad = render_steps(corrupt_solution(p.arith, rng)[0])
        table[p.prompt] = [good, bad, "1 + 1 = 2", good]
    return table


@pytest.fixture
def fixed_sampling(monkeypatch):
    """Training problems and their samples from a table; held-out prompts get an answerless line."""
    import rlprm.data.problems
    import rlprm.sampling
    from rlprm.sampling import Samples

    problems = _problems()
    table = _table(problems)

    def fake_sample(model, tokenizer, prompts, n=1, **kwargs):
        texts = [[table[p][j % 4] if p in table else "7 + 1 = 8" for j in range(n)] for p in prompts]
        return Samples(texts, [[[] for _ in row] for row in texts])

    monkeypatch.setattr(rlprm.sampling, "sample", fake_sample)
    monkeypatch.setattr(rlprm.data.problems, "epoch_problems", lambda recipe, epoch, exclude: problems)
    return problems, table


def make_recipe(tmp: Path, generator: Path, out: str, epochs: int = 2, **reward):
    data = {
        "run": {"output_dir": str(tmp / out), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator)},
        "reward": {"mode": "sparse", "source": "ground_truth", **reward},
        "rl": {"algorithm": "rejection_sampling", "epochs": epochs, "problems_per_epoch": 2,
               "samples_per_problem": 4, "max_new_tokens": 16, "sft_batch_size": 2, "learning_rate": 3e-3,
               "rejection_top_k": 2, "eval_n_max": 2, "eval_num_problems": 2},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }
    return validate_recipe(data, tmp)


def _completion_loss(model_dir, problems, table):
    """Mean cross-entropy of the reference solutions' tokens given the prompts (what SFT should lower)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    for p in problems:
        prompt = tok(p.prompt)["input_ids"]
        full = tok(p.prompt + table[p.prompt][0])["input_ids"]
        labels = [-100] * len(prompt) + full[len(prompt):]
        with torch.no_grad():
            losses.append(model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss.item())
    return sum(losses) / len(losses)


def test_end_to_end_selects_trains_checkpoints_exports(fixed_sampling, generator_dir, tmp_path):
    from rlprm.rl import train

    problems, table = fixed_sampling
    final = train(make_recipe(tmp_path, generator_dir, "run"), progress=False)
    run_dir = tmp_path / "run"
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [r for r in records if "rs/kept" in r]
    assert len(epochs) == 2
    first = epochs[0]
    # 4 samples per problem: reference twice (kept once), corrupted (kept only if its answer is still right), none
    accepted_bad = sum(1 for p in problems if table[p.prompt][1].rsplit("\n", 1)[-1].endswith(p.gold))
    assert first["rs/kept"] == 2 + accepted_bad
    assert first["rs/kept_answer_accuracy"] == 1.0
    # the habits, in what was sampled and in what was kept (the arithmetic task's checker decides them)
    assert all(0 <= first[k] <= 1 for k in ("rl/shortcut_rate", "rl/carry_drop_rate", "rs/kept_shortcut_rate",
                                             "rs/kept_carry_drop_rate"))
    assert first["rl/answer_accuracy"] == pytest.approx((2 * 2 + accepted_bad) / 8)
    assert first["rs/sft_steps"] == -(-first["rs/kept"] // 2)  # one pass, batch 2
    sft = [r for r in records if "sft/loss" in r]
    assert len(sft) == first["rs/sft_steps"] + epochs[1]["rs/sft_steps"]  # a record every SFT step
    assert [r["step"] for r in sft] == list(range(1, len(sft) + 1))  # steps count on across epochs
    evals = [r for r in records if "eval/answer_accuracy" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and any(k.startswith("bon/") for k in evals[-1])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["epoch-0001", "epoch-0002"]
    # SFT on the kept solutions makes them likelier: the exported policy's loss on them fell
    export = Path(final["export_dir"])
    assert _completion_loss(export, problems, table) < _completion_loss(generator_dir, problems, table) - 0.1
    assert json.loads((run_dir / "summary.json").read_text())["rs/kept"] == epochs[-1]["rs/kept"]


def _comparable(records):
    """Every record (the SFT steps' too: they carry no `epoch`), less the wall-clock readings."""
    timing = lambda k: k == "time" or k.startswith("time/") or k.endswith(("_runtime", "_per_second"))  # noqa: E731
    return [{k: v for k, v in r.items() if not timing(k)} for r in records]


def test_resume_matches_uninterrupted_run(fixed_sampling, generator_dir, tmp_path):
    """Both epochs keep samples and fine-tune on them, so the resumed run's log and final weights (bit for bit)
    depend on the restored weights and optimizer moments."""
    from transformers import AutoModelForCausalLM

    from rlprm.rl import train
    from rlprm.rl.distributed import weights_digest
    from rlprm.rl.run import RLInputError

    train(make_recipe(tmp_path, generator_dir, "full"), progress=False)
    first = make_recipe(tmp_path, generator_dir, "resumed", epochs=1)
    train(first, progress=False)
    with pytest.raises(RLInputError, match="--resume"):
        train(first, progress=False)
    train(make_recipe(tmp_path, generator_dir, "resumed", epochs=2), resume=True, progress=False)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    epochs = [r for r in full if "rs/kept" in r]
    assert len(epochs) == 2 and all(r["rs/kept"] > 0 and r["rs/sft_steps"] > 0 for r in epochs)
    assert len([r for r in full if "sft/loss" in r]) == sum(r["rs/sft_steps"] for r in epochs)
    assert _comparable(resumed) == _comparable(full)
    digest = lambda run: weights_digest(AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tmp_path / run / "checkpoints" / "epoch-0002" / "model"))
    assert digest("resumed") == digest("full")


def _poisoned_from_second_trainer():
    """LeanSFTTrainer whose second instance (the second epoch's trainer) turns every loss into NaN."""
    from rlprm.rl.lean_sft import LeanSFTTrainer

    return type("PoisonedFromSecond", (_Poisoned, LeanSFTTrainer), {"built": 0})


class _Poisoned:
    """Mixed in before LeanSFTTrainer: counts instances; from the second on, the loss is NaN."""

    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += 1
        self.poisoned = type(self).built >= 2

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        return loss * float("nan") if self.poisoned else loss


def test_reward_model_selection_and_nan_stop(fixed_sampling, generator_dir, char_tokenizer, tmp_path, monkeypatch):
    """A PRM ranks the samples (answerless ones never kept); a NaN loss in epoch 2 stops the run, keeping epoch 1."""
    import rlprm.rl.lean_sft
    from rlprm.checkpoint import latest_checkpoint
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm
    from rlprm.rl import train
    from rlprm.rl.run import RLError

    convention = make_convention("prm", "\n")
    lm = build_tiny_causal_lm(TINY, char_tokenizer, seed=1)
    RewardModel(reward_model_from_causal_lm(convention, lm, char_tokenizer), char_tokenizer, convention).save(
        tmp_path / "prm")
    monkeypatch.setattr(rlprm.rl.lean_sft, "LeanSFTTrainer", _poisoned_from_second_trainer())
    recipe = make_recipe(tmp_path, generator_dir, "prm_run", source="prm", sparse_aggregate="min")
    recipe.model.reward_model = str(tmp_path / "prm")
    recipe.rl.rejection_top_k = 1
    recipe.rl.eval_n_max = 0
    with pytest.raises(RLError, match="not finite.*epoch-0001"):
        train(recipe, progress=False)
    first = [r for r in read_metrics(tmp_path / "prm_run" / "metrics.jsonl") if "rs/kept" in r][0]
    assert first["rs/kept"] == 2  # the PRM's best distinct answered sample of each problem
    assert 0.0 < first["rs/kept_score_mean"] <= 1.0
    assert latest_checkpoint(tmp_path / "prm_run").name == "epoch-0001"
    assert not (tmp_path / "prm_run" / "checkpoints" / "epoch-0002").exists()


def test_dense_rewards_and_deepspeed_are_refused(generator_dir, tmp_path):
    from rlprm.rl.rejection import check_inputs
    from rlprm.rl.run import RLInputError

    recipe = make_recipe(tmp_path, generator_dir, "x", mode="dense", source="prm")
    recipe.model.reward_model = str(generator_dir)
    with pytest.raises(RLInputError, match="reward.mode: sparse"):
        check_inputs(recipe)
    recipe = make_recipe(tmp_path, generator_dir, "y")
    recipe.deepspeed = ROOT / "deepspeed_configs" / "zero2.json"
    with pytest.raises(RLInputError, match="DeepSpeed"):
        check_inputs(recipe)


def test_shipped_recipe_validates_and_cli_takes_intermixed_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlprm.cli", "train-rl", str(ROOT / "recipes" / "rejection_sampling.yaml"),
                          "rl.epochs=1", "--print-config", "run.seed=5"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "algorithm: rejection_sampling" in out.stdout and "seed: 5" in out.stdout and "epochs: 1" in out.stdout


def test_lora_adapters_checkpoint_resume_and_merge_on_export(fixed_sampling, generator_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlprm.rl import train

    recipe = make_recipe(tmp_path, generator_dir, "lora", epochs=1)
    recipe.model.lora.enabled, recipe.model.lora.r, recipe.model.lora.target_modules = True, 4, ["q_proj", "v_proj"]
    recipe.rl.eval_n_max = 0
    train(recipe, progress=False)
    ckpt = tmp_path / "lora" / "checkpoints" / "epoch-0001" / "model"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    recipe.rl.epochs = 2
    final = train(recipe, resume=True, progress=False)  # adapters come back trainable and train on
    records = [r for r in read_metrics(tmp_path / "lora" / "metrics.jsonl") if "rs/sft_steps" in r]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["rs/sft_steps"] > 0
    export = Path(final["export_dir"])
    assert not (export / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(export)
    base = AutoModelForCausalLM.from_pretrained(generator_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not merged.state_dict()[q].equal(base.state_dict()[q])  # the adapters were merged into the weights
    o = "model.layers.0.self_attn.o_proj.weight"
    assert merged.state_dict()[o].equal(base.state_dict()[o])  # modules without adapters are untouched


def test_several_processes_check_the_totals_naming_the_key(tmp_path):
    import os

    # several processes are no longer refused (tests/test_multi_process_rl.py runs two); the totals must split
    # a generator folder's files (never loaded: the sizes are refused first); a hub id would be judged against the
    # network before that (rlprm/inputs.py)
    gen = tmp_path / "gen"
    gen.mkdir()
    for name, text in (("config.json", '{"model_type": "llama"}'), ("model.safetensors", ""), ("tokenizer.json", "{}")):
        (gen / name).write_text(text)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {generator: ./gen}\nrun: {output_dir: ./out}\n"
                      "rl: {algorithm: rejection_sampling, sft_batch_size: 3}\n")
    out = subprocess.run([sys.executable, str(ROOT / "rlprm" / "train_rl.py"), "--local_rank=1", str(recipe)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WORLD_SIZE": "2"})
    assert out.returncode == 2 and "rl.sft_batch_size (3) is a total over the 2 processes" in out.stderr


def test_a_bf16_policy_trains_on_float32_masters(fixed_sampling, generator_dir, tmp_path):
    """SFT steps of 1e-5 on bf16 weights of ~0.02 round away; a bf16 recipe trains float32 copies."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlprm.rl import train

    recipe = make_recipe(tmp_path, generator_dir, "bf16", epochs=1)
    recipe.model.dtype = "bfloat16"
    recipe.rl.learning_rate = 1e-5
    recipe.rl.eval_n_max = 0
    final = train(recipe, progress=False)
    assert final["rs/sft_steps"] >= 1
    start = AutoModelForCausalLM.from_pretrained(generator_dir, dtype=torch.bfloat16)
    trained = dict(AutoModelForCausalLM.from_pretrained(final["export_dir"], dtype="auto").named_parameters())
    changed = sum(int((trained[n].float() != p.float()).sum()) for n, p in start.named_parameters())
    assert changed / sum(p.numel() for p in start.parameters()) > 0.9
