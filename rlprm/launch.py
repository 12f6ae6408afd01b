"""What every job needs from the way it was launched: one process or many, and the model inside an engine.

`rlprm/rl/distributed.py` (RL) and `rlprm/train_rm.py` (reward models) both run
under plain `python` as well as under the DeepSpeed launcher; the pieces they
share live here so that there is one of each.
"""

from __future__ import annotations

import os
import socket


def _env_int(key: str) -> int:
    try:
        return int(os.environ.get(key, "0") or 0)
    except ValueError:
        raise ValueError(f"{key}={os.environ[key]!r} is not a number; launch with `deepspeed`, `torchrun` or "
                         "`accelerate launch`") from None


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (RANK; 0 under plain python).

    The one place the run's rank is read: rank 0 over every node writes metrics, checkpoints and the export and
    reports for all; LOCAL_RANK (`launcher_local_rank`) only picks this node's device. Raises ValueError for a
    RANK that is not a number."""
    return _env_int("RANK")


def launcher_local_rank() -> int:
    """This process's rank on its own node (LOCAL_RANK; 0 under plain python): which GPU it takes."""
    return _env_int("LOCAL_RANK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Under plain `python` (no launcher) DeepSpeed looks for MPI unless these are set (docs/design.md section 10)."""
    if "RANK" not in os.environ:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def unwrap(model):
    """The HF model inside a DeepSpeed engine or a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


__all__ = ["free_port", "single_process_env", "unwrap"]
