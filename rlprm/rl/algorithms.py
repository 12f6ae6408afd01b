"""The algorithms by name: `rl.algorithm` -> its `run.Algorithm`, and the entry point that runs one.

The registry sits above the algorithms and the skeleton: `ppo`, `grpo` and `rejection` import `run` (the skeleton
and what they share), and `run` imports none of them, so the three modules and the skeleton form no import circle.
"""

from __future__ import annotations

import importlib

ALGORITHMS: dict[str, tuple[str, str]] = {
    "ppo": ("rlprm.rl.ppo", "PPO"),
    "grpo": ("rlprm.rl.grpo", "GRPO"),
    "rejection_sampling": ("rlprm.rl.rejection", "RejectionSampling"),
}
"""rl.algorithm -> (module, class) of its `run.Algorithm` (imported when asked for: each brings its own libraries)."""


def algorithm_for(recipe):
    """The `run.Algorithm` of `rl.algorithm`."""
    from rlprm.rl.run import RLInputError

    name = recipe.rl.algorithm
    if name not in ALGORITHMS:
        raise RLInputError(f"rl.algorithm {name!r} is not one of {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)()


def train(recipe, resume: bool = False, progress: bool = True) -> dict:
    """Run the recipe's RL algorithm (`rl.algorithm`) on the run skeleton; returns the final metrics."""
    from rlprm.rl.run import run_algorithm

    return run_algorithm(recipe, algorithm_for(recipe), resume=resume, progress=progress)


__all__ = ["ALGORITHMS", "algorithm_for", "train"]
