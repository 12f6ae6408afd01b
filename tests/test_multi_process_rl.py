"""GRPO and rejection sampling on several processes, and the multi-node launch.

- the process advantages of a generation batch whose groups are spread over ranks, on hand-made tensors;
- GRPO on 2 CPU processes (`deepspeed --num_gpus 2`, gloo): every rank's process advantages are the slice of the
  whole batch's, groups straddling two ranks included; identical final weights; rank 0 alone writes;
- rejection sampling on 2 "nodes" (`deepspeed --hostfile --num_nodes 2 --no_ssh --node_rank K`, both on this
  machine, one process each: the second has RANK=1 and LOCAL_RANK=0): disjoint sampling shards, the same kept set
  on both ranks, identical final weights, one writer;
- the launcher's hostfile parsing and rank assignment for 2 nodes x 2 slots (DeepSpeed's own functions), and the
  global rank (not LOCAL_RANK) deciding who writes.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlprm.config import validate_recipe
from rlprm.launch import free_port
from rlprm.tracking import read_metrics
from tests.multi_process import LAUNCHER, job_env, launch_job, same_weights_on_two_ranks, wait_all

ROOT = Path(__file__).resolve().parents[1]
# --------------------------------------------------------------------------- groups over ranks (pure tensors)


def _recipe(tmp_path, form="min"):
    return validate_recipe({"run": {"output_dir": str(tmp_path / "x")},
                            "reward": {"mode": "dense", "source": "exact", "dense_form": "score"},
                            "rl": {"algorithm": "grpo", "process_advantage": form}}, tmp_path)


def test_a_group_straddling_two_ranks_is_normalised_whole(tmp_path):
    """TRL hands rank r the r-th contiguous slice of the generation batch: with 3 completions per rank and groups of
    2, the middle group has a member on each rank. Each rank's advantages must be its rows of the whole batch's."""
    from rlprm.rl.core import process_token_advantages
    from rlprm.rl.grpo import rank_process_advantages

    recipe = _recipe(tmp_path)
    # rank 0: samples 0, 1 (group A) and 2 (group B); rank 1: sample 3 (group B) and 4, 5 (group C).
    # one event each (a one-step solution, its score on its last token) except sample 0 (two steps) and 3 (none)
    v0 = torch.tensor([[0.9, 0.3], [0.5, 0.0], [1.0, 0.0]])
    p0 = torch.tensor([[0, 2], [1, -1], [0, -1]])
    v1 = torch.tensor([[0.0], [0.2], [0.6]])
    p1 = torch.tensor([[-1], [4], [0]])
    o0, o1 = torch.zeros(3), torch.zeros(3)
    parts = [(v0, p0, o0, 3), (v1, p1, o1, 5)]  # the ranks padded their completions to different widths
    a0 = rank_process_advantages(recipe, parts, 0, group_size=2)
    a1 = rank_process_advantages(recipe, parts, 1, group_size=2)
    assert a0.shape == (3, 3) and a1.shape == (3, 5)

    # by hand (min form): group B pools sample 2's one return 1.0 and nothing of sample 3 (no events): a single
    # value has no spread, so both get 0 -- on their own ranks. Group A pools sample 0's returns at its two events
    # (min(0.9, 0.3) = 0.3 and 0.3) and sample 1's 0.5: mean 1.1/3, unbiased std of (0.3, 0.3, 0.5)
    mean_a = 1.1 / 3
    std_a = (((0.3 - mean_a) ** 2 * 2 + (0.5 - mean_a) ** 2) / 2) ** 0.5
    torch.testing.assert_close(a0[0], torch.full((3,), (0.3 - mean_a) / (std_a + 1e-4)))
    torch.testing.assert_close(a0[1], torch.tensor([(0.5 - mean_a) / (std_a + 1e-4)] * 2 + [0.0]))
    torch.testing.assert_close(a0[2], torch.zeros(3))
    torch.testing.assert_close(a1[0], torch.zeros(5))
    # group C, wholly on rank 1: returns 0.2 (up to token 4) and 0.6 (token 0): +-0.7071 around their mean
    c = 0.2 / (2 ** 0.5 * 0.2 + 1e-4)
    torch.testing.assert_close(a1[1], torch.tensor([-c] * 5))
    torch.testing.assert_close(a1[2], torch.tensor([c] + [0.0] * 4))

    # the same as one process normalising the whole batch
    whole = process_token_advantages(torch.cat([v0, torch.nn.functional.pad(v1, (0, 1))]),
                                     torch.cat([p0, torch.nn.functional.pad(p1, (0, 1), value=-1)]), 2, 5,
                                     form="min", outcome=torch.zeros(6))
    torch.testing.assert_close(torch.cat([torch.nn.functional.pad(a0, (0, 2)), a1]), whole)
    # what a rank alone could do is wrong: its 3 rows are not whole groups
    with pytest.raises(ValueError, match="groups of 2"):
        rank_process_advantages(recipe, parts[:1], 0, group_size=2)


def test_ranks_holding_whole_groups_and_one_process_agree(tmp_path):
    """Groups wholly on one rank each (sum form, outcome term included): the result equals each rank's own
    normalisation, and one process (parts = [its own]) is `grpo_advantages`'s path unchanged."""
    import warnings

    from rlprm.rl.core import process_token_advantages
    from rlprm.rl.grpo import rank_process_advantages

    recipe = _recipe(tmp_path, form="sum")
    v = [torch.tensor([[0.9, 0.1], [0.4, 0.0]]), torch.tensor([[0.7], [0.2]])]
    p = [torch.tensor([[0, 3], [2, -1]]), torch.tensor([[1], [3]])]
    o = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    parts = [(v[r], p[r], o[r], 4) for r in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sum form warns that it can be farmed
        for r in range(2):
            own = process_token_advantages(v[r], p[r], 2, 4, form="sum", outcome=o[r])
            torch.testing.assert_close(rank_process_advantages(recipe, parts, r, group_size=2), own)
            torch.testing.assert_close(rank_process_advantages(recipe, [parts[r]], 0, group_size=2), own)


def test_sizes_are_totals_over_the_ranks(tmp_path):
    from rlprm.rl.grpo import check_sizes
    from rlprm.rl.rejection import check_world
    from rlprm.rl.run import RLInputError

    grpo = validate_recipe({"run": {"output_dir": str(tmp_path / "g")},
                            "rl": {"algorithm": "grpo", "prompts_per_iteration": 3, "samples_per_problem": 2,
                                   "minibatch_size": 6, "problems_per_epoch": 6}}, tmp_path)
    check_sizes(grpo, world=2)
    check_sizes(grpo, world=3)
    with pytest.raises(RLInputError, match=r"rl.minibatch_size \(6\) is a total over the 4 processes"):
        check_sizes(grpo, world=4)
    rs = validate_recipe({"run": {"output_dir": str(tmp_path / "r")},
                          "rl": {"algorithm": "rejection_sampling", "sft_batch_size": 4, "problems_per_epoch": 2}},
                         tmp_path)
    check_world(rs, 2)
    with pytest.raises(RLInputError, match=r"rl.sft_batch_size \(4\) is a total over the 3 processes"):
        check_world(rs, 3)
    rs.rl.sft_batch_size = 8
    with pytest.raises(RLInputError, match=r"rl.problems_per_epoch \(2\) is below the number of processes \(4\)"):
        check_world(rs, 4)


def test_gather_rows_restores_the_problems_order():
    from rlprm.rl.distributed import Dist, shard
    from rlprm.rl.rejection import gather_rows
    from rlprm.rl.run import RLError

    items = list("abcde")
    parts = [[(i, items[i].upper()) for i in shard(list(range(5)), Dist(rank=r, world=2))] for r in range(2)]
    assert parts == [[(0, "A"), (2, "C"), (4, "E")], [(1, "B"), (3, "D")]]
    assert gather_rows(parts) == list("ABCDE")
    with pytest.raises(RLError, match="sharding"):
        gather_rows([parts[0], parts[0]])


# --------------------------------------------------------------------------- multi-node: the launcher's world


def test_hostfile_of_two_nodes_gives_a_world_of_four_and_rank_two_does_not_write(tmp_path, monkeypatch):
    """`deepspeed --hostfile hostfile --num_nodes 2` with 2 slots per node, as DeepSpeed's runner and per-node
    launcher compute it: the second node's first process is RANK=2, LOCAL_RANK=0, and it must not write."""
    from deepspeed.launcher.runner import (apply_num_nodes_and_gpus, encode_world_info, fetch_hostfile,
                                           parse_inclusion_exclusion)

    from rlprm.rl.distributed import Dist, launch_env

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes of two GPUs\nnode-a slots=2\nnode-b slots=2\nnode-c slots=2\n")
    pool = fetch_hostfile(str(hostfile))
    assert dict(pool) == {"node-a": 2, "node-b": 2, "node-c": 2}
    active = apply_num_nodes_and_gpus(parse_inclusion_exclusion(pool, "", ""), num_nodes=2, num_gpus=-1)
    assert dict(active) == {"node-a": [0, 1], "node-b": [0, 1]}  # --num_nodes 2 keeps the first two hosts

    # what the runner runs on node-b (node rank 1): DeepSpeed's per-node launcher, here printing each process's env
    # (each process writes its own file: their stdout lines interleave)
    show = ("import os, sys; open(os.path.join(sys.argv[1], 'rank' + os.environ['RANK']), 'w').write("
            "' '.join(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')))")
    out = subprocess.run([sys.executable, "-m", "deepspeed.launcher.launch",
                          f"--world_info={encode_world_info(active)}", "--node_rank=1",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--no_python",
                          "--no_local_rank", sys.executable, "-c", show, str(tmp_path)],
                         capture_output=True, text=True, env=job_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ranks = sorted(tuple(int(x) for x in f.read_text().split()) for f in tmp_path.glob("rank*"))
    assert ranks == [(2, 0, 4), (3, 1, 4)]
    assert json.loads(base64.urlsafe_b64decode(encode_world_info(active))) == {"node-a": [0, 1], "node-b": [0, 1]}

    # our side: the writer is the GLOBAL rank 0; node-b's LOCAL_RANK=0 process is not it
    for rank, local_rank, main in [(2, 0, False), (3, 1, False), (1, 1, False), (0, 0, True)]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        assert launch_env() == (rank, local_rank, 4)
        d = Dist(rank=rank, world=4, local_rank=local_rank)
        assert d.is_main is main and d.local_rank == local_rank


def test_entry_point_reports_only_on_global_rank_zero(tmp_path, monkeypatch, capsys):
    """train_rl.py's closing report (and so its stdout) is rank 0's only: RANK=2 with LOCAL_RANK=0 stays quiet."""
    import rlprm.prerequisites
    import rlprm.rl
    import rlprm.train_rl as entry

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "out"), "threads": 1},
                                      "tracking": {"wandb": "disabled"}}))
    monkeypatch.setattr(rlprm.prerequisites, "ensure_prerequisites", lambda *a, **k: None)
    monkeypatch.setattr(rlprm.rl, "train", lambda *a, **k: {"export_dir": "EXPORT"})
    for rank, local_rank, printed in [("2", "0", False), ("0", "0", True)]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert entry.main([str(recipe), "--no-progress"]) == 0
        assert ("policy exported to EXPORT" in capsys.readouterr().out) is printed


# --------------------------------------------------------------------------- GRPO on 2 processes


DUMP_ADVANTAGES = '''
import os, sys
sys.path.insert(0, os.getcwd())
import torch
import rlprm.rl.grpo_trainer as gt

original = gt.RlprmGRPOTrainer._generate_and_score_completions
calls = [0]

def dumped(self, inputs):
    out = original(self, inputs)
    values, positions, outcome = self.rlprm_reward.last["rewards"].event_tensors()
    last = self.rlprm_reward.last
    torch.save({"values": values, "positions": positions, "outcome": outcome,
                "width": out["completion_ids"].shape[1], "advantages": out["advantages"].cpu(),
                "prompts": [x["prompt"] for x in inputs], "texts": last["texts"],
                "missing": list(last["rewards"].missing_answer)},
               os.path.join(os.environ["RLPRM_DUMP"], f"rank{os.environ['RANK']}_{calls[0]}.pt"))
    calls[0] += 1
    return out

gt.RlprmGRPOTrainer._generate_and_score_completions = dumped
from rlprm.train_rl import main
sys.exit(main(sys.argv[1:]))
'''


def _moved_beyond_weight_decay(start: dict, end: dict, steps: int, lr: float, weight_decay: float) -> float:
    """How far some weight moved beyond what AdamW's decoupled weight decay alone moves it in `steps` steps at
    learning rates up to `lr` (|w| (1 - (1 - lr wd)^steps)): > 0 only where a gradient moved it."""
    shrink = 1 - (1 - lr * weight_decay) ** steps
    return max(((end[k].float() - start[k].float()).abs() - start[k].float().abs() * shrink).max().item()
               for k in start)


def _assert_trained_beyond_weight_decay(generator_dir: Path, trained: Path, steps: int, lr: float) -> None:
    """The final weights moved where only a gradient moves them. GRPO's AdamW decays every weight (0.01), so
    `weights != start` also holds when every advantage is 0; shown here on a decay-only copy of the start."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(generator_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = AutoModelForCausalLM.from_pretrained(trained).state_dict()
    assert _moved_beyond_weight_decay(start, end, steps, lr, 0.01) > 1e-4
    # the fault this check must see: the same number of AdamW steps with zero gradients (zero advantages)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        opt.step()
    decayed = model.state_dict()
    assert any(not decayed[k].equal(start[k]) for k in start)  # what the old `digest != start` accepted
    assert _moved_beyond_weight_decay(start, decayed, steps, lr, 0.01) < 1e-6


def test_grpo_on_two_processes(tmp_path, answering_generator):
    from transformers import AutoModelForCausalLM

    generator_dir = answering_generator  # a random policy answers nothing: every advantage would be 0

    from rlprm.rl.core import process_token_advantages
    from rlprm.rl.distributed import weights_digest

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator_dir)},
        "reward": {"mode": "dense", "source": "exact", "dense_form": "score"},
        # per iteration 3 prompts x 2 samples = 6 completions, 3 per rank: the second group straddles the ranks;
        # minibatch 6 in total = 3 per rank; 2 iterations
        "rl": {"algorithm": "grpo", "epochs": 1, "problems_per_epoch": 6, "prompts_per_iteration": 3,
               "samples_per_problem": 2, "max_new_tokens": 64, "minibatch_size": 6, "ppo_epochs": 1,
               "learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }))
    script = tmp_path / "dump_advantages.py"
    script.write_text(DUMP_ADVANTAGES)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    proc = launch_job([str(LAUNCHER), "--num_gpus", "2", "--master_port", str(free_port()), str(script), str(recipe),
                    "--no-progress"], job_env(RLPRM_DUMP=str(dumps), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")))
    out = wait_all([proc], 300)[0]
    assert proc.returncode == 0, out[-4000:]

    # every rank's advantages are its rows of the whole generation batch's, groups normalised whole
    for it in range(2):
        d = [torch.load(dumps / f"rank{r}_{it}.pt") for r in range(2)]
        prompts = d[0]["prompts"] + d[1]["prompts"]
        assert len(d[0]["prompts"]) == len(d[1]["prompts"]) == 3
        assert [prompts[i] == prompts[i + 1] for i in range(0, 6, 2)] == [True] * 3  # consecutive groups of 2
        assert d[0]["prompts"][2] == d[1]["prompts"][0]  # ... one of them on both ranks
        # the signal is not degenerate: distinct answered texts, and advantages that are not all 0 (else any
        # pairing of ranks and rows would compare equal)
        answered = {t for x in d for t, miss in zip(x["texts"], x["missing"]) if not miss}
        assert len(answered) >= 2, [x["texts"] for x in d]
        assert any(x["advantages"].abs().max() > 0.1 for x in d), [x["advantages"] for x in d]
        S = max(x["values"].shape[1] for x in d)
        W = max(x["width"] for x in d)
        whole = process_token_advantages(
            torch.cat([torch.nn.functional.pad(x["values"], (0, S - x["values"].shape[1])) for x in d]),
            torch.cat([torch.nn.functional.pad(x["positions"], (0, S - x["positions"].shape[1]), value=-1)
                       for x in d]), 2, W, form="min", outcome=torch.cat([x["outcome"] for x in d]))
        for r in range(2):
            assert d[r]["advantages"].shape == (3, d[r]["width"])
            torch.testing.assert_close(d[r]["advantages"], whole[3 * r:3 * r + 3, :d[r]["width"]])

    run_dir = tmp_path / "run"
    summary, digest = same_weights_on_two_ranks(run_dir)
    assert weights_digest(AutoModelForCausalLM.from_pretrained(run_dir / "export")) == digest
    # it trained: 2 iterations of one optimizer step each (6 completions, minibatch 6)
    _assert_trained_beyond_weight_decay(generator_dir, run_dir / "export", steps=2, lr=1e-3)
    # rank 0 alone wrote: one record per iteration, best-of-N before and after the epoch, one report
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len([r for r in records if "rl/reward" in r]) == 2
    assert [r["epoch"] for r in records if "eval/answer_accuracy" in r] == [0, 1]
    assert out.count("policy exported to") == 1
    assert not (run_dir / "trl").exists()


def test_grpo_under_accelerate_launch(tmp_path, answering_generator):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; gloo on a CPU-only machine), outcome
    rewards (TRL's own group normalisation over the gathered rewards): the same weights on both ranks, one writer."""
    generator_dir = answering_generator  # outcome rewards that differ within a group: non-zero advantages
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator_dir)},
        "reward": {"mode": "sparse", "source": "ground_truth"},
        "rl": {"algorithm": "grpo", "epochs": 1, "problems_per_epoch": 4, "prompts_per_iteration": 2,
               "samples_per_problem": 2, "max_new_tokens": 64, "minibatch_size": 2, "ppo_epochs": 1,
               "learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }))
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = launch_job([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                    str(free_port()), "rlprm/train_rl.py", str(recipe), "--no-progress"], job_env())
    out = wait_all([proc], 300)[0]
    assert proc.returncode == 0, out[-4000:]
    run_dir = tmp_path / "run"
    summary, digest = same_weights_on_two_ranks(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    its = [r for r in records if "rl/reward" in r]
    assert len(its) == 2  # 2 iterations of 2 prompts, logged once each
    assert any(r["rl/reward_std"] > 0 for r in its), its  # some group's rewards differ: non-zero advantages
    # it trained: 2 iterations x 4 completions / minibatch 2 = 4 optimizer steps
    _assert_trained_beyond_weight_decay(generator_dir, run_dir / "export", steps=4, lr=1e-3)
    assert out.count("policy exported to") == 1


# --------------------------------------------------------------------------- rejection sampling on 2 "nodes"


FIXED_SAMPLING = '''
import json, os, sys
sys.path.insert(0, os.getcwd())
import rlprm.rl.lean_sft
import rlprm.data.problems
import rlprm.sampling
from rlprm.config import ArithmeticConfig
from rlprm.data.problems import from_arithmetic
from rlprm.sampling import Samples
from rlprm.steps import render_steps
from rlprm.tasks.arithmetic import make_problems, reference_solution

# 5 training problems (uneven over 2 ranks); samples from a table: the reference solution twice and a wrong
# line, so that the grader accepts one distinct sample per problem (a random tiny policy never answers)
problems = from_arithmetic(make_problems(ArithmeticConfig(), 5, seed=99), prefix="fixed")
table = {p.prompt: render_steps(reference_solution(p.arith)) for p in problems}
dump = os.environ["RLPRM_DUMP"]
rank = os.environ["RANK"]

def fake_sample(model, tokenizer, prompts, n=1, **kwargs):
    if any(p in table for p in prompts):
        with open(os.path.join(dump, f"sampled{rank}.json"), "w") as f:
            json.dump(prompts, f)
    texts = [[table[p] if p in table and j < 2 else "1 + 1 = 2" for j in range(n)] for p in prompts]
    return Samples(texts, [[[] for _ in row] for row in texts])

original_init = rlprm.rl.lean_sft.LeanSFTTrainer.__init__

def init(self, *args, **kwargs):
    data = kwargs["train_dataset"]
    with open(os.path.join(dump, f"sft{rank}.json"), "w") as f:
        json.dump({"prompt": list(data["prompt"]), "completion": list(data["completion"]),
                   "per_device": kwargs["args"].per_device_train_batch_size}, f)
    original_init(self, *args, **kwargs)

rlprm.sampling.sample = fake_sample
rlprm.data.problems.epoch_problems = lambda recipe, epoch, exclude: problems
rlprm.rl.lean_sft.LeanSFTTrainer.__init__ = init
from rlprm.train_rl import main
sys.exit(main(sys.argv[1:]))
'''


def test_rejection_sampling_on_two_nodes(tmp_path, generator_dir):
    """Two `deepspeed --hostfile hostfile --num_nodes 2 --no_ssh --node_rank K` launches on this machine, as one
    runs them on two nodes without ssh: one process per node, so rank 1 has LOCAL_RANK=0 and must not write."""
    from transformers import AutoModelForCausalLM

    from rlprm.rl.distributed import weights_digest

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator_dir)},
        "reward": {"mode": "sparse", "source": "ground_truth"},
        "rl": {"algorithm": "rejection_sampling", "epochs": 1, "problems_per_epoch": 5, "samples_per_problem": 3,
               "max_new_tokens": 16, "sft_batch_size": 2, "learning_rate": 3e-3, "rejection_top_k": 2,
               "eval_n_max": 2, "eval_num_problems": 2},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    script = tmp_path / "fixed_sampling.py"
    script.write_text(FIXED_SAMPLING)
    dump = tmp_path / "dump"
    dump.mkdir()
    port = free_port()
    env = job_env(RLPRM_DUMP=str(dump), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    procs = [launch_job([str(LAUNCHER), "--hostfile", str(hostfile), "--num_nodes", "2", "--no_ssh", "--node_rank",
                      str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(recipe),
                      "--no-progress"], env) for node in (0, 1)]
    outs = wait_all(procs, 300)
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-4000:]

    # each rank sampled its own problems (every other one, 3 + 2), and both trained on the same kept set: the
    # one distinct accepted sample of each of the 5 problems, in the problems' order
    sampled = [json.loads((dump / f"sampled{r}.json").read_text()) for r in range(2)]
    assert len(sampled[0]) == 3 and len(sampled[1]) == 2 and not set(sampled[0]) & set(sampled[1])
    sft = [json.loads((dump / f"sft{r}.json").read_text()) for r in range(2)]
    assert sft[0]["prompt"] == sft[1]["prompt"] and sft[0]["completion"] == sft[1]["completion"]
    assert len(sft[0]["prompt"]) == 5 and sft[0]["prompt"][::2] == sampled[0] and sft[0]["prompt"][1::2] == sampled[1]
    assert sft[0]["per_device"] == 1  # rl.sft_batch_size 2 is the total over the 2 ranks

    run_dir = tmp_path / "run"
    summary, digest = same_weights_on_two_ranks(run_dir)
    assert digest != weights_digest(AutoModelForCausalLM.from_pretrained(generator_dir))  # it trained
    assert weights_digest(AutoModelForCausalLM.from_pretrained(run_dir / "export")) == digest
    records = read_metrics(run_dir / "metrics.jsonl")
    epoch_records = [r for r in records if "rs/kept" in r]
    assert len(epoch_records) == 1 and epoch_records[0]["rs/kept"] == 5  # every rank's selections counted once
    # data parallel: 5 samples, 1 per rank per step -> 3 steps (each rank alone would have taken 5)
    assert epoch_records[0]["rs/sft_steps"] == 3
    assert epoch_records[0]["rl/answer_accuracy"] == pytest.approx(2 / 3)
    assert [r["epoch"] for r in records if "eval/answer_accuracy" in r] == [0, 1]
    # the second node's process (RANK=1, LOCAL_RANK=0) reported nothing; node 0's did, once
    assert outs[0].count("policy exported to") == 1 and "policy exported to" not in outs[1]
