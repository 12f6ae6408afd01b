"""GRPO on TRL's `GRPOTrainer`, with process supervision (per-token advantages from step rewards).

docs/design.md section 7. Two modes, chosen by `reward.mode`:
- `sparse` (outcome supervision): plain GRPO. Each completion gets one scalar
  (the grader's 1/0, an ORM's probability, or a PRM's aggregated score, all
  from `reward.tokens.token_rewards`), TRL normalises it within the group of
  `rl.samples_per_problem` completions of one prompt, and every token of a
  completion shares that advantage.
- `dense` (process supervision, DeepSeekMath section 4.1.3): the step scores
  (a PRM's, or with `reward.source: exact` the arithmetic checker's
  prefix-correctness, an oracle PRM; `confidence` is PPO-only, refused at
  recipe validation) become step values in `reward.tokens.token_rewards`, the one
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

LoRA (`model.lora.enabled`): TRL gets the peft model `models.load_policy` builds
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

from pathlib import Path

from rlprm.config import Recipe
# the reward function and the process advantages live in rl/grpo_rewards.py (the trainer imports them from there,
# not from here: no import circle); named here too, where a reader of GRPO looks for them
from rlprm.rl.grpo_rewards import TRL_OUTPUT_KEYS, RewardFunction, grpo_advantages, rank_process_advantages
from rlprm.rl.run import RLInputError, Run


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

        check_sizes(recipe, launched_world_size())  # the models' presence: the skeleton's `run.check_run`
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
        # rl.rollout_search: groups from a PRM-guided tree (rl/search_rollouts.py), handed to TRL as its rollout_func;
        # off-policy (that module's docstring says how); None: TRL samples
        from rlprm.rl.search_rollouts import build_tree

        self.tree = build_tree(run, batch_size=256)

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
        rollout = {}
        if getattr(self, "tree", None) is not None:
            from rlprm.rl.search_rollouts import TRLRollout

            # TRL's rollout_func (experimental in trl 1.16, which pyproject pins; TRL warns so once per trainer)
            generator, scorer = self.tree
            rollout = {"rollout_func": TRLRollout(problems, generator, scorer, rl.rollout_search, run.policy,
                                                  run.tokenizer, rl.max_new_tokens, rl.temperature,
                                                  recipe.run.seed * 1_000_003 + 4000 + epoch + 1000 * run.dist.rank,
                                                  times)}
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
            **rollout,
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
