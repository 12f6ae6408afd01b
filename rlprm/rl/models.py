"""The run's models, loaded in one place and once: tokenizer, policy, frozen reference, reward model.

Step 4 of the run's setup (rl/run.py): after the checks, the run folder and the problems, before the reward
source (which is built from the reward model loaded here). Every model kind goes through this one loader, so a
recipe enters the model code once; the pieces it uses stay where they were (`rlprm.models` for HF loading and
LoRA, `rlprm.reward.adapters` for reward models of every family, `rl.reference.AdaptersOff` for a LoRA reference).
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


def load_policy(recipe: Recipe, ckpt: Path | None, device: str):
    """The trained model: the generator (LoRA adapters added when model.lora.enabled), or a checkpoint's."""
    from rlprm.models import apply_lora, load_causal_lm

    gen, dtype, trc = recipe.model.generator, recipe.model.dtype, recipe.model.trust_remote_code
    if ckpt is not None and (ckpt / "model" / "adapter_config.json").is_file():
        # a LoRA run checkpoints its adapters only: the base is the generator, the adapters come back trainable
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(gen, dtype, device, trc), str(ckpt / "model"),
                                         is_trainable=True).to(device)
    if ckpt is not None:
        # in the dtype it was written in: GRPO's float32 master weights of a bf16 recipe come back unrounded
        return load_causal_lm(ckpt / "model", "auto", device, trc)
    return apply_lora(load_causal_lm(gen, dtype, device, trc), recipe.model.lora)


def load_reference(recipe: Recipe, policy, device: str):
    """The frozen starting model: `policy` with its adapters off under model.lora.enabled (no second copy of the
    weights, `rl.reference.AdaptersOff`), else a copy of the generator loaded from disk (eval mode, no gradients)."""
    if recipe.model.lora.enabled:
        from rlprm.rl.reference import AdaptersOff

        return AdaptersOff(policy)
    from rlprm.models import load_causal_lm

    m = recipe.model
    return load_causal_lm(m.generator, m.dtype, device, m.trust_remote_code).eval().requires_grad_(False)


def load_models(recipe: Recipe, ckpt: Path | None, device: str, *, reference: bool, reward_model: bool) -> Models:
    """The run's models, in this order (LoRA's random adapters draw from the seeded RNG, so the order is part of
    a run's numbers): the tokenizer, the policy (from `ckpt` on resume), the frozen reference when `reference`
    (the algorithm's `needs_reference`), model.reward_model (family reward.adapter, in model.dtype) when
    `reward_model` (the reward source's `uses_reward_model`)."""
    from rlprm.models import load_tokenizer

    m = recipe.model
    models = Models(tokenizer=load_tokenizer(m.generator, padding_side="left", trust_remote_code=m.trust_remote_code),
                    policy=load_policy(recipe, ckpt, device))
    if reference:
        models.reference = load_reference(recipe, models.policy, device)
    if reward_model:
        from rlprm.reward.adapters import load_for_recipe

        models.reward_model = load_for_recipe(recipe, device=device, dtype=m.dtype)
    return models


__all__ = ["Models", "load_models", "load_policy", "load_reference"]
