"""RL on the generator: PPO, GRPO and rejection sampling on one run skeleton (rl/run.py)."""


def train(recipe, resume: bool = False, progress: bool = True) -> dict:
    """Run the recipe's RL algorithm (`rl.algorithm`); returns the final metrics (also in summary.json).

    The one entry point the CLI, rlprm/train_rl.py, the demo and the benchmarks call. Raises `run.RLInputError`
    (exit_code 2) when the run cannot start and `run.RLError` (exit_code 4) when it stopped.
    """
    from rlprm.rl.algorithms import train as run_train

    return run_train(recipe, resume=resume, progress=progress)


__all__ = ["train"]
