"""TRL's `GRPOTrainer` with rlprm's process advantages, phase timings and NaN guard, and the per-iteration log.

This module imports TRL when it is imported: import it inside the function
that trains (rl/grpo.py does), so that `rlprm check` and friends stay fast.
"""

from __future__ import annotations

import time
from pathlib import Path

from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlprm.rl.grpo_rewards import TRL_OUTPUT_KEYS, RewardFunction, rank_process_advantages
from rlprm.rl.run import RLError, Run, check_finite, mean, process_part


class RlprmGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with process-supervised advantages (dense rewards), phase timings and a NaN guard.

    reward: the `RewardFunction` it was built with (also in reward_funcs);
    process: hand the loss (B, T) process advantages (`grpo_rewards.grpo_advantages`);
    run_dir: where the last good checkpoint is named from when a loss is not
    finite; times: seconds spent generating and scoring, summed over an
    iteration (the `IterationLog` callback reads and clears it); vllm_generation: with `use_vllm`, an
    engine an earlier trainer built (TRL's `VLLMGeneration`), used instead of building another; dist: the run's
    `rl.distributed.Dist` (a NaN on one rank stops every rank).

    A LoRA policy (a peft model) with a KL term: the reference log-probs are the base's, adapters disabled.

    Several processes: this rank's `output` holds its own slice of the
    generation batch; its process advantages come from every rank's reward
    events (`grpo_rewards.rank_process_advantages`), as TRL's scalar advantages come
    from every rank's rewards.
    """

    def __init__(self, *args, reward: RewardFunction, process: bool, run_dir: Path, times: dict,
                 vllm_generation=None, dist=None, **kwargs):
        if vllm_generation is None:
            super().__init__(*args, **kwargs)
        else:
            # rlprm builds a trainer per epoch and TRL a colocated engine per trainer: a second engine would take
            # another rl.vllm_gpu_memory_utilization of the GPU, so TRL's constructor is handed the first one
            import trl.trainer.grpo_trainer as trl_grpo

            build = trl_grpo.VLLMGeneration
            trl_grpo.VLLMGeneration = lambda **_: vllm_generation
            try:
                super().__init__(*args, **kwargs)
            finally:
                trl_grpo.VLLMGeneration = build
        if "ref" in getattr(self.model, "peft_config", {}):
            # a LoRA policy with a KL term: TRL copied the adapters as they are now into a "ref" adapter to serve
            # as the reference. rlprm's reference is the initial generator, which is the base with the adapters
            # disabled (TRL's choice when there is no "ref" adapter); with a trainer per epoch the copy would also
            # move the reference every epoch, and the next epoch's trainer could not add "ref" again
            self.model.delete_adapter("ref")
        self.rlprm_reward, self.rlprm_process, self.rlprm_run_dir, self.rlprm_times = reward, process, run_dir, times
        self.rlprm_dist = dist
        if dist is not None and self.accelerator.num_processes != dist.world:
            raise RLError(f"TRL's accelerator sees {self.accelerator.num_processes} processes but the run has "
                          f"{dist.world}: the trainer did not join the launcher's process group")

    def _generate(self, prompts):
        t0 = time.monotonic()
        out = super()._generate(prompts)
        self.rlprm_times["generate"] = self.rlprm_times.get("generate", 0.0) + time.monotonic() - t0
        if self.rollout_func is None:
            # TRL's own sampling: its completion ids (EOS included) are every token generated, as rl.rollout_search
            # counts its own (pruned branches too) in the same entry, so the two compare at equal generated tokens
            self.rlprm_times["generated_tokens"] = self.rlprm_times.get("generated_tokens", 0) + sum(
                len(ids) for ids in out[1])
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
            raise RLError(f"TRL's _generate_and_score_completions no longer returns {missing}; rlprm's GRPO "
                          "override needs trl 1.16.x (see pyproject.toml)")
        completion_ids = output["completion_ids"]
        B, C = completion_ids.shape
        if len(last.get("ids", [])) != B:
            raise RLError(f"the reward function scored {len(last.get('ids', []))} completions but TRL returned "
                          f"{B}; the TRL contract changed (rlprm needs trl 1.16.x)")
        # the reward function saw the completions in this order: check it is the same batch
        for i in range(B):
            n = int(output["completion_mask"][i].sum())
            if completion_ids[i, :n].tolist() != last["ids"][i][:n]:
                raise RLError(f"completion {i} differs from the one the reward function scored; the TRL "
                              "contract changed (rlprm needs trl 1.16.x)")
        # every rank's reward events (one rank: its own), so that a group straddling two ranks is normalised whole
        values, positions, outcome = last["rewards"].event_tensors()
        mine = (values.cpu(), positions.cpu(), outcome.cpu(), C)
        parts = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        adv = rank_process_advantages(self.rlprm_reward.recipe, parts, self.accelerator.process_index,
                                      self.num_generations)
        output["advantages"] = adv.to(output["advantages"].device, output["advantages"].dtype)
        check_finite("the advantages", output["advantages"], self.rlprm_run_dir, self.rlprm_dist)
        self.rlprm_times["score"] += time.monotonic() - t0
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        check_finite("the GRPO loss", value.detach(), self.rlprm_run_dir, self.rlprm_dist)
        return loss


class IterationLog(TrainerCallback):
    """Step 8 of the rlprm loop around TRL's steps: one record per iteration (generation batch) through `run.log`.

    TRL logs once per iteration (logging_steps = optimizer steps per iteration); the record joins TRL's
    loss-side statistics with ours from the reward function (grades, rewards, timings).
    """

    def __init__(self, run: Run, reward: RewardFunction, times: dict, epoch: int, iterations: int,
                 steps_per_iteration: int):
        self.run, self.reward, self.times, self.epoch = run, reward, times, epoch
        self.iterations, self.steps_per_iteration = iterations, steps_per_iteration
        self.t_iter = time.monotonic()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step % self.steps_per_iteration == 0:
            self.t_iter = time.monotonic()
            self.times.clear()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "train_runtime" in logs or state.global_step % self.steps_per_iteration:
            return
        run, rl = self.run, self.run.recipe.rl
        it = state.global_step // self.steps_per_iteration  # within this epoch, 1-based
        last = self.reward.last
        total = time.monotonic() - self.t_iter
        t_gen, t_score = self.times.get("generate", 0.0), self.times.get("score", 0.0)
        grades, tr = last["grades"], last["rewards"]
        run.step += 1
        record = {
            "epoch": self.epoch + it / self.iterations,
            "rl/reward": float(tr.objective.mean()),
            "rl/reward_std": logs.get("reward_std"),
            "rl/frac_reward_zero_std": logs.get("frac_reward_zero_std"),
            "rl/kl": logs.get("kl"),  # TRL's k3 estimate per token (only with a KL coefficient > 0)
            "rl/entropy": logs.get("entropy"),
            "rl/clipfrac": logs.get("clip_ratio/region_mean"),
            "rl/loss": logs.get("loss"),
            "rl/grad_norm": logs.get("grad_norm"),
            "rl/response_length": mean(last["lengths"]),
            "rl/steps_per_solution": mean(len(g.steps) for g in grades),
            "rl/answer_accuracy": mean(last["outcomes"]),
            "rl/process_accuracy": mean(g.process_correct for g in grades),
            "rl/well_formed": mean(g.well_formed for g in grades),
            "rl/shortcut_rate": mean(g.shortcut for g in grades),  # the habits in this update's samples
            "rl/carry_drop_rate": mean(g.carry_drop for g in grades),
            **{f"reward/{k}": v for k, v in tr.stats.items()},
            # this rank's generated tokens this iteration (rl.rollout_search: pruned branches included)
            **({"rl/generated_tokens": self.times["generated_tokens"]} if "generated_tokens" in self.times else {}),
            **({"rl/search_short_groups": self.times["search_short_groups"]}
               if "search_short_groups" in self.times else {}),
            "time/generate": round(t_gen, 3),
            "time/score": round(t_score, 3),
            "time/update": round(total - t_gen - t_score, 3),
        }
        # ours are this rank's; TRL's (loss, kl, reward_std) are already over every rank: the all-rank mean
        record = run.dist.mean_metrics(record)
        run.log(record)
        if run.progress and run.dist.is_main:
            print(f"epoch {self.epoch + 1}/{rl.epochs} it {it}/{self.iterations}  reward {record['rl/reward']:+.3f}  "
                  f"answer {record['rl/answer_accuracy']:.1%}{process_part(record)}  "
                  f"gen {t_gen:.1f}s score {t_score:.1f}s "
                  f"update {record['time/update']:.1f}s", flush=True)
        self.t_iter = time.monotonic()


__all__ = ["IterationLog", "RlprmGRPOTrainer"]
