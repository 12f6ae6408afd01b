"""rlprm: process-supervised reinforcement learning for math reasoning.

Modules own one concern each (see docs/design.md section 3); heavy dependencies
(torch, transformers, deepspeed, wandb) are imported inside the functions that
need them so that `import rlprm` and config validation stay fast.
"""

__version__ = "0.1.0"
