"""`rlprm prepare`: build and fine-tune the tiny generator on the embedded task.

The generator is fine-tuned (rlprm/experiments/sft.py, a plain torch loop) on a mix of
clean and corrupted solutions (loss on the completion only), so that when
sampled at temperature 1 it makes the kind of step errors a PRM has to catch.
It is then checked on held-out problems, and saved as `generator/` only if it
meets the recipe's targets: a generator that cannot write well-formed
solutions, or never makes (or never avoids) step errors, would make every
later stage meaningless, so the run stops with a message instead.

Training runs exactly `sft.steps` optimizer steps, with the learning-rate
schedule (warm-up, then cosine to `min_lr_ratio`) laid over them, so a slow
machine trains as many steps as a fast one. It used to be laid over wall-clock
time, and a slow machine (486 s for 700 steps instead of 250-320 s) then
trained a different, often worse, generator. The wall time is printed and
reported (`train_seconds`), never used to stop. The same steps are not yet the
same generator: the float sums depend on the CPU kernels torch and MKL pick and
on the thread count, and a few hundred steps turn a last-bit difference into
another model. rlprm pins the kernels (rlprm/reproducibility.py) and the recipe
fixes run.threads and sft.processes (with sft.processes > 1, that many processes
of one thread each train, and run.threads serve the check only); what that does
and does not cover: docs/reproducibility.md. The summary records the kernels,
threads and SFT processes the run used.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rlprm.config import Recipe
from rlprm.errors import EXIT_TARGETS_MISSED, InputError
from rlprm.files import atomic_dir


class PrepareError(RuntimeError):
    """The generator missed its targets (the message says which and what to try)."""

    exit_code = EXIT_TARGETS_MISSED


class PrepareInputError(InputError, ValueError):
    """The recipe cannot be prepared as given (another command's recipe, a model too small for the task); exit 2,
    not 3: no target was missed, nothing was trained."""


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
    rates = summarize(results)
    arith = recipe.task.arithmetic
    rates.update(shortcut_confidence_auroc(model, tokenizer, problems, out, results, ev.max_new_tokens,
                                           finals=tuple(arith.shortcut_finals)))
    rates.update(habit_confidence_auroc(model, tokenizer, problems, out, results, ev.max_new_tokens, "carry_drop",
                                        finals=tuple(arith.carry_drop_finals)))
    return rates


def shortcut_confidence_auroc(model, tokenizer, problems, samples, results, max_new_tokens: int,
                              finals: tuple[str, ...] = ("mod10", "last_digit")) -> dict:
    """How well the generator's OWN confidence tells its shortcut chains from its fully correct ones.

    AUROC of the lowest token log-probability (and of the total log-likelihood) of each sample, fully correct
    samples against shortcut samples: near 0.5 (or below) means the shortcut is written as confidently as the
    right chain, so a reward model that merely measures the generator's certainty cannot catch it. Also on the
    problems whose final op is one the training data takes the shortcut on (`finals`, the recipe's
    task.arithmetic.shortcut_finals: there the shortcut is the commoner, surer choice). None where a class is missing.
    """
    return habit_confidence_auroc(model, tokenizer, problems, samples, results, max_new_tokens, "shortcut", finals)


def habit_confidence_auroc(model, tokenizer, problems, samples, results, max_new_tokens: int, habit: str,
                           finals: tuple[str, ...]) -> dict:
    """`shortcut_confidence_auroc` for any habit a CheckResult flags (`habit`: "shortcut" or "carry_drop"):
    keys confidence_auroc_<habit>, likelihood_auroc_<habit>, confidence_auroc_<habit>_eligible (on the problems
    whose final is in `finals`, those the training data takes the habit on). The samples are pooled over
    problems, one per problem."""
    from rlprm.evaluation.evaluate import response_logprobs
    from rlprm.reward.metrics import auroc

    keys = [f"confidence_auroc_{habit}", f"likelihood_auroc_{habit}", f"confidence_auroc_{habit}_eligible"]
    keep = [i for i, r in enumerate(results) if r.process_correct or getattr(r, habit)]
    if not keep:
        return dict.fromkeys(keys)
    eos = tokenizer.eos_token_id
    comps = []
    for i in keep:
        ids = list(samples.token_ids[i][0])
        comps.append(ids + [eos] if eos is not None and len(ids) < max_new_tokens else ids)
    lps = response_logprobs(model, tokenizer, [problems[i].prompt for i in keep], comps)
    low = [float(lp.min()) if len(lp) else 0.0 for lp in lps]
    total = [float(lp.sum()) for lp in lps]
    right = [bool(results[i].process_correct) for i in keep]
    eligible = [j for j, i in enumerate(keep) if problems[i].final in finals]
    return dict(zip(keys, [auroc(low, right), auroc(total, right),
                           auroc([low[j] for j in eligible], [right[j] for j in eligible])]))


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


def training_data(recipe: Recipe):
    """(prompts, completions, rows, held-out problems) of the recipe: held-out problems never appear in training.

    `rows` are training_solutions' (problem, steps, is_clean) triples, one per prompt.
    """
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import split_problems, training_solutions

    arith = recipe.task.arithmetic
    train_problems, test_problems = split_problems(arith, recipe.sft.num_examples, recipe.prepare_eval.num_problems,
                                                   recipe.run.seed)
    rows = training_solutions(train_problems, arith.corrupt_rate, seed=recipe.run.seed,
                              shortcut_rate=arith.shortcut_rate, shortcut_finals=arith.shortcut_finals,
                              carry_drop_rate=arith.carry_drop_rate, carry_drop_finals=arith.carry_drop_finals)
    prompts = [p.prompt for p, _, _ in rows]
    completions = [render_steps(steps, recipe.task.step_separator) for _, steps, _ in rows]
    return prompts, completions, rows, test_problems


def prepare(recipe: Recipe, progress: bool = True) -> dict:
    """Train, check and save the generator; returns the rates. Raises PrepareError on missed targets."""
    if recipe.task.name != "arithmetic" or recipe.model.generator != "tiny":
        wrong = [f"{k} is {v}" for k, v, want in (("task.name", recipe.task.name, "arithmetic"),
                                                  ("model.generator", recipe.model.generator, "tiny")) if v != want]
        raise PrepareInputError(f"{recipe.source or 'the recipe'}: {' and '.join(wrong)}, but `rlprm prepare` builds "
                                "the tiny generator for the arithmetic task (task.name: arithmetic, model.generator: "
                                "tiny). Is this another command's recipe? (an RL recipe runs with `rlprm train-rl`, a "
                                "reward model's with `rlprm train-rm`, recipes/arith_prepare.yaml is prepare's)")
    import torch

    from rlprm.models import build_tiny_causal_lm, num_parameters, resolve_device
    from rlprm.experiments.sft import SFTError, encode_completions, train_sft
    from rlprm.reproducibility import kernel_report
    from rlprm.tracking import Tracker

    t_start = time.monotonic()
    run_dir = Path(recipe.run.output_dir)
    final_dir = run_dir / "generator"
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    device = resolve_device(recipe.run.device)
    sft = recipe.sft

    # 1. problems and solutions
    prompts, completions, rows, test_problems = training_data(recipe)

    # 2. tokenizer and model, built on the spot
    tokenizer = build_tokenizer(recipe, prompts[:2000] + completions[:2000])
    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed)
    encoded = encode_completions(tokenizer, prompts, completions)
    longest = max(len(ids) for ids in encoded.ids)
    if longest > recipe.model.tiny.max_positions:
        # a cut solution would lose its end token, and the generator would never learn to stop
        raise PrepareInputError(f"a training solution is {longest} tokens, more than model.tiny.max_positions "
                           f"({recipe.model.tiny.max_positions}); raise it or make task.arithmetic smaller")

    tracker = Tracker(run_dir, recipe, job="prepare", tags=["prepare"])
    try:
        tracker.log({"params": num_parameters(model), "train_examples": len(rows),
                     "corrupted_share": sum(not clean for _, _, clean in rows) / len(rows)}, step=0)
        print(f"tiny generator: {num_parameters(model) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
              f"{len(rows)} training solutions ({recipe.task.arithmetic.corrupt_rate:.0%} corrupted), "
              f"{sft.steps} steps of {sft.batch_size}")

        # 3. SFT: exactly sft.steps optimizer steps
        try:
            clean = None
            if sft.clean_steps:
                from rlprm.steps import render_steps
                from rlprm.tasks.arithmetic import reference_solution

                clean = encode_completions(tokenizer, prompts, [render_steps(reference_solution(p), recipe.task.step_separator)
                                                                for p, _, _ in rows])
            result = train_sft(model, encoded, sft, tokenizer.pad_token_id, recipe.run.seed, device=device,
                               tracker=tracker, progress=progress, clean=clean)
        except SFTError as exc:
            raise PrepareError(str(exc)) from None
        print(f"trained {result['steps']} steps in {result['seconds']:.0f} s "
              f"({result['steps_per_second']:.2f} steps/s), final loss {result['final_loss']:.3f}")

        # 4. check the generator on held-out problems, sampled as RL will sample it
        rates = evaluate_generator(model, tokenizer, test_problems, recipe, progress=progress)
        rates.update(train_steps=result["steps"], train_loss=result["train_loss"], final_loss=result["final_loss"],
                     train_seconds=round(result["seconds"], 1),
                     train_steps_per_second=round(result["steps_per_second"], 3),
                     sft_processes=result["processes"],
                     wall_seconds=round(time.monotonic() - t_start, 1), **kernel_report())
        failures = target_failures(rates, recipe)
        rates["targets_met"] = not failures
        tracker.log({f"prepare/{k}": v for k, v in rates.items()}, step=result["steps"])
        tracker.summary(rates)
        rates["targets_missed"] = list(failures)  # saved anyway (enforce_targets false): the terminal says which

        # 5. save atomically: a complete `generator/` or none at all
        enforce = recipe.prepare_eval.enforce_targets
        dest = run_dir / ("generator.rejected" if failures and enforce else "generator")
        model.generation_config.do_sample = True
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if failures and enforce:
            shutil.rmtree(final_dir, ignore_errors=True)
            raise PrepareError(
                "the generator missed its targets: " + "; ".join(failures) + f". It was kept in {dest} for "
                "inspection but NOT saved as generator/. Try more sft.steps (below about 600 the arithmetic "
                "has not clicked; docs/design.md section 8), keep task.arithmetic small, or adjust "
                "task.arithmetic.corrupt_rate (process accuracy is about 1 - corrupt_rate); "
                "prepare_eval.enforce_targets: false saves it anyway."
            )
        return rates
    finally:
        tracker.finish()
