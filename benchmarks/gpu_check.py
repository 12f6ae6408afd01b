"""The GPU check in one short call (issue 15): rollout speed, one PPO and one GRPO iteration, peak memory; prints JSON.

    python benchmarks/gpu_check.py            # one GPU, bf16, a Qwen2-shaped 0.5B policy and PRM (under 8 minutes)
    python benchmarks/gpu_check.py --tiny     # 2 layers, width 64, on the CPU in seconds (what the test runs)

Nothing is downloaded: the policy is a Qwen2ForCausalLM built from a config with
Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
vocabulary 151936) and random weights, the PRM a second such model under
rlprm's token-classification head (`reward_models.reward_model_from_causal_lm`),
and the tokenizer a one-token-per-character vocabulary of the same size built in
code (so every id the random policy samples decodes to text). Both are saved to
a temporary folder and trained through `rlprm.rl.train` on recipes built here
(dense PRM rewards, log_prob form; 1 epoch of `--iterations` iterations; the
first iteration is warm-up when there are 2 or more; best-of-N off); the phase
seconds come from each run's metrics.jsonl (`time/generate`, `time/score`,
`time/update`; with vLLM the weight refresh after the update counts as update).

Runs, in this order (vLLM last: its colocated engine keeps its memory until the process ends):
- `ppo_full`: PPO, all weights, HF `generate` rollouts; also HF's rollout tokens/s;
- `grpo_full`: GRPO (TRL's GRPOTrainer), all weights, at the same batch;
- `ppo_lora`: PPO with LoRA adapters ({"skipped": the refusal} where PPO does not take LoRA yet);
- `grpo_lora`: GRPO with LoRA adapters (the KL reference is the base with the adapters off);
- `ppo_full_vllm`: PPO with `rl.rollout: vllm`; vLLM's rollout tokens/s at the same batch, and the logged
  sampler-vs-trainer log-prob gap ({"skipped": why} without vLLM or a GPU).
Rollout tokens/s = sampled tokens (EOS included) / the generate phase's seconds, in the same PPO loop.

Targets (issue 15), judged where both sides were measured: vLLM at least 3x HF `generate` tokens/s, and a PPO
iteration at most 1.3x a GRPO iteration at the same batch. A run that fails is reported as {"error": ...}, so
the JSON always comes out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

QWEN2_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936}
"""Qwen2.5-0.5B's shape (about 0.5B parameters with tied embeddings)."""
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 64}

TARGET_VLLM_SPEEDUP = 3.0
TARGET_PPO_OVER_GRPO = 1.3


def build_tokenizer(vocab_size: int):
    """One token per character, `vocab_size` entries in all (the 4 specials included): the arithmetic task's
    characters first, then distinct code points from U+0100 on (surrogates skipped)."""
    from rlprm.models import SPECIAL_TOKENS, build_char_tokenizer
    from rlprm.tasks.arithmetic import CHARSET

    chars = list(dict.fromkeys(CHARSET))
    code = 0x100  # above the task's (ASCII) characters
    while len(chars) < vocab_size - len(SPECIAL_TOKENS):
        if not 0xD800 <= code <= 0xDFFF:
            chars.append(chr(code))
        code += 1
    return build_char_tokenizer(chars, model_max_length=4096)


def build_qwen2(shape: dict, tokenizer, seed: int):
    """A Qwen2ForCausalLM of `shape` with random weights, its special tokens the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.update(**special)
    return model


def build_models(folder: Path, shape: dict, dtype: str) -> dict:
    """The policy (generator) and the PRM, saved as rlprm's stages save them; returns their sizes."""
    import torch

    from rlprm.models import num_parameters, torch_dtype
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

    tokenizer = build_tokenizer(shape["vocab_size"])
    policy = build_qwen2(shape, tokenizer, seed=0)
    n_policy = num_parameters(policy)
    policy.to(torch_dtype(dtype)).save_pretrained(folder / "generator")
    tokenizer.save_pretrained(folder / "generator")
    del policy
    convention = make_convention("prm", "\n")
    body = build_qwen2(shape, tokenizer, seed=1)
    prm = reward_model_from_causal_lm(convention, body, tokenizer).to(torch_dtype(dtype))
    n_prm = num_parameters(prm)
    RewardModel(prm, tokenizer, convention).save(folder / "prm")
    del body, prm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"policy_parameters": n_policy, "prm_parameters": n_prm}


def recipe_for(folder: Path, name: str, algorithm: str, args, device: str, dtype: str, **rl):
    from rlprm.config import validate_recipe

    batch = {"prompts_per_iteration": args.prompts, "samples_per_problem": args.samples,
             "problems_per_epoch": args.prompts * args.iterations, "max_new_tokens": args.max_new_tokens,
             "minibatch_size": args.minibatch, "ppo_epochs": 1}
    lora = rl.pop("lora", False)
    data = {
        "run": {"name": name, "output_dir": str(folder / name), "device": device, "seed": 0},
        "model": {"generator": str(folder / "generator"), "reward_model": str(folder / "prm"), "dtype": dtype,
                  "lora": {"enabled": lora}},
        "reward": {"mode": "dense", "source": "prm", "dense_form": "log_prob"},
        "rl": {"algorithm": algorithm, "epochs": 1, "eval_n_max": 0, "temperature": 1.0, **batch, **rl},
        "tracking": {"wandb": "disabled"},
    }
    return validate_recipe(data, folder)


def phases(records: list[dict], batch: int) -> dict:
    """Mean seconds per phase over the timed iterations (the first dropped as warm-up when there are 2+)."""
    its = [r for r in records if "time/generate" in r]
    its = its[1:] if len(its) > 1 else its
    out = {k: round(statistics.mean(r[f"time/{k}"] for r in its), 3) for k in ("generate", "score", "update")}
    out["total"] = round(out["generate"] + out["score"] + out["update"], 3)
    out["iterations_timed"] = len(its)
    length = statistics.mean(r["rl/response_length"] for r in its)
    out["response_length"] = round(length, 1)
    out["rollout_tokens_per_s"] = round(length * batch / max(out["generate"], 1e-9), 1)
    gaps = [r["rollout/logprob_gap"] for r in its if r.get("rollout/logprob_gap") is not None]
    if gaps:
        out["rollout_logprob_gap"] = round(statistics.mean(gaps), 5)
    return out


def run(recipe, device: str) -> dict:
    """One `rlprm.rl.train` run: its phases, wall time and peak GPU memory; {"skipped": ...} when refused as input."""
    import torch

    from rlprm.rl import train
    from rlprm.rl.run import RLInputError
    from rlprm.tracking import read_metrics

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    try:
        train(recipe, progress=False)
    except RLInputError as exc:
        return {"skipped": str(exc)}
    except Exception as exc:  # the check reports every part it could measure, and what broke
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    out = phases(read_metrics(Path(recipe.run.output_dir) / "metrics.jsonl"),
                 recipe.rl.prompts_per_iteration * recipe.rl.samples_per_problem)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["peak_gpu_memory_mib"] = (round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None)
    return out


def vllm_missing(device: str) -> str | None:
    """Why the vLLM run cannot happen here (None: it can)."""
    import importlib.util

    from rlprm.config import VLLM_EXTRA

    if device != "cuda":
        return "no GPU: vLLM's colocated engine needs CUDA"
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed (`{VLLM_EXTRA}`)"
    return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def judged(value: float | None, target: float, at_least: bool, verdict: str | None = None) -> dict:
    """The measured ratio against its target; `verdict` set (why not) leaves "pass" None: the targets are for the
    0.5B policy on a GPU, and a tiny model's or a CPU's ratio says nothing about them."""
    ok = None if value is None or verdict else (value >= target if at_least else value <= target)
    out = {"value": None if value is None else round(value, 3), "target": f"{'>=' if at_least else '<='} {target}",
           "pass": ok}
    return out if verdict is None or value is None else {**out, "no_verdict": verdict}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 64, tiny batch (CPU, seconds)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--prompts", type=int, help="prompts per iteration (default 16; tiny 2)")
    parser.add_argument("--samples", type=int, help="samples per prompt (default 4; tiny 2)")
    parser.add_argument("--max-new-tokens", type=int, help="response cap (default 256; tiny 16)")
    parser.add_argument("--minibatch", type=int, help="sequences per optimizer step (default 16; tiny 2)")
    parser.add_argument("--iterations", type=int, help="iterations per run, the first is warm-up (default 2; tiny 1)")
    args = parser.parse_args(argv)
    defaults = ({"prompts": 2, "samples": 2, "max_new_tokens": 16, "minibatch": 2, "iterations": 1} if args.tiny else
                {"prompts": 16, "samples": 4, "max_new_tokens": 256, "minibatch": 16, "iterations": 2})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    t0 = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON document alone; the runs' lines go to stderr
        result = measure(args)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=1))
    return 0


def measure(args) -> dict:
    import torch

    from rlprm.models import resolve_device

    device = resolve_device(args.device)
    dtype = "bfloat16" if device == "cuda" else "float32"  # bf16 on the GPU; on a CPU float32 (bf16 is emulated)
    shape = TINY if args.tiny else QWEN2_05B
    result: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": dtype, "torch": torch.__version__, "vllm": _version("vllm"), "model_shape": shape,
        "batch": {"prompts": args.prompts, "samples_per_prompt": args.samples,
                  "sequences": args.prompts * args.samples, "max_new_tokens": args.max_new_tokens,
                  "minibatch": args.minibatch},
        "iterations_per_run": args.iterations,
        "reward": "dense PRM (log_prob), PRM of the policy's shape",
    }
    with tempfile.TemporaryDirectory(prefix="rlprm_gpu_check_") as d:
        folder = Path(d)
        result.update(build_models(folder, shape, dtype))
        runs = {
            "ppo_full": run(recipe_for(folder, "ppo_full", "ppo", args, device, dtype), device),
            "grpo_full": run(recipe_for(folder, "grpo_full", "grpo", args, device, dtype), device),
            "ppo_lora": run(recipe_for(folder, "ppo_lora", "ppo", args, device, dtype, lora=True), device),
            "grpo_lora": run(recipe_for(folder, "grpo_lora", "grpo", args, device, dtype, lora=True), device),
        }
        why = vllm_missing(device)
        runs["ppo_full_vllm"] = ({"skipped": why} if why else
                                 run(recipe_for(folder, "ppo_full_vllm", "ppo", args, device, dtype, rollout="vllm"),
                                     device))
    result["runs"] = runs
    hf = runs["ppo_full"].get("rollout_tokens_per_s")
    vllm = runs["ppo_full_vllm"].get("rollout_tokens_per_s")
    ppo, grpo = runs["ppo_full"].get("total"), runs["grpo_full"].get("total")
    result["rollout_tokens_per_s"] = {"hf": hf, "vllm": vllm}
    verdict = ("--tiny: the targets are for the 0.5B policy" if args.tiny else
               None if device == "cuda" else "not on a GPU: the targets are for one GPU")
    result["targets"] = {
        "vllm_over_hf_tokens_per_s": judged(vllm / hf if hf and vllm else None, TARGET_VLLM_SPEEDUP, at_least=True,
                                            verdict=verdict),
        "ppo_over_grpo_iteration_s": judged(ppo / grpo if ppo and grpo else None, TARGET_PPO_OVER_GRPO,
                                            at_least=False, verdict=verdict),
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
