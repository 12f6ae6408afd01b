"""GRPO with LoRA (model.lora.enabled): the adapters train and the base stays frozen, the KL reference is the base
with the adapters disabled (the generator, in every epoch), checkpoints hold the adapters and resume from them,
the export merges them into a plain HF folder, and 2 processes over gloo end with the same weights.

Rollouts are fixed answered solutions (a random tiny policy never writes `# Answer`, so every sample would get the
same missing-answer reward and no gradient): a random tiny PRM scores their steps differently, which gives
non-zero process advantages and so a real update.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rlprm.config import TinyModelConfig, validate_recipe
from rlprm.launch import free_port
from rlprm.tracking import read_metrics
from tests.multi_process import LAUNCHER, job_env, launch_job, same_weights_on_two_ranks, wait_all

ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)


def fixed_generation(tokenizer):
    """A stand-in for `GRPOTrainer._generate_single_turn`: two answered solutions (3 and 2 steps), alternating."""
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import render_step

    texts = [render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")]),
             render_steps([render_step("+", 1, 2, 4), answer_step("4")])]
    solutions = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(solutions[i % 2]) for i in range(len(prompt_ids))], None

    return generate


@pytest.fixture(scope="module")
def models(tmp_path_factory, char_tokenizer):
    """(generator folder, PRM folder): tiny, random, built here."""
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

    root = tmp_path_factory.mktemp("models")
    build_tiny_causal_lm(TINY, char_tokenizer, seed=0).save_pretrained(root / "generator")
    char_tokenizer.save_pretrained(root / "generator")
    convention = make_convention("prm", "\n")
    lm = build_tiny_causal_lm(TINY, char_tokenizer, seed=1)
    RewardModel(reward_model_from_causal_lm(convention, lm, char_tokenizer), char_tokenizer,
                convention).save(root / "prm")
    return root / "generator", root / "prm"


def lora_recipe(out: Path, models, epochs: int = 2) -> dict:
    """1 iteration per epoch of 2 prompts x 2 samples, one optimizer step over all 4; KL on; adapters on q and v."""
    generator, prm = models
    return {
        "run": {"output_dir": str(out), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator), "reward_model": str(prm),
                  "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "reward": {"mode": "dense", "source": "prm", "dense_form": "score"},
        "rl": {"algorithm": "grpo", "epochs": epochs, "problems_per_epoch": 2, "prompts_per_iteration": 2,
               "samples_per_problem": 2, "max_new_tokens": 64, "minibatch_size": 4, "ppo_epochs": 1,
               "learning_rate": 1e-2, "kl_coef": 0.1, "eval_n_max": 0},
        "tracking": {"wandb": "disabled"},
    }


def merged_weights(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _plain(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, models, char_tokenizer):
    """A 2-epoch GRPO+LoRA run on one process; (run folder, final metrics, the policy as it ended)."""
    import rlprm.rl.run as rl_run
    from rlprm.rl import train
    from trl import GRPOTrainer

    tmp = tmp_path_factory.mktemp("grpo_lora")
    ended = {}
    cleanup = rl_run.cleanup

    def keep_policy(run, algorithm):
        ended["policy"] = run.policy
        return cleanup(run, algorithm)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GRPOTrainer, "_generate_single_turn", fixed_generation(char_tokenizer))
        mp.setattr(rl_run, "cleanup", keep_policy)
        final = train(validate_recipe(lora_recipe(tmp / "run", models), tmp), progress=False)
    return tmp / "run", final, ended["policy"]


def test_only_the_adapters_train_and_the_export_is_merged(uninterrupted, models):
    from peft import PeftModel

    from rlprm.checkpoint import load_state

    run_dir, final, policy = uninterrupted
    generator = merged_weights(models[0])
    # the base stayed the generator's weights; the adapters moved (peft starts lora_B at 0)
    assert isinstance(policy, PeftModel) and list(policy.peft_config) == ["default"]
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for name, value in policy.get_base_model().state_dict().items():
        if ".lora_" not in name:
            assert value.equal(generator[name.replace(".base_layer", "")]), name
    assert all(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    # the optimizer holds the adapters only (2 layers x q, v x A, B), with their moments after 2 steps
    state = load_state(run_dir / "checkpoints" / "epoch-0002", restore_rng=False)["policy_optimizer"]
    assert len(state["param_groups"][0]["params"]) == len(trainable) == 8
    assert [int(s["step"]) for s in state["state"].values()] == [2] * 8

    # checkpoints hold the adapters, not the weights
    ckpt = run_dir / "checkpoints" / "epoch-0001" / "model"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    # the export: a plain HF folder with the adapters merged where they were, the rest the generator's
    export = Path(final["export_dir"])
    assert not (export / "adapter_config.json").exists()
    merged = merged_weights(export)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert not merged[q].equal(generator[q]) and merged[o].equal(generator[o])
    # ... and it is the policy that ended the run, merged
    with torch.no_grad():
        ids = torch.tensor([[5, 9, 13, 2, 7]])
        torch.testing.assert_close(policy(input_ids=ids).logits, _plain(export)(input_ids=ids).logits)


def test_the_kl_reference_is_the_base_with_adapters_disabled(uninterrupted):
    """One optimizer step per epoch. Epoch 1 starts with zero adapters: the policy is the base, KL 0. Epoch 2 starts
    from the trained adapters: against the base the KL is positive. TRL's own choice for a PeftModel (a copy of the
    adapters as they are when the trainer is built, i.e. at the epoch's start) would give 0 again."""
    run_dir, _, _ = uninterrupted
    kl = [r["rl/kl"] for r in read_metrics(run_dir / "metrics.jsonl") if "rl/reward" in r]
    assert len(kl) == 2 and kl[0] == 0.0 and kl[1] > 0.0


def test_resume_from_an_adapter_checkpoint_replays_the_run(uninterrupted, models, char_tokenizer, tmp_path,
                                                          monkeypatch):
    """Killed after epoch 1, resumed with --resume: the adapters (and the optimizer's moments) come back from the
    adapter checkpoint, and the run ends where the uninterrupted one did, bit for bit on CPU."""
    from trl import GRPOTrainer

    from rlprm.rl import train

    full_dir, full_final, _ = uninterrupted
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fixed_generation(char_tokenizer))
    train(validate_recipe(lora_recipe(tmp_path / "run", models, epochs=1), tmp_path), progress=False)
    final = train(validate_recipe(lora_recipe(tmp_path / "run", models, epochs=2), tmp_path), resume=True,
                  progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rl/reward" in r]
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    resumed, whole = merged_weights(Path(final["export_dir"])), merged_weights(Path(full_final["export_dir"]))
    assert resumed.keys() == whole.keys() and all(resumed[k].equal(whole[k]) for k in whole)
    assert final["rl/kl"] == full_final["rl/kl"] > 0


def test_setup_keeps_float32_master_weights_and_optimizes_only_trainable_ones(models, tmp_path):
    """model.dtype bfloat16: the trained weights (all of them, or LoRA's adapters) are float32 masters, computed in
    bf16 by TRL's autocast: an AdamW step of 1e-6 on a bf16 weight of ~0.02 would round away. A frozen base stays bf16."""
    from rlprm.models import apply_lora, load_causal_lm
    from rlprm.rl.grpo import GRPO
    from rlprm.rl.run import Run

    for lora in (False, True):
        data = lora_recipe(tmp_path / "run", models)
        data["model"]["dtype"] = "bfloat16"
        data["model"]["lora"]["enabled"] = lora
        recipe = validate_recipe(data, tmp_path)
        run = Run(recipe, False, tmp_path / "run", None, "cpu", None)
        run.policy = apply_lora(load_causal_lm(models[0], "bfloat16"), recipe.model.lora)
        grpo = GRPO()
        grpo.setup(run)
        trained = [p for p in run.policy.parameters() if p.requires_grad]
        frozen = [p for p in run.policy.parameters() if not p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)
        assert all(p.dtype == torch.bfloat16 for p in frozen) and bool(frozen) is lora
        assert {id(p) for p in grpo.optimizer.param_groups[0]["params"]} == {id(p) for p in trained}


def test_lora_is_taken_and_deepspeed_refused_with_the_reason(models, tmp_path):
    from rlprm.rl.grpo import GRPO
    from rlprm.rl.run import RLInputError

    recipe = validate_recipe(lora_recipe(tmp_path / "run", models), tmp_path)
    GRPO().check(recipe)  # LoRA: no refusal
    recipe.deepspeed = ROOT / "deepspeed_configs" / "zero2.json"
    with pytest.raises(RLInputError, match="does not take a `deepspeed:` config.*model.lora.enabled"):
        GRPO().check(recipe)


FIXED_ROLLOUTS = '''
import os, sys
sys.path.insert(0, os.getcwd())
from transformers import AutoTokenizer
from trl import GRPOTrainer
from tests.test_grpo_lora import fixed_generation

GRPOTrainer._generate_single_turn = fixed_generation(AutoTokenizer.from_pretrained(os.environ["RLPRM_GENERATOR"]))
from rlprm.train_rl import main
sys.exit(main(sys.argv[1:]))
'''


def test_grpo_lora_on_two_processes(models, tmp_path):
    """`deepspeed --num_gpus 2` on CPU (gloo): 4 completions per iteration, 2 per rank; DDP averages the adapters'
    gradients, so both ranks end with the same weights (each hashes its own), and rank 0 alone exports."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(lora_recipe(tmp_path / "run", models)))
    script = tmp_path / "fixed_rollouts.py"
    script.write_text(FIXED_ROLLOUTS)
    proc = launch_job([str(LAUNCHER), "--num_gpus", "2", "--master_port", str(free_port()), str(script), str(recipe),
                    "--no-progress"],
                   job_env(RLPRM_GENERATOR=str(models[0]), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")))
    out = wait_all([proc], 300)[0]
    assert proc.returncode == 0, out[-4000:]
    run_dir = tmp_path / "run"
    summary, _ = same_weights_on_two_ranks(run_dir)
    assert (run_dir / "checkpoints" / "epoch-0002" / "model" / "adapter_config.json").is_file()
    generator, merged = merged_weights(models[0]), merged_weights(run_dir / "export")
    q = "model.layers.1.self_attn.v_proj.weight"
    assert not merged[q].equal(generator[q])  # it trained
    assert summary["rl/kl"] > 0  # epoch 2 against the base
    assert out.count("policy exported to") == 1



def test_bf16_full_weights_resume_keeps_the_float32_masters(models, char_tokenizer, tmp_path, monkeypatch):
    """model.dtype bfloat16, all weights: the checkpoint holds the float32 masters, and a resumed run reads them back
    as written (not rounded to bf16, which would drop most of an epoch's 1e-6-sized steps), so it ends exactly
    where the uninterrupted run does."""
    from trl import GRPOTrainer

    from rlprm.rl import train

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fixed_generation(char_tokenizer))

    def recipe(out: str, epochs: int):
        data = lora_recipe(tmp_path / out, models, epochs)
        data["model"]["lora"]["enabled"] = False
        data["model"]["dtype"] = "bfloat16"
        data["rl"]["learning_rate"] = 1e-5
        return validate_recipe(data, tmp_path)

    whole = train(recipe("whole", 2), progress=False)
    train(recipe("resumed", 1), progress=False)
    resumed = train(recipe("resumed", 2), resume=True, progress=False)
    a, b = merged_weights(Path(whole["export_dir"])), merged_weights(Path(resumed["export_dir"]))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert a[q].dtype == torch.float32 and not a[q].equal(merged_weights(models[0])[q])
    assert all(a[k].equal(b[k]) for k in a)
