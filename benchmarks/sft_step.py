"""Seconds per SFT optimizer step of the tiny generator: TRL's SFTTrainer against our plain loop; prints JSON.

    flock /tmp/rlprm_cpu_lock .venv/bin/python benchmarks/sft_step.py            # 30 timed steps per variant
    .venv/bin/python benchmarks/sft_step.py --steps 10 --warmup 2                # quicker

On the shape of recipes/arith_prepare.yaml (tiny Llama, hidden 128, MLP 384, 4 layers, 4 heads, char
tokenizer, batch 64, the task's training solutions), all in this one process, at torch threads 1 and 2:

- trl_lean: TRL's SFTTrainer with the lean loss (rlprm/rl/lean_sft.py), configured as `rlprm prepare` configured
  it before it got its own loop (random batches, completion-only loss, no bf16, no activation recomputation);
- plain: rlprm/experiments/sft.py's `train_sft`, the loop `rlprm prepare` uses: each batch sorted by length into
  `LENGTH_GROUPS` passes, each padded to its own longest sequence, no attention mask;
- plain_1_group: the same loop, one pass per batch padded to the batch's longest (what TRL's collator does);
- plain_1_group_masked: that, with an attention mask passed, to show what dropping it is worth.

Then, in a section of its own (`processes`, skipped with `--skip-processes`), the plain loop three ways side by
side: `plain_1_thread` and `plain_2_threads` (this process, torch threads 1 and 2) against `plain_2_processes`
(sft.processes=2: two spawned processes of one thread, each half of every batch, gradients summed), with the
ratios to plain_2_threads (what the recipe ran before) and plain_1_thread. The processes' steps are timed in
rank 0 (its logged sft/steps_per_second, one step a window); their start-up (spawning, imports, about 10-25 s)
is not in the step time, and is paid once per `rlprm prepare`. `--only-processes` runs this section alone and
`--out FILE` writes the JSON there too (benchmarks/sft_step.json).

Each run builds a fresh model from the same seed, takes `--warmup` untimed steps (allocator, first
backward), then times steps from one optimizer step's end to the next (data loading included); the
`--steps` timed steps of a variant are split over `--rounds` runs in alternating order (ABCD DCBA), and
the median step is reported. The machine is shared, so compare the variants within one run, as ratios,
not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepClock(TrainerCallback):
    """Records the time at the end of every optimizer step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.monotonic())


class TrackerClock:
    """Stands in for the run tracker in `train_sft` (logging every step): records when each step ended."""

    def __init__(self):
        self.ends: list[float] = []

    def log(self, metrics, step=None):
        self.ends.append(time.monotonic())


class RateClock:
    """Stands in for the tracker of a multi-process run: the step times rank 0 measured (1 / its steps per second
    over a one-step window), not the times its logs reach this process (they are polled)."""

    def __init__(self):
        self.gaps: list[float] = []

    def log(self, metrics, step=None):
        self.gaps.append(1 / metrics["sft/steps_per_second"])


class WithMask(torch.nn.Module):
    """The model, called with an attention mask over the non-pad tokens (what TRL's collator passes)."""

    def __init__(self, model, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long(), **kwargs)


def _gaps(ends: list[float], warmup: int) -> list[float]:
    """Seconds of each step after the first `warmup` ones (from one step's end to the next)."""
    return [b - a for a, b in zip(ends[max(warmup, 1) - 1:], ends[max(warmup, 1):])]


def _summary(gaps: list[float]) -> dict:
    # the median: another process's burst inflates a few steps, not the typical one
    median = statistics.median(gaps)
    return {"steps_per_s": round(1 / median, 3), "median_s_per_step": round(median, 4),
            "mean_s_per_step": round(statistics.mean(gaps), 4), "timed_steps": len(gaps)}


def run_trl(recipe, data, tokenizer, steps: int, warmup: int):
    from trl import SFTConfig

    from rlprm.rl.lean_sft import LeanSFTTrainer
    from rlprm.models import build_tiny_causal_lm

    sft = recipe.sft
    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as work:
        args = SFTConfig(
            output_dir=work, per_device_train_batch_size=sft.batch_size, max_steps=warmup + steps,
            learning_rate=sft.learning_rate, max_grad_norm=sft.max_grad_norm, logging_steps=25,
            save_strategy="no", report_to=[], use_cpu=True, bf16=False, activation_checkpointing=False,
            seed=recipe.run.seed, data_seed=recipe.run.seed, completion_only_loss=True,
            max_length=recipe.model.tiny.max_positions, dataset_num_proc=None, disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy="random",
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=sft.learning_rate, betas=tuple(sft.betas),
                                      weight_decay=sft.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        trainer = LeanSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 optimizers=(optimizer, scheduler), callbacks=[clock])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return _gaps(clock.ends, warmup), trainer.train_dataset


def run_plain(recipe, encoded, tokenizer, steps: int, warmup: int, masked: bool, groups: int) -> list[float]:
    from rlprm.models import build_tiny_causal_lm
    from rlprm.experiments.sft import train_sft

    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed)
    # processes=1: this process, on its torch threads (the recipe's own sft.processes would spawn)
    cfg = recipe.sft.model_copy(update={"steps": warmup + steps, "logging_steps": 1, "processes": 1})
    clock = TrackerClock()
    train_sft(WithMask(model, tokenizer.pad_token_id) if masked else model, encoded, cfg,
              tokenizer.pad_token_id, recipe.run.seed, tracker=clock, progress=False, groups=groups)
    return _gaps(clock.ends, warmup)


def run_processes(recipe, encoded, tokenizer, steps: int, warmup: int, processes: int) -> list[float]:
    from rlprm.models import build_tiny_causal_lm
    from rlprm.experiments.sft import train_sft

    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed)
    cfg = recipe.sft.model_copy(update={"steps": warmup + steps, "logging_steps": 1, "processes": processes})
    clock = RateClock()
    train_sft(model, encoded, cfg, tokenizer.pad_token_id, recipe.run.seed, tracker=clock, progress=False)
    return clock.gaps[warmup:]


def processes_section(recipe, encoded, tokenizer, steps: int, warmup: int, rounds: int) -> dict:
    """plain at 1 and 2 threads against 2 processes of 1 thread, in alternating rounds (ABC CBA ...)."""
    from rlprm.experiments.sft import LENGTH_GROUPS

    variants = ["plain_1_thread", "plain_2_threads", "plain_2_processes"]
    gaps: dict[str, list[float]] = {name: [] for name in variants}
    per_round = -(-steps // rounds)
    for r in range(rounds):
        for name in variants if r % 2 == 0 else variants[::-1]:
            if name == "plain_2_processes":
                gaps[name] += run_processes(recipe, encoded, tokenizer, per_round, warmup, 2)
            else:
                torch.set_num_threads(1 if name == "plain_1_thread" else 2)
                gaps[name] += run_plain(recipe, encoded, tokenizer, per_round, warmup, masked=False,
                                        groups=LENGTH_GROUPS)
    row = {name: _summary(g) for name, g in gaps.items()}
    fast = row["plain_2_processes"]["median_s_per_step"]
    row["speedup_of_2_processes_over"] = {name: round(row[name]["median_s_per_step"] / fast, 2)
                                          for name in variants[:2]}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, in alternating order")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--only-processes", action="store_true")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()

    import datasets
    from datasets import Dataset

    from rlprm.config import load_recipe
    from rlprm.experiments.prepare import build_tokenizer, training_data
    from rlprm.experiments.sft import LENGTH_GROUPS, batch_order, encode_completions, padded_table

    datasets.disable_progress_bars()
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml", ["tracking.wandb=disabled"])
    prompts, completions, _, _ = training_data(recipe)
    tokenizer = build_tokenizer(recipe, prompts[:2000] + completions[:2000])
    encoded = encode_completions(tokenizer, prompts, completions)
    _, _, lengths = padded_table(encoded, tokenizer.pad_token_id)
    widths = [int(lengths[rows].max()) for rows in batch_order(len(lengths), recipe.sft.batch_size, 200, 0)]
    shape = {
        "examples": len(prompts),
        "tokens_per_example": {"min": int(lengths.min()), "mean": round(float(lengths.float().mean()), 1),
                               "max": int(lengths.max())},
        "batch_width_first_200_batches": {"min": min(widths), "mean": round(statistics.mean(widths), 1),
                                          "max": max(widths)},
        "max_positions": recipe.model.tiny.max_positions,
        "batch_size": recipe.sft.batch_size,
    }

    results: dict = {}
    data = Dataset.from_dict({"prompt": prompts, "completion": completions})
    variants = ["trl_lean", "plain", "plain_1_group", "plain_1_group_masked"]
    if args.skip_trl:
        variants.remove("trl_lean")
    per_round = -(-args.steps // args.rounds)
    same_as_trl = None
    for threads in [] if args.only_processes else args.threads:
        torch.set_num_threads(threads)
        gaps: dict[str, list[float]] = {name: [] for name in variants}
        # rounds in alternating order (ABCD DCBA ...): a load that comes and goes hits every variant alike
        for r in range(args.rounds):
            for name in variants if r % 2 == 0 else variants[::-1]:
                if name == "trl_lean":
                    timed, trl_data = run_trl(recipe, data, tokenizer, per_round, args.warmup)
                    if same_as_trl is None:
                        # our tokenization must be TRL's: the same ids, and labels from the same token on
                        starts = [sum(1 for x in lab if x == -100) for lab in trl_data["labels"]]
                        same_as_trl = (all(list(a) == b for a, b in zip(trl_data["input_ids"], encoded.ids))
                                       and starts == encoded.prompt_lengths)
                else:
                    timed = run_plain(recipe, encoded, tokenizer, per_round, args.warmup,
                                      masked=name.endswith("masked"), groups=1 if "1_group" in name else LENGTH_GROUPS)
                gaps[name] += timed
        row = {name: _summary(g) for name, g in gaps.items()}
        base = row["plain"]["median_s_per_step"]
        row["speedup_of_plain_over"] = {name: round(row[name]["median_s_per_step"] / base, 2)
                                        for name in variants if name != "plain"}
        results[f"threads_{threads}"] = row

    if not args.skip_processes:
        results["processes"] = processes_section(recipe, encoded, tokenizer, args.steps, args.warmup, args.rounds)

    report = json.dumps({
        "shape": shape,
        "model": "tiny Llama hidden 128, MLP 384, 4 layers, 4 heads, char tokenizer",
        "warmup_steps_per_run": args.warmup,
        "rounds": args.rounds,
        "length_groups": LENGTH_GROUPS,
        "same_tokens_and_labels_as_trl": same_as_trl,
        "results": results,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }, indent=2)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
