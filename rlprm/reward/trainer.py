"""The reward-model training classes built on transformers' `Trainer`: the loss and the progress/budget callback.

A module of their own so that transformers (a heavy import) loads only when a function that trains imports
this one; the classes themselves stay at module level, where a reader, a debugger and pickle can find them.
"""

from __future__ import annotations

import time

from transformers import Trainer, TrainerCallback

from rlprm.reward.model import reward_loss


class RewardModelTrainer(Trainer):
    """`transformers.Trainer` with the reward-model loss (`rm_kind`: "prm" or "orm")."""

    # compute_loss returns a per-micro-batch mean; Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, rm_kind: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.rm_kind = rm_kind

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        loss = reward_loss(self.rm_kind, outputs.logits, inputs["labels"])
        return (loss, outputs) if return_outputs else loss


class TrainProgress(TrainerCallback):
    """A bar over optimizer steps with the loss; logs to `tracker` (metrics.jsonl, W&B); stops at `budget_s`
    seconds of training when that is set (0: no clock, the step count alone decides)."""

    def __init__(self, tracker=None, budget_s: float = 0.0, progress: bool = True, total_steps_hint: int = 0):
        self.tracker, self.budget_s, self.progress, self.total_steps_hint = tracker, budget_s, progress, total_steps_hint
        self.t0 = 0.0
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.t0 = time.monotonic()
        self.bar = tqdm(total=state.max_steps or self.total_steps_hint, desc="training reward model", unit="step",
                        disable=not self.progress or not state.is_world_process_zero)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        if self.budget_s and time.monotonic() - self.t0 >= self.budget_s:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        if self.tracker is not None:
            self.tracker.log({f"train/{k}": v for k, v in logs.items()}, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
