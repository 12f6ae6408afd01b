"""The run's models, loaded in one place and once: tokenizer, policy, frozen reference, reward model.

Step 4 of the run's setup (rl/run.py): after the checks, the run folder and the problems, before the reward
source (which is built from the reward model loaded here). Every model kind goes through this one loader, so a
recipe enters the model code once: `rlprm.models.load_generator` for the generator's three (tokenizer, policy,
frozen copy), `rlprm.reward.adapters.load_for_recipe` for a reward model of any family, `rl.reference.AdaptersOff`
for a LoRA reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlprm.config import Recipe


@dataclass
class Models:
    """What `load_models` loaded: the run skeleton copies them onto its `Run`."""

    tokenizer: object
    """The generator's tokenizer, padded on the left (generation)."""
    policy: object
    """The trained model (LoRA adapters on it when model.lora.enabled), or a checkpoint's on resume."""
    reference: object = None
    """The frozen starting model when the algorithm needs one (PPO's KL and confidence rewards), else None."""
    reward_model: object = None
    """model.reward_model when the reward source scores with one (prm, orm), else None."""


def load_models(recipe: Recipe, ckpt: Path | None, device: str, *, reference: bool, reward_model: bool) -> Models:
    """The run's models, in this order (LoRA's random adapters draw from the seeded RNG, so the order is part of
    a run's numbers): the tokenizer, the policy (from `ckpt` on resume) and the frozen reference when `reference`
    (the algorithm's `needs_reference`), all three by one call of `rlprm.models.load_generator`; then
    model.reward_model (family reward.adapter, in model.dtype) when `reward_model` (the reward source's
    `uses_reward_model`)."""
    from contextlib import nullcontext

    from rlprm.errors import loading
    from rlprm.models import load_generator

    lora = recipe.model.lora.enabled
    if reward_model:  # what would keep it from loading, found before the generator's (long, at scale) loads
        from rlprm.reward.adapters import check_reward_model

        with loading("model.reward_model", recipe.model.reward_model):
            check_reward_model(recipe.model.reward_model, recipe.reward.adapter, recipe.task.step_separator)
    # a folder that passed the input checks but does not load is bad input naming its key (exit 2), as in
    # `rlprm eval`; a checkpoint of this run's own (resume) is not the user's input: its errors stay as they are
    with loading("model.generator", recipe.model.generator) if ckpt is None else nullcontext():
        tokenizer, policy, frozen = load_generator(recipe, ckpt, device, frozen_copy=reference and not lora)
    models = Models(tokenizer=tokenizer, policy=policy)
    if reference:  # with LoRA the policy's own base, adapters off: no second copy of the weights
        from rlprm.rl.reference import AdaptersOff

        models.reference = AdaptersOff(policy) if lora else frozen
    if reward_model:
        from rlprm.reward.adapters import load_for_recipe

        with loading("model.reward_model", recipe.model.reward_model):
            models.reward_model = load_for_recipe(recipe, device=device, dtype=recipe.model.dtype)
    return models


__all__ = ["Models", "load_models"]
