"""`rlprm prepare`: build and fine-tune the tiny generator on the embedded task.

The generator is trained with TRL's SFTTrainer on a mix of clean and
corrupted solutions (loss on the completion only), so that when sampled at
temperature 1 it makes the kind of step errors a PRM has to catch. It is then
checked on held-out problems, and saved as `generator/` only if it meets the
recipe's targets: a generator that cannot write well-formed solutions, or
never makes (or never avoids) step errors, would make every later stage
meaningless, so the run stops with a message instead.

The learning-rate schedule is laid over wall-clock time, not steps: warm-up,
then cosine to `min_lr_ratio` at `time_budget_s`, where training stops. That
is how the calibration in DESIGN.md section 7 was measured, and it keeps the
run inside its budget on slower machines (at the cost of step-exact
reproducibility). With `sft.min_steps`, a machine too busy to reach that many
steps in the budget trains on: the schedule follows whichever of time and
steps is further from its end, because below about 600 steps the arithmetic
has not clicked (a loaded run of 300 s reached 20% process accuracy, an idle
one 37-46%).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from rlprm.config import Recipe


class PrepareError(RuntimeError):
    """The generator missed its targets (the message says which and what to try)."""


def _schedule_progress(clock, budget_s: float, min_steps: int):
    """progress(step) in [0, 1]: the share of the time budget spent, or of `min_steps` done if that is smaller."""

    def progress(step: int) -> float:
        frac = clock() / budget_s
        if min_steps:
            frac = min(frac, step / min_steps)
        return min(1.0, frac)

    return progress


def _time_schedule(optimizer, warmup_steps: int, min_ratio: float, progress):
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress(step)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _budget_callback(clock, progress_of, progress: bool):
    """Stops training when the schedule is done; its progress bar counts percent of the schedule."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StopAtBudget(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()
            self.bar = tqdm(total=100, desc="training generator", unit="%", disable=not progress)

        def on_step_end(self, args, state, control, **kwargs):
            done = progress_of(state.global_step)
            self.bar.n = min(round(100 * done), 100)
            self.bar.refresh()
            if done >= 1.0:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(step=state.global_step, loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StopAtBudget()


class _Clock:
    """Seconds since training began (0 before)."""

    def __init__(self):
        self.t0 = None

    def start(self):
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0


def _metrics_callback(tracker):
    from transformers import TrainerCallback

    class ToTracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                tracker.log({f"sft/{k}": v for k, v in logs.items()}, step=state.global_step)

    return ToTracker()


def _lean_sft_trainer_class():
    """SFTTrainer with the plain causal-LM loss.

    TRL 1.16 computes the loss through a fused, tiled LM head that also
    produces per-token entropy and top-1 metrics on every step. For a
    40-symbol vocabulary on a CPU that machinery is pure overhead: the plain
    loss (same value: mean cross-entropy over completion tokens) made a step
    about 1.8x faster in a side-by-side run. Everything else (data
    preparation, completion-only labels, EOS, the loop) stays TRL's.
    """
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                            labels=inputs["labels"], use_cache=False)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return LeanSFTTrainer


def build_tokenizer(recipe: Recipe, corpus: list[str]):
    from rlprm.models import build_bpe_tokenizer, build_char_tokenizer
    from rlprm.tasks.arithmetic import CHARSET

    tiny = recipe.model.tiny
    if tiny.tokenizer == "char":
        return build_char_tokenizer(CHARSET, model_max_length=tiny.max_positions)
    return build_bpe_tokenizer(corpus, vocab_size=512, model_max_length=tiny.max_positions)


def evaluate_generator(model, tokenizer, problems, recipe: Recipe, progress: bool = True) -> dict:
    """Sample once per held-out problem at the recipe's temperature; rates from the exact checker."""
    from rlprm.sampling import sample
    from rlprm.tasks.arithmetic import check, summarize

    ev = recipe.prepare_eval
    out = sample(
        model, tokenizer, [p.prompt for p in problems], n=1, temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, seed=recipe.run.seed, progress=progress,
        desc="checking generator",
    )
    results = [check(p, texts[0], recipe.task.step_separator) for p, texts in zip(problems, out.texts)]
    return summarize(results)


def target_failures(rates: dict, recipe: Recipe) -> list[str]:
    ev = recipe.prepare_eval
    problems = []
    if rates["well_formed"] < ev.min_well_formed:
        problems.append(f"well-formed {rates['well_formed']:.1%} < {ev.min_well_formed:.0%}")
    if rates["process_accuracy"] < ev.min_process_accuracy:
        problems.append(f"process accuracy {rates['process_accuracy']:.1%} < {ev.min_process_accuracy:.0%}")
    if rates["process_accuracy"] > ev.max_process_accuracy:
        problems.append(f"process accuracy {rates['process_accuracy']:.1%} > {ev.max_process_accuracy:.0%}")
    return problems


def prepare(recipe: Recipe, progress: bool = True) -> dict:
    """Train, check and save the generator; returns the rates. Raises PrepareError on missed targets."""
    import datasets
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from rlprm.models import build_tiny_causal_lm, num_parameters, resolve_device
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import split_problems, training_solutions
    from rlprm.tracking import Tracker

    if recipe.task.name != "arithmetic" or recipe.model.generator != "tiny":
        raise PrepareError("`rlprm prepare` builds the tiny generator for the arithmetic task: "
                           "set task.name: arithmetic and model.generator: tiny")
    t_start = time.monotonic()
    datasets.disable_progress_bars()  # TRL's dataset preparation takes seconds; its five bars are noise
    run_dir = Path(recipe.run.output_dir)
    final_dir = run_dir / "generator"
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    device = resolve_device(recipe.run.device)
    sep = recipe.task.step_separator
    sft = recipe.sft

    # 1. problems and solutions: held-out problems never appear in training
    train_problems, test_problems = split_problems(
        recipe.task.arithmetic, sft.num_examples, recipe.prepare_eval.num_problems, recipe.run.seed
    )
    arith = recipe.task.arithmetic
    rows = training_solutions(train_problems, arith.corrupt_rate, seed=recipe.run.seed,
                              shortcut_rate=arith.shortcut_rate, shortcut_finals=arith.shortcut_finals)
    data = Dataset.from_dict({
        "prompt": [p.prompt for p, _, _ in rows],
        "completion": [render_steps(steps, sep) for _, steps, _ in rows],
    })

    # 2. tokenizer and model, built on the spot
    tokenizer = build_tokenizer(recipe, data["prompt"][:2000] + data["completion"][:2000])
    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed)

    tracker = Tracker(run_dir, recipe, job="prepare", tags=["prepare"])
    try:
        tracker.log({"params": num_parameters(model), "train_examples": len(rows),
                     "corrupted_share": sum(not clean for _, _, clean in rows) / len(rows)}, step=0)
        print(f"tiny generator: {num_parameters(model) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
              f"{len(rows)} training solutions ({recipe.task.arithmetic.corrupt_rate:.0%} corrupted), "
              f"budget {sft.time_budget_s:.0f} s" + (f", at least {sft.min_steps} steps" if sft.min_steps else ""))

        # 3. SFT with a wall-clock schedule
        work_dir = run_dir / "sft_work"
        args = SFTConfig(
            output_dir=str(work_dir),
            per_device_train_batch_size=sft.batch_size,
            max_steps=sft.max_steps,
            learning_rate=sft.learning_rate,
            max_grad_norm=sft.max_grad_norm,
            logging_steps=25,
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            # TRL's SFTConfig turns on bf16 autocast and activation recomputation by default; on CPU both
            # only cost time for a 1M-parameter model (fewer steps fit the budget)
            bf16=False if device == "cpu" else None,
            activation_checkpointing=False,
            seed=recipe.run.seed,
            data_seed=recipe.run.seed,
            completion_only_loss=True,
            max_length=recipe.model.tiny.max_positions,
            dataset_num_proc=None,
            disable_tqdm=True,  # our own bar counts seconds of the budget
            dataloader_num_workers=0,
            # random batches: grouping by length saves padding but makes each batch one kind of
            # problem, and then the arithmetic never clicks (loss 0.82 vs 0.40 after 200 steps)
            train_sampling_strategy="random",
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=sft.learning_rate, betas=tuple(sft.betas),
                                      weight_decay=sft.weight_decay)
        clock = _Clock()
        progress_of = _schedule_progress(clock, sft.time_budget_s, sft.min_steps)
        scheduler = _time_schedule(optimizer, sft.warmup_steps, sft.min_lr_ratio, progress_of)
        trainer = _lean_sft_trainer_class()(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            optimizers=(optimizer, scheduler),
            callbacks=[_budget_callback(clock, progress_of, progress), _metrics_callback(tracker)],
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # logs go to metrics.jsonl and the bar, not raw dicts on stdout
        result = trainer.train()
        train_s = clock()
        steps_done = trainer.state.global_step
        shutil.rmtree(work_dir, ignore_errors=True)

        # 4. check the generator on held-out problems, sampled as RL will sample it
        model = trainer.model.to(device)
        rates = evaluate_generator(model, tokenizer, test_problems, recipe, progress=progress)
        rates.update(train_seconds=round(train_s, 1), train_steps=steps_done, train_loss=float(result.training_loss),
                     wall_seconds=round(time.monotonic() - t_start, 1))
        failures = target_failures(rates, recipe)
        rates["targets_met"] = not failures
        tracker.log({f"prepare/{k}": v for k, v in rates.items()}, step=steps_done)
        tracker.summary(rates)

        # 5. save atomically: a complete `generator/` or none at all
        enforce = recipe.prepare_eval.enforce_targets
        dest = run_dir / ("generator.rejected" if failures and enforce else "generator")
        tmp = run_dir / (dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.generation_config.do_sample = True
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        if failures and enforce:
            shutil.rmtree(final_dir, ignore_errors=True)
            raise PrepareError(
                "the generator missed its targets: " + "; ".join(failures) + f". It was kept in {dest} for "
                "inspection but NOT saved as generator/. Try a larger sft.time_budget_s (the calibration in "
                "DESIGN.md section 7 needed 300 s), keep task.arithmetic small, or adjust "
                "task.arithmetic.corrupt_rate (process accuracy is about 1 - corrupt_rate); "
                "prepare_eval.enforce_targets: false saves it anyway."
            )
        return rates
    finally:
        tracker.finish()
