"""PPO end to end on tiny models built in code: metrics, checkpoints, export, resume, dense PRM rewards."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlprm.config import TinyModelConfig, validate_recipe
from rlprm.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)

LOGGED = ["rl/reward", "rl/kl", "rl/kl_per_sample", "rl/kl_per_token", "rl/kl_coef", "rl/entropy", "rl/clipfrac",
          "rl/value_loss", "rl/explained_variance", "rl/policy_loss",
          "rl/response_length", "rl/steps_per_solution", "rl/answer_accuracy", "rl/process_accuracy",
          "time/generate", "time/score", "time/update"]


def make_recipe(tmp: Path, generator: Path, out: str, epochs: int = 2, problems_per_epoch: int = 2, **reward):
    data = {
        # one thread: tiny models gain nothing from two, and lose 4-8x when the 2 shared cores are busy
        "run": {"output_dir": str(tmp / out), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator)},
        "reward": {"mode": "sparse", "source": "ground_truth", **reward},
        "rl": {"epochs": epochs, "problems_per_epoch": problems_per_epoch, "prompts_per_iteration": 2, "samples_per_problem": 2,
               "max_new_tokens": 16, "minibatch_size": 2, "ppo_epochs": 1, "learning_rate": 1e-3, "kl_coef": 0.05,
               "value_learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }
    return validate_recipe(data, tmp)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, generator_dir):
    """An uninterrupted 2-epoch run (shared by the end-to-end and the resume test)."""
    from rlprm.rl import train

    tmp = tmp_path_factory.mktemp("ppo")
    recipe = make_recipe(tmp, generator_dir, "full")
    final = train(recipe, progress=False)
    return tmp / "full", final


def _comparable(records):
    """Every value but wall-clock times, from the records after epoch 1 (what the resumed run recomputes)."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")}
            for r in records if r.get("epoch", 0) > 1]


def test_end_to_end_metrics_checkpoints_export(full_run, char_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, final = full_run
    records = read_metrics(run_dir / "metrics.jsonl")
    iterations = [r for r in records if "rl/reward" in r]
    assert len(iterations) == 2  # 2 epochs x 1 iteration
    for key in LOGGED:
        assert key in iterations[0], key
    # before training the policy IS the reference: the KL of the first rollout is exactly 0
    assert iterations[0]["rl/kl"] == 0.0 and iterations[0]["rl/kl_per_token"] == 0.0
    assert all(r["rl/kl_per_sample"] == r["rl/kl"] for r in iterations)
    evals = [r for r in records if "eval/answer_accuracy" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2]  # before training, then after each epoch
    assert any(k.startswith("bon/") for k in evals[-1])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["epoch-0001", "epoch-0002"]
    state = torch.load(run_dir / "checkpoints" / "epoch-0002" / "state.pt", weights_only=False)
    assert {"policy_optimizer", "value_optimizer", "kl_coef", "step", "epoch", "rng"} <= set(state)
    assert (run_dir / "checkpoints" / "epoch-0002" / "extra" / "value" / "config.json").exists()
    export = Path(final["export_dir"])
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    enc = tok(["12 + 3\n"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert json.loads((run_dir / "summary.json").read_text())["rl/reward"] == iterations[-1]["rl/reward"]


def test_resume_matches_uninterrupted_run(full_run, generator_dir, tmp_path):
    from rlprm.rl import train
    from rlprm.rl.run import RLError

    full_dir, _ = full_run
    first = make_recipe(tmp_path, generator_dir, "resumed", epochs=1)
    train(first, progress=False)
    # a fresh start into a folder with checkpoints is refused rather than silently mixed
    with pytest.raises(RLError, match="--resume"):
        train(first, progress=False)
    train(make_recipe(tmp_path, generator_dir, "resumed", epochs=2), resume=True, progress=False)
    resumed = _comparable(read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
    full = _comparable(read_metrics(full_dir / "metrics.jsonl"))
    assert resumed and resumed == full


KILLER = """
import os, signal, sys
from rlprm.tracking import Tracker
log = Tracker.log
def log_then_die(self, metrics, step=None):
    log(self, metrics, step)
    self._file.flush()
    if step == int(sys.argv[2]):  # SIGKILL: no finally, no atexit, nothing tidied up
        os.kill(os.getpid(), signal.SIGKILL)
Tracker.log = log_then_die
from rlprm.config import load_recipe
from rlprm.rl import train
train(load_recipe(sys.argv[1]), progress=False)
"""


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_metrics(generator_dir, tmp_path):
    from rlprm.config import recipe_to_yaml
    from rlprm.rl import train

    # 2 iterations per epoch: steps 1-2 are epoch 1, steps 3-4 epoch 2
    full = make_recipe(tmp_path, generator_dir, "full", problems_per_epoch=4)
    train(full, progress=False)
    killed = make_recipe(tmp_path, generator_dir, "killed", problems_per_epoch=4)
    path = tmp_path / "killed.yaml"
    path.write_text(recipe_to_yaml(killed))
    out = subprocess.run([sys.executable, "-c", KILLER, str(path), "3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -9, out.stderr[-2000:]  # killed in epoch 2, after its first iteration was logged
    run = tmp_path / "killed"
    assert (run / "checkpoints" / "epoch-0001").is_dir() and not (run / "checkpoints" / "epoch-0002").exists()
    assert any(r.get("step") == 3 for r in read_metrics(run / "metrics.jsonl"))
    train(killed, resume=True, progress=False)
    strip = lambda records: [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in records]
    assert strip(read_metrics(run / "metrics.jsonl")) == strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))


def _fixed_rollouts(ppo, texts):
    """A stand-in for sampling: sample k of a batch is texts[k % len(texts)] (one text: every sample); a random
    tiny policy never writes `# Answer`."""
    texts = [texts] if isinstance(texts, str) else list(texts)

    def fake_generate(policy, tokenizer, prompts, n, temperature, max_new_tokens):
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        ids = [tokenizer(texts[k % len(texts)], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for k in range(len(prompts) * n)]
        return ppo.build_rollout(tokenizer, enc["input_ids"], enc["attention_mask"], ids, n)

    return fake_generate


@pytest.mark.parametrize("kind", ["prm", "orm"])
def test_reward_model_rewards(kind, generator_dir, char_tokenizer, tmp_path, monkeypatch):
    """PRM: dense rewards at the step ends; ORM: one sparse reward. Rollouts are four distinct answered
    solutions (2 to 5 steps), so the reward model, the reward placement, GAE and the update all run on real
    step structure, and each sample's reward must be its own text's score: a shuffled pairing of scores and
    samples fails."""
    import rlprm.reward.model as rm_module
    import rlprm.reward.tokens as rewards_module  # the PPO update imports token_rewards when it runs: spy on the module
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm
    from rlprm.rl import ppo, train
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import render_step

    lm = build_tiny_causal_lm(TINY, char_tokenizer, seed=1)
    convention = make_convention(kind, "\n")
    RewardModel(reward_model_from_causal_lm(convention, lm, char_tokenizer), char_tokenizer, convention).save(tmp_path / kind)
    chains = [[("+", 1, 2, 3), ("+", 3, 4, 7)], [("+", 2, 2, 4)], [("+", 1, 1, 2), ("+", 2, 1, 3), ("+", 3, 1, 4)],
              [("+", 5, 0, 5), ("+", 5, 1, 6), ("+", 6, 1, 7), ("+", 7, 1, 8)]]
    texts = [render_steps([render_step(*s) for s in chain] + [answer_step(str(chain[-1][3]))]) for chain in chains]
    seen, scored = [], []
    _spy(monkeypatch, rewards_module, "token_rewards", seen)
    _spy(monkeypatch, rm_module.RewardModel, "score_steps", scored)
    monkeypatch.setattr(ppo, "_generate", _fixed_rollouts(ppo, texts))
    reward = {"mode": "dense", "source": "prm", "dense_form": "min_form"} if kind == "prm" else {"source": "orm"}
    recipe = make_recipe(tmp_path, generator_dir, f"run_{kind}", epochs=1, **reward)
    recipe.model.reward_model = str(tmp_path / kind)
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 80  # the fixed solutions are longer than the other tests' cap
    final = train(recipe, progress=False)
    (args, kwargs, tr) = seen[0]
    assert list(args[1]) == texts  # token_rewards(cfg, texts, ...): the samples in rollout order
    problems = scored[0][0][1]  # RewardModel.score_steps(self, problems, solutions, ...)
    assert len(set(problems)) == 2  # two prompts, two samples each
    alone = RewardModel.load(tmp_path / kind)
    own = [alone.score_steps([problems[i]], [texts[i]], sep="\n")[0] for i in range(4)]  # each pair on its own
    assert kwargs["scores"] == [pytest.approx(s, abs=1e-5) for s in own]
    assert len({round(min(s), 6) for s in own}) == 4  # distinct scores: a permutation would be seen
    nonzero = (tr.rewards != 0).sum(1).tolist()
    if kind == "prm":
        # each sample's steps (2, 3, 4, 5 with the answer), each rewarded at its end; min_form's return is the
        # sample's own worst step
        assert [len(r) for r in tr.step_rewards] == [3, 2, 4, 5]
        assert all(1 <= k <= len(r) for k, r in zip(nonzero, tr.step_rewards))
        assert tr.returns.tolist() == pytest.approx([min(s) for s in own], abs=1e-5)
    else:
        # one reward, at the last response token (the EOS): the sample's own ORM score
        last = tr.mask.sum(1) - 1
        assert nonzero == [1] * len(nonzero)
        assert [tr.rewards[i, last[i]].item() for i in range(4)] == pytest.approx([s[0] for s in own], abs=1e-5)
    assert final["rl/steps_per_solution"] == 3.5
    assert final["reward/missing_answer_frac"] == 0.0
    assert 0.0 <= final["rl/reward"] <= 1.0
    assert (Path(final["export_dir"]) / "config.json").exists()


def test_entry_point_accepts_local_rank_and_names_missing_prerequisites(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  generator: ./runs/arith/generator\nrun:\n  output_dir: ./out\n")
    script = str(ROOT / "rlprm" / "train_rl.py")
    ok = subprocess.run([sys.executable, script, "--local_rank=0", str(recipe), "rl.epochs=1", "--print-config"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "epochs: 1" in ok.stdout
    missing = subprocess.run([sys.executable, script, str(recipe)], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2
    assert "rlprm prepare recipes/arith_prepare.yaml" in missing.stderr
    import os

    # several processes are no longer refused (tests/test_distributed.py runs two); inputs are still checked first
    two = subprocess.run([sys.executable, script, "--local_rank=1", str(recipe)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "WORLD_SIZE": "2"})
    assert two.returncode == 2 and "rlprm prepare recipes/arith_prepare.yaml" in two.stderr


def test_cli_export_without_checkpoint_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlprm.cli", "export", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(generator_dir, tmp_path, monkeypatch):
    from rlprm.checkpoint import latest_checkpoint
    from rlprm.rl import core
    from rlprm.rl import train
    from rlprm.rl.run import RLError

    calls = []
    real = core.policy_loss

    def poisoned(*args, **kwargs):  # 2 minibatches per iteration: the first epoch is clean, the second goes NaN
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) > 2 else loss), stats

    monkeypatch.setattr(core, "policy_loss", poisoned)
    recipe = make_recipe(tmp_path, generator_dir, "nan")
    recipe.rl.eval_n_max = 0
    with pytest.raises(RLError, match="not finite.*epoch-0001"):
        train(recipe, progress=False)
    assert latest_checkpoint(tmp_path / "nan").name == "epoch-0001"
    assert not (tmp_path / "nan" / "checkpoints" / "epoch-0002").exists()


# --------------------------------------------------------------------------- temperature, truncation, oracle rewards


def _full_logits_logprobs(model, ro, temperature):
    """log softmax(logits / T) of the rollout's response tokens from the model's full logits, computed here
    without rlprm's helpers (with gradients if they are on)."""
    import torch

    P, T = ro.prompt_width, ro.response_mask.shape[1]
    position_ids = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=position_ids).logits
    z = logits[:, P - 1:P - 1 + T].float() / temperature
    return torch.log_softmax(z, -1).gather(-1, ro.input_ids[:, P:].unsqueeze(-1)).squeeze(-1)


def _independent_logprobs(model, ro, temperature):
    """`_full_logits_logprobs` without gradients."""
    import torch

    with torch.no_grad():
        return _full_logits_logprobs(model, ro, temperature)


def test_rollout_logprobs_are_those_generate_sampled_from(generator_dir):
    """At T = 0.5 the log-probs PPO takes as "old" are log softmax(logits / T) at the sampled tokens, exactly
    what generate sampled from (its output_scores after the temperature warper). The raw logits used before
    differ: every update at T != 1 was off-policy."""
    import torch

    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.rl.ppo import build_rollout, rollout_logprobs

    tok = load_tokenizer(str(generator_dir), padding_side="left")
    model = load_causal_lm(str(generator_dir), "float32", "cpu", False).eval()
    enc = tok(["93 +3 -4 mod 10\n", "5 +1 last digit\n"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=0.5, top_k=0, top_p=1.0, max_new_tokens=12,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    P = enc["input_ids"].shape[1]
    ro = build_rollout(tok, enc["input_ids"], enc["attention_mask"], out.sequences[:, P:].tolist(), 1)
    T, m = ro.response_mask.shape[1], ro.response_mask
    sampled = torch.stack([torch.log_softmax(out.scores[t].float(), -1) for t in range(T)], dim=1)
    sampled = sampled.gather(-1, ro.input_ids[:, P:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        got, _ = rollout_logprobs(model, ro, 0.5)
        raw, _ = rollout_logprobs(model, ro, 1.0)
    assert torch.allclose(got[m], sampled[m], atol=1e-4)
    assert not torch.allclose(raw[m], sampled[m], atol=1e-2)  # what the old code used


def _spy(monkeypatch, module, name, seen):
    original = getattr(module, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, spy)


def _solve(prompt: str) -> str:
    """The reference solution of an arithmetic prompt such as `93 +3 -4 mod 10`."""
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import reference_solution

    return render_steps(reference_solution(_problem(prompt)))


def _wrong_second_step(solution: str) -> str:
    from rlprm.steps import render_steps, split_steps
    from rlprm.tasks.arithmetic import parse_step, render_step

    steps = split_steps(solution)
    kind, a, b, result = parse_step(steps[1])
    steps[1] = render_step(kind, a, b, result + 1)
    return render_steps(steps)


def _right_and_wrong(prompt: str) -> list[str]:
    """Two samples per prompt: its reference solution, and the same with a wrong second step."""
    return [_solve(prompt), _wrong_second_step(_solve(prompt))]


def _rollouts_per_prompt(ppo, make_texts, eos: bool = True, record=None):
    """A stand-in for sampling: for each prompt, the texts `make_texts(prompt)` (one per sample)."""

    def fake_generate(policy, tokenizer, prompts, n, temperature, max_new_tokens):
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        ids = []
        for prompt in prompts:
            texts = make_texts(prompt)
            assert len(texts) == n
            for text in texts:
                seq = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.append((seq + [tokenizer.eos_token_id] if eos else seq)[:max_new_tokens])
        ro = ppo.build_rollout(tokenizer, enc["input_ids"], enc["attention_mask"], ids, n)
        if record is not None:
            record.append(ro)
        return ro

    return fake_generate


def _problem(prompt: str):
    from rlprm.tasks.arithmetic import Problem

    text, final = prompt.strip(), "none"
    for suffix, kind in ((" mod 10", "mod10"), (" last digit", "last_digit")):
        if text.endswith(suffix):
            text, final = text[: -len(suffix)], kind
    start, *ops = text.split()
    return Problem(int(start), tuple((o[0], int(o[1:])) for o in ops), final)


def _reference_and_habit(prompt: str) -> list[str]:
    """The reference solution, and the dropped-carry chain where the problem has a carry (else the reference)."""
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import carry_drop_solution

    habit = carry_drop_solution(_problem(prompt))
    return [_solve(prompt), render_steps(habit) if habit else _solve(prompt)]


def test_each_update_logs_the_habits_in_its_own_samples(generator_dir, tmp_path, monkeypatch):
    """rl/carry_drop_rate and rl/shortcut_rate: the share of the update's samples that take each habit (what the
    demo reads to see how fast each reward removes a habit between the held-out evaluations)."""
    from rlprm.rl import ppo, train
    from rlprm.tasks.arithmetic import carry_drop_solution

    prompts = []
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(
        ppo, lambda prompt: prompts.append(prompt) or _reference_and_habit(prompt)))
    recipe = make_recipe(tmp_path, generator_dir, "habits", epochs=1, mode="sparse", source="exact")
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 80
    final = train(recipe, progress=False)
    with_carry = sum(carry_drop_solution(_problem(p)) is not None for p in prompts)
    assert with_carry > 0  # else the test shows nothing
    assert final["rl/carry_drop_rate"] == pytest.approx(with_carry / (2 * len(prompts)))
    assert final["rl/shortcut_rate"] == 0.0


def test_eval_every_evaluates_the_start_every_nth_epoch_and_the_last(generator_dir, tmp_path):
    from rlprm.rl import train

    recipe = make_recipe(tmp_path, generator_dir, "every", epochs=3)
    recipe.rl.eval_every = 2
    train(recipe, progress=False)
    records = read_metrics(tmp_path / "every" / "metrics.jsonl")
    assert [r["epoch"] for r in records if "eval/answer_accuracy" in r] == [0, 2, 3]
    assert len([r for r in records if "rl/reward" in r]) == 3  # every epoch still updates and logs


@pytest.mark.parametrize("mode, form", [("dense", "min_form"), ("dense", "log_prob"), ("sparse", "log_prob")])
def test_exact_rewards_are_the_checker_as_an_oracle_prm(mode, form, generator_dir, tmp_path, monkeypatch):
    import rlprm.reward.tokens as rewards_module
    from rlprm.reward.tokens import dense_step_rewards
    from rlprm.rl import ppo, train

    seen = []
    _spy(monkeypatch, rewards_module, "token_rewards", seen)
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, _right_and_wrong))
    recipe = make_recipe(tmp_path, generator_dir, f"exact_{mode}_{form}", epochs=1, mode=mode, source="exact",
                         dense_form=form)
    assert recipe.model.reward_model is None  # no reward model is needed, none is loaded
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 80
    final = train(recipe, progress=False)
    tr = seen[0][2]
    # the wrong chain keeps the reference's later lines, so it lands on the right answer: an outcome reward would
    # pay both samples alike, the oracle PRM does not
    assert final["rl/process_accuracy"] == 0.5 and final["rl/answer_accuracy"] == 1.0
    assert tr.missing_answer == [False] * 4 and tr.truncated == [False] * 4
    for i in range(4):
        n_steps = len(seen[0][0][1][i].split("\n")) - 3  # the text's steps: lines minus the blank and trailing ones
        probs = [1.0] * n_steps if i % 2 == 0 else [1.0] + [0.0] * (n_steps - 1)
        if mode == "dense":
            assert tr.step_rewards[i] == pytest.approx(dense_step_rewards(probs, form, floor=-1.0 + 0.1))
        else:
            assert tr.returns[i].item() == (1.0 if i % 2 == 0 else 0.0)


def test_update_and_kl_logprobs_are_at_the_sampling_temperature(generator_dir, tmp_path, monkeypatch):
    """Fails on the old code, which took raw logits: at rl.temperature 0.5 the "old" policy log-probs and the
    reference's, both fed to the KL and (old) to the PPO ratio, are log softmax(logits / 0.5) at the sampled tokens."""
    import torch

    import rlprm.rl.core as core_module
    from rlprm.models import load_causal_lm
    from rlprm.rl import ppo, train

    seen_kl, rollouts = [], []
    _spy(monkeypatch, core_module, "add_kl_penalty", seen_kl)
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, _right_and_wrong, record=rollouts))
    recipe = make_recipe(tmp_path, generator_dir, "temperature", epochs=1)
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 80
    recipe.rl.temperature = 0.5
    train(recipe, progress=False)
    start = load_causal_lm(str(generator_dir), "float32", "cpu", False).eval()
    _, old, ref, mask = seen_kl[0][0][:4]  # add_kl_penalty(rewards, logprobs, ref_logprobs, mask, ...)
    want = _independent_logprobs(start, rollouts[0], 0.5)
    # before the first update the policy is the start, so both equal the start's tempered log-probs
    assert torch.allclose(old[mask], want[mask], atol=1e-5) and torch.allclose(ref[mask], want[mask], atol=1e-5)
    assert not torch.allclose(want[mask], _independent_logprobs(start, rollouts[0], 1.0)[mask], atol=1e-2)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_confidence_rewards_read_the_frozen_start_at_t1(mode, generator_dir, tmp_path, monkeypatch):
    """`confidence`: p_k = exp(lowest token log-prob in step k) under the start at T = 1 (sparse: over the whole
    response, EOS included), even when rollouts are sampled at 0.5; no reward model is loaded."""
    import rlprm.reward.tokens as rewards_module
    from rlprm.models import load_causal_lm
    from rlprm.reward.tokens import dense_step_rewards, step_token_ends
    from rlprm.rl import ppo, train

    seen_rewards, rollouts = [], []
    _spy(monkeypatch, rewards_module, "token_rewards", seen_rewards)
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, _right_and_wrong, record=rollouts))
    recipe = make_recipe(tmp_path, generator_dir, f"confidence_{mode}", epochs=1, mode=mode, source="confidence",
                         dense_form="min_form")
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 80
    recipe.rl.temperature = 0.5
    train(recipe, progress=False)
    ro, tr = rollouts[0], seen_rewards[0][2]
    assert recipe.model.reward_model is None
    start = load_causal_lm(str(generator_dir), "float32", "cpu", False).eval()  # the frozen reference
    at_t1 = _independent_logprobs(start, ro, 1.0)
    from rlprm.models import load_tokenizer

    tok = load_tokenizer(str(generator_dir), padding_side="left")
    for i, (text, ids) in enumerate(zip(ro.texts, ro.response_ids)):
        if mode == "sparse":
            assert tr.returns[i].item() == pytest.approx(math.exp(at_t1[i, :len(ids)].min().item()), abs=1e-5)
            continue
        ends, lo, probs = step_token_ends(text, ids, tok), 0, []
        for end in ends:
            probs.append(math.exp(at_t1[i, lo:end + 1].min().item()))
            lo = end + 1
        assert tr.step_rewards[i] == pytest.approx(dense_step_rewards(probs, "min_form"), abs=1e-5)


def test_a_response_cut_at_max_new_tokens_gets_the_missing_answer_reward(generator_dir, char_tokenizer, tmp_path,
                                                                         monkeypatch):
    """Fails on the old code: a response that generate stopped at max_new_tokens before its EOS, with an answer
    written, was judged as written (here: the grader's 0 or 1) instead of as cut."""
    import rlprm.reward.tokens as rewards_module
    from rlprm.rl import ppo, train

    text = "1 + 2 = 3\n3 + 4 = 7\n# Answer\n\n7"
    n_tokens = len(char_tokenizer(text, add_special_tokens=False)["input_ids"])
    seen = []
    _spy(monkeypatch, rewards_module, "token_rewards", seen)
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, lambda p: [text] * 2, eos=False))
    recipe = make_recipe(tmp_path, generator_dir, "cut", epochs=1, missing_answer_reward=-1.0)
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = n_tokens  # the answer's last token is the cap's: no room was left for EOS
    final = train(recipe, progress=False)
    tr = seen[0][2]
    assert all(len(r) == n_tokens for r in [*seen[0][0][2]])
    assert tr.truncated == [True] * 4 and tr.missing_answer == [True] * 4
    assert tr.returns.tolist() == [-1.0] * 4
    assert final["reward/truncated_frac"] == 1.0 and final["rl/reward"] == -1.0


def test_warmup_ramps_the_policy_learning_rate_across_a_resume(generator_dir, tmp_path):
    """rl.warmup_steps counts policy optimizer steps (2 per iteration here), and a resumed run goes on counting."""
    from rlprm.rl import train

    first = make_recipe(tmp_path, generator_dir, "wu", epochs=1)
    first.rl.warmup_steps = 8
    train(first, progress=False)
    more = make_recipe(tmp_path, generator_dir, "wu", epochs=2)
    more.rl.warmup_steps = 8
    train(more, resume=True, progress=False)
    lrs = [r["rl/learning_rate"] for r in read_metrics(tmp_path / "wu" / "metrics.jsonl") if "rl/learning_rate" in r]
    assert lrs == pytest.approx([1e-3 * 2 / 8, 1e-3 * 4 / 8])  # a restart of the count would log 2/8 twice


def test_critic_warmup_fits_the_new_critic_to_the_first_returns_before_the_first_update(generator_dir, tmp_path):
    """rl.critic_warmup_passes: the first iteration's advantages use a critic already fitted to that rollout's
    reward-to-go (logged as rl/value_mean, the critic's mean over the response tokens), from the same rollout."""
    from rlprm.rl import train

    first = {}
    for passes in (0, 40):
        recipe = make_recipe(tmp_path, generator_dir, f"cw{passes}", epochs=1, problems_per_epoch=2)
        recipe.rl.critic_warmup_passes = passes
        recipe.rl.value_learning_rate = 1e-2
        train(recipe, progress=False)
        first[passes] = next(r for r in read_metrics(tmp_path / f"cw{passes}" / "metrics.jsonl") if "rl/reward" in r)
    assert first[0]["rl/reward"] == first[40]["rl/reward"]  # the same first rollout
    target = first[0]["rl/reward"]  # sparse and KL 0 at the start: the reward-to-go of every token is the return
    assert abs(target) >= 0.3, "the check needs a return away from a new head's ~0"
    assert abs(first[40]["rl/value_mean"] - target) < 0.5 * abs(first[0]["rl/value_mean"] - target)


def test_value_layers_truncates_the_critic_and_a_checkpoint_reloads_in_its_shape(generator_dir, tmp_path):
    from rlprm.rl.ppo import _load_value_model

    full = _load_value_model(str(generator_dir), "float32", "cpu", False)
    n = full.config.num_hidden_layers
    assert n >= 2
    small = _load_value_model(str(generator_dir), "float32", "cpu", False, layers=1)
    assert len(small.base_model.layers) == 1 and small.config.num_hidden_layers == 1
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    import torch

    ids = torch.tensor([[5, 6, 7, 8]])
    assert small(input_ids=ids).logits.shape == (1, 4, 1)
    small.save_pretrained(tmp_path / "v")
    again = _load_value_model(str(tmp_path / "v"), "float32", "cpu", False, layers=1)  # as a resume loads it
    assert len(again.base_model.layers) == 1
    assert torch.equal(again(input_ids=ids).logits, small(input_ids=ids).logits)
    # more layers than the body has: unchanged
    assert len(_load_value_model(str(generator_dir), "float32", "cpu", False, layers=n + 3).base_model.layers) == n


# --------------------------------------------------------------------------- LoRA


def _lora_recipe(tmp_path, generator_dir, out, **kw):
    recipe = make_recipe(tmp_path, generator_dir, out, **kw)
    recipe.model.lora.enabled, recipe.model.lora.r, recipe.model.lora.alpha = True, 4, 8
    recipe.model.lora.dropout = 0.0
    return recipe


def test_lora_reference_is_the_base_with_its_adapters_off(generator_dir, tmp_path):
    """The reference of a LoRA policy is the policy's own base: its log-probs (PPO's KL, and the held-out
    confidence of the evaluation) equal the plain generator's, however far the adapters have moved."""
    import torch

    from rlprm.evaluation.evaluate import response_logprobs
    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.rl.models import load_models
    from rlprm.rl.ppo import build_rollout, rollout_logprobs
    from rlprm.rl.reference import AdaptersOff

    recipe = _lora_recipe(tmp_path, generator_dir, "unit")
    models = load_models(recipe, None, "cpu", reference=True, reward_model=False)
    policy, reference = models.policy, models.reference
    assert isinstance(reference, AdaptersOff) and reference.model is policy  # no second copy of the weights
    with torch.no_grad():  # adapters that change the model (lora_B starts at 0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    policy.train()
    base = load_causal_lm(str(generator_dir), "float32", "cpu", False).eval()
    tok = load_tokenizer(str(generator_dir), padding_side="left")
    enc = tok(["93 +3 -4 mod 10\n", "5 +1 last digit\n"], return_tensors="pt", padding=True)
    ids = [tok("1 + 2 = 3\n", add_special_tokens=False)["input_ids"], tok("7\n", add_special_tokens=False)["input_ids"]]
    ro = build_rollout(tok, enc["input_ids"], enc["attention_mask"], ids, 1)
    m = ro.response_mask
    got, _ = rollout_logprobs(reference, ro, 0.7)
    want = _independent_logprobs(base, ro, 0.7)
    assert torch.allclose(got[m], want[m], atol=1e-6)
    assert policy.training and not got.requires_grad  # the policy's mode is restored; no graph is kept
    policy.eval()
    with torch.no_grad():
        adapted, _ = rollout_logprobs(policy, ro, 0.7)
    assert not torch.allclose(adapted[m], want[m], atol=1e-2)  # the adapters do change the policy
    prompts = ["93 +3 -4 mod 10\n", "5 +1 last digit\n"]
    for a, b in zip(response_logprobs(reference, tok, prompts, ids), response_logprobs(base, tok, prompts, ids)):
        assert a == pytest.approx(b, abs=1e-5)


def test_ppo_with_lora_trains_adapters_only_and_exports_a_plain_model(generator_dir, tmp_path, monkeypatch):
    """PPO + LoRA with `confidence` rewards (which read the reference): one load of the generator's weights, the
    reference stays the start after the adapters moved, checkpoints hold adapters, the export is plain HF."""
    import torch
    from transformers import AutoModelForCausalLM

    import rlprm.models as models_module
    import rlprm.reward.tokens as rewards_module
    import rlprm.rl.core as core_module
    from rlprm.models import load_causal_lm
    from rlprm.rl import ppo, train
    from rlprm.models import load_policy

    loads, seen_rewards, seen_kl, rollouts = [], [], [], []
    _spy(monkeypatch, models_module, "load_causal_lm", loads)
    _spy(monkeypatch, rewards_module, "token_rewards", seen_rewards)
    _spy(monkeypatch, core_module, "add_kl_penalty", seen_kl)
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, _right_and_wrong, record=rollouts))
    # 2 iterations: the second one's rollouts are scored after the adapters' first update
    recipe = _lora_recipe(tmp_path, generator_dir, "lora", epochs=1, problems_per_epoch=4, mode="sparse",
                          source="confidence")
    recipe.rl.max_new_tokens = 80
    final = train(recipe, progress=False)
    assert len(loads) == 1  # the policy's base; the reference is that base, not a second copy

    start = load_causal_lm(str(generator_dir), "float32", "cpu", False).eval()
    kl = [args[0][1:4] for args in seen_kl]  # (old logprobs, ref logprobs, mask) per iteration
    old, ref, mask = kl[1]
    assert not torch.allclose(old[mask], ref[mask], atol=1e-4)  # the policy moved away from its reference ...
    assert torch.allclose(ref[mask], _independent_logprobs(start, rollouts[1], 1.0)[mask], atol=1e-5)  # ... the start
    at_t1 = _independent_logprobs(start, rollouts[1], 1.0)
    # the second iteration's rewards (evaluation computes the held-out reward through the same function)
    tr = next(out for args, _, out in seen_rewards if list(args[1]) == list(rollouts[1].texts))
    for i, ids in enumerate(rollouts[1].response_ids):  # the start's confidence, not the adapted policy's
        assert tr.returns[i].item() == pytest.approx(math.exp(at_t1[i, :len(ids)].min().item()), abs=1e-5)
    assert final["eval/reward"] is not None  # the held-out confidence, read through the same reference

    ckpt = tmp_path / "lora" / "checkpoints" / "epoch-0001"
    assert (ckpt / "model" / "adapter_config.json").is_file() and not (ckpt / "model" / "model.safetensors").exists()
    trained = load_policy(recipe, ckpt, "cpu").eval()
    base = dict(start.named_parameters())
    changed = []
    for name, p in trained.named_parameters():
        if "lora_" in name:
            changed.append(bool(p.abs().sum() > 0) if "lora_B" in name else True)
        else:  # every base weight is the generator's, bit for bit
            plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(p, base[plain]), name
    assert changed and all(changed)  # every lora_B left 0
    export = Path(final["export_dir"])
    assert not (export / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(export).eval()  # plain transformers, no peft
    ro = rollouts[1]
    pos = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = trained(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
        got = merged(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
        before = start(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, before, atol=1e-4)


def test_ppo_with_lora_resumes_to_the_uninterrupted_metrics(generator_dir, tmp_path):
    from rlprm.rl import train

    train(_lora_recipe(tmp_path, generator_dir, "full"), progress=False)
    train(_lora_recipe(tmp_path, generator_dir, "resumed", epochs=1), progress=False)
    train(_lora_recipe(tmp_path, generator_dir, "resumed"), resume=True, progress=False)  # adapters + optimizer back
    resumed = _comparable(read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
    full = _comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    # equal up to float32 rounding: MKL's matrix products may round differently with the buffers' alignment
    # (MKL_CBWR=COMPATIBLE makes them equal bit for bit), and a reloaded critic's buffers lie elsewhere; a lost
    # optimizer state or adapter moves these metrics by far more than 1e-6
    assert resumed and len(resumed) == len(full)
    for a, b in zip(resumed, full):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-6, abs=1e-9) if isinstance(b[k], float) else b[k]), k
    assert resumed[0]["rl/kl"] != 0.0  # epoch 2 starts from trained adapters, not from fresh ones


# --------------------------------------------------------------------------- dropout (issue 23, finding 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_critic_has_no_dropout_in_train_mode(arch, tmp_path):
    """Old values and GAE targets come from the critic in eval(), its updates run in train(): with a dropout
    anywhere in it (transformers 5 gives Llama's and Qwen2's token-classification heads Dropout(0.1); a config
    may set attention dropout) the critic trained would be another function than the one read."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from rlprm.rl.ppo import _load_value_model

    config = (LlamaConfig if arch == "llama" else Qwen2Config)(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, attention_dropout=0.2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    critic = _load_value_model(str(tmp_path / arch), "float32", "cpu", False)
    ids = torch.randint(0, 40, (3, 9))
    critic.eval()
    with torch.no_grad():
        evaluated = critic(input_ids=ids).logits
    critic.train()
    with torch.no_grad():
        trained = [critic(input_ids=ids).logits for _ in range(3)]
    assert evaluated.abs().max() > 0
    assert all(torch.equal(t, evaluated) for t in trained)


def test_ppo_with_lora_by_default_starts_every_update_at_ratio_one(generator_dir, tmp_path, monkeypatch):
    """lora.dropout's default: with dropout on the adapters, the first minibatch of an update (whose old
    log-probs are the same weights in eval mode) has a ratio away from 1 once lora_B has moved."""
    from rlprm.rl import core, ppo, train

    seen = []
    _spy(monkeypatch, core, "policy_loss", seen)
    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, _right_and_wrong))
    recipe = make_recipe(tmp_path, generator_dir, "lora_ratio", epochs=1, problems_per_epoch=6)
    recipe.model.lora.enabled, recipe.model.lora.r, recipe.model.lora.alpha = True, 4, 8  # dropout: the default
    recipe.rl.minibatch_size = 4  # one minibatch per iteration: every policy_loss call is an update's first
    recipe.rl.eval_n_max = 0
    recipe.rl.max_new_tokens = 80
    recipe.rl.learning_rate = 1e-2
    train(recipe, progress=False)
    stats = [out[1] for _, _, out in seen]
    assert len(stats) == 3
    for s in stats:  # iterations 2 and 3 start from moved adapters
        assert abs(s["ratio"].item() - 1.0) < 1e-6 and s["approx_kl"].item() < 1e-10 and s["clipfrac"].item() == 0


def test_ppo_refuses_lora_dropout(generator_dir, tmp_path):
    from rlprm.rl import train
    from rlprm.rl.run import RLInputError

    recipe = _lora_recipe(tmp_path, generator_dir, "lora_dropout")
    recipe.model.lora.dropout = 0.05
    with pytest.raises(RLInputError, match="model.lora.dropout: 0"):
        train(recipe, progress=False)


# --------------------------------------------------------------------------- bf16 master weights (issue 23, finding 4)


def _changed_fraction(trained_dir, generator_dir) -> float:
    """Share of the generator's weights (as loaded in bf16) that the saved policy no longer holds."""
    import torch
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(generator_dir, dtype=torch.bfloat16)
    trained = dict(AutoModelForCausalLM.from_pretrained(trained_dir, dtype="auto").named_parameters())
    changed = total = 0
    for name, p in start.named_parameters():
        changed += int((trained[name].float() != p.float()).sum())
        total += p.numel()
    return changed / total


def test_a_bf16_policy_and_critic_train_on_float32_masters(generator_dir, tmp_path):
    """AdamW steps of 1e-5 on weights of ~0.02 are below bf16's resolution: with bf16 parameters most updates
    round away. A bf16 recipe (without DeepSpeed) trains float32 copies, moving as many weights as float32."""
    from safetensors import safe_open

    from rlprm.rl import train

    fractions = {}
    for dtype in ("float32", "bfloat16"):
        recipe = make_recipe(tmp_path, generator_dir, dtype, epochs=1)
        recipe.model.dtype = dtype
        recipe.rl.learning_rate = recipe.rl.value_learning_rate = 1e-5
        recipe.rl.eval_n_max = 0
        train(recipe, progress=False)
        ckpt = tmp_path / dtype / "checkpoints" / "epoch-0001"
        fractions[dtype] = _changed_fraction(ckpt / "model", generator_dir)
    assert fractions["float32"] > 0.9
    assert fractions["bfloat16"] > fractions["float32"] - 0.05
    with safe_open(str(ckpt / "extra" / "value" / "model.safetensors"), "pt") as f:  # the critic's masters too
        assert all(f.get_tensor(k).dtype == __import__("torch").float32 for k in f.keys())


# --------------------------------------------------------------------------- rl.target_kl inside the loop


def test_target_kl_adapts_the_kl_coefficient_inside_the_loop(generator_dir, tmp_path, monkeypatch):
    """rl.target_kl (the real-size recipes set 0.02): after every iteration the coefficient is multiplied by
    1 + clip(KL / target - 1, -0.2, 0.2) * B / horizon (Ziegler et al. 2019), from that iteration's per-token
    KL; the first rollout's KL is 0 (the policy is the reference), so it falls, then the KL of a moved policy
    above the target raises it. Without target_kl it stays rl.kl_coef."""
    from rlprm.rl import ppo, train

    monkeypatch.setattr(ppo, "_generate", _rollouts_per_prompt(ppo, _right_and_wrong))
    logs = {}
    for target in (None, 1e-6):
        recipe = make_recipe(tmp_path, generator_dir, f"kl_{target}", epochs=1, problems_per_epoch=8)
        recipe.rl.target_kl, recipe.rl.kl_horizon, recipe.rl.kl_estimator = target, 8, "k3"  # k3: never below 0
        recipe.rl.learning_rate, recipe.rl.eval_n_max, recipe.rl.max_new_tokens = 1e-2, 0, 80
        train(recipe, progress=False)
        logs[target] = [r for r in read_metrics(tmp_path / f"kl_{target}" / "metrics.jsonl") if "rl/kl_coef" in r]
    assert [r["rl/kl_coef"] for r in logs[None]] == [0.05] * 4
    adaptive = logs[1e-6]
    assert len(adaptive) == 4 and adaptive[0]["rl/kl_per_token"] == 0.0 and adaptive[-1]["rl/kl_per_token"] > 1e-4
    coef, want = 0.05, []
    for r in adaptive:  # 4 samples per iteration, horizon 8
        coef *= 1 + min(max(r["rl/kl_per_token"] / 1e-6 - 1, -0.2), 0.2) * 4 / 8
        want.append(coef)
    assert [r["rl/kl_coef"] for r in adaptive] == pytest.approx(want, rel=1e-9)
    assert want[0] == pytest.approx(0.045) and want[-1] > want[-2]  # down after KL 0, up once the policy moved


# --------------------------------------------------------------------------- no (B, T, V) float32 logits (issue 23, finding 5)


def test_update_logprobs_from_hidden_states_equal_the_full_logits_and_their_gradient(generator_dir):
    """The update's log-probs (the last hidden states through the output layer, a chunk of rows at a time,
    recomputed in the backward pass; or, for a head ZeRO-3 partitions, the model's response logits) equal
    log_softmax of the full logits, and so do the gradients of a loss on them."""
    import torch

    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.rl.core import token_logprobs
    from rlprm.rl.ppo import build_rollout, response_features

    tok = load_tokenizer(str(generator_dir), padding_side="left")
    model = load_causal_lm(str(generator_dir), "float32", "cpu", False).train()
    enc = tok(["93 +3 -4 mod 10\n", "5 +1 last digit\n"], return_tensors="pt", padding=True)
    ids = [tok("1 + 2 = 3\n", add_special_tokens=False)["input_ids"], tok("7\n", add_special_tokens=False)["input_ids"]]
    ro = build_rollout(tok, enc["input_ids"], enc["attention_mask"], ids, 1)
    P, T, m = ro.prompt_width, ro.response_mask.shape[1], ro.response_mask
    weights = torch.randn(m.shape, generator=torch.Generator().manual_seed(0))

    def run(how):
        model.zero_grad(set_to_none=True)
        if how == "plain":
            logp = _full_logits_logprobs(model, ro, 0.7)
        else:
            features, head = response_features(model, ro.input_ids, ro.attention_mask, P, T)
            assert (head is None) == (how == "zero3")
            logp = token_logprobs(features, ro.input_ids[:, P:], head, 0.7, chunk_elements=3 * features.shape[-1]
                                  if head is None else 3 * head.out_features)[0]
        (logp * weights)[m].sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = run("plain")
    got, grads = run("hidden")
    weight = model.get_output_embeddings().weight
    weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    try:
        zero3, zero3_grads = run("zero3")
    finally:
        del weight.ds_id
    for logp, g in ((got, grads), (zero3, zero3_grads)):
        assert torch.allclose(logp[m], want[m], atol=1e-5)
        assert all(torch.allclose(g[n], want_grads[n], atol=1e-5) for n in want_grads)


def test_a_model_whose_head_does_not_give_its_logits_is_refused(generator_dir):
    """A model that scales (or soft-caps) its logits after the output layer: reading the head on the hidden
    states would give other log-probs than the model's; the check on the last position refuses it."""
    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.rl.ppo import build_rollout, rollout_logprobs
    from rlprm.rl.run import RLError

    tok = load_tokenizer(str(generator_dir), padding_side="left")
    model = load_causal_lm(str(generator_dir), "float32", "cpu", False).eval()
    enc = tok(["93 +3 -4 mod 10\n"], return_tensors="pt", padding=True)
    ro = build_rollout(tok, enc["input_ids"], enc["attention_mask"], [tok("7\n", add_special_tokens=False)["input_ids"]], 1)
    rollout_logprobs(model, ro, 1.0)

    def scale(_module, _args, out):
        out.logits = out.logits * 0.5
        return out

    model.register_forward_hook(scale)
    with pytest.raises(RLError, match="does not give its logits"):
        rollout_logprobs(model, ro, 1.0)


def test_a_bf16_run_resumes_to_the_uninterrupted_metrics(generator_dir, tmp_path):
    """The float32 masters of a bf16 recipe come back from a checkpoint unrounded (the policy's and the
    critic's), so a resumed bf16 run continues as the uninterrupted one."""
    from rlprm.rl import train

    def recipe(out, epochs):
        r = make_recipe(tmp_path, generator_dir, out, epochs=epochs)
        r.model.dtype, r.rl.eval_n_max = "bfloat16", 0
        return r

    train(recipe("full", 2), progress=False)
    train(recipe("resumed", 1), progress=False)
    train(recipe("resumed", 2), resume=True, progress=False)
    resumed = _comparable(read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
    full = _comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert resumed and len(resumed) == len(full)
    for a, b in zip(resumed, full):  # to float32 rounding (see the LoRA resume test)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-6, abs=1e-9) if isinstance(b[k], float) else b[k]), k


def test_rows_grouped_by_length_give_the_full_width_losses_advantages_and_gradients(generator_dir):
    """`ppo.by_length` (each group of rows cut to its own columns) against one pass of the whole batch at the
    rollout's full width, as the update ran before: the same log-probs and values at every real token, and so
    the same clipped losses, GAE advantages and gradients. A cut that dropped a real token (its output left 0) or
    shifted a position would fail."""
    import torch
    from transformers import AutoModelForTokenClassification

    from rlprm.models import disable_dropout, load_causal_lm, load_tokenizer
    from rlprm.rl.core import gae, length_groups, masked_whiten, policy_loss, token_logprobs, value_loss
    from rlprm.rl.ppo import build_rollout, by_length, response_features

    torch.manual_seed(0)
    tok = load_tokenizer(str(generator_dir), padding_side="left")
    policy = load_causal_lm(str(generator_dir), "float32", "cpu", False).train()
    critic = disable_dropout(AutoModelForTokenClassification.from_pretrained(str(generator_dir), num_labels=1)).train()
    prompts = ["93 +3 -4 mod 10\n", "5 +1\n", "12 -7 +8 last digit\n"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    # responses of 1 to 23 tokens (EOS on some, none on the longest: a row cut at the length cap)
    texts = ["7", "1 + 2 = 3\n", "93 + 3 = 96\n96 - 4 = 92\n", "5\n", "5 + 1 = 6\n6", "12 - 7 = 5\n5 + 8 = 13\n3"]
    gen = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if i % 2 else [])
           for i, t in enumerate(texts)]
    ro = build_rollout(tok, enc["input_ids"], enc["attention_mask"], gen, 2)
    P, (B, T), m = ro.prompt_width, ro.response_mask.shape, ro.response_mask
    g = torch.Generator().manual_seed(1)
    old_lp, old_v, rewards = (torch.randn(B, T, generator=g) for _ in range(3))

    def passes(ids, att, p, t):
        features, head = response_features(policy, ids, att, p, t)
        position_ids = (att.cumsum(-1) - 1).clamp(min=0)
        values = critic(input_ids=ids, attention_mask=att, position_ids=position_ids).logits[:, p - 1:p - 1 + t]
        return token_logprobs(features, ids[:, p:], head, 0.7)[0], values.squeeze(-1).float()

    def losses(how):
        policy.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)
        logp, values = (passes(ro.input_ids, ro.attention_mask, P, T) if how is None else
                        by_length(passes, ro.input_ids, ro.attention_mask, P, m, how))
        advantages, returns = gae(rewards, values.detach(), m, 1.0, 0.95)
        advantages = masked_whiten(advantages, m)
        pl, _ = policy_loss(logp, old_lp, advantages, m, 0.2)
        vl, _ = value_loss(values, old_v, returns, m, 0.2)
        (pl + 0.5 * vl).backward()
        grads = {n: p.grad.clone() for model in (policy, critic) for n, p in model.named_parameters()}
        return logp.detach(), values.detach(), advantages, torch.stack([pl, vl]).detach(), grads

    prompt_lengths = ro.attention_mask[:, :P].sum(1)
    assert len(length_groups(prompt_lengths, m.sum(1), 0)) > 2  # the check below compares several cut passes
    want = losses(None)
    for cost in (0, 10, None):  # many groups, a few, one of the batch's own width
        got = losses(cost)
        for w, h in zip(want[:3], got[:3]):
            assert torch.allclose(w[m], h[m], atol=1e-5)
        assert torch.allclose(want[3], got[3], atol=1e-5)
        assert all(torch.allclose(want[4][n], got[4][n], atol=1e-5) for n in want[4])
