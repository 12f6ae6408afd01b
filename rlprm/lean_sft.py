"""TRL's SFTTrainer with the plain causal-LM loss (rejection sampling's SFT step uses it).

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

from trl import SFTTrainer


class LeanSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the model's own (mean cross-entropy over labelled tokens)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        labels=inputs["labels"], use_cache=False)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
