"""GRPO on TRL's `GRPOTrainer`, with process supervision (per-token advantages from step rewards).

DESIGN.md section 6. Two modes, chosen by `reward.mode`:
- `sparse` (outcome supervision): plain GRPO. Each completion gets one scalar
  (the grader's 1/0, an ORM's probability, or a PRM's aggregated score, all
  from `rewards.token_rewards`), TRL normalises it within the group of
  `rl.samples_per_problem` completions of one prompt, and every token of a
  completion shares that advantage.
- `dense` (process supervision, DeepSeekMath section 4.1.3): the step scores
  (a PRM's, or with `reward.source: exact` the arithmetic checker's
  prefix-correctness, an oracle PRM; `confidence` is PPO-only, refused at
  recipe validation) give the step rewards (`rl.process_reward`: each step's
  probability, or `reward.dense_form`'s shaped rewards), which are normalised
  with the mean and std of all step rewards of the group (`core.group_normalize_steps`), and a token's
  advantage is the sum of the normalised rewards of the steps that end at or
  after it (`core.step_rewards_to_token_advantages`): a (B, T) tensor.

The hook: `_generate_and_score_completions` is the private method of
`GRPOTrainer` that samples, scores and returns a dict whose "advantages" entry
(shape (B,)) the loss multiplies with the token log-ratios; TRL's loss also
accepts (B, T). `GRPOTrainer` maintainers recommend overriding it for custom
advantages. Being private, its contract can change in any minor release:
pyproject pins trl to 1.16.x and tests/test_grpo.py checks the keys and shapes.

What TRL runs and what we add: TRL does the sampling (`generate`, no vLLM), the
reference and old log-probs, the clipped loss with its KL term (`rl.beta`) and
the optimizer steps. We supply the problems (`ppo._problems_for_epoch`, so GRPO
and PPO train on the same prompts), the reward function, the process
advantages, and through a `TrainerCallback` the rlprm loop around it: metrics
per iteration through `Tracker`, best-of-N after every epoch, an atomic
checkpoint per epoch, `--resume`, NaN/inf guards, and the final export.

One iteration = one generation batch: `rl.prompts_per_iteration` prompts x
`rl.samples_per_problem` completions, then `rl.ppo_epochs` passes (GRPO's mu)
over it in minibatches of `rl.minibatch_size` completions, one optimizer step
each. The whole generation batch lives on one process, so a group's
completions are always together when they are normalised.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rlprm.config import Recipe
from rlprm.rl.ppo import PPOError, PPOInputError

# the keys (and, for advantages, the leading dimension) that `_generate_and_score_completions` of TRL 1.16
# returns and that the override and the loss rely on; tests/test_grpo.py fails loudly if TRL changes them
TRL_OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")


class GRPOError(PPOError):
    """A GRPO run cannot go on (non-finite rewards or losses, a broken TRL contract); the message says what to do."""


class GRPOInputError(GRPOError, PPOInputError):
    """The run cannot start: missing inputs, or sizes that do not fit GRPO's batching."""


# --------------------------------------------------------------------------- pure pieces


def process_advantages(token_rewards, step_ends: list[list[int]], lengths: list[int], group_size: int, width: int):
    """Per-token advantages of process-supervised GRPO from the reward tensor of `rewards.token_rewards`.

    token_rewards: (B, T') float, the rewards on each completion's tokens (a PRM
    step reward at each step's last token; a missing answer's penalty, or the
    outcome term, at the last token). step_ends: per sample, the token index
    of each rewarded step's end. lengths: per sample, the response tokens kept.
    Returns (B, width).

    Each sample's reward events are its step ends plus its last token (when
    that token carries a reward that is not a step's: a missing answer or
    reward.outcome_coef). The event values are read from `token_rewards`, so
    two steps ending in one token count once with their sum. The last event of
    a sample is moved to its last token (EOS): the final step's reward then
    also teaches the policy to stop there, instead of leaving EOS with no
    signal. Events are normalised over the group (`group_normalize_steps`)
    and summed from each token to the end (`step_rewards_to_token_advantages`).
    A sample with no tokens gets 0 everywhere.
    """
    import torch

    from rlprm.rl.core import group_normalize_steps, step_rewards_to_token_advantages

    B = token_rewards.shape[0]
    events: list[list[int]] = []
    for i in range(B):
        if lengths[i] == 0:
            events.append([])
            continue
        last = lengths[i] - 1
        pos = sorted(set(step_ends[i]))
        if float(token_rewards[i, last]) != 0.0 and last not in pos:
            pos.append(last)  # a missing answer's penalty or the outcome term
        if not pos:  # an answered sample whose rewards all sit nowhere (cannot happen with token_rewards): 0
            events.append([])
            continue
        events.append(pos)
    S = max(1, max(len(e) for e in events))
    values = torch.zeros(B, S, dtype=torch.float32)
    positions = torch.full((B, S), -1, dtype=torch.long)
    for i, pos in enumerate(events):
        for k, p in enumerate(pos):
            values[i, k] = float(token_rewards[i, p])
            positions[i, k] = p
        if pos:
            positions[i, len(pos) - 1] = lengths[i] - 1  # the last event moves to EOS (see above)
    normalized = group_normalize_steps(values, positions >= 0, group_size)
    return step_rewards_to_token_advantages(normalized, positions, width)


def step_score_rewards(tr, scores, outcomes, outcome_coef: float):
    """(B, T') rewards with each step's PRM probability p_k at its end (DeepSeekMath's step rewards).

    tr: the `TokenRewards` of the same completions (its step ends, lengths and
    missing-answer decisions are reused; a sample without an answer keeps its
    penalty at the last token). scores: per sample, the PRM's step
    probabilities. outcome_coef > 0 adds outcome_coef * outcome at the last token.
    """
    import torch

    out = torch.zeros_like(tr.rewards)
    lengths = tr.mask.sum(1).tolist()
    for i, ends in enumerate(tr.step_token_ends):
        if tr.missing_answer[i] or not ends:
            out[i] = tr.rewards[i]
            continue
        for end, p in zip(ends, scores[i]):
            out[i, end] += float(p)  # += : two steps may end in one token
        if outcome_coef > 0:
            out[i, int(lengths[i]) - 1] += outcome_coef * float(outcomes[i])
    return out


# --------------------------------------------------------------------------- the reward function


class RewardFunction:
    """A TRL reward function computing rlprm rewards; keeps what it computed for the trainer and the log.

    TRL calls it with the prompts, the decoded completions, the completion ids
    and the dataset's other columns (here `problem_index`, an index into
    `problems`). It returns one scalar per completion: the return of
    `rewards.token_rewards` (for sparse rewards the reward itself; for dense
    rewards the sum of the step rewards, used by TRL only for its log). The
    full `TokenRewards`, the grades and the scoring time stay in `self.last`
    for the process advantages and the metrics.
    """

    __name__ = "rlprm_reward"  # TRL names the reward column after it

    def __init__(self, recipe: Recipe, problems: list, tokenizer, reward_model=None, run_dir: Path | None = None):
        self.recipe, self.problems, self.tokenizer, self.reward_model = recipe, problems, tokenizer, reward_model
        self.run_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir)
        self.last: dict = {}
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, problem_index, **_):
        from rlprm.problems import grade_samples
        from rlprm.rewards import RewardError, prefix_correct_probs, token_rewards
        from rlprm.rl.ppo import _check_finite

        t0 = time.monotonic()
        rcfg, sep = self.recipe.reward, self.recipe.task.step_separator
        eos = self.tokenizer.eos_token_id
        ids = [list(c) for c in completion_ids]
        # decode ourselves: step ends are found through character offsets of exactly this decoding (rewards.py)
        texts = [self.tokenizer.decode([t for t in c if t != eos], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False) for c in ids]
        problems = [self.problems[int(i)] for i in problem_index]
        grades = [row[0] for row in grade_samples(problems, [[t] for t in texts], sep)]
        outcomes = [float(g.answer_correct) for g in grades]
        scores = None
        if self.reward_model is not None:
            scores = self.reward_model.score_steps([p.text for p in problems], texts, sep=sep)
        elif rcfg.source == "exact":  # the exact checker as an oracle PRM (recipe validation: arithmetic only)
            scores = [prefix_correct_probs(g.step_correct or []) for g in grades]
        try:
            # TRL hands over each completion up to and including its EOS: one without EOS at the cap was cut
            tr = token_rewards(rcfg, texts, ids, scores=scores, outcomes=outcomes, tokenizer=self.tokenizer,
                               max_tokens=self.recipe.rl.max_new_tokens, eos_token_id=eos, sep=sep,
                               sparse_aggregate=rcfg.sparse_aggregate)
        except RewardError as exc:
            raise GRPOError(f"iteration {self.calls + 1}: {exc}") from None
        _check_finite("the rewards", tr.rewards, self.run_dir)
        self.calls += 1
        self.last = {"texts": texts, "ids": ids, "rewards": tr, "scores": scores, "grades": grades, "outcomes": outcomes,
                     "lengths": [int(n) for n in tr.mask.sum(1).tolist()], "time_score": time.monotonic() - t0}
        return [float(r) for r in tr.returns]


# --------------------------------------------------------------------------- the trainer


def make_trainer_class():
    """`RlprmGRPOTrainer`, built on first use so that importing this module does not import TRL."""
    from trl import GRPOTrainer

    class RlprmGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with process-supervised advantages (dense rewards), phase timings and a NaN guard.

        `rlprm_reward` is the `RewardFunction` it was built with; `rlprm_process`
        turns on the (B, T) process advantages; `rlprm_run_dir` is where the
        last good checkpoint is named from when a loss is not finite.
        """

        rlprm_reward: RewardFunction
        rlprm_process: bool = False
        rlprm_run_dir: Path | None = None
        rlprm_times: dict

        def _generate(self, prompts):
            t0 = time.monotonic()
            out = super()._generate(prompts)
            self.rlprm_times["generate"] = self.rlprm_times.get("generate", 0.0) + time.monotonic() - t0
            return out

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            last = self.rlprm_reward.last
            self.rlprm_times["score"] = self.rlprm_times.get("score", 0.0) + last.get("time_score", 0.0)
            if not self.rlprm_process or not self.model.training:
                return output
            t0 = time.monotonic()
            missing = [k for k in TRL_OUTPUT_KEYS if k not in output]
            if missing:
                raise GRPOError(f"TRL's _generate_and_score_completions no longer returns {missing}; rlprm's GRPO "
                                "override needs trl 1.16.x (see pyproject.toml)")
            if self.accelerator.num_processes > 1:
                raise GRPOError("process-supervised GRPO runs on one process for now (a group's steps must be "
                                "normalised together)")
            completion_ids = output["completion_ids"]
            B, C = completion_ids.shape
            if len(last.get("ids", [])) != B:
                raise GRPOError(f"the reward function scored {len(last.get('ids', []))} completions but TRL returned "
                                f"{B}; the TRL contract changed (rlprm needs trl 1.16.x)")
            # the reward function saw the completions in this order: check it is the same batch
            for i in range(B):
                n = int(output["completion_mask"][i].sum())
                if completion_ids[i, :n].tolist() != last["ids"][i][:n]:
                    raise GRPOError(f"completion {i} differs from the one the reward function scored; the TRL "
                                    "contract changed (rlprm needs trl 1.16.x)")
            tr, recipe = last["rewards"], self.rlprm_reward.recipe
            step_rewards = tr.rewards  # rl.process_reward: dense_form (reward.dense_form's shaped rewards)
            if recipe.rl.process_reward == "score":
                step_rewards = step_score_rewards(tr, last["scores"], last["outcomes"], recipe.reward.outcome_coef)
            adv = process_advantages(step_rewards, tr.step_token_ends, last["lengths"], self.num_generations, C)
            output["advantages"] = adv.to(output["advantages"].device, output["advantages"].dtype)
            from rlprm.rl.ppo import _check_finite

            _check_finite("the advantages", output["advantages"], self.rlprm_run_dir or Path("."))
            self.rlprm_times["score"] += time.monotonic() - t0
            return output

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from rlprm.rl.ppo import _check_finite

            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            value = loss[0] if isinstance(loss, tuple) else loss
            try:
                _check_finite("the GRPO loss", value.detach(), self.rlprm_run_dir or Path("."))
            except PPOError as exc:
                raise GRPOError(str(exc)) from None
            return loss

    return RlprmGRPOTrainer


def grpo_args(recipe: Recipe, output_dir: Path, seed: int, progress: bool = False, plain: bool = False):
    """TRL's `GRPOConfig` for a recipe (also used by benchmarks/rl_step.py for TRL's plain trainer)."""
    from trl import GRPOConfig

    from rlprm.models import resolve_device

    rl = recipe.rl
    B = rl.prompts_per_iteration * rl.samples_per_problem
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=resolve_device(recipe.run.device) == "cpu",
        bf16=recipe.model.dtype == "bfloat16",
        per_device_train_batch_size=rl.minibatch_size,
        steps_per_generation=B // rl.minibatch_size,  # one optimizer step per minibatch, as in our PPO loop
        gradient_accumulation_steps=1,
        num_generations=rl.samples_per_problem,
        num_iterations=rl.ppo_epochs,
        max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature,
        top_k=0, top_p=1.0,  # pure temperature sampling, as everywhere in rlprm
        learning_rate=rl.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,  # torch AdamW's default, as the PPO loop's optimizer
        max_grad_norm=rl.max_grad_norm,
        beta=rl.beta,
        epsilon=rl.clip_range,
        loss_type=rl.loss_type,
        scale_rewards=rl.scale_rewards,
        num_train_epochs=1,
        shuffle_dataset=False,  # the problems are already in the order of (seed, epoch): resume replays them
        seed=seed,
        logging_steps=B // rl.minibatch_size * rl.ppo_epochs,  # one log per iteration
        save_strategy="no",  # rlprm writes its own atomic checkpoints
        report_to="none",  # rlprm's Tracker logs (W&B included)
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        log_completions=False,
    )


def check_sizes(recipe: Recipe) -> None:
    """Raise GRPOInputError when the batch sizes do not fit GRPO's batching."""
    rl = recipe.rl
    B = rl.prompts_per_iteration * rl.samples_per_problem
    if rl.samples_per_problem < 2:
        raise GRPOInputError("rl.samples_per_problem is GRPO's group size and must be at least 2 (the advantage is "
                             "relative to the group's other completions)")
    if B % rl.minibatch_size:
        raise GRPOInputError(f"rl.minibatch_size ({rl.minibatch_size}) must divide rl.prompts_per_iteration x "
                             f"rl.samples_per_problem ({B}) for GRPO")
    if rl.problems_per_epoch % rl.prompts_per_iteration:
        raise GRPOInputError(f"rl.problems_per_epoch ({rl.problems_per_epoch}) must be a multiple of "
                             f"rl.prompts_per_iteration ({rl.prompts_per_iteration}) for GRPO")


def check_prerequisites(recipe: Recipe) -> None:
    """Missing generator / reward model (named with the command that builds it), or sizes GRPO cannot batch."""
    from rlprm.rl import ppo

    if recipe.rl.algorithm != "grpo":
        raise GRPOInputError(f"rl.algorithm is {recipe.rl.algorithm!r}; train_grpo runs grpo")
    # ppo's check covers the model paths; it refuses any algorithm but ppo, so it sees this recipe as one
    ppo.check_prerequisites(recipe.model_copy(update={"rl": recipe.rl.model_copy(update={"algorithm": "ppo"})}))
    check_sizes(recipe)


# --------------------------------------------------------------------------- the loop


def train_grpo(recipe: Recipe, resume: bool = False, progress: bool = True) -> dict:
    """Run GRPO as the recipe says; returns the final metrics (also in summary.json)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from rlprm.checkpoint import export, load_state, save_checkpoint, start_or_resume
    from rlprm.evaluate import between_epochs
    from rlprm.models import load_causal_lm, load_tokenizer, resolve_device
    from rlprm.problems import eval_problems, held_out_arithmetic
    from rlprm.prm_adapters import load_for_recipe
    from rlprm.rl.ppo import _mean, _problems_for_epoch
    from rlprm.tracking import Tracker

    check_prerequisites(recipe)
    rl, rcfg, sep = recipe.rl, recipe.reward, recipe.task.step_separator
    process = rcfg.mode == "dense"
    run_dir = Path(recipe.run.output_dir)
    device = resolve_device(recipe.run.device)
    ckpt = start_or_resume(run_dir, resume, GRPOInputError)
    torch.manual_seed(recipe.run.seed)

    # models: the policy (from the checkpoint on resume); TRL builds the frozen reference from
    # `config._name_or_path`, which must stay the initial generator, also on resume
    gen, dtype, trc = recipe.model.generator, recipe.model.dtype, recipe.model.trust_remote_code
    tokenizer = load_tokenizer(gen, padding_side="left", trust_remote_code=trc)
    policy = load_causal_lm(ckpt / "model" if ckpt else gen, dtype, device, trc)
    policy.config._name_or_path = str(gen)
    reward_model = None
    if rcfg.source in ("prm", "orm"):
        reward_model = load_for_recipe(recipe, device=device, dtype=dtype)
        if reward_model.kind != rcfg.source:
            raise GRPOInputError(f"reward.source is {rcfg.source} but {recipe.model.reward_model} is a "
                                 f"{reward_model.kind}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=rl.learning_rate, weight_decay=0.01)
    start_epoch, step = 0, 0
    if ckpt is not None:
        state = load_state(ckpt)
        optimizer.load_state_dict(state["policy_optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        print(f"resuming from {ckpt} (epoch {start_epoch}, iteration {step})")

    exclude = set()
    if recipe.task.name == "arithmetic":
        exclude = {p.text for p in held_out_arithmetic(recipe, max(recipe.prepare_eval.num_problems, rl.eval_problems))}
    eval_set = eval_problems(recipe, rl.eval_problems) if rl.eval_n else []
    iterations = rl.problems_per_epoch // rl.prompts_per_iteration
    steps_per_iteration = rl.prompts_per_iteration * rl.samples_per_problem // rl.minibatch_size * rl.ppo_epochs
    # the problems of every remaining epoch, in order (each epoch's depend only on (seed, epoch))
    problems = [p for e in range(start_epoch, rl.epochs) for p in _problems_for_epoch(recipe, e, exclude)]
    final: dict = {}

    tracker = Tracker(run_dir, recipe, job="rl", tags=["rl", "grpo", rcfg.mode, rcfg.source])
    threads_before = torch.get_num_threads()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    try:
        def evaluate(epoch: int, model) -> dict:
            # 9. best-of-N on held-out problems, scored by the run's own reward model if it has one
            metrics = between_epochs(recipe, model, tokenizer, eval_set, reward_model, epoch)
            if metrics:
                tracker.log(metrics, step=step)
            return metrics

        if ckpt is None:
            final.update(evaluate(0, policy))  # the starting point, for before/after comparisons
        if not problems:
            print(f"{run_dir} already finished its {rl.epochs} epochs; raise rl.epochs to train on")
        else:
            reward_fn = RewardFunction(recipe, problems, tokenizer, reward_model, run_dir)
            dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems],
                                         "problem_index": list(range(len(problems)))})
            trainer_cls = make_trainer_class()
            state_box = {"step": step, "t_iter": None}

            class Loop(TrainerCallback):
                """The rlprm loop around TRL's steps: 8. log per iteration, 9. best-of-N and 10. checkpoint per epoch."""

                def on_step_begin(self, args, state, control, **kw):
                    if state.global_step % steps_per_iteration == 0:
                        state_box["t_iter"] = time.monotonic()
                        trainer.rlprm_times.clear()

                def on_log(self, args, state, control, logs=None, **kw):
                    logs = logs or {}
                    if "train_runtime" in logs or state.global_step % steps_per_iteration:
                        return
                    # 8. log: TRL's loss-side statistics of this iteration, and ours from the reward function
                    state_box["step"] += 1
                    it = state_box["step"]
                    last, times = reward_fn.last, trainer.rlprm_times
                    total = time.monotonic() - state_box["t_iter"]
                    t_gen, t_score = times.get("generate", 0.0), times.get("score", 0.0)
                    grades, tr = last["grades"], last["rewards"]
                    proc = [g.process_correct for g in grades]
                    record = {
                        "epoch": it / iterations,
                        "rl/reward": float(tr.returns.mean()),
                        "rl/reward_std": logs.get("reward_std"),
                        "rl/frac_reward_zero_std": logs.get("frac_reward_zero_std"),
                        "rl/kl": logs.get("kl"),  # TRL's k3 estimate per token (only with rl.beta > 0)
                        "rl/entropy": logs.get("entropy"),
                        "rl/clipfrac": logs.get("clip_ratio/region_mean"),
                        "rl/loss": logs.get("loss"),
                        "rl/grad_norm": logs.get("grad_norm"),
                        "rl/response_length": float(np.mean(last["lengths"])),
                        "rl/steps_per_solution": _mean(len(g.steps) for g in grades),
                        "rl/answer_accuracy": _mean(last["outcomes"]),
                        "rl/process_accuracy": _mean(proc) if any(p is not None for p in proc) else None,
                        "rl/well_formed": _mean(g.well_formed for g in grades),
                        **{f"reward/{k}": v for k, v in tr.stats.items()},
                        "time/generate": round(t_gen, 3),
                        "time/score": round(t_score, 3),
                        "time/update": round(total - t_gen - t_score, 3),
                    }
                    tracker.log(record, step=it)
                    final.update(record)
                    if progress:
                        print(f"epoch {math.ceil(it / iterations)}/{rl.epochs} it {(it - 1) % iterations + 1}/"
                              f"{iterations}  reward {record['rl/reward']:+.3f}  answer "
                              f"{record['rl/answer_accuracy']:.1%}  gen {t_gen:.1f}s score {t_score:.1f}s "
                              f"update {record['time/update']:.1f}s", flush=True)
                    if it % iterations == 0:
                        epoch = it // iterations
                        final.update(evaluate(epoch, trainer.model))
                        # 10. checkpoint: weights, optimizer, counters (and the RNG, added by save_checkpoint)
                        save_checkpoint(run_dir, epoch, trainer.model, tokenizer,
                                        {"policy_optimizer": trainer.optimizer.state_dict(), "step": it})
                    state_box["t_iter"] = time.monotonic()

            trainer = trainer_cls(
                model=policy,
                reward_funcs=[reward_fn],
                args=grpo_args(recipe, run_dir / "trl", seed=recipe.run.seed + start_epoch, progress=False),
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[Loop()],
                optimizers=(optimizer, None),
            )
            trainer.rlprm_reward, trainer.rlprm_process, trainer.rlprm_run_dir = reward_fn, process, run_dir
            # our Loop prints one line per iteration; transformers' own printer/progress bar would repeat it as dicts
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            trainer.rlprm_times = {}
            # 1.-7. generate, score, advantages, update: TRL's loop with our reward function and advantages
            trainer.train()

        # 11. export the final policy as a plain HF folder (summary first: export copies it)
        if final:
            tracker.summary({k: v for k, v in final.items() if isinstance(v, (int, float)) or v is None})
        out = export(run_dir)
        final["export_dir"] = str(out)
        return final
    finally:
        torch.set_num_threads(threads_before)
        tracker.finish()


__all__ = ["GRPOError", "GRPOInputError", "RewardFunction", "TRL_OUTPUT_KEYS", "check_prerequisites", "check_sizes",
           "grpo_args", "make_trainer_class", "process_advantages", "step_score_rewards", "train_grpo"]
