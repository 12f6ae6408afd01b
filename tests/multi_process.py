"""Launching rlprm jobs as several processes from a test: the environment, the launcher, waiting, the ranks' weights.

Shared by the multi-process tests (test_multi_process_rl.py, test_grpo_lora.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).with_name("deepspeed")


def job_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the launcher sets its own
    return env


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output; every process group killed if they are not all done within `timeout` seconds."""
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the ranks were still running after %d s:\n%s" % (timeout, "\n".join(
            (p.communicate()[0] or "")[-2000:] for p in procs)))
    return outs


def launch_job(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def same_weights_on_two_ranks(run_dir: Path) -> tuple[dict, str]:
    """The run's summary and its one policy digest, asserting that 2 ranks each hashed the same final weights."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dist/world_size"] == 2
    digests = summary["dist/policy_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # each rank hashed its own weights
    return summary, digests[0]
