"""Rejection sampling (expert iteration): sample N per problem, keep the best, fine-tune on them; repeat.

Each RL epoch reads top to bottom in `train_rejection`: 1. generate N samples
per problem, 2. score them (the exact grader always; the PRM or ORM when the
recipe has one), 3. select the samples to keep, 4. one SFT pass over them with
TRL's `SFTTrainer` (loss on the completion only), 5. log, 6. best-of-N on
held-out problems, 7. a checkpoint; the run ends with 8. export.

Selection (`select_samples`, a pure function): with a reward model, the
`rl.rejection_top_k` best distinct samples of each problem that reach a final
answer (optionally only those scoring at least `rl.rejection_min_score`); with
ground-truth rewards, up to `rl.rejection_top_k` distinct samples the grader
accepts. Identical texts are kept once: a solution sampled many times (the
usual case for a right one) would otherwise be trained on many times.

The policy's optimizer lives across epochs (each epoch builds a new trainer
around the same model and optimizer), and the checkpoint holds it, so a resumed
run continues where it stopped. The problems and the sampling seed of epoch e
depend only on (seed, e): on CPU a resumed run ends with the same metrics as
an uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from rlprm.config import Recipe


class RejectionError(RuntimeError):
    """A rejection-sampling run cannot go on (non-finite loss or scores); the message says what to do."""


class RejectionInputError(RejectionError):
    """The run cannot start (missing inputs, an unsupported setting, a run folder that needs --resume)."""


# --------------------------------------------------------------------------- pure pieces


def select_samples(scores: list[list[float]], eligible: list[list[bool]], texts: list[list[str]], top_k: int,
                   min_score: float | None = None) -> list[list[int]]:
    """The samples to keep, per problem.

    scores, eligible, texts: [P][N] (problem i, sample j). Returns [P] lists of at
    most `top_k` sample indices, best score first: eligible samples only, at
    least `min_score` if given, each text once (its first occurrence), ties
    broken by sample order (stable).
    """
    keep: list[list[int]] = []
    for row_scores, row_ok, row_texts in zip(scores, eligible, texts):
        order = sorted(range(len(row_scores)), key=lambda j: -row_scores[j])  # sorted() is stable: ties keep order
        chosen, seen = [], set()
        for j in order:
            if len(chosen) == top_k:
                break
            if not row_ok[j] or row_texts[j] in seen or (min_score is not None and row_scores[j] < min_score):
                continue
            seen.add(row_texts[j])
            chosen.append(j)
        keep.append(chosen)
    return keep


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def check_inputs(recipe: Recipe) -> None:
    """What can be checked before a model is loaded; raises RejectionInputError."""
    if recipe.model.generator == "tiny":
        raise RejectionInputError("model.generator is `tiny` (an untrained model); point it at a trained generator, "
                                  "e.g. ../runs/arith/generator built by `rlprm prepare recipes/arith_prepare.yaml`")
    gen = recipe.model.generator
    if gen.startswith("/") and not (Path(gen) / "config.json").is_file():
        raise RejectionInputError(f"model.generator: no checkpoint at {gen} (config.json missing)")
    if recipe.reward.source in ("prm", "orm"):
        if recipe.model.reward_model is None:
            raise RejectionInputError(f"reward.source is {recipe.reward.source} but model.reward_model is not set; "
                                      "point it at a folder written by `rlprm train-rm`")
        rm = recipe.model.reward_model
        if rm.startswith("/") and not Path(rm).exists():
            raise RejectionInputError(f"model.reward_model: {rm} does not exist")
    if recipe.reward.mode == "dense":
        raise RejectionInputError("reward.mode is dense, but rejection sampling ranks whole solutions: set "
                                  "reward.mode: sparse (a PRM's step scores are aggregated by reward.sparse_aggregate)")
    if recipe.deepspeed is not None:
        raise RejectionInputError("rl.algorithm rejection_sampling does not run under DeepSpeed yet (its SFT step "
                                  "keeps one optimizer across epochs); remove the `deepspeed` key (LoRA, "
                                  "model.lora.enabled, keeps the memory small)")


# --------------------------------------------------------------------------- the loop


def _sft_callback(tracker, step_offset: int, state: dict):
    """Logs every SFT step to the tracker and stops the trainer at the first non-finite loss or gradient."""
    from transformers import TrainerCallback

    class ToTrackerAndGuard(TrainerCallback):
        def on_log(self, args, st, control, logs=None, **kwargs):
            if not logs:
                return
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            tracker.log({f"sft/{k}": v for k, v in numbers.items()}, step=step_offset + st.global_step)
            state["last_loss"] = numbers.get("loss", state.get("last_loss"))
            for key in ("loss", "grad_norm"):
                if key in numbers and not math.isfinite(numbers[key]):
                    state["bad"] = f"the SFT {key} ({numbers[key]}) at SFT step {st.global_step}"
                    control.should_training_stop = True

    return ToTrackerAndGuard()


def _load_policy(recipe: Recipe, ckpt: Path | None, device: str):
    from rlprm.models import apply_lora, load_causal_lm

    gen, dtype, trc = recipe.model.generator, recipe.model.dtype, recipe.model.trust_remote_code
    if ckpt is not None and (ckpt / "model" / "adapter_config.json").is_file():
        # a LoRA run checkpoints its adapters only: the base is the generator, the adapters come back trainable
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(gen, dtype, device, trc), str(ckpt / "model"),
                                         is_trainable=True).to(device)
    policy = load_causal_lm(ckpt / "model" if ckpt is not None else gen, dtype, device, trc)
    return policy if ckpt is not None else apply_lora(policy, recipe.model.lora)


def train_rejection(recipe: Recipe, resume: bool = False, progress: bool = True) -> dict:
    """Run rejection sampling as the recipe says; returns the final metrics (also in summary.json)."""
    import datasets
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig

    from rlprm.checkpoint import export, latest_checkpoint, load_state, save_checkpoint, start_or_resume
    from rlprm.evaluate import between_epochs
    from rlprm.lean_sft import LeanSFTTrainer
    from rlprm.models import load_tokenizer, resolve_device
    from rlprm.problems import eval_problems, grade_samples, held_out_arithmetic
    from rlprm.prm_adapters import load_for_recipe
    from rlprm.rl.ppo import _problems_for_epoch
    from rlprm.sampling import sample
    from rlprm.tracking import Tracker

    check_inputs(recipe)
    datasets.disable_progress_bars()
    rl, rcfg, sep = recipe.rl, recipe.reward, recipe.task.step_separator
    run_dir = Path(recipe.run.output_dir)
    device = resolve_device(recipe.run.device)
    ckpt = start_or_resume(run_dir, resume, RejectionInputError)
    torch.manual_seed(recipe.run.seed)

    tokenizer = load_tokenizer(recipe.model.generator, padding_side="left",
                               trust_remote_code=recipe.model.trust_remote_code)
    policy = _load_policy(recipe, ckpt, device)
    reward_model = None
    if rcfg.source in ("prm", "orm"):
        reward_model = load_for_recipe(recipe, device=device, dtype=recipe.model.dtype)
        if reward_model.kind != rcfg.source:
            raise RejectionInputError(f"reward.source is {rcfg.source} but {recipe.model.reward_model} is a "
                                      f"{reward_model.kind}")
    # one optimizer for the whole run (constant rate): its moments carry over from epoch to epoch
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=rl.learning_rate)
    start_epoch, step = 0, 0
    if ckpt is not None:
        state = load_state(ckpt)  # also restores the RNG
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        print(f"resuming from {ckpt} (epoch {start_epoch}, SFT step {step})")

    exclude = set()
    if recipe.task.name == "arithmetic":
        exclude = {p.text for p in held_out_arithmetic(recipe, max(recipe.prepare_eval.num_problems, rl.eval_problems))}
    eval_set = eval_problems(recipe, rl.eval_problems) if rl.eval_n else []
    n = rl.samples_per_problem
    final: dict = {}
    gpu_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    tracker = Tracker(run_dir, recipe, job="rl", tags=["rl", "rejection_sampling", rcfg.source])
    threads_before = torch.get_num_threads()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    try:
        def evaluate(epoch: int) -> dict:
            # 6. best-of-N on held-out problems, scored by the run's own reward model if it has one
            metrics = between_epochs(recipe, policy, tokenizer, eval_set, reward_model, epoch)
            if metrics:
                tracker.log(metrics, step=step)
            return metrics

        if ckpt is None:
            final.update(evaluate(0))  # the starting point, for before/after comparisons

        for epoch in range(start_epoch, rl.epochs):
            problems = _problems_for_epoch(recipe, epoch, exclude)
            t0 = time.monotonic()

            # 1. generate: N per problem, seeded by (seed, epoch) so that a resumed run samples the same
            out = sample(policy, tokenizer, [p.prompt for p in problems], n=n, temperature=rl.temperature,
                         max_new_tokens=rl.max_new_tokens, batch_size=rl.prompts_per_iteration * n,
                         seed=recipe.run.seed * 1_000_003 + 2000 + epoch, progress=progress,
                         desc=f"epoch {epoch + 1}/{rl.epochs}: sampling {n} per problem")
            texts = out.texts
            t_gen = time.monotonic() - t0

            # 2. score: the grader always (for the log, and ground-truth selection); the reward model if used
            grades = grade_samples(problems, texts, sep)
            if reward_model is not None:
                flat = reward_model.score([p.text for p in problems for _ in range(n)],
                                          [t for row in texts for t in row], aggregate=rcfg.sparse_aggregate, sep=sep)
                if not all(math.isfinite(s) for s in flat):
                    raise RejectionError(f"epoch {epoch + 1}: the reward model gave non-finite scores (NaN/inf); "
                                         f"check {recipe.model.reward_model}")
                scores = [flat[i * n:(i + 1) * n] for i in range(len(problems))]
                # a solution with no final answer is never worth imitating, however the RM scores its steps
                eligible = [[g.answer is not None for g in row] for row in grades]
            else:
                scores = [[float(g.answer_correct) for g in row] for row in grades]
                eligible = [[g.answer_correct for g in row] for row in grades]
            t_score = time.monotonic() - t0 - t_gen

            # 3. select: the best distinct samples of each problem
            keep = select_samples(scores, eligible, texts, rl.rejection_top_k,
                                  rl.rejection_min_score if reward_model is not None else None)
            kept = [(i, j) for i, row in enumerate(keep) for j in row]

            # 4. SFT: one pass (rl.sft_epochs) over the kept samples, completion-only loss, the run's optimizer
            sft_state: dict = {}
            steps_before = step
            if kept:
                data = Dataset.from_dict({"prompt": [problems[i].prompt for i, _ in kept],
                                          "completion": [texts[i][j] for i, j in kept]})
                args = SFTConfig(
                    output_dir=str(run_dir / "sft_work"), num_train_epochs=rl.sft_epochs,
                    per_device_train_batch_size=rl.minibatch_size, learning_rate=rl.learning_rate,
                    max_grad_norm=rl.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=device == "cpu", seed=recipe.run.seed + epoch, data_seed=recipe.run.seed + epoch,
                    completion_only_loss=True, max_length=None, dataset_num_proc=None, disable_tqdm=not progress,
                    dataloader_num_workers=0,
                    # TRL's SFTConfig defaults both to True; on a CPU, bf16 autocast and recomputed activations
                    # only slow small models down, so they are on for GPUs only
                    bf16=gpu_bf16, activation_checkpointing=device != "cpu",
                )
                # the run's optimizer at a constant rate: a fresh trainer per epoch, the same moments throughout
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
                trainer = LeanSFTTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer,
                                         optimizers=(optimizer, scheduler),
                                         callbacks=[_sft_callback(tracker, step, sft_state)])
                trainer.remove_callback(PrinterCallback)  # logs go to metrics.jsonl, not raw dicts on stdout
                trainer.train()
                step += trainer.state.global_step
                shutil.rmtree(run_dir / "sft_work", ignore_errors=True)
                if "bad" in sft_state:
                    last = latest_checkpoint(run_dir)
                    kept_ckpt = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                    raise RejectionError(f"epoch {epoch + 1}: {sft_state['bad']} is not finite (NaN/inf); stopped "
                                         f"before it reached a checkpoint. {kept_ckpt}. Lower rl.learning_rate, then "
                                         "run again (with --resume to continue from the checkpoint)")
                policy.to(device)
            else:
                print(f"epoch {epoch + 1}: no sample was kept (none {'reached an answer' if reward_model else 'was accepted by the grader'}"
                      "); skipping SFT this epoch")
            t_sft = time.monotonic() - t0 - t_gen - t_score

            # 5. log what was sampled and what was kept
            flat_grades = [g for row in grades for g in row]
            kept_grades = [grades[i][j] for i, j in kept]
            process = [g.process_correct for g in flat_grades]
            record = {
                "epoch": epoch + 1,
                "rl/answer_accuracy": _mean(g.answer_correct for g in flat_grades),
                "rl/process_accuracy": _mean(process) if any(p is not None for p in process) else None,
                "rl/well_formed": _mean(g.well_formed for g in flat_grades),
                "rl/score_mean": _mean(s for row in scores for s in row),
                "rs/kept": len(kept),
                "rs/problems_with_kept": sum(bool(row) for row in keep) / max(1, len(keep)),
                "rs/kept_answer_accuracy": _mean(g.answer_correct for g in kept_grades),
                "rs/kept_process_accuracy": _mean(g.process_correct for g in kept_grades),
                "rs/kept_score_mean": _mean(scores[i][j] for i, j in kept),
                "rs/sft_steps": step - steps_before,
                "rs/sft_loss": sft_state.get("last_loss"),
                "time/generate": round(t_gen, 3),
                "time/score": round(t_score, 3),
                "time/sft": round(t_sft, 3),
            }
            tracker.log(record, step=step)
            final.update(record)
            if progress:
                ka = record["rs/kept_answer_accuracy"]
                print(f"epoch {epoch + 1}/{rl.epochs}: sampled answer {record['rl/answer_accuracy']:.1%}, kept "
                      f"{len(kept)} ({'-' if ka is None else f'{ka:.1%}'} right), {step - steps_before} SFT steps  "
                      f"gen {t_gen:.1f}s score {t_score:.1f}s sft {t_sft:.1f}s", flush=True)

            final.update(evaluate(epoch + 1))

            # 7. checkpoint: weights (adapters with LoRA), the optimizer, counters (and the RNG)
            save_checkpoint(run_dir, epoch + 1, policy, tokenizer, {"optimizer": optimizer.state_dict(), "step": step})

        # 8. export the final policy as a plain HF folder (LoRA merged; summary first: export copies it)
        if final:
            tracker.summary({k: v for k, v in final.items() if isinstance(v, (int, float)) or v is None})
        else:
            print(f"{run_dir} already finished its {rl.epochs} epochs; raise rl.epochs to train on")
        out_dir = export(run_dir)
        final["export_dir"] = str(out_dir)
        return final
    finally:
        torch.set_num_threads(threads_before)
        tracker.finish()


def run_rejection_sampling(recipe: Recipe, resume: bool = False, progress: bool = True) -> int:
    """The train_rl.py entry for `rl.algorithm: rejection_sampling`; returns the exit code (0, 2 bad input, 4 stopped)."""
    import sys

    from rlprm.reward_models import RewardModelError

    try:
        final = train_rejection(recipe, resume=resume, progress=progress)
    except (RewardModelError, RejectionInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RejectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    acc, proc = final.get("eval/answer_accuracy"), final.get("eval/process_accuracy")
    line = f"policy exported to {final['export_dir']}"
    if acc is not None:
        line += f"\n  held-out answer accuracy {acc:.1%}" + (f", process accuracy {proc:.1%}" if proc is not None else "")
    print(line)
    return 0


__all__ = ["RejectionError", "RejectionInputError", "check_inputs", "run_rejection_sampling", "select_samples",
           "train_rejection"]
