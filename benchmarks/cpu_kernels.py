"""What pinning the CPU kernels costs (rlprm/reproducibility.py): pinned against native, side by side; prints JSON.

    flock /tmp/rlprm_cpu_lock .venv/bin/python benchmarks/cpu_kernels.py                 # 3 rounds each
    .venv/bin/python benchmarks/cpu_kernels.py --rounds 1 --sft-steps 6 --out /tmp/k.json  # quicker

The kernels are chosen once per process (torch at its first kernel, MKL at its first call), so each
measurement is a fresh child process, `pinned` (the default: ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2) and
`native` (RLPRM_CPU_KERNELS=native: the machine's own choice) taking turns (ABBA...) so that a drift in the
shared machine's speed hits both. Each child, at `--threads` torch threads, on the shape of
recipes/arith_prepare.yaml (tiny Llama, hidden 128, 4 layers, char tokenizer):

- sft: seconds per optimizer step of rlprm/experiments/sft.py's `train_sft`, batch 64 of the task's training solutions
  (what `rlprm prepare` runs), after `--warmup` untimed steps;
- sample: seconds to sample `--prompts` prompts x 4 at temperature 1, 48 new tokens each (the generate phase,
  the larger part of an RL iteration on these recipes: benchmarks/rl_step.py), from an untrained model
  (it writes no end token, so every call makes the same number of tokens).

Each is timed on the wall clock and in the process's CPU seconds (all its threads): on a shared, loaded
machine the wall time of one step swung 2.4-15 s within one run, while CPU seconds move far less. The
ratio pinned / native per round and its median is the cost. On an AVX2 processor (no AVX-512) torch's
native level already is AVX2, so only MKL's branch differs; on an AVX-512 processor the pin also takes
torch down a level, which this script measures only when run there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


FIGURES = ("sft_step_s", "sft_step_cpu_s", "sample_s", "sample_cpu_s")


def child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from rlprm.config import load_recipe
    from rlprm.models import build_tiny_causal_lm
    from rlprm.experiments.prepare import build_tokenizer, training_data
    from rlprm.reproducibility import kernel_report
    from rlprm.sampling import sample
    from rlprm.experiments.sft import encode_completions, train_sft

    torch.set_num_threads(args.threads)
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml",
                         ["sft.num_examples=2000", f"sft.steps={args.warmup + args.sft_steps}", "sft.clean_steps=0",
                          "sft.logging_steps=1", "prepare_eval.num_problems=64"])
    prompts, completions, _, test = training_data(recipe)
    tokenizer = build_tokenizer(recipe, prompts + completions)
    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=0)
    encoded = encode_completions(tokenizer, prompts, completions)

    class Clock:
        def __init__(self):
            self.ends = []

        def log(self, metrics, step=None):
            self.ends.append((time.monotonic(), time.process_time()))

    clock = Clock()
    train_sft(model, encoded, recipe.sft, tokenizer.pad_token_id, 0, tracker=clock, progress=False)
    timed = clock.ends[args.warmup - 1:]
    wall = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    cpu = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    model.eval()
    sample(model, tokenizer, [p.prompt for p in test[:8]], n=1, temperature=1.0, max_new_tokens=8, seed=0,
           progress=False)  # warm-up
    t0, c0 = time.monotonic(), time.process_time()
    sample(model, tokenizer, [p.prompt for p in test[:args.prompts]], n=4, temperature=1.0, max_new_tokens=48,
           batch_size=256, seed=0, progress=False)
    return {"sft_step_s": statistics.median(wall), "sft_step_cpu_s": statistics.median(cpu),
            "sample_s": time.monotonic() - t0, "sample_cpu_s": time.process_time() - c0, **kernel_report()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="child processes per mode, in alternating order")
    p.add_argument("--sft-steps", type=int, default=12, help="timed SFT steps per child")
    p.add_argument("--warmup", type=int, default=3, help="untimed SFT steps first")
    p.add_argument("--prompts", type=int, default=32, help="prompts sampled 4 times each")
    p.add_argument("--threads", type=int, default=2, help="torch threads (arith_prepare.yaml's run.threads)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "RLPRM_CPU_KERNELS")}
    modes = {"pinned": base, "native": {**base, "RLPRM_CPU_KERNELS": "native"}}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    cmd = [sys.executable, __file__, "--child", "--sft-steps", str(args.sft_steps), "--warmup", str(args.warmup),
           "--prompts", str(args.prompts), "--threads", str(args.threads)]
    for r in range(args.rounds):
        for mode in (("pinned", "native") if r % 2 == 0 else ("native", "pinned")):
            out = subprocess.run(cmd, env={**modes[mode], "OMP_NUM_THREADS": str(args.threads)},
                                 capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
        "kernels": {m: {k: runs[m][0][k] for k in ("cpu_capability", "mkl_cbwr")} for m in runs},
        **{k: {m: [round(x[k], 4) for x in runs[m]] for m in runs} for k in FIGURES},
        "ratio_pinned_over_native": {
            k: round(statistics.median(a[k] / b[k] for a, b in zip(runs["pinned"], runs["native"])), 3)
            for k in FIGURES},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
