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

from rlprm.config import RecipeError, validate_recipe
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
    zero3 = read_ds_config(_recipe_with_ds(tmp_path, str(ROOT / "deepspeed_configs" / "zero3.json")))
    assert zero3["zero_optimization"]["stage"] == 3  # accepted now
    filled = fill_ds_config(zero3, micro_batch=2, grad_clip=1.0, bf16=False, hidden_size=64)
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 640  # HF's 10 h
    assert "auto" not in json.dumps(filled)
    # offloading is still refused, and the message says why and what to use instead
    with pytest.raises(DistributedError, match="offloads to the CPU.*DeepSpeed's own optimizer.*zero3.json"):
        read_ds_config(_recipe_with_ds(tmp_path, str(ROOT / "deepspeed_configs" / "zero3_offload.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="bad.json:1: not valid JSON"):  # refused when the recipe loads
        _recipe_with_ds(tmp_path, str(bad))


# --------------------------------------------------------------------------- collectives on 2 real processes


class _Saveable:
    """Stands in for the model and tokenizer (the spawned ranks then need no transformers import: seconds each)."""

    def save_pretrained(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)


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
    # what only this rank holds (a ZeRO shard) reaches the one writer, into the checkpoint, and comes back to it
    from rlprm.checkpoint import latest_checkpoint, load_state, save_checkpoint

    own = {"rank": rank, "exp_avg": torch.arange(4.0) + 10 * rank}
    if d.is_main:
        save_checkpoint(Path(out), 1, _Saveable(), _Saveable(), {"step": 1}, rank_states=d.from_every_rank(own))
    else:
        d.send_to_main(own)
    d.barrier()
    state = load_state(latest_checkpoint(Path(out)), restore_rng=False, rank=rank)
    result["shard"] = {"rank": state["rank_state"]["rank"], "exp_avg": state["rank_state"]["exp_avg"].tolist(),
                       "written": state["ranks_written"]}
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
    # each rank's own shard went through rank 0 into the checkpoint and came back to that rank
    for rank, r in enumerate((r0, r1)):
        assert r["shard"] == {"rank": rank, "exp_avg": [10.0 * rank + i for i in range(4)], "written": 2}


def _init_gloo(rank: int, world: int, port: int):
    import torch
    import torch.distributed as tdist

    from rlprm.rl.distributed import Dist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    return Dist(rank=rank, world=world)


def _seeding_worker(rank: int, world: int, port: int, out: str) -> None:
    import random

    import torch
    import torch.distributed as tdist

    d = _init_gloo(rank, world, port)
    d.seed_everything(7)
    init = torch.nn.Linear(8, 8).weight.detach().flatten().tolist()  # a new head's weights, drawn from the seed
    d.split_streams(7)
    draws = {"torch": torch.rand(4).tolist(), "python": random.random()}  # sampling noise, minibatch order
    Path(out, f"rank{rank}.json").write_text(json.dumps({"init": init, "draws": draws}))
    tdist.destroy_process_group()


def test_ranks_start_from_the_same_weights_but_sample_their_own_noise(tmp_path):
    import random

    import torch
    import torch.multiprocessing as mp

    mp.spawn(_seeding_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["init"] == r1["init"]  # identical initialisation: data parallelism starts from one model
    assert r0["draws"]["torch"] != r1["draws"]["torch"]  # each rank its own sampling stream
    assert r0["draws"]["python"] != r1["draws"]["python"]
    # rank 0 draws what one process draws: a single-process run is unchanged by the split
    d = Dist()
    d.seed_everything(7)
    torch.nn.Linear(8, 8)
    d.split_streams(7)
    assert torch.rand(4).tolist() == r0["draws"]["torch"] and random.random() == r0["draws"]["python"]


def _whiten_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as tdist

    d = _init_gloo(rank, world, port)
    # different row counts per rank; padding holds garbage that must not count
    x = {0: torch.tensor([[1.0, 2.0, float("nan")]]),
         1: torch.tensor([[10.0, 20.0, 30.0], [9.0, 5.0, 6.0]])}[rank]
    mask = {0: torch.tensor([[True, True, False]]), 1: torch.tensor([[True, True, True], [True, False, False]])}[rank]
    result = {"whitened": d.masked_whiten(x, mask).tolist(),
              "rescaled": d.masked_whiten(x, mask, shift_mean=False).tolist()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    tdist.destroy_process_group()


def test_advantages_are_whitened_with_every_ranks_statistics(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from rlprm.rl.core import masked_whiten

    mp.spawn(_whiten_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the reference: one process whitening the whole batch (rank 0's row, then rank 1's two)
    x = torch.tensor([[1.0, 2.0, 0.0], [10.0, 20.0, 30.0], [9.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    whole = masked_whiten(x, mask)
    torch.testing.assert_close(torch.tensor(r0["whitened"]), whole[:1])
    torch.testing.assert_close(torch.tensor(r1["whitened"]), whole[1:])
    # by hand: 6 values, mean 72 / 6 = 12, unbiased variance (121 + 100 + 4 + 64 + 324 + 9) / 5 = 124.4
    assert r0["whitened"][0][0] == pytest.approx((1 - 12) / 124.4 ** 0.5, abs=1e-6) and r0["whitened"][0][2] == 0.0
    # per-rank statistics (what PPO did) put rank 0's advantages on another scale
    assert masked_whiten(x[:1], mask[:1])[0, 0].item() == pytest.approx(-0.7071, abs=1e-4) != r0["whitened"][0][0]
    rescaled = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(torch.tensor(r1["rescaled"]), rescaled[1:])
    # one process: exactly core's function
    assert torch.equal(Dist().masked_whiten(x, mask), whole)


def _failure_worker(rank: int, world: int, port: int, out: str, how: str) -> None:
    import os
    import time

    import torch.distributed as tdist

    from rlprm.rl.distributed import RankFailedError

    d = _init_gloo(rank, world, port)
    d.barrier()  # a normal barrier first: both pass
    t0 = time.monotonic()
    if rank == 0:
        if how == "dies":  # a hard death (killed, segfault): no handler runs, the store it hosts goes with it
            os._exit(0)
        try:
            with d.fail_together():
                raise ValueError("planted failure in evaluation")
        except ValueError:
            pass
        # this process stays alive a while (a W&B upload, a stuck worker pool): rank 1 must not wait for it
        while not Path(out, "rank1.json").exists() and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        return
    try:
        d.barrier()
        message = None
    except RankFailedError as exc:
        message = str(exc)
    Path(out, "rank1.json").write_text(json.dumps({"message": message, "waited_s": time.monotonic() - t0}))
    if how == "raises":
        tdist.destroy_process_group()


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_failing_rank_stops_the_ranks_at_a_barrier_at_once(tmp_path, how):
    import torch.multiprocessing as mp

    mp.spawn(_failure_worker, args=(2, _free_port(), str(tmp_path), how), nprocs=2, join=True)
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r1["waited_s"] < 10  # not the process group's 30 minutes, nor rank 0's exit
    if how == "raises":
        assert r1["message"] == "rank 0 failed: ValueError: planted failure in evaluation (rank 1 stops too)"
    else:
        assert "rank 1 lost the rendezvous store" in r1["message"] and "died" in r1["message"]


def test_a_resume_loads_its_own_shard_only_on_the_same_zero_layout(capsys):
    """PPO's DeepSpeed resume hands each engine's ZeRO optimizer the list it expects (this rank's entry at this
    rank); a checkpoint of another world size or stage, or without shards, restarts the moments and says why."""
    from rlprm.rl.ppo import PPO

    class ZeroOptimizer:  # DeepSpeed's ZeRO-1/2 signature
        def __init__(self):
            self.calls = []

        def load_state_dict(self, state_dict_list, load_optimizer_states=True, load_from_fp32_weights=False):
            self.calls.append((state_dict_list, load_from_fp32_weights))

    class Engine:
        def __init__(self):
            self.optimizer = ZeroOptimizer()

    ppo = PPO.__new__(PPO)
    ppo.deepspeed, ppo.is_main = True, True
    ppo.dist = Dist(rank=0, world=1, deepspeed=True, ds_config={"zero_optimization": {"stage": 2}})
    ppo.policy_engine, ppo.value_engine = Engine(), Engine()
    ppo._load_rank_state({"world": 1, "zero_stage": 2, "policy": "P0", "value": "V0"}, ranks_written=1)
    assert ppo.policy_engine.optimizer.calls == [(["P0"], True)]  # fp32 masters from the shard, not the weights
    assert ppo.value_engine.optimizer.calls == [(["V0"], True)]
    assert "moments restart" not in capsys.readouterr().out
    for part, written, why in [({"world": 2, "zero_stage": 2, "policy": "P", "value": "V"}, 2, "written by 2 rank"),
                               ({"world": 1, "zero_stage": 3, "policy": "P", "value": "V"}, 1, "written by 1 rank"),
                               (None, 0, "holds no DeepSpeed optimizer shards")]:
        ppo._load_rank_state(part, ranks_written=written)
        out = capsys.readouterr().out
        assert why in out and "moments restart" in out
    assert len(ppo.policy_engine.optimizer.calls) == 1  # nothing of another layout was loaded


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


def _launch_two(tmp_path: Path, generator: Path, **extra) -> tuple[subprocess.CompletedProcess, Path]:
    """`deepspeed --num_gpus 2 rlprm/train_rl.py` on `_write_recipe(tmp_path, generator, **extra)`; the run folder."""
    recipe = _write_recipe(tmp_path, generator, **extra)
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
           "rlprm/train_rl.py", str(recipe), "--no-progress"]
    # an empty extensions folder: nothing may be JIT-compiled (DeepSpeed's CPU shm all-reduce would take 35-78 s)
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "built successfully" not in proc.stdout + proc.stderr
    return proc, tmp_path / "run"


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, generator_dir):
    """The 2-process ZeRO-2 run (the built-in default), shared with the ZeRO-3 test that compares against it."""
    return _launch_two(tmp_path_factory.mktemp("zero2"), generator_dir)


def test_deepspeed_two_processes_end_with_identical_weights(zero2_run, generator_dir):
    from transformers import AutoModelForCausalLM

    proc, run_dir = zero2_run
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


def test_zero3_two_processes_train_as_zero2_and_export_whole_weights(tmp_path, generator_dir, zero2_run):
    """ZeRO-3 shards the policy's and the critic's parameters: generation, evaluation, checkpoints and the export
    read them gathered, and the run ends where the ZeRO-2 run ends (the same algorithm, sharded differently)."""
    import torch
    from transformers import AutoModelForCausalLM

    proc, run_dir = _launch_two(tmp_path, generator_dir, deepspeed=str(ROOT / "deepspeed_configs" / "zero3.json"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dist/zero_stage"] == 3
    digests = summary["dist/policy_sha256"]  # of the gathered weights: whole, not each rank's shard
    assert len(digests) == 2 and digests[0] == digests[1] and len(set(summary["dist/value_sha256"])) == 1
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export")  # plain transformers: whole weights
    assert weights_digest(exported) == digests[0]
    start = AutoModelForCausalLM.from_pretrained(generator_dir).state_dict()
    zero2 = AutoModelForCausalLM.from_pretrained(zero2_run[1] / "export").state_dict()
    got = exported.state_dict()
    moved = max((got[k] - start[k]).abs().max().item() for k in got)
    apart = max((got[k] - zero2[k]).abs().max().item() for k in got)
    # the same samples and updates; only the order of float sums differs between the two reductions
    assert moved > 1e-3 and apart < 1e-5, (moved, apart)
    assert all(torch.isfinite(v).all() for v in got.values())
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records if "eval/answer_accuracy" in r] == [0, 1]  # rank 0 evaluated, gathered


@pytest.mark.parametrize("stage", [2, 3])
def test_ppo_lora_two_processes_end_with_identical_weights_and_a_plain_export(tmp_path, generator_dir, stage):
    from transformers import AutoModelForCausalLM

    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    proc, run_dir = _launch_two(tmp_path, generator_dir, model={"generator": str(generator_dir), "lora": lora},
                                deepspeed=str(ROOT / "deepspeed_configs" / f"zero{stage}.json"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dist/zero_stage"] == stage
    digests = summary["dist/policy_sha256"]  # base + adapters, each rank its own
    assert len(digests) == 2 and digests[0] == digests[1] and len(set(summary["dist/value_sha256"])) == 1
    assert (run_dir / "checkpoints" / "epoch-0001" / "model" / "adapter_config.json").is_file()
    export = run_dir / "export"
    assert not (export / "adapter_config.json").exists()  # merged
    merged = AutoModelForCausalLM.from_pretrained(export)
    assert weights_digest(merged) != weights_digest(AutoModelForCausalLM.from_pretrained(generator_dir))


FAILING_EVALUATION = '''
import os, sys, time
sys.path.insert(0, os.getcwd())
import rlprm.evaluation.evaluate
import rlprm.tracking

def between_epochs(*args, **kwargs):
    raise ValueError("planted failure in evaluation")

def finish(self):
    time.sleep(600)  # a slow teardown (a W&B upload, a stuck worker pool): rank 0 stays alive after its failure

if os.environ["RANK"] == "0":  # only rank 0 evaluates; only it has a Tracker
    rlprm.evaluation.evaluate.between_epochs = between_epochs
    rlprm.tracking.Tracker.finish = finish
from rlprm.train_rl import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_rank_failing_in_evaluation_stops_every_rank_within_two_minutes(tmp_path, generator_dir):
    """The real launcher and PPO loop: rank 0 raises while evaluating, rank 1 waits at the barrier after it."""
    import re
    import signal
    import time

    recipe = _write_recipe(tmp_path, generator_dir)
    script = tmp_path / "failing_evaluation.py"
    script.write_text(FAILING_EVALUATION)
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(script), str(recipe),
           "--no-progress"]
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, _ = proc.communicate()
        pytest.fail("the ranks were still running 2 minutes after rank 0 failed:\n" + out[-3000:])
    assert time.monotonic() - t0 < 120
    assert proc.returncode != 0, out[-3000:]
    # rank 1 names the failing rank and its error (the launcher names the last-spawned command, rank 1's)
    assert "rank 0 failed: ValueError: planted failure in evaluation (rank 1 stops too)" in out, out[-3000:]
    pids = [int(p) for p in re.findall(r"process (\d+) spawned", out)]
    assert len(pids) == 2
    for pid in pids:  # both ranks are gone: none is left waiting or uploading
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


# --------------------------------------------------------------------------- DeepSpeed resume: the optimizer shards


DS_RESUME = '''
import shutil, sys
from pathlib import Path
from rlprm.config import load_recipe
from rlprm.rl import train
import rlprm.rl.ppo as ppo

recipe_path, out = sys.argv[1], Path(sys.argv[2])

def recipe(name, epochs):
    r = load_recipe(recipe_path)
    r.run.output_dir, r.rl.epochs = out / name, epochs
    return r

train(recipe("full", 2), progress=False)
train(recipe("resumed", 1), progress=False)  # stopped after its epoch-1 checkpoint
shutil.copytree(out / "resumed", out / "forgetful")
train(recipe("resumed", 2), resume=True, progress=False)
# the fault the check must see: the shards are on disk but not loaded (what every DeepSpeed resume did before)
ppo.PPO._load_rank_state = lambda self, part, ranks_written: print("FAULT: optimizer shards not loaded")
train(recipe("forgetful", 2), resume=True, progress=False)
'''


def _checkpoint_digests(run_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    ckpt = run_dir / "checkpoints" / "epoch-0002"
    return {"policy": weights_digest(AutoModelForCausalLM.from_pretrained(ckpt / "model")),
            "value": weights_digest(AutoModelForTokenClassification.from_pretrained(ckpt / "extra" / "value"))}


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])  # ~40 s each on 2 busy cores
def test_deepspeed_resume_restores_the_optimizer_shards(tmp_path, answering_generator, stage):
    """PPO under DeepSpeed (one process, ZeRO-`stage`) stopped after epoch 1 and resumed ends bit for bit where the
    uninterrupted run ends, policy and critic; the same resume without the ZeRO optimizer shards does not (before
    they were written into the checkpoint, every DeepSpeed resume restarted Adam's moments)."""
    from rlprm.tracking import read_metrics

    recipe = _write_recipe(tmp_path, answering_generator,
                           deepspeed=str(ROOT / "deepspeed_configs" / f"zero{stage}.json"),
                           rl={"epochs": 2, "problems_per_epoch": 4, "prompts_per_iteration": 2,
                               "samples_per_problem": 2, "max_new_tokens": 64, "minibatch_size": 2, "ppo_epochs": 1,
                               "learning_rate": 1e-3, "value_learning_rate": 1e-3, "eval_n_max": 0})
    script = tmp_path / "ds_resume.py"
    script.write_text(DS_RESUME)
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(recipe), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("FAULT: optimizer shards not loaded") == 1
    shards = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints" / "epoch-0001" / "ranks").iterdir())
    assert shards == ["rank0.pt"]

    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    its = [r for r in full if "rl/reward" in r]
    assert len(its) == 4  # the rewards told samples apart (some answered and some not, or some right)
    assert any(0 < r["reward/missing_answer_frac"] < 1 or 0 < r["rl/answer_accuracy"] < 1 for r in its), its
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")}  # noqa: E731
                        for r in rs]
    expected = _checkpoint_digests(tmp_path / "full")
    assert _checkpoint_digests(tmp_path / "resumed") == expected
    assert strip(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == strip(full)
    forgetful = _checkpoint_digests(tmp_path / "forgetful")
    assert forgetful["policy"] != expected["policy"] and forgetful["value"] != expected["value"]
    assert strip(read_metrics(tmp_path / "forgetful" / "metrics.jsonl")) != strip(full)


KILL_IN_EPOCH_TWO = '''
import os, signal, sys
sys.path.insert(0, os.getcwd())
from rlprm.tracking import Tracker

log = Tracker.log

def log_then_die(self, metrics, step=None):  # rank 0 alone has a Tracker; the launcher then stops rank 1
    log(self, metrics, step)
    if metrics.get("epoch", 0) > 1:
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

Tracker.log = log_then_die
from rlprm.train_rl import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_run_killed_in_epoch_two_resumes_to_the_uninterrupted_weights(tmp_path,
                                                                                          answering_generator, stage):
    """`deepspeed --num_gpus 2`, ZeRO-`stage`: rank 0 is SIGKILLed after epoch 2's first record (the launcher
    stops rank 1), and `--resume` on 2 processes ends bit for bit where an uninterrupted 2-process run ends: both
    ranks' optimizer shards came back (each rank its own, sent to rank 0 and written in the atomic checkpoint)."""
    from rlprm.tracking import read_metrics

    rl = {"epochs": 2, "problems_per_epoch": 8, "prompts_per_iteration": 4, "samples_per_problem": 2,
          "max_new_tokens": 64, "minibatch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3,
          "value_learning_rate": 1e-3, "eval_n_max": 0}
    ds = str(ROOT / "deepspeed_configs" / f"zero{stage}.json")
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    runs = {}
    for name, script, flags in [("full", "rlprm/train_rl.py", []), ("killed", None, []),
                                ("killed", "rlprm/train_rl.py", ["--resume"])]:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        recipe = _write_recipe(folder, answering_generator, deepspeed=ds, rl=rl)
        if script is None:
            script = str(folder / "kill_in_epoch_two.py")
            Path(script).write_text(KILL_IN_EPOCH_TWO)
        proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), script,
                               str(recipe), "--no-progress", *flags], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        if script.endswith("kill_in_epoch_two.py"):
            assert proc.returncode != 0
            ckpts = folder / "run" / "checkpoints"
            assert (ckpts / "epoch-0001" / "ranks").is_dir() and not (ckpts / "epoch-0002").exists()
            assert sorted(p.name for p in (ckpts / "epoch-0001" / "ranks").iterdir()) == ["rank0.pt", "rank1.pt"]
        else:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "moments restart" not in proc.stdout + proc.stderr
        runs[name] = folder / "run"

    its = [r for r in read_metrics(runs["full"] / "metrics.jsonl") if "rl/reward" in r]
    assert any(0 < r["reward/missing_answer_frac"] < 1 or 0 < r["rl/answer_accuracy"] < 1 for r in its), its
    full = json.loads((runs["full"] / "summary.json").read_text())
    resumed = json.loads((runs["killed"] / "summary.json").read_text())
    assert len(set(resumed["dist/policy_sha256"])) == 1
    assert resumed["dist/policy_sha256"] == full["dist/policy_sha256"]
    assert resumed["dist/value_sha256"] == full["dist/value_sha256"]
    assert _checkpoint_digests(runs["killed"]) == _checkpoint_digests(runs["full"])
