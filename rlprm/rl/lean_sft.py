"""TRL's SFTTrainer with the plain causal-LM loss, and a callback that logs its steps (rejection sampling's SFT).

TRL 1.16 computes the loss through a fused, tiled LM head that also produces
per-token entropy and top-1 metrics on every step. For a 40-symbol vocabulary
on a CPU that machinery is pure overhead: the plain loss (same value: mean
cross-entropy over completion tokens) made a step about 1.8x faster in a
side-by-side run. Everything else (data preparation, completion-only labels,
EOS, the loop) stays TRL's.

This module imports TRL when it is imported: import it inside the function
that trains, so that `rlprm check` and friends stay fast.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback
from trl import SFTTrainer


class LeanSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the model's own (mean cross-entropy over labelled tokens)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        labels=inputs["labels"], use_cache=False)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class SFTStepLog(TrainerCallback):
    """Logs every SFT step to a tracker (as `sft/...` at step_offset + the trainer's step) and stops the trainer at
    the first non-finite loss or gradient norm; `state` receives `last_loss` and, on a stop, `bad` (what and where)."""

    def __init__(self, tracker, step_offset: int, state: dict):
        self.tracker, self.step_offset, self.state = tracker, step_offset, state

    def on_log(self, args, st, control, logs=None, **kwargs):
        if not logs:
            return
        numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        self.tracker.log({f"sft/{k}": v for k, v in numbers.items()}, step=self.step_offset + st.global_step)
        self.state["last_loss"] = numbers.get("loss", self.state.get("last_loss"))
        for key in ("loss", "grad_norm"):
            if key in numbers and not math.isfinite(numbers[key]):
                self.state["bad"] = f"the SFT {key} ({numbers[key]}) at SFT step {st.global_step}"
                control.should_training_stop = True
