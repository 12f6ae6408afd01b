"""benchmarks/gpu_check.py on tiny models on the CPU, so that the one-call GPU check cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_prints_one_json_document_with_every_measure():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # stdout is the JSON document alone
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["model_shape"]["num_hidden_layers"] == 2 and result["model_shape"]["hidden_size"] == 64
    assert result["batch"]["sequences"] == result["batch"]["prompts"] * result["batch"]["samples_per_prompt"] > 0
    assert result["policy_parameters"] > 0 and result["prm_parameters"] > 0
    runs = result["runs"]
    for name in ("ppo_full", "grpo_full", "grpo_lora"):
        run = runs[name]
        assert "error" not in run and "skipped" not in run, run
        for key in ("generate", "score", "update", "total", "rollout_tokens_per_s", "response_length"):
            assert run[key] > 0, (name, key, run)
        assert run["total"] >= run["generate"] and run["peak_gpu_memory_mib"] is None  # no GPU here
    # LoRA for PPO: measured where PPO takes LoRA, else the refusal itself
    lora = runs["ppo_lora"]
    assert ("skipped" in lora and "lora" in lora["skipped"].lower()) or lora["total"] > 0, lora
    assert "GPU" in runs["ppo_full_vllm"]["skipped"]  # no CUDA here: skipped, with the reason
    assert result["rollout_tokens_per_s"] == {"hf": runs["ppo_full"]["rollout_tokens_per_s"], "vllm": None}
    speedup, ratio = result["targets"]["vllm_over_hf_tokens_per_s"], result["targets"]["ppo_over_grpo_iteration_s"]
    assert speedup == {"value": None, "target": ">= 3.0", "pass": None}  # not measured: no verdict
    assert ratio["value"] > 0 and ratio["pass"] is None and "--tiny" in ratio["no_verdict"]  # a tiny ratio: no verdict


def test_targets_are_judged_only_without_a_reason_not_to():
    from benchmarks.gpu_check import judged

    assert judged(1.2, 1.3, at_least=False)["pass"] is True and judged(3.5, 3.0, at_least=True)["pass"] is True
    assert judged(1.4, 1.3, at_least=False)["pass"] is False
    assert judged(1.4, 1.3, at_least=False, verdict="cpu") == {"value": 1.4, "target": "<= 1.3", "pass": None,
                                                                "no_verdict": "cpu"}
