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
  recipe validation) become step values in `rewards.token_rewards`, the one
  placement (`reward.dense_form`: `score`, each step's probability, or
  `log_prob`, its log; each step's OWN value, floored one by one at
  missing_answer_reward + 0.1, never PPO's floored running sum, which made
  the steps after a bad one look perfect; min_form and delta, increments of a
  running score, are refused at validation; the last step's value sits on EOS
  so that it also teaches stopping). `grpo_advantages` only normalises them over the group and spreads
  them over the tokens as `rl.process_advantage` says
  (`core.process_token_advantages`): `min` (the default: a token's return is the
  worst step from it on, which writing more steps cannot raise), `mean`, or
  DeepSeekMath's `sum` (farmable by step count; it warns). A (B, T) tensor.

The hook: `_generate_and_score_completions` is the private method of
`GRPOTrainer` that samples, scores and returns a dict whose "advantages" entry
(shape (B,)) the loss multiplies with the token log-ratios; TRL's loss also
accepts (B, T). `GRPOTrainer` maintainers recommend overriding it for custom
advantages. Being private, its contract can change in any minor release:
pyproject pins trl to 1.16.x and tests/test_grpo.py checks the keys and shapes.

What TRL runs and what we add: TRL does the sampling (`generate`, or with
`rl.rollout: vllm` its own colocated vLLM engine, `use_vllm`), the
reference and old log-probs, the clipped loss with its KL term (`rl.kl_coef`) and
the optimizer steps. `GRPO` is this algorithm's part of the run skeleton
(`rl/run.py`: the problems of each epoch, shared with PPO, best-of-N after
every epoch, an atomic checkpoint per epoch, `--resume`, the final export);
it supplies the reward function, the process advantages (`grpo_advantages`)
and one TRL trainer per epoch (`rl/grpo_trainer.py`), whose callback logs one
record per iteration.

One iteration = one generation batch: `rl.prompts_per_iteration` prompts x
`rl.samples_per_problem` completions, then `rl.ppo_epochs` passes (GRPO's mu)
over it in minibatches of `rl.minibatch_size` completions, one optimizer step
each.

Several processes (`deepspeed --num_gpus N rlprm/train_rl.py RECIPE`, or
`torchrun` / `accelerate launch --multi_gpu`): `rl.prompts_per_iteration` and
`rl.minibatch_size` stay totals over the ranks, as in PPO. TRL's trainer runs
data parallel (DDP) in the process group `distributed.setup_process_group`
starts; its sampler hands rank r the r-th contiguous slice of each generation
batch (B / N completions), so a group of `rl.samples_per_problem` may straddle
two ranks. TRL gathers the scalar rewards and normalises each group whole,
then keeps the rank's slice; the process advantages do the same
(`rank_process_advantages`: every rank's reward events gathered, normalised
over whole groups, this rank's rows cut out). Rank 0 alone evaluates and
writes; the ranks end with the same weights (DDP averages the gradients).

LoRA (`model.lora.enabled`): TRL gets the peft model `rl.run.load_policy` builds
(adapters trainable, base frozen; from an adapter checkpoint on resume), the
optimizer holds the adapters only, and the KL reference is the base with the
adapters disabled (the generator: no second copy of the weights). Checkpoints
hold the adapters; the export merges them into a plain HF folder.

Precision: with `model.dtype: bfloat16` the trained weights (all of them, or
the adapters) are kept in float32 and TRL computes in bf16 (autocast), as
DeepSpeed's bf16 does for PPO: an AdamW step of ~1e-6 on a bf16 weight would
round away. No `deepspeed:` key (ZeRO): each epoch builds a new TRL trainer
around the same optimizer, which a ZeRO engine would own.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlprm.config import Recipe
from rlprm.rl.run import RLError, RLInputError, Run, check_finite, check_models

# the keys (and, for advantages, the leading dimension) that `_generate_and_score_completions` of TRL 1.16
# returns and that the override and the loss rely on; tests/test_grpo.py fails loudly if TRL changes them
TRL_OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")


# --------------------------------------------------------------------------- pure pieces


# --------------------------------------------------------------------------- the reward function


class RewardFunction:
    """A TRL reward function computing rlprm rewards; keeps what it computed for the trainer and the log.

    TRL calls it with the prompts, the decoded completions, the completion ids
    and the dataset's other columns (here `problem_index`, an index into
    `problems`). It returns one scalar per completion: the return of
    `rewards.token_rewards`, each completion's value under the training objective
    (`TokenRewards.objective`: for sparse rewards the reward itself; for dense
    rewards rl.process_advantage's min, mean or sum of the step values plus the
    outcome, used by TRL only for its log). The
    full `TokenRewards`, the grades and the scoring time stay in `self.last`
    for the process advantages and the metrics.
    """

    __name__ = "rlprm_reward"  # TRL names the reward column after it

    def __init__(self, recipe: Recipe, problems: list, tokenizer, reward_model=None, run_dir: Path | None = None,
                 dist=None, source=None):
        from rlprm.reward_sources import reward_source
        from rlprm.rl.distributed import Dist

        self.recipe, self.problems, self.tokenizer = recipe, problems, tokenizer
        # who scores (rlprm/reward_sources.py): the run's, or one built around `reward_model`
        self.source = source if source is not None else reward_source(recipe, reward_model)
        # several ranks: a reason to stop on one stops them all (the others would wait in TRL's gather for ever)
        self.dist = dist or Dist.single()
        self.run_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir)
        self.last: dict = {}
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, problem_index, **_):
        from rlprm.rewards import RewardError

        t0 = time.monotonic()
        eos = self.tokenizer.eos_token_id
        ids = [list(c) for c in completion_ids]
        # decode ourselves: step ends are found through character offsets of exactly this decoding (rewards.py)
        texts = [self.tokenizer.decode([t for t in c if t != eos], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False) for c in ids]
        problems = [self.problems[int(i)] for i in problem_index]
        grades = self.source.grade(problems, texts)
        outcomes = [float(g.answer_correct) for g in grades]
        reason, scores = None, None
        try:
            scores = self.source.step_scores(problems, texts, ids, grades, tokenizer=self.tokenizer)
            # TRL hands over each completion up to and including its EOS: one without EOS at the cap was cut
            tr = self.source.rewards(texts, ids, grades, scores, tokenizer=self.tokenizer)
        except RewardError as exc:
            reason = f"iteration {self.calls + 1}: {exc}"
        self.dist.stop_if_any(reason, RLError)
        check_finite("the rewards", tr.rewards, self.run_dir, self.dist)
        self.calls += 1
        self.last = {"texts": texts, "ids": ids, "rewards": tr, "scores": scores, "grades": grades, "outcomes": outcomes,
                     "lengths": [int(n) for n in tr.mask.sum(1).tolist()], "time_score": time.monotonic() - t0}
        return [float(r) for r in tr.objective]


def grpo_args(recipe: Recipe, output_dir: Path, seed: int, progress: bool = False, plain: bool = False,
              world: int = 1):
    """TRL's `GRPOConfig` for a recipe (also used by benchmarks/rl_step.py for TRL's plain trainer).

    world: the number of processes; rl.minibatch_size is a total over them (`check_sizes` checks it divides),
    so each rank takes minibatch_size / world completions per optimizer step, and an iteration is as many
    optimizer steps of as many completions as on one process.
    """
    from trl import GRPOConfig

    from rlprm.models import resolve_device

    rl = recipe.rl
    B = rl.prompts_per_iteration * rl.samples_per_problem
    # rl.rollout vllm: TRL's own colocated engine (weights synced from the policy after every optimizer step)
    vllm = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": rl.vllm_gpu_memory_utilization}
            if rl.rollout == "vllm" else {})
    return GRPOConfig(
        **vllm,
        output_dir=str(output_dir),
        use_cpu=resolve_device(recipe.run.device) == "cpu",
        bf16=recipe.model.dtype == "bfloat16",
        per_device_train_batch_size=rl.minibatch_size // world,
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
        beta=rl.kl_coef,
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


def grpo_advantages(recipe: Recipe, last: dict, group_size: int, width: int):
    """(B, width) per-token process advantages of one generation batch: the one call the trainer makes.

    last: what `RewardFunction` kept for the batch; its `TokenRewards` holds every sample's reward events (the
    step rewards of reward.dense_form, the last one on EOS; a missing answer's penalty) and outcome term, placed
    by `rewards.token_rewards`, the one placement. Here they are only normalised over each group of
    `group_size` samples and spread over the tokens as rl.process_advantage says
    (`core.process_token_advantages`).
    """
    values, positions, outcome = last["rewards"].event_tensors()
    return rank_process_advantages(recipe, [(values, positions, outcome, width)], 0, group_size)


def rank_process_advantages(recipe: Recipe, parts: list, rank: int, group_size: int):
    """(B_r, T_r) process advantages of rank `rank`'s completions, each group normalised whole, wherever its members are.

    parts: every rank's (event values (B_q, S_q), event positions (B_q, S_q), outcome (B_q,), width T_q), in rank
    order: `TokenRewards.event_tensors()` of that rank's completions and their padded width. TRL gives rank q
    the q-th contiguous slice of a generation batch made of consecutive groups of `group_size`, so the rows
    stacked in rank order are the whole batch in TRL's order (as TRL's own `gather` of the scalar rewards), and
    a group may straddle two ranks. The advantages of the whole batch (`core.process_token_advantages`, width
    max T_q) are cut to this rank's rows and its width T_r; nothing is lost: a sample's events, and so its
    non-zero advantages, lie within its own completion. One process: parts = [its own], rank 0.
    """
    import torch

    from rlprm.rl.core import process_token_advantages

    S = max(v.shape[1] for v, _, _, _ in parts)
    values = torch.cat([torch.nn.functional.pad(v, (0, S - v.shape[1]), value=0.0) for v, _, _, _ in parts])
    positions = torch.cat([torch.nn.functional.pad(p, (0, S - p.shape[1]), value=-1) for _, p, _, _ in parts])
    outcome = torch.cat([o.reshape(-1) for _, _, o, _ in parts])
    width = max(int(w) for _, _, _, w in parts)
    whole = process_token_advantages(values, positions, group_size, width, form=recipe.rl.process_advantage,
                                     outcome=outcome)
    start = sum(v.shape[0] for v, _, _, _ in parts[:rank])
    rows, own_width = parts[rank][0].shape[0], int(parts[rank][3])
    return whole[start:start + rows, :own_width]


def check_sizes(recipe: Recipe, world: int = 1) -> None:
    """Raise RLInputError when the batch sizes do not fit GRPO's batching on `world` processes."""
    rl = recipe.rl
    B = rl.prompts_per_iteration * rl.samples_per_problem
    if rl.samples_per_problem < 2:
        raise RLInputError("rl.samples_per_problem is GRPO's group size and must be at least 2 (the advantage is "
                             "relative to the group's other completions)")
    if B % rl.minibatch_size:
        raise RLInputError(f"rl.minibatch_size ({rl.minibatch_size}) must divide rl.prompts_per_iteration x "
                             f"rl.samples_per_problem ({B}) for GRPO")
    if rl.problems_per_epoch % rl.prompts_per_iteration:
        raise RLInputError(f"rl.problems_per_epoch ({rl.problems_per_epoch}) must be a multiple of "
                             f"rl.prompts_per_iteration ({rl.prompts_per_iteration}) for GRPO")
    if rl.minibatch_size % world:
        raise RLInputError(f"rl.minibatch_size ({rl.minibatch_size}) is a total over the {world} processes and must "
                           f"be a multiple of {world} for GRPO (each rank takes minibatch_size / {world} completions "
                           "per optimizer step); set it to a multiple, or launch a number of processes that divides it")




# --------------------------------------------------------------------------- the algorithm


class GRPO:
    """GRPO's part of the run skeleton: the optimizer, and per epoch a TRL trainer over that epoch's problems.

    Each epoch builds a fresh `RlprmGRPOTrainer` around the same policy and optimizer (its Adam moments carry
    over; TRL's scheduler is constant). TRL seeds the global RNG when a trainer is built (`set_seed(args.seed)`),
    so the seed is one of (run.seed, epoch): a resumed run builds epoch e's trainer with epoch e's seed and samples
    what the uninterrupted run sampled, bit for bit on CPU.
    """

    name = "grpo"
    # TRL builds its own from `config._name_or_path` (the generator) when the KL is on; LoRA: the base, adapters off
    needs_reference = False

    def check(self, recipe: Recipe) -> None:
        from rlprm.rl.distributed import launched_world_size

        check_models(recipe)
        check_sizes(recipe, launched_world_size())
        if recipe.deepspeed is not None:
            # each epoch builds a new TRL trainer around the same policy and optimizer; a ZeRO-wrapped optimizer
            # belongs to the engine of the trainer that built it and would not carry over to the next epoch's
            raise RLInputError("rl.algorithm grpo does not take a `deepspeed:` config: TRL's trainer runs data "
                               "parallel (DDP) on the processes the launcher starts; remove the key (LoRA, "
                               "model.lora.enabled, keeps the memory small)")

    def distributed(self, recipe: Recipe):
        # one process: Dist.single(); several: a process group that TRL's accelerate state adopts (DDP)
        from rlprm.rl.distributed import setup_process_group

        return setup_process_group(recipe)

    def setup(self, run: Run) -> None:
        import torch

        # TRL builds the frozen reference from `config._name_or_path`: it must stay the initial generator, also
        # when the policy comes from a checkpoint (a LoRA policy has none: its reference is the base, adapters off)
        run.policy.config._name_or_path = str(run.recipe.model.generator)
        trainable = [p for p in run.policy.parameters() if p.requires_grad]  # LoRA: the adapters only
        if run.recipe.model.dtype == "bfloat16":
            # master weights in float32, computed in bf16 by TRL's autocast: AdamW steps of rl.learning_rate ~1e-6
            # are below bf16's resolution of a weight (~0.4%) and would round away (peft's adapters already are)
            for p in trainable:
                p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(trainable, lr=run.recipe.rl.learning_rate, weight_decay=0.01)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["policy_optimizer"])

    def state_dict(self) -> dict:
        return {"policy_optimizer": self.optimizer.state_dict()}

    def extra_models(self) -> dict:
        return {}

    def train_epoch(self, run: Run, epoch: int, problems: list) -> None:
        import shutil

        from datasets import Dataset
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from rlprm.rl.grpo_trainer import IterationLog, RlprmGRPOTrainer

        recipe, rl = run.recipe, run.recipe.rl
        iterations = rl.problems_per_epoch // rl.prompts_per_iteration
        steps_per_iteration = rl.prompts_per_iteration * rl.samples_per_problem // rl.minibatch_size * rl.ppo_epochs
        reward_fn = RewardFunction(recipe, problems, run.tokenizer, run.reward_model, run.run_dir, run.dist,
                                   source=run.reward_source)
        times: dict = {}
        engine = getattr(self, "vllm_generation", None)  # rl.rollout vllm: the first epoch's engine serves them all
        # 1.-7. generate, score, advantages, update: TRL's loop with our reward function and advantages; 8. log
        trainer = RlprmGRPOTrainer(
            model=run.policy,
            reward_funcs=[reward_fn],
            args=grpo_args(recipe, run.run_dir / "trl", seed=recipe.run.seed * 1_000_003 + 3000 + epoch,
                           world=run.dist.world),
            train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in problems],
                                             "problem_index": list(range(len(problems)))}),
            processing_class=run.tokenizer,
            callbacks=[IterationLog(run, reward_fn, times, epoch, iterations, steps_per_iteration)],
            optimizers=(self.optimizer, None),
            reward=reward_fn, process=recipe.reward.mode == "dense", run_dir=run.run_dir, times=times,
            vllm_generation=engine,
            dist=run.dist,
        )
        self.vllm_generation = getattr(trainer, "vllm_generation", None)
        # IterationLog prints one line per iteration; transformers' own printer/progress bar would repeat it as dicts
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        run.dist.barrier()  # every rank is done with the folder before rank 0 removes it
        if run.dist.is_main:
            shutil.rmtree(run.run_dir / "trl", ignore_errors=True)


__all__ = ["GRPO", "RewardFunction", "TRL_OUTPUT_KEYS", "check_sizes", "grpo_advantages", "grpo_args",
           "rank_process_advantages"]
