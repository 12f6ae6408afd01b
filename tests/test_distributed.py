"""Data-parallel PPO through DeepSpeed: config filling, sharding, rank-agreeing collectives, and a real
2-process launch (`deepspeed --num_gpus 2 rlprm/train_rl.py`) whose ranks must end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlprm.config import validate_recipe
from rlprm.rl.distributed import (DEFAULT_ZERO2, Dist, DistributedError, fill_ds_config, read_ds_config, shard, trim,
                                  weights_digest)
from rlprm.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- pure pieces


def test_shard_and_trim_give_every_rank_an_equal_disjoint_share():
    items = list(range(7))
    parts = [shard(trim(items, Dist(rank=r, world=3)), Dist(rank=r, world=3)) for r in range(3)]
    assert parts == [[0, 3], [1, 4], [2, 5]]  # 6 kept: equal shares, so equal step counts on every rank
    assert shard(trim(items, Dist()), Dist()) == items  # one process: untouched


def test_fill_ds_config_replaces_every_auto_value():
    cfg = fill_ds_config(DEFAULT_ZERO2, micro_batch=8, grad_clip=0.5, bf16=False, hidden_size=64)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 10_000_000  # a floor: hidden^2 is tiny here
    assert fill_ds_config(DEFAULT_ZERO2, micro_batch=1, grad_clip=1.0, bf16=True, hidden_size=4096)[
        "zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    assert "auto" not in json.dumps(cfg)
    assert DEFAULT_ZERO2["train_micro_batch_size_per_gpu"] == "auto"  # the default itself is not modified
    # the shipped zero2.json is what the built-in default mirrors
    assert json.loads((ROOT / "deepspeed_configs" / "zero2.json").read_text()) == DEFAULT_ZERO2


def _recipe_with_ds(tmp_path, ds: str):
    return validate_recipe({"run": {"output_dir": str(tmp_path / "out")}, "deepspeed": ds}, tmp_path)


def test_read_ds_config_refuses_what_ppo_cannot_run(tmp_path):
    assert read_ds_config(_recipe_with_ds(tmp_path, str(ROOT / "deepspeed_configs" / "zero2.json")))[
        "zero_optimization"]["stage"] == 2
    with pytest.raises(DistributedError, match="ZeRO-3.*zero2.json"):
        read_ds_config(_recipe_with_ds(tmp_path, str(ROOT / "deepspeed_configs" / "zero3.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DistributedError, match="bad.json"):
        read_ds_config(_recipe_with_ds(tmp_path, str(bad)))


# --------------------------------------------------------------------------- collectives on 2 real processes


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as tdist

    from rlprm.rl.distributed import Dist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    d = Dist(rank=rank, world=world)
    result = {
        "any_false": d.any_rank(False),
        "any_one": d.any_rank(rank == 1),  # only rank 1 sees a problem: both must learn it
        "mean": d.mean(float(rank + 1)),
        "metrics": d.mean_metrics({"a": float(rank), "b": None if rank == 0 else 4.0, "c": "text"}),
        "gather": d.gather(f"r{rank}"),
    }
    try:
        d.stop_if_any("reward is NaN" if rank == 1 else None, RuntimeError)
        result["stopped"] = None
    except RuntimeError as exc:
        result["stopped"] = str(exc)
    d.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    tdist.destroy_process_group()


def test_collectives_agree_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["any_false"] is False and r["any_one"] is True
        assert r["mean"] == 1.5
        assert r["metrics"] == {"a": 0.5, "b": 4.0, "c": "text"}  # None skipped in the mean, text untouched
        assert r["gather"] == ["r0", "r1"]
    # a stop reason on one rank stops BOTH (rank 0 would otherwise wait forever in the next collective)
    assert r1["stopped"] == "reward is NaN"
    assert r0["stopped"] == "reward is NaN (rank 1)"


# --------------------------------------------------------------------------- the real launcher, 2 processes


def _write_recipe(tmp: Path, generator: Path, **extra) -> Path:
    data = {
        "run": {"output_dir": str(tmp / "run"), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator)},
        "reward": {"mode": "sparse", "source": "ground_truth"},
        # 2 iterations of 4 prompts: 2 prompts x 2 samples per rank; minibatch 4 = 2 per rank
        "rl": {"epochs": 1, "problems_per_epoch": 8, "prompts_per_iteration": 4, "samples_per_problem": 2,
               "max_new_tokens": 12, "minibatch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3, "kl_coef": 0.05,
               "value_learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
        **extra,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the launcher sets its own
    return env


def test_deepspeed_two_processes_end_with_identical_weights(tmp_path, generator_dir):
    from transformers import AutoModelForCausalLM

    recipe = _write_recipe(tmp_path, generator_dir)
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
           "rlprm/train_rl.py", str(recipe), "--no-progress"]
    # an empty extensions folder: nothing may be JIT-compiled (DeepSpeed's CPU shm all-reduce would take 35-78 s)
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "built successfully" not in proc.stdout + proc.stderr

    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dist/world_size"] == 2 and summary["dist/zero_stage"] == 2  # the built-in ZeRO-2 default
    digests = summary["dist/policy_sha256"]  # each rank hashed its own weights
    assert len(digests) == 2 and digests[0] == digests[1]
    assert len(set(summary["dist/value_sha256"])) == 1
    start = weights_digest(AutoModelForCausalLM.from_pretrained(generator_dir))
    assert digests[0] != start  # it trained
    assert weights_digest(AutoModelForCausalLM.from_pretrained(run_dir / "export")) == digests[0]
    # rank 0 alone wrote the log: one record per iteration, one eval before and one after the epoch
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len([r for r in records if "rl/reward" in r]) == 2
    assert [r["epoch"] for r in records if "eval/answer_accuracy" in r] == [0, 1]
    assert proc.stdout.count("policy exported to") == 1  # rank 0 reports for all
