"""docs/bring_your_own_model.md, done as a user would: a policy folder of their own (a Qwen2 architecture), a public
PRM by family (a qwen_prm stand-in written by `save_standin`, the doc's offline step), their own data in GSM8K's
layout, and the shipped real-size PPO recipe with only the doc's overrides plus tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "prm_dense_qwen_math.yaml"
DOC = ROOT / "docs" / "bring_your_own_model.md"


def _my_policy(folder: Path) -> Path:
    """A user's own causal LM folder: a tiny Qwen2 on the Qwen-shaped stand-in tokenizer (chat tokens included)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlprm.testing.standins import build_tokenizer

    tok = build_tokenizer("qwen")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _my_data(path: Path, n: int) -> Path:
    """GSM8K's layout: `question`, and `answer` a worked solution ending in `#### n`."""
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}", "id": f"mine-{i}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_doc_names_the_overrides_this_test_uses():
    text = DOC.read_text()
    for key in ("model.generator=", "model.reward_model=", "reward.adapter=qwen_prm", "task.name=gsm8k",
                "task.train_path=", "task.test_path=", "save_standin('qwen_prm'"):
        assert key in text, key
    assert "docs/bring_your_own_model.md" in (ROOT / "README.md").read_text()


def test_own_policy_public_prm_family_and_own_data_run_the_real_size_recipe(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlprm.testing.standins import save_standin

    policy = _my_policy(tmp_path / "my-policy")
    prm = save_standin("qwen_prm", tmp_path / "standin_prm")  # the doc's offline step
    train, test = _my_data(tmp_path / "train.jsonl", 8), _my_data(tmp_path / "test.jsonl", 4)
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "rlprm" / "train_rl.py"), str(RECIPE),
         # the doc's overrides
         f"model.generator={policy}", f"model.reward_model={prm}", "reward.adapter=qwen_prm",
         "task.name=gsm8k", f"task.train_path={train}", f"task.test_path={test}", f"run.output_dir={tmp_path / 'run'}",
         # tiny budgets for a CPU
         "run.device=cpu", "run.threads=1", "rl.epochs=1", "rl.problems_per_epoch=2", "rl.prompts_per_iteration=2",
         "rl.samples_per_problem=2", "rl.minibatch_size=4", "rl.max_new_tokens=12", "rl.eval_n_max=2",
         "rl.eval_num_problems=2", "eval.resamples=5", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "run"
    resolved = (run / "recipe.yaml").read_text()
    assert str(policy) in resolved and str(prm) in resolved and "adapter: qwen_prm" in resolved
    assert "name: gsm8k" in resolved
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any("rl/reward" in r for r in rows)
    # the export is the user's architecture with the user's tokenizer, loadable as a plain HF folder
    export = run / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(export).get_vocab() == AutoTokenizer.from_pretrained(policy).get_vocab()
