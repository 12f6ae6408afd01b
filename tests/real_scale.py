"""Shared by the real-size recipe tests (tests/test_real_scale_rl.py, tests/test_real_scale_grpo.py) and the rehearsal
(tests/test_rehearsal.py): Qwen2-architecture stand-ins for Qwen2.5-Math and the PRM800K PRM, and the one launcher
that runs a shipped recipe's entry point in child processes (one, or two under the DeepSpeed launcher) with
overrides, measuring its wall seconds and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).with_name("deepspeed")


def qwen2_causal_lm(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int | None = None, max_positions: int = 4096, vocab_size: int | None = None,
                    seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM (the architecture of Qwen2.5-Math: grouped-query attention, biases on
    q/k/v, RMSNorm, SwiGLU) of a small shape, with tied embeddings (at a 151,936-token vocabulary the untied output
    layer alone would be as large as the whole body). `vocab_size` defaults to the tokenizer's length; Qwen2.5's
    checkpoints pad it to 151,936, more rows than the tokenizer has tokens, and so may a caller."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    # the model and its generation settings must agree with the tokenizer on the special tokens (Qwen: no BOS)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2Config(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.update(**special)
    return model


def small_qwen_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE fitted to `corpus` that reloads as the Qwen2 tokenizer does: Qwen2's pre-tokenisation split
    (transformers loads the tokenizer beside a `qwen2` model as Qwen2Tokenizer, which imposes it), Qwen's special
    tokens and chat template, no BOS, EOS `<|im_end|>`, pad `<|endoftext|>`. For the fast tests, whose models must
    stay cheap; the rehearsal runs the real 151k vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlprm.testing.standins import FAMILY_SPECIALS, QWEN_TEMPLATE, SPLIT

    specials = FAMILY_SPECIALS["qwen"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=32768, pad_token="<|endoftext|>",
                                 eos_token="<|im_end|>", additional_special_tokens=specials[1:])
    hf.chat_template = QWEN_TEMPLATE
    return hf


def save_prm(folder: Path, tokenizer, lm, separator: str = "\n\n", template: str = "{problem}\n\n") -> Path:
    """A PRM folder (rlprm layout) with `lm`'s body and a fresh head, saved as prm_train_prm800k.yaml saves one."""
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

    convention = make_convention("prm", separator, template)
    RewardModel(reward_model_from_causal_lm(convention, lm, tokenizer), tokenizer, convention).save(folder)
    return folder


def stand_ins(tmp_path: Path, math: Path, template: str) -> tuple[Path, Path]:
    """A tiny Qwen2-architecture generator and PRM (width 64, 2 layers) on a small BPE with Qwen's special tokens,
    fitted to MATH text: the fast tests' stand-ins (the rehearsal's run the real tokenizer)."""
    from rlprm.data.problems import load_jsonl_problems

    problems = load_jsonl_problems(math, limit=200, template=template)
    tokenizer = small_qwen_tokenizer([p.prompt + p.gold for p in problems])
    gen = tmp_path / "qwen_stand_in"
    qwen2_causal_lm(tokenizer, seed=0).save_pretrained(gen)
    tokenizer.save_pretrained(gen)
    return gen, save_prm(tmp_path / "prm", tokenizer, qwen2_causal_lm(tokenizer, seed=1))


# --------------------------------------------------------------------------- the launcher


@dataclass
class Launched:
    """One finished child run."""

    returncode: int
    output: str
    """stdout and stderr together."""
    seconds: float
    """Wall seconds from start to exit."""
    peak_rss_mb: float
    """Peak resident memory of the child's process tree (ru_maxrss of wait4: the largest of the child and the
    descendants it waited for; under the DeepSpeed launcher, the largest rank)."""

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:]


def child_env(**extra) -> dict:
    """The environment a recipe runs in here: W&B off, the DeepSpeed CPU accelerator, one thread per process,
    and no rank variables of whatever launched pytest (the DeepSpeed launcher sets its own)."""
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), **extra)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(entry: list[str], cwd: Path, processes: int = 1, env: dict | None = None, log: Path | None = None,
           hang_guard_s: float = 3600) -> Launched:
    """Run `entry` (a script path or `-m module` and its arguments) as a user would: `python ENTRY` for one process,
    `deepspeed --num_gpus N ENTRY` for N (CPU processes, gloo). Budgets are the recipe's steps; `hang_guard_s` only
    kills a run that hangs (a deadlock between ranks), it never sizes one. The output goes to `log` (default
    cwd/launch.log) as it is written, so a killed run still leaves it."""
    from rlprm.launch import free_port

    cmd = [sys.executable, *entry] if processes == 1 else [
        str(LAUNCHER), "--num_gpus", str(processes), "--master_port", str(free_port()), *entry]
    log = log or Path(cwd) / "launch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        # wait4: this child's own resource usage (peak RSS), which RUSAGE_CHILDREN would mix with earlier runs'
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > hang_guard_s:
                os.killpg(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    # Linux reports ru_maxrss in KiB
    return Launched(proc.returncode, log.read_text(errors="replace"), seconds, usage.ru_maxrss / 1024)


def rl_entry(recipe_path: Path, overrides: list[str], probe: bool = False) -> list[str]:
    """`rlprm/train_rl.py RECIPE overrides --no-progress`, or the same through tests/rehearsal_probe.py, which records
    what the run graded, rewarded and advantaged for the rehearsal's checks."""
    script = ROOT / "tests" / "rehearsal_probe.py" if probe else ROOT / "rlprm" / "train_rl.py"
    return [str(script), str(recipe_path), *overrides, "--no-progress"]


def run_tiny(recipe_path: Path, gen: Path, prm: Path, math: Path, tmp_path: Path) -> Path:
    """Run `rlprm/train_rl.py recipe_path` on the stand-ins for one epoch of two problems; the run folder. Asserts
    that it exited 0 (the output's tail in the message)."""
    overrides = [f"model.generator={gen}", f"model.reward_model={prm}", f"run.output_dir={tmp_path / 'run'}",
                 f"task.train_path={math}", f"task.test_path={math}", "run.device=cpu", "run.threads=1",
                 "rl.epochs=1", "rl.problems_per_epoch=2", "rl.prompts_per_iteration=2", "rl.samples_per_problem=2",
                 "rl.minibatch_size=4", "rl.max_new_tokens=12", "rl.eval_n_max=2", "rl.eval_num_problems=2",
                 "eval.resamples=5"]
    out = launch(rl_entry(recipe_path, overrides), tmp_path, hang_guard_s=900)
    assert out.returncode == 0, out.tail(6000)
    return tmp_path / "run"
