"""Shared by the real-size recipe tests (tests/test_real_scale_rl.py, tests/test_real_scale_grpo.py): tiny stand-ins
for Qwen2.5-Math and the PRM800K PRM, and one run of a shipped recipe on them with tiny budgets on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stand_ins(tmp_path: Path, math: Path, template: str) -> tuple[Path, Path]:
    """A tiny Llama-shaped generator and PRM (width 64, 2 layers) on a BPE tokenizer fitted to MATH text."""
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_bpe_tokenizer, build_tiny_causal_lm
    from rlprm.problems import load_jsonl_problems
    from rlprm.reward_models import RewardModel, make_convention, reward_model_from_causal_lm

    problems = load_jsonl_problems(math, limit=200, template=template)
    tokenizer = build_bpe_tokenizer([p.prompt + p.gold for p in problems], 400, 4096)
    tiny = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, max_positions=4096,
                           tokenizer="bpe")
    gen = tmp_path / "qwen_stand_in"
    build_tiny_causal_lm(tiny, tokenizer, seed=0).save_pretrained(gen)
    tokenizer.save_pretrained(gen)
    convention = make_convention("prm", "\n\n", "{problem}\n\n")  # what prm_train_prm800k.yaml saves
    lm = build_tiny_causal_lm(tiny, tokenizer, seed=1)
    RewardModel(reward_model_from_causal_lm(convention, lm, tokenizer), tokenizer, convention).save(tmp_path / "prm")
    return gen, tmp_path / "prm"


def run_tiny(recipe_path: Path, gen: Path, prm: Path, math: Path, tmp_path: Path) -> Path:
    """Run `rlprm/train_rl.py recipe_path` on the stand-ins for one epoch of two problems; the run folder. Asserts
    that it exited 0 (the output's tail in the message)."""
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # one process, whatever launched pytest
    out = subprocess.run(
        [sys.executable, str(ROOT / "rlprm" / "train_rl.py"), str(recipe_path),
         f"model.generator={gen}", f"model.reward_model={prm}", f"run.output_dir={tmp_path / 'run'}",
         f"task.train_path={math}", f"task.test_path={math}", "run.device=cpu", "run.threads=1",
         "rl.epochs=1", "rl.problems_per_epoch=2", "rl.prompts_per_iteration=2", "rl.samples_per_problem=2",
         "rl.minibatch_size=4", "rl.max_new_tokens=12", "rl.eval_n_max=2", "rl.eval_num_problems=2", "eval.resamples=5",
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp_path / "run"
