"""`rlprm train-rm`: train a PRM or an ORM, save it, and evaluate it on held-out data.

    rlprm train-rm recipes/prm_train.yaml                           # one process
    deepspeed --num_gpus 8 rlprm/train_rm.py recipes/prm_train_prm800k.yaml   # many

The job, top to bottom:

1. check inputs (data files, the generator, the DeepSpeed config) before
   loading anything heavy, so a typo costs seconds, not a sampling run;
2. training arguments (this also starts DeepSpeed's process group);
3. data: on the arithmetic task, sample the generator on training problems and
   on held-out problems and label every step with the exact checker (cached as
   JSONL, so a re-run skips it); or PRM800K lines and, for evaluation,
   PRM800K's held-out lines and ProcessBench;
4. the model: the backbone's body with a fresh token-classification (PRM) or
   sequence-classification (ORM) head, LoRA if asked;
5. training examples and `transformers.Trainer` with the reward-model loss;
6. save `RUN_DIR/reward_model/` atomically (a plain HF folder + rlprm_rm.json);
7. evaluate the saved model: step accuracy / AUROC, first-error F1, solution
   AUROC, the blind-spot rate (on the arithmetic task), best-of-N; all to
   metrics.jsonl, W&B and summary.json.

Only the first process samples, saves and evaluates; the others train.
"""

if __name__ == "__main__":  # launched as a script: this folder must not shadow top-level modules
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import json  # noqa: E402  (the guard above must run first; hence no `from __future__` either)
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from rlprm.config import Recipe  # noqa: E402
from rlprm.errors import InputError  # noqa: E402
from rlprm.launch import launcher_rank, single_process_env  # noqa: E402


class TrainRMError(InputError, RuntimeError):
    """The job cannot start or cannot go on (the message says why and what to change)."""


# --------------------------------------------------------------------------- helpers


def check_inputs(recipe: Recipe, generator_built_first: bool = False) -> None:
    """Everything that can be checked without loading a model; raises TrainRMError.

    `generator_built_first`: a missing model.generator that an embedded recipe builds is not a problem (`rlprm
    train-rm` checks everything else before that build, then builds it)."""
    rm, data = recipe.rm, recipe.rm.data
    problems = []
    for key, paths in (("rm.data.train_paths", data.train_paths if data.source == "prm800k" else []),
                       ("rm.data.eval_paths", data.eval_paths if data.source == "prm800k" else []),
                       ("rm.data.processbench_paths", data.processbench_paths)):
        for path in paths:
            if not Path(path).is_file():
                problems.append(f"{key}: file not found: {path} (edit the recipe or override, e.g. {key}=[/data/file])")
    if data.source == "arithmetic" and recipe.task.name != "arithmetic":
        problems.append(f"rm.data.source is arithmetic but task.name is {recipe.task.name}; set task.name: arithmetic")
    needs_generator = data.source == "arithmetic" or rm.backbone == "generator"
    gen = recipe.model.generator
    if needs_generator:
        from rlprm.prerequisites import builder_hint, generator_hint, recipe_folder

        if gen == "tiny":
            problems.append("model.generator is `tiny`, but sampling arithmetic data (and rm.backbone: generator) needs a "
                            f"trained generator: make one with {generator_hint()} and point model.generator at it "
                            "(or rm.backbone: tiny for a fresh backbone)")
        elif gen.startswith("/") and not (Path(gen) / "config.json").is_file() and not (
                generator_built_first and builder_hint(gen, recipe_folder(recipe))):
            problems.append(f"model.generator: no checkpoint at {gen} (config.json missing). Make it with "
                            f"{generator_hint()}, or point model.generator at one")
    if rm.freeze_backbone and recipe.model.lora.enabled:
        problems.append("rm.freeze_backbone and model.lora.enabled both limit what trains; pick one "
                        "(set model.lora.enabled: false, or rm.freeze_backbone: false)")
    if recipe.deepspeed is not None:
        try:
            stage = json.loads(Path(recipe.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
        except (OSError, ValueError) as exc:
            problems.append(f"deepspeed: cannot read {recipe.deepspeed}: {exc}")
        else:
            if stage == 3:
                problems.append("deepspeed: ZeRO-3 is not supported by train-rm yet (the evaluation reads whole "
                                "weights on one process); use deepspeed_configs/zero2.json")
    if problems:
        raise TrainRMError("\n".join(problems))  # one line each, key first: the first line says what to fix


# --------------------------------------------------------------------------- data


def arithmetic_data(recipe: Recipe, progress: bool) -> tuple[list, list, dict]:
    """(train records, eval records, counts): generator samples labelled by the exact checker, cached."""
    from rlprm.data.stepwise import arithmetic_pool, label_summary

    data = recipe.rm.data
    pool = arithmetic_pool(recipe, Path(data.cache_dir or recipe.run.output_dir), progress, what="solutions")
    out, counts = {}, {}
    for split, (records, sample_counts, cached, _) in pool.items():
        out[split] = records
        counts.update({f"data/{split}_{k}": v for k, v in sample_counts.items()})
        counts.update({f"data/{split}_{k}": v for k, v in label_summary(records).items()})
        counts[f"data/{split}_from_cache"] = cached
    if data.synthetic_per_problem:
        from rlprm.data.problems import reward_model_arithmetic

        train_problems, _ = reward_model_arithmetic(recipe)
        synthetic = synthetic_records(train_problems, data.synthetic_per_problem, recipe.task.step_separator,
                                      seed=recipe.run.seed * 7 + 3)
        counts.update({f"data/synthetic_{k}": v for k, v in label_summary(synthetic).items()})
        out["train"] = out["train"] + synthetic
    return out["train"], out["eval"], counts


def synthetic_records(problems, per_problem: int, sep: str, seed: int) -> list:
    """The task's own solutions for each problem, in equal thirds: the reference, one single-error corruption, and
    the last-digit shortcut (another corruption where the problem has none), labelled by the exact checker."""
    from rlprm.data.stepwise import label_arithmetic_sample
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import corrupt_solution, reference_solution, shortcut_solution

    rng = random.Random(seed)
    records = []
    for problem in problems:
        for k in range(per_problem):
            steps = None
            if k % 3 == 0:
                steps = reference_solution(problem)
            elif k % 3 == 2:
                steps = shortcut_solution(problem)
            if steps is None:
                steps, _ = corrupt_solution(problem, rng)
            record, _ = label_arithmetic_sample(problem, render_steps(steps, sep), sep)
            record.source = "arithmetic/synthetic"
            records.append(record)
    return records


def prm800k_data(recipe: Recipe) -> tuple[list, list, dict]:
    """(train records, eval records, counts) from PRM800K files; eval from eval_paths or held-out problems."""
    import zlib

    from rlprm.data.prm800k import load_many

    data = recipe.rm.data
    kwargs = dict(neutral_as=data.neutral_as, keep_quality_control=data.keep_quality_control,
                  keep_screening=data.keep_screening, alternatives=data.alternatives, on_bad_line=data.on_bad_line)
    train, train_counts = load_many(data.train_paths, **kwargs)
    counts = {f"data/train_{k}": v for k, v in train_counts.items()}
    if data.eval_paths:
        evals, eval_counts = load_many(data.eval_paths, **kwargs)
        counts.update({f"data/eval_{k}": v for k, v in eval_counts.items()})
    else:
        # hold out whole problems (a stable hash of the text), never single steps of a seen trajectory
        held = lambda r: zlib.crc32(r.problem.encode()) % 10_000 < data.eval_fraction * 10_000  # noqa: E731
        evals = [r for r in train if held(r)]
        train = [r for r in train if not held(r)]
    if data.max_records and len(train) > data.max_records:
        random.Random(recipe.run.seed).shuffle(train)
        train = train[: data.max_records]
    counts["data/train_records_used"] = len(train)
    counts["data/eval_records"] = len(evals)
    return train, evals, counts


# --------------------------------------------------------------------------- evaluation


def _fitting(rm, records) -> tuple[list, int]:
    """The records the model has positions for, and how many were left out."""
    from rlprm.steps import encode_batch

    limit = getattr(rm.model.config, "max_position_embeddings", None)
    if not limit or not records:
        return list(records), 0
    encoded = encode_batch(rm.tokenizer, [rm.convention.prompt(r.problem) for r in records],
                           [r.steps for r in records], rm.step_separator)
    kept = [r for r, e in zip(records, encoded) if len(e.input_ids) <= limit]
    return kept, len(records) - len(kept)


def evaluate_reward_model(rm, records, threshold: float = 0.5, batch_size: int = 64, head_only: bool = False) -> dict:
    """Every metric the records allow (see rlprm.reward.metrics); keys without a prefix.

    Solutions longer than the model's positions are left out and counted (`num_too_long`). `head_only`: score
    without confidence stacking (to show what the stacking adds).
    """
    from rlprm.data.stepwise import INCORRECT
    from rlprm.reward.model import AGGREGATIONS, aggregate
    from rlprm.reward.metrics import (auroc, best_of_n_accuracy, blind_spot_rate, first_error_f1, predict_first_error,
                                  step_accuracy)

    records, too_long = _fitting(rm, records)
    if not records:
        return {"num_too_long": too_long}
    options = {"head_only": True} if head_only else {}  # any object with score_steps will do otherwise
    step_probs = rm.score_steps([r.problem for r in records], [r.steps for r in records], batch_size=batch_size,
                                **options)
    out: dict = {"num_solutions": len(records), "num_problems": len({r.group for r in records}),
                 "num_too_long": too_long}
    aggregations = AGGREGATIONS if rm.kind == "prm" else ("last",)
    if rm.kind == "prm":
        probs, truth = [], []
        for r, ps in zip(records, step_probs):
            for p, y in zip(ps, r.labels):
                if y is not None:
                    probs.append(p)
                    truth.append(y != INCORRECT)
        out["num_labelled_steps"] = len(probs)
        out["step_accuracy"] = step_accuracy(probs, truth, threshold)
        out["step_auroc"] = auroc(probs, truth)
        # the task's confident flaw on its own: the first (wrong) step of shortcut chains against every right step
        cut = [(p, y) for r, ps in zip(records, step_probs) for p, y in zip(ps, r.labels)
               if y is not None and (y != INCORRECT or r.meta.get("shortcut"))]
        if any(y == INCORRECT for _, y in cut):
            out["shortcut_step_auroc"] = auroc([p for p, _ in cut], [y != INCORRECT for _, y in cut])
        known = [(r, ps) for r, ps in zip(records, step_probs)
                 if r.process_correct is True or (r.process_correct is False and r.first_error is not None)]
        fe = first_error_f1([None if r.process_correct else r.first_error for r, _ in known],
                            [predict_first_error(ps, threshold) for _, ps in known])
        out.update({f"first_error_{k}": v for k, v in fe.items()})
    for how in aggregations:
        scores = [aggregate(ps, how) for ps in step_probs]
        tag = "" if how == aggregations[0] else f"_{how}"  # the paper's product (PRM) is the unsuffixed one
        with_process = [(r, s) for r, s in zip(records, scores) if r.process_correct is not None]
        with_answer = [(r, s) for r, s in zip(records, scores) if r.answer_correct is not None]
        out[f"solution_auroc{tag}"] = auroc([s for _, s in with_process], [r.process_correct for r, _ in with_process]) \
            if with_process else None
        out[f"solution_auroc_answer{tag}"] = auroc([s for _, s in with_answer], [r.answer_correct for r, _ in with_answer]) \
            if with_answer else None
        both = [(r, s) for r, s in zip(records, scores) if r.process_correct is not None and r.answer_correct is not None]
        if both:
            rate, pairs = blind_spot_rate([r.group for r, _ in both], [s for _, s in both],
                                          [r.answer_correct for r, _ in both], [r.process_correct for r, _ in both])
            out[f"blind_spot_rate{tag}"] = rate
            out["blind_spot_pairs"] = pairs
            out[f"best_of_n_process_accuracy{tag}"] = best_of_n_accuracy(
                [r.group for r, _ in both], [s for _, s in both], [r.process_correct for r, _ in both])
            out[f"best_of_n_answer_accuracy{tag}"] = best_of_n_accuracy(
                [r.group for r, _ in both], [s for _, s in both], [r.answer_correct for r, _ in both])
    return out


def evaluate_processbench(rm, path: Path, limit: int, threshold: float, batch_size: int) -> dict:
    """ProcessBench first-error F1 of a PRM on one file."""
    from rlprm.data.processbench import load_processbench
    from rlprm.reward.metrics import first_error_f1, predict_first_error

    records, too_long = _fitting(rm, load_processbench(path, limit))
    probs = rm.score_steps([r.problem for r in records], [r.steps for r in records], batch_size=batch_size)
    fe = first_error_f1([r.first_error for r in records], [predict_first_error(p, threshold) for p in probs])
    return {**fe, "num_too_long": too_long}


def fit_confidence_stacking(rm, records, limit: int, batch_size: int = 64) -> tuple[list[float], int]:
    """Fit `rm`'s confidence stacking on the first `limit` training records; returns (weights, labels used).

    PRM: every labelled step (label: not incorrect); ORM: every solution with a known final answer.
    """
    from rlprm.data.stepwise import INCORRECT
    from rlprm.reward.model import fit_confidence
    from rlprm.steps import encode_batch

    records, _ = _fitting(rm, records[:limit])
    head = rm.score_steps([r.problem for r in records], [r.steps for r in records], batch_size=batch_size,
                          head_only=True)
    encoded = encode_batch(rm.tokenizer, [rm.convention.prompt(r.problem) for r in records],
                           [r.steps for r in records], rm.step_separator)
    feats: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        feats.extend(rm.confidence_features(encoded[start:start + batch_size]))
    probs, mins, ys = [], [], []
    for r, h, f in zip(records, head, feats):
        if rm.kind == "orm":
            if r.answer_correct is not None and h:
                probs.append(h[0]); mins.append(f[0]); ys.append(bool(r.answer_correct))
            continue
        for p, m, y in zip(h, f, r.labels):
            if y is not None:
                probs.append(p); mins.append(m); ys.append(y != INCORRECT)
    if not probs:
        raise TrainRMError("rm.confidence_features: no labelled training examples to fit the stacking on")
    return fit_confidence(probs, mins, ys), len(ys)


def prm800k_records(recipe: Recipe) -> tuple[list, list, dict]:
    """`prm800k_data`, refusing a set with no training records (every line dropped or skipped)."""
    train_records, eval_records, counts = prm800k_data(recipe)
    if not train_records:
        raise TrainRMError("rm.data.train_paths: no training records (every line dropped or skipped?); check "
                           "rm.data.train_paths, rm.data.on_bad_line and rm.data.keep_*")
    return train_records, eval_records, counts


# --------------------------------------------------------------------------- the job


def rm_training_args(recipe: Recipe, work_dir: Path, device: str):
    """`train_rm` step 2: the HF TrainingArguments of the recipe (with DeepSpeed, building them starts the process
    group)."""
    import transformers

    rm_cfg = recipe.rm
    return transformers.TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=rm_cfg.batch_size,
        gradient_accumulation_steps=rm_cfg.gradient_accumulation_steps,
        num_train_epochs=rm_cfg.epochs,
        max_steps=rm_cfg.max_steps or -1,
        learning_rate=rm_cfg.learning_rate,
        weight_decay=rm_cfg.weight_decay,
        warmup_steps=rm_cfg.warmup_ratio,  # below 1: a share of the steps
        lr_scheduler_type=rm_cfg.lr_scheduler,
        max_grad_norm=rm_cfg.max_grad_norm,
        bf16=rm_cfg.bf16,
        activation_checkpointing=rm_cfg.gradient_checkpointing,
        logging_steps=rm_cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        deepspeed=str(recipe.deepspeed) if recipe.deepspeed else None,
        disable_tqdm=True,  # our own bar (the default one prints every log dict)
        dataloader_num_workers=0,
    )


def build_rm(recipe: Recipe, convention, train_records) -> tuple:
    """`train_rm` step 4: (tokenizer, model, backbone, confidence source, parameters, trainable parameters): the
    backbone's body with a fresh head (a tiny one built on the spot for `tiny`), identity layers added, the body
    frozen and LoRA applied as the recipe asks. The caller seeds first (`transformers.set_seed`)."""
    from rlprm.models import load_tokenizer, num_parameters
    from rlprm.reward.model import (add_identity_layers, apply_lora, build_reward_model, freeze_body,
                                     reward_model_from_causal_lm)

    rm_cfg, sep = recipe.rm, recipe.task.step_separator
    backbone = recipe.model.generator if rm_cfg.backbone == "generator" else rm_cfg.backbone
    if backbone == "tiny":
        from rlprm.models import build_tiny_causal_lm
        from rlprm.experiments.prepare import build_tokenizer
        from rlprm.steps import render_steps

        corpus = [recipe.rm.prompt_template.format(problem=r.problem) + render_steps(r.steps, sep)
                  for r in train_records[:2000]]
        tokenizer = build_tokenizer(recipe, corpus)
        causal = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed)
        model = reward_model_from_causal_lm(convention, causal, tokenizer)
        confidence_source = causal if rm_cfg.confidence_features else None
        del causal
    else:
        tokenizer = load_tokenizer(backbone, padding_side="right", trust_remote_code=recipe.model.trust_remote_code)
        model = build_reward_model(convention, backbone, tokenizer, dtype=recipe.model.dtype,
                                   trust_remote_code=recipe.model.trust_remote_code)
        confidence_source = backbone if rm_cfg.confidence_features else None
    own_layers = model.config.num_hidden_layers
    add_identity_layers(model, rm_cfg.extra_layers)
    if rm_cfg.freeze_backbone:
        freeze_body(model, own_layers)
    params = num_parameters(model)
    model = apply_lora(model, recipe.model.lora, rm_cfg.kind)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tokenizer, model, backbone, confidence_source, params, trainable


def save_trained(recipe: Recipe, trainer, tokenizer, convention, confidence_source, train_records, ckpt: Path,
                 device: str, tracker) -> dict:
    """`train_rm` step 6: the trained model saved whole to `ckpt` (a complete reward_model/ or none at all), with
    confidence stacking fitted first when asked; returns what the fit adds to the summary (empty without it)."""
    from rlprm.reward.model import RewardModel

    rm_cfg = recipe.rm
    trained = trainer.accelerator.unwrap_model(trainer.model)
    fitted: dict = {}
    if confidence_source is not None:
        # stack the head with the backbone LM's token confidence (see rlprm/reward/model.py for why)
        from rlprm.models import load_causal_lm

        lm = confidence_source if not isinstance(confidence_source, (str, Path)) else load_causal_lm(
            confidence_source, recipe.model.dtype, device, recipe.model.trust_remote_code)
        plain = RewardModel(trained, tokenizer, convention, confidence_lm=lm.eval())
        weights, n_fit = fit_confidence_stacking(plain, train_records, rm_cfg.confidence_fit_examples,
                                                 rm_cfg.eval_batch_size)
        convention.confidence = weights
        fitted = {"confidence_weights": weights, "confidence_fit_labels": n_fit}
        if tracker:
            print(f"confidence stacking fitted on {n_fit} labels: P = sigmoid({weights[0]:.3f} * head logit "
                  f"{weights[1]:+.3f} * min token log-prob {weights[2]:+.3f})")
        RewardModel(trained, tokenizer, convention, confidence_lm=lm).save(ckpt)
        del lm, plain
    else:
        RewardModel(trained, tokenizer, convention).save(ckpt)
    return fitted


def train_rm(recipe: Recipe, progress: bool = True) -> dict:
    """Train, save and evaluate a reward model; returns the summary (empty on processes other than the first)."""
    t_start = time.monotonic()
    rm_cfg, data_cfg = recipe.rm, recipe.rm.data
    run_dir = Path(recipe.run.output_dir)
    sep = recipe.task.step_separator

    # 1. inputs checked before anything heavy is loaded
    check_inputs(recipe)
    # PRM800K lines are read (a bad one refused) before torch loads and before the run folder gets anything
    labelled = prm800k_records(recipe) if data_cfg.source == "prm800k" else None
    if rm_cfg.scorer == "lm":
        return train_lm_scored_rm(recipe, progress, t_start, labelled)
    if recipe.deepspeed is not None:
        single_process_env()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    from rlprm.data.stepwise import label_summary
    from rlprm.models import resolve_device
    from rlprm.reward.model import Collator, encode_examples, make_convention
    from rlprm.reward.trainer import RewardModelTrainer, TrainProgress
    from rlprm.tracking import Tracker

    datasets.disable_progress_bars()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    device = resolve_device(recipe.run.device)
    is_main = launcher_rank() == 0

    # 2. training arguments (with DeepSpeed this starts the process group)
    work_dir = run_dir / "rm_trainer_work"
    args = rm_training_args(recipe, work_dir, device)

    tracker = Tracker(run_dir, recipe, job=f"train-{rm_cfg.kind}", tags=[rm_cfg.kind]) if is_main else None
    try:
        # 3. data (the first process samples and caches; the others then read the cache)
        with args.main_process_first(desc="reward-model data", local=False):
            if data_cfg.source == "arithmetic":
                train_records, eval_records, counts = arithmetic_data(recipe, progress and is_main)
            else:
                train_records, eval_records, counts = labelled
        if not train_records:
            raise TrainRMError("no training records: check rm.data (all lines dropped or skipped?)")
        t_data = time.monotonic() - t_start

        # 4. the model: backbone body, fresh head, LoRA if asked
        transformers.set_seed(recipe.run.seed)
        convention = make_convention(rm_cfg.kind, sep, rm_cfg.prompt_template,
                                     data_cfg.neutral_as if data_cfg.source == "prm800k" else None)
        tokenizer, model, backbone, confidence_source, params, trainable = build_rm(recipe, convention, train_records)

        # 5. examples and training
        max_length = rm_cfg.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        examples, enc_counts = encode_examples(tokenizer, train_records, convention, max_length)
        if not examples:
            raise TrainRMError(f"no training examples left after encoding ({enc_counts}); "
                               "raise rm.max_length or check the labels")
        counts.update({f"data/train_{k}": v for k, v in enc_counts.items()})
        if tracker:
            tracker.log({**counts, "params": params, "trainable_params": trainable, "data_seconds": round(t_data, 1)},
                        step=0)
            summary_line = label_summary(train_records)
            extra = f" + {rm_cfg.extra_layers} new layers" if rm_cfg.extra_layers else ""
            print(f"{rm_cfg.kind.upper()}: backbone {backbone}{extra} ({params / 1e6:.2f}M parameters, "
                  f"{trainable / 1e6:.2f}M trained), "
                  f"{len(examples)} training examples ({summary_line['labelled_steps']} labelled steps), "
                  f"{len(eval_records)} held-out solutions")
        steps_per_epoch = max(1, len(examples) // (rm_cfg.batch_size * rm_cfg.gradient_accumulation_steps))
        trainer = RewardModelTrainer(
            model=model, args=args, train_dataset=examples,
            data_collator=Collator(tokenizer.pad_token_id, rm_cfg.kind), rm_kind=rm_cfg.kind,
            callbacks=[TrainProgress(tracker, rm_cfg.time_budget_s, progress, int(steps_per_epoch * rm_cfg.epochs))],
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        t_train = time.monotonic()
        result = trainer.train()
        train_s = time.monotonic() - t_train
        shutil.rmtree(work_dir, ignore_errors=True)
        if not is_main:
            return {}

        # 6. save: a complete reward_model/ or none at all
        ckpt = run_dir / "reward_model"
        fitted = save_trained(recipe, trainer, tokenizer, convention, confidence_source, train_records, ckpt,
                              device, tracker)
        del trainer, model

        # 7. evaluate the saved model, as any later stage will load it
        summary = {"kind": rm_cfg.kind, "checkpoint": str(ckpt), "backbone": str(backbone), "params": params,
                   "extra_layers": rm_cfg.extra_layers, "trainable_params": trainable,
                   "train_examples": len(examples), "train_steps": result.global_step,
                   "train_loss": float(result.training_loss), "train_seconds": round(train_s, 1),
                   "data_seconds": round(t_data, 1), **fitted}
        return evaluate_saved(recipe, ckpt, eval_records, counts, summary, tracker, result.global_step, t_start,
                              head_only=bool(fitted))
    finally:
        if tracker:
            tracker.finish()


def evaluate_saved(recipe: Recipe, ckpt: Path, eval_records, counts: dict, summary: dict, tracker, step: int,
                   t_start: float, head_only: bool = False) -> dict:
    """Load the saved reward model as a later stage would, evaluate it, log and return the summary."""
    from rlprm.models import resolve_device
    from rlprm.reward.model import RewardModel

    rm_cfg, data_cfg = recipe.rm, recipe.rm.data
    rm = RewardModel.load(ckpt, device=resolve_device(recipe.run.device), step_separator=recipe.task.step_separator)
    t_eval = time.monotonic()
    metrics = {f"eval/{k}": v for k, v in
               evaluate_reward_model(rm, eval_records, rm_cfg.threshold, rm_cfg.eval_batch_size).items()}
    if head_only:  # what the head alone scores, so the stacking's contribution is visible
        metrics.update({f"eval_head_only/{k}": v for k, v in evaluate_reward_model(
            rm, eval_records, rm_cfg.threshold, rm_cfg.eval_batch_size, head_only=True).items()})
    if rm_cfg.kind == "prm":
        for path in data_cfg.processbench_paths:
            pb = evaluate_processbench(rm, Path(path), data_cfg.processbench_max, rm_cfg.threshold,
                                       rm_cfg.eval_batch_size)
            metrics.update({f"processbench/{Path(path).stem}/{k}": v for k, v in pb.items()})
    summary.update(metrics)
    summary.update({k: v for k, v in counts.items() if "rate" in k or k.endswith("_samples")})
    summary["eval_seconds"] = round(time.monotonic() - t_eval, 1)
    summary["wall_seconds"] = round(time.monotonic() - t_start, 1)
    tracker.log(metrics, step=step)
    tracker.summary(summary)
    return summary


def train_lm_scored_rm(recipe: Recipe, progress: bool, t_start: float, labelled: tuple | None = None) -> dict:
    """`rm.scorer: lm`: the backbone stays a causal LM, trained on the labels (rlprm/reward/lm.py); one process."""
    import torch

    from rlprm.models import load_causal_lm, load_tokenizer, num_parameters, resolve_device
    from rlprm.reward.model import RewardModel, quiet_transformers, make_convention
    from rlprm.reward.lm import train_lm_scorer
    from rlprm.tracking import Tracker

    rm_cfg, data_cfg = recipe.rm, recipe.rm.data
    if recipe.deepspeed is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainRMError("rm.scorer `lm` trains on one process without DeepSpeed; drop `deepspeed:` or use "
                           "rm.scorer: head for multi-process training")
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    torch.manual_seed(recipe.run.seed)
    device = resolve_device(recipe.run.device)
    run_dir = Path(recipe.run.output_dir)
    if labelled is None and data_cfg.source == "prm800k":  # read before anything is written
        labelled = prm800k_records(recipe)
    tracker = Tracker(run_dir, recipe, job=f"train-{rm_cfg.kind}", tags=[rm_cfg.kind, "lm-scorer"])
    try:
        # 2. data: generator samples (+ the task's own solutions), labelled by the exact checker
        if data_cfg.source == "arithmetic":
            train_records, eval_records, counts = arithmetic_data(recipe, progress)
        else:
            train_records, eval_records, counts = labelled
        t_data = time.monotonic() - t_start

        # 3. the model: the backbone as a causal LM (the generator's weights, or a fresh tiny one)
        convention = make_convention(rm_cfg.kind, recipe.task.step_separator, rm_cfg.prompt_template,
                                     data_cfg.neutral_as if data_cfg.source == "prm800k" else None)
        convention.scorer = "lm"
        backbone = recipe.model.generator if rm_cfg.backbone == "generator" else rm_cfg.backbone
        if backbone == "tiny":
            from rlprm.models import build_tiny_causal_lm
            from rlprm.experiments.prepare import build_tokenizer
            from rlprm.steps import render_steps

            corpus = [rm_cfg.prompt_template.format(problem=r.problem) + render_steps(r.steps, convention.step_separator)
                      for r in train_records[:2000]]
            tokenizer = build_tokenizer(recipe, corpus)
            model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=recipe.run.seed).to(device)
        else:
            tokenizer = load_tokenizer(backbone, padding_side="right", trust_remote_code=recipe.model.trust_remote_code)
            with quiet_transformers(report=False):
                model = load_causal_lm(backbone, recipe.model.dtype, device, recipe.model.trust_remote_code)
        params = num_parameters(model)
        max_length = rm_cfg.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        print(f"{rm_cfg.kind.upper()} (LM scorer): backbone {backbone} ({params / 1e6:.2f}M parameters), "
              f"{len(train_records)} training solutions, {len(eval_records)} held-out, {rm_cfg.max_steps} steps")
        tracker.log({**counts, "params": params, "data_seconds": round(t_data, 1)}, step=0)

        # 4. train exactly rm.max_steps steps
        fit = train_lm_scorer(
            model, tokenizer, train_records, convention, steps=rm_cfg.max_steps, batch_size=rm_cfg.batch_size,
            learning_rate=rm_cfg.learning_rate, head_learning_rate=rm_cfg.head_learning_rate, lm_coef=rm_cfg.lm_coef,
            weight_decay=rm_cfg.weight_decay, warmup_ratio=rm_cfg.warmup_ratio, max_grad_norm=rm_cfg.max_grad_norm,
            max_length=max_length, seed=recipe.run.seed, log=tracker.log, logging_steps=rm_cfg.logging_steps,
            progress=progress)
        convention.lm_head = fit["head"]

        # 5. save atomically, then evaluate the saved model as any later stage will load it
        ckpt = RewardModel(model, tokenizer, convention).save(run_dir / "reward_model")
        del model
        summary = {"kind": rm_cfg.kind, "scorer": "lm", "checkpoint": str(ckpt), "backbone": str(backbone),
                   "params": params, "trainable_params": params, "train_examples": fit["examples"],
                   "train_steps": fit["steps"], "train_loss": fit["train_loss"], "train_seconds": fit["train_seconds"],
                   "data_seconds": round(t_data, 1), "lm_head": fit["head"]}
        summary = evaluate_saved(recipe, ckpt, eval_records, counts, summary, tracker, fit["steps"], t_start)
        if backbone != "tiny":
            # the baseline that could explain the result away: the untrained backbone's own token confidence,
            # read the same way (P = sigmoid(min log-prob + 3): a step is "wrong" below p = e^-3 for its least
            # likely token; AUROCs do not depend on that choice, first-error F1 does)
            with quiet_transformers(report=False):
                base_lm = load_causal_lm(backbone, recipe.model.dtype, device, recipe.model.trust_remote_code)
            base_conv = make_convention(rm_cfg.kind, recipe.task.step_separator, rm_cfg.prompt_template)
            base_conv.scorer, base_conv.lm_head = "lm", [1.0, 0.0, 3.0]
            base = RewardModel(base_lm.eval(), tokenizer, base_conv)
            metrics = {f"baseline_confidence/{k}": v for k, v in
                       evaluate_reward_model(base, eval_records, rm_cfg.threshold, rm_cfg.eval_batch_size).items()}
            summary.update(metrics)
            tracker.log(metrics, step=fit["steps"])
            tracker.summary(summary)
        return summary
    finally:
        tracker.finish()


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""
    def f(key, fmt="{:.3f}"):
        v = s.get(key)
        return "n/a" if v is None else fmt.format(v)

    lines = [f"{s['kind'].upper()} saved to {s['checkpoint']}",
             f"  held-out: {s.get('eval/num_solutions', 0)} solutions of {s.get('eval/num_problems', 0)} problems"]
    if s["kind"] == "prm":
        lines.append(f"  step accuracy {f('eval/step_accuracy')}  step AUROC {f('eval/step_auroc')}  "
                     f"first-error F1 {f('eval/first_error_f1')}")
    lines.append(f"  solution AUROC {f('eval/solution_auroc')} (fully correct)  "
                 f"{f('eval/solution_auroc_answer')} (answer right)")
    if "eval/blind_spot_rate" in s:
        lines.append(f"  blind-spot rate {f('eval/blind_spot_rate')} over {s.get('eval/blind_spot_pairs')} pairs "
                     "(right answer + wrong step scored above a fully correct solution)")
        lines.append(f"  best-of-N: process accuracy {f('eval/best_of_n_process_accuracy')}, "
                     f"answer accuracy {f('eval/best_of_n_answer_accuracy')}")
    if "baseline_confidence/solution_auroc" in s:
        lines.append(f"  baseline, the backbone's own token confidence: step AUROC {f('baseline_confidence/step_auroc')}  "
                     f"best-of-N process accuracy {f('baseline_confidence/best_of_n_process_accuracy')}")
    if "eval/shortcut_step_auroc" in s:
        lines.append(f"  shortcut steps vs right steps AUROC {f('eval/shortcut_step_auroc')} "
                     f"(backbone confidence {f('baseline_confidence/shortcut_step_auroc')})")
    for key in s:
        if key.startswith("processbench/") and key.endswith("/f1"):
            lines.append(f"  {key.rsplit('/', 1)[0]} F1 {f(key)}")
    lines.append(f"  {s['train_steps']} steps in {s['train_seconds']:.0f} s (loss {s['train_loss']:.4f}); "
                 f"data {s['data_seconds']:.0f} s, eval {s['eval_seconds']:.0f} s, wall {s['wall_seconds']:.0f} s")
    return "\n".join(lines)



def run_job(recipe: Recipe, progress: bool = True) -> None:
    """`rlprm train-rm` once the recipe is loaded and its inputs judged: the generator built if an embedded recipe
    makes it, then the job; the summary printed by the process that wrote it."""
    check_inputs(recipe, generator_built_first=True)  # all of it before a generator build takes minutes
    if recipe.rm.data.source == "arithmetic" or recipe.rm.backbone == "generator":
        from rlprm.prerequisites import ensure, find_builder, recipe_folder

        gen, near = recipe.model.generator, recipe_folder(recipe)
        # the generator this job samples from: built first if an embedded recipe makes it (else check_inputs says)
        if gen.startswith("/") and find_builder(Path(gen), near) is not None:
            ensure("model.generator", Path(gen), progress=progress, wandb=recipe.tracking.wandb, near=near)
    summary = train_rm(recipe, progress=progress)
    if summary:
        print(format_summary(summary))


def _run_script(args) -> int:
    from rlprm.config import load_recipe, recipe_to_yaml
    from rlprm.inputs import check_job

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    # what the recipe points at (model folders, hub ids, data files) is judged before the job writes anything
    check_job(recipe, "train-rm")
    run_job(recipe, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python rlprm/train_rm.py RECIPE [key.sub=value ...]` (what `deepspeed` launches): `rlprm train-rm`."""
    import argparse

    from rlprm.errors import ArgumentParser, run_reporting_errors

    parser = ArgumentParser(prog="train_rm.py", description="Train and evaluate a PRM or an ORM: `rlprm train-rm`.")
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. run.seed=1 rm.epochs=2")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (defaults filled in, paths absolute) and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # the deepspeed launcher passes --local_rank=N first (and sets LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return run_reporting_errors(_run_script, parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
