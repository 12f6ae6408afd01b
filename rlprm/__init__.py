"""rlprm: process-supervised reinforcement learning for math reasoning.

Modules own one concern each (see docs/design.md section 3); heavy dependencies
(torch, transformers, deepspeed, wandb) are imported inside the functions that
need them so that `import rlprm` and config validation stay fast.

Importing the package pins the CPU kernels torch and MKL choose (rlprm/reproducibility.py,
docs/reproducibility.md) before torch computes anything: every rlprm process, the `rlprm` command,
rlprm/train_rl.py under a launcher and the demo's child processes, imports this file first.
"""

from rlprm.reproducibility import pin_cpu_kernels

pin_cpu_kernels()

__version__ = "0.1.0"
