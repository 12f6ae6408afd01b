"""Digests of eight short RL runs with tiny models: run it at two commits to show a change kept a run's numbers.

    .venv/bin/python benchmarks/rl_digests.py /tmp/digests_here > here.json    # at each commit, then
    diff before.json after.json                                                   # identical: same numbers

PPO (dense exact, sparse confidence, dense PRM, LoRA + sparse confidence), GRPO (dense exact, sparse ORM) and
rejection sampling (ground truth, PRM), 2 epochs of 2 iterations each, seed 3, one thread, on CPU, from a tiny
generator fitted here on its first prompts (so that it answers, some right, some wrong) and a tiny untrained PRM
and ORM built on it. Per run it prints the SHA-256 of metrics.jsonl and summary.json with their wall-clock keys
dropped (`time`, `time/...`, the HF Trainer's `*_runtime`, `*_per_second`; they differ between any two runs)
and of the exported weights. The models it builds are cached in OUT/models (delete it to rebuild them);
OUT/runs is emptied first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SEED = 3
SIZES = {
    "ppo": {"prompts_per_iteration": 2, "minibatch_size": 2, "ppo_epochs": 1, "value_learning_rate": 1e-3},
    "grpo": {"prompts_per_iteration": 2, "minibatch_size": 2, "ppo_epochs": 1},
    "rejection_sampling": {"sft_batch_size": 2, "samples_per_problem": 4},
}
RUNS = {
    "ppo_dense_exact": ("ppo", {"mode": "dense", "source": "exact", "dense_form": "min_form"}),
    "ppo_sparse_confidence": ("ppo", {"mode": "sparse", "source": "confidence"}),
    "ppo_dense_prm": ("ppo", {"mode": "dense", "source": "prm", "dense_form": "min_form"}),
    "ppo_lora_confidence": ("ppo", {"mode": "sparse", "source": "confidence"}),
    "grpo_dense_exact": ("grpo", {"mode": "dense", "source": "exact", "dense_form": "score"}),
    "grpo_sparse_orm": ("grpo", {"mode": "sparse", "source": "orm"}),
    "rejection_ground_truth": ("rejection_sampling", {"mode": "sparse", "source": "ground_truth"}),
    "rejection_prm": ("rejection_sampling", {"mode": "sparse", "source": "prm"}),
}


def build_models(folder: Path) -> None:
    """The generator (250 full-batch steps on the reference solutions of the runs' first prompts) and an
    untrained PRM and ORM on its tokenizer."""
    from rlprm.config import ArithmeticConfig, TinyModelConfig
    from rlprm.models import build_char_tokenizer, build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm
    from rlprm.tasks.arithmetic import CHARSET, make_problems
    from rlprm.testing.tiny import fit_generator

    tok = build_char_tokenizer(CHARSET)
    # the seed stream of epoch_problems (rlprm/data/problems.py) for epochs 0 and 1
    problems = [p for e in (0, 1) for p in make_problems(ArithmeticConfig(), 8, seed=SEED * 1_000_003 + 1000 + e)]
    fit_generator(tok, problems, 250, seed=0).save_pretrained(folder / "generator")
    tok.save_pretrained(folder / "generator")
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    for kind in ("prm", "orm"):
        convention = make_convention(kind, "\n")
        lm = build_tiny_causal_lm(tiny, tok, seed=1)
        RewardModel(reward_model_from_causal_lm(convention, lm, tok), tok, convention).save(folder / kind)


def recipe_of(name: str, out: Path, models: Path):
    from rlprm.config import validate_recipe

    algorithm, reward = RUNS[name]
    model = {"generator": str(models / "generator")}
    if reward["source"] in ("prm", "orm"):
        model["reward_model"] = str(models / reward["source"])
    if "lora" in name:
        model["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    return validate_recipe({
        "run": {"output_dir": str(out / name), "device": "cpu", "seed": SEED, "threads": 1},
        "model": model, "reward": reward,
        "rl": {"algorithm": algorithm, "epochs": 2, "problems_per_epoch": 4, "samples_per_problem": 2,
               "max_new_tokens": 80, "learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2,
               **SIZES[algorithm]},
        "eval": {"resamples": 5}, "tracking": {"wandb": "disabled"},
    }, out)


def wall_clock(key: str) -> bool:
    return key == "time" or key.startswith("time/") or key.endswith(("_runtime", "_per_second"))


def digest(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if not wall_clock(k)} for r in records]
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items()
               if not wall_clock(k) and k != "export_dir"}

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    return {"records": len(records), "metrics_sha256": sha(json.dumps(records, sort_keys=True).encode()),
            "summary_sha256": sha(json.dumps(summary, sort_keys=True).encode()),
            "export_sha256": sha((run_dir / "export" / "model.safetensors").read_bytes())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a folder for the runs (and the cached models)")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="a subset of the runs")
    args = parser.parse_args()
    import shutil

    import torch

    from rlprm.rl import train

    torch.set_num_threads(1)
    shutil.rmtree(args.out / "runs", ignore_errors=True)  # a run refuses a folder it did not start (no --resume)
    models = args.out / "models"
    if not models.exists():
        build_models(models)
    out = {}
    for name in args.runs:
        train(recipe_of(name, args.out / "runs", models), progress=False)
        out[name] = digest(args.out / "runs" / name)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
