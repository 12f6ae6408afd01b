"""GRPO: the process advantages on hand-computed tensors, TRL's private contract, and runs on tiny models."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from rlprm.config import TinyModelConfig, validate_recipe
from rlprm.tracking import read_metrics
from tests.conftest import no_warning

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
LOGGED = ["rl/reward", "rl/kl", "rl/entropy", "rl/clipfrac", "rl/response_length", "rl/steps_per_solution",
          "rl/answer_accuracy", "rl/process_accuracy", "rl/shortcut_rate", "rl/carry_drop_rate", "time/generate",
          "time/score", "time/update"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, char_tokenizer):
    from rlprm.models import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("gen") / "generator"
    build_tiny_causal_lm(TINY, char_tokenizer, seed=0).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def make_recipe(tmp: Path, generator: Path, out: str, epochs: int = 2, reward: dict | None = None, **rl):
    data = {
        "run": {"output_dir": str(tmp / out), "device": "cpu", "seed": 3, "threads": 1},
        "model": {"generator": str(generator)},
        "reward": reward or {"mode": "sparse", "source": "ground_truth"},
        "rl": {"algorithm": "grpo", "epochs": epochs, "problems_per_epoch": 2, "prompts_per_iteration": 2,
               "samples_per_problem": 2, "max_new_tokens": 16, "minibatch_size": 2, "ppo_epochs": 1,
               "learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2, **rl},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }
    return validate_recipe(data, tmp)


# --------------------------------------------------------------------------- pure tensors


@pytest.mark.parametrize("form", ["min", "sum"])
def test_grpo_advantages_read_the_placed_events_and_normalise_over_the_group(form, tmp_path, generator_dir):
    """GRPO only normalises: the events come from rewards.token_rewards (the one placement), the last step's on EOS."""
    from rlprm.reward.tokens import TokenRewards
    from rlprm.rl.grpo import grpo_advantages

    # one group of 2: sample 0 has steps ending at tokens 1 and 3 (scores 0.9, 0.3), the last moved to EOS (4);
    # sample 1 wrote no answer: the missing-answer penalty -1 on its last token (3)
    rewards = torch.zeros(2, 5)
    rewards[0, 1], rewards[0, 4], rewards[1, 3] = 0.9, 0.3, -1.0
    mask = torch.tensor([[True] * 5, [True] * 4 + [False]])
    tr = TokenRewards(rewards, mask, [[1, 3], []], [[0.9, 0.3], []], [False, True], [False, False],
                      event_positions=[[1, 4], [3]], event_values=[[0.9, 0.3], [-1.0]], outcome_rewards=[0.0, 0.0])
    recipe = make_recipe(tmp_path, generator_dir, "x", reward={"mode": "dense", "source": "exact",
                                                                "dense_form": "score"}, process_advantage=form)
    if form == "sum":
        with pytest.warns(UserWarning, match="pay for more steps"):
            adv = grpo_advantages(recipe, {"rewards": tr}, group_size=2, width=6)
        values = [0.9, 0.3, -1.0]  # DeepSeekMath: every step reward of the group normalised, then summed onwards
        mean, std = statistics.mean(values), statistics.stdev(values)
        n = [(v - mean) / (std + 1e-4) for v in values]
        expected = [[n[0] + n[1], n[0] + n[1], n[1], n[1], n[1], 0.0], [n[2]] * 4 + [0.0, 0.0]]
    else:
        # min: sample 0's return is min(0.9, 0.3) = 0.3 at both its events, sample 1's -1; pooled over the group
        pool = [0.3, 0.3, -1.0]
        mean, std = statistics.mean(pool), statistics.stdev(pool)
        a0, a1 = (0.3 - mean) / (std + 1e-4), (-1.0 - mean) / (std + 1e-4)
        expected = [[a0] * 5 + [0.0], [a1] * 4 + [0.0, 0.0]]
        adv = grpo_advantages(recipe, {"rewards": tr}, group_size=2, width=6)
    assert adv.shape == (2, 6)
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)


def test_process_advantage_min_needs_step_values(tmp_path, generator_dir):
    from rlprm.config import RecipeError

    for form in ("min_form", "delta"):
        # `sum` too: it normalises every event on its own, as a step's value (issue 23 finding 2)
        for process in ("min", "mean", "sum"):
            with pytest.raises((RecipeError, ValueError), match="increments of a running score"):
                make_recipe(tmp_path, generator_dir, "x", process_advantage=process,
                            reward={"mode": "dense", "source": "exact", "dense_form": form})
    for form in ("score", "log_prob"):
        make_recipe(tmp_path, generator_dir, "x", reward={"mode": "dense", "source": "exact", "dense_form": form},
                    process_advantage="sum")


def test_sizes_that_do_not_fit_are_refused_with_the_keys(tmp_path, generator_dir):
    from rlprm.config import RecipeError
    from rlprm.rl.grpo import check_sizes
    from rlprm.rl.run import RLInputError

    with pytest.raises(RLInputError, match="rl.minibatch_size"):
        check_sizes(make_recipe(tmp_path, generator_dir, "x", minibatch_size=3))
    with pytest.raises(RLInputError, match="rl.problems_per_epoch"):
        check_sizes(make_recipe(tmp_path, generator_dir, "x", problems_per_epoch=3))
    with pytest.raises(RecipeError, match="group size and must be at least 2"):  # refused when the recipe loads
        make_recipe(tmp_path, generator_dir, "x", samples_per_problem=1, minibatch_size=2)


# --------------------------------------------------------------------------- TRL's private contract


def test_trl_contract_of_generate_and_score_completions(generator_dir, tmp_path):
    """The override relies on TRL 1.16's private `_generate_and_score_completions`: the keys it returns, advantages
    shaped (B,) in completion order, and a loss that takes (B, T) advantages. If this fails after a TRL upgrade,
    re-read trl/trainer/grpo_trainer.py and adapt rlprm/rl/grpo.py before moving the pin in pyproject.toml."""
    import trl
    from datasets import Dataset
    from trl import GRPOTrainer

    from rlprm.models import load_causal_lm, load_tokenizer
    from rlprm.rl.grpo import TRL_OUTPUT_KEYS, grpo_args

    assert trl.__version__.startswith("1.16."), f"rlprm's GRPO override is written against trl 1.16, got {trl.__version__}"
    seen = {}

    def reward(prompts, completions, completion_ids, **kw):
        seen["ids"] = [list(c) for c in completion_ids]
        return [float(len(c)) for c in completion_ids]  # distinct rewards: non-zero advantages

    recipe = make_recipe(tmp_path, generator_dir, "contract", samples_per_problem=4, minibatch_size=8)
    tokenizer = load_tokenizer(str(generator_dir), padding_side="left")
    model = load_causal_lm(str(generator_dir), "float32", "cpu")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=grpo_args(recipe, tmp_path / "trl", seed=0),
                          train_dataset=Dataset.from_dict({"prompt": ["1 +2 mod 10", "3 -1 last digit"]}),
                          processing_class=tokenizer)
    torch.manual_seed(0)
    inputs = [{"prompt": p} for p in ["1 +2 mod 10", "3 -1 last digit"] for _ in range(4)]
    out = trainer._generate_and_score_completions(inputs)
    for key in TRL_OUTPUT_KEYS:
        assert key in out, f"TRL no longer returns {key!r}"
    ids, mask, adv = out["completion_ids"], out["completion_mask"], out["advantages"]
    B, C = ids.shape
    assert B == 8 and mask.shape == (B, C) and adv.shape == (B,)
    # the reward function saw the completions in the order of the returned tensors (EOS included, padding not)
    assert [ids[i, : int(mask[i].sum())].tolist() for i in range(B)] == seen["ids"]
    lengths = torch.tensor([len(s) for s in seen["ids"]], dtype=torch.float32).reshape(2, 4)
    expected = ((lengths - lengths.mean(1, keepdim=True)) / (lengths.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(adv, expected, atol=1e-5)

    # the loss takes (B, T) advantages: a constant row equals the (B,) form; another tensor changes the loss
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    loss_1d = trainer.compute_loss(trainer.model, out).item()
    loss_2d = trainer.compute_loss(trainer.model, {**out, "advantages": adv.unsqueeze(1).expand(B, C)}).item()
    assert loss_1d == pytest.approx(loss_2d, abs=1e-6)
    varied = adv.unsqueeze(1) * torch.linspace(0, 2, C).unsqueeze(0)
    assert trainer.compute_loss(trainer.model, {**out, "advantages": varied}).item() != pytest.approx(loss_1d, abs=1e-6)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def outcome_run(tmp_path_factory, answering_generator):
    """2 epochs on a generator that answers (a random one answers nothing: every reward -1, every advantage 0)."""
    from rlprm.rl import train

    tmp = tmp_path_factory.mktemp("grpo")
    final = train(make_recipe(tmp, answering_generator, "full", max_new_tokens=64), progress=False)
    return tmp / "full", final


def test_outcome_run_metrics_checkpoints_export(outcome_run):
    from transformers import AutoModelForCausalLM

    run_dir, final = outcome_run
    records = read_metrics(run_dir / "metrics.jsonl")
    iterations = [r for r in records if "rl/reward" in r]
    assert len(iterations) == 2  # 2 epochs x 1 iteration
    for key in LOGGED:
        assert key in iterations[0], key
    assert iterations[0]["time/generate"] > 0 and iterations[0]["time/update"] > 0
    evals = [r for r in records if "eval/answer_accuracy" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "epoch-0002"
    assert (run_dir / "checkpoints" / "epoch-0001" / "state.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(final["export_dir"])
    assert model.config.num_hidden_layers == 2


def test_resume_continues_from_the_checkpoint(answering_generator, outcome_run, tmp_path):
    """Stopped after epoch 1 and resumed, the run ends bit for bit where the uninterrupted `outcome_run` ends: the
    weights and Adam's moments came back (with rewards that differ within groups, lost moments would show)."""
    from transformers import AutoModelForCausalLM

    from rlprm.checkpoint import load_state
    from rlprm.rl import train
    from rlprm.rl.distributed import weights_digest
    from rlprm.rl.run import RLInputError

    first = make_recipe(tmp_path, answering_generator, "resumed", epochs=1, max_new_tokens=64)
    train(first, progress=False)
    with pytest.raises(RLInputError, match="--resume"):
        train(first, progress=False)
    before = load_state(tmp_path / "resumed" / "checkpoints" / "epoch-0001", restore_rng=False)
    train(make_recipe(tmp_path, answering_generator, "resumed", epochs=2, max_new_tokens=64), resume=True,
          progress=False)
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["epoch"] for r in records if "rl/reward" in r] == [1.0, 2.0]  # the log goes on, not over
    assert all(r["rl/reward_std"] > 0 for r in records if "rl/reward" in r)  # non-zero advantages in each epoch
    full_dir = outcome_run[0]
    digest = lambda run: weights_digest(AutoModelForCausalLM.from_pretrained(  # noqa: E731
        run / "checkpoints" / "epoch-0002" / "model"))
    assert digest(tmp_path / "resumed") == digest(full_dir)
    after = load_state(tmp_path / "resumed" / "checkpoints" / "epoch-0002", restore_rng=False)
    assert before["step"] == 1 and after["step"] == 2
    # the optimizer went on from its saved moments: Adam's step count carries over (2 minibatches per iteration)
    step_of = lambda s: max(int(v["step"]) for v in s["policy_optimizer"]["state"].values())  # noqa: E731
    assert (step_of(before), step_of(after)) == (2, 4)


@pytest.mark.parametrize("dense_form", ["score", "log_prob"])
def test_process_mode_gives_per_token_advantages(dense_form, generator_dir, char_tokenizer, tmp_path, monkeypatch):
    """Dense PRM rewards: the advantages handed to TRL's loss are (B, T), vary along a solution, and are 0 after EOS.
    Rollouts are fixed answered solutions (a random tiny policy never writes `# Answer`)."""
    from trl import GRPOTrainer

    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm
    from rlprm.rl import grpo, train
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import render_step

    convention = make_convention("prm", "\n")
    lm = build_tiny_causal_lm(TINY, char_tokenizer, seed=1)
    RewardModel(reward_model_from_causal_lm(convention, lm, char_tokenizer), char_tokenizer, convention).save(tmp_path / "prm")
    texts = [render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")]),
             render_steps([render_step("+", 1, 2, 4), answer_step("4")])]
    solutions = [char_tokenizer(t, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id] for t in texts]

    def fixed(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(solutions[i % 2]) for i in range(len(prompt_ids))], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fixed)
    handed = []
    real = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        handed.append((inputs["advantages"].detach().clone(), inputs["completion_mask"].clone()))
        return real(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    recipe = make_recipe(tmp_path, generator_dir, "dense", epochs=1, max_new_tokens=64, eval_n_max=0,
                         reward={"mode": "dense", "source": "prm", "dense_form": dense_form})
    recipe.model.reward_model = str(tmp_path / "prm")
    final = train(recipe, progress=False)
    assert final["rl/steps_per_solution"] == 2.5 and final["reward/missing_answer_frac"] == 0.0
    assert handed
    for adv, mask in handed:
        assert adv.dim() == 2 and adv.shape == mask.shape
        assert torch.isfinite(adv).all()
        assert (adv[mask == 0] == 0).all()  # nothing after EOS
        for row, m in zip(adv, mask):
            real_tokens = row[m.bool()]
            assert real_tokens.unique().numel() > 1  # steps end at different tokens: not one scalar per solution


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(generator_dir, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    from rlprm.checkpoint import latest_checkpoint
    from rlprm.rl import train
    from rlprm.rl.run import RLError

    calls = []
    real = GRPOTrainer.compute_loss

    def poisoned(self, *args, **kwargs):  # 2 optimizer steps per iteration: epoch 1 is clean, epoch 2 goes NaN
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(GRPOTrainer, "compute_loss", poisoned)
    recipe = make_recipe(tmp_path, generator_dir, "nan", samples_per_problem=2, minibatch_size=2, eval_n_max=0)
    with pytest.raises(RLError, match="not finite.*epoch-0001"):
        train(recipe, progress=False)
    assert latest_checkpoint(tmp_path / "nan").name == "epoch-0001"
    assert not (tmp_path / "nan" / "checkpoints" / "epoch-0002").exists()


def test_entry_point_dispatches_grpo(generator_dir, tmp_path):
    """train_rl.py runs rl.algorithm grpo through rlprm/rl/grpo.py: its size check answers, with exit code 2."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  generator: {generator_dir}\nrun:\n  output_dir: ./out\n"
                      "rl:\n  algorithm: grpo\n  samples_per_problem: 4\n  prompts_per_iteration: 2\n"
                      "  minibatch_size: 3\ntracking:\n  wandb: disabled\n")
    out = subprocess.run([sys.executable, str(root / "rlprm" / "train_rl.py"), str(recipe)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "rl.minibatch_size (3) must divide" in out.stderr


def test_reward_function_scores_with_the_exact_checker(generator_dir, char_tokenizer, tmp_path):
    """reward.source exact in GRPO: the checker's prefix-correctness as step scores, no reward model; and a
    completion stopped at max_new_tokens without EOS is cut (missing-answer reward), not judged as written."""
    from rlprm.data.problems import from_arithmetic
    from rlprm.rl.grpo import RewardFunction
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import Problem, render_step

    problems = from_arithmetic([Problem(1, (("+", 2), ("+", 4)))])
    right = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")])
    wrong = render_steps([render_step("+", 1, 2, 4), render_step("+", 4, 4, 8), answer_step("8")])
    eos = char_tokenizer.eos_token_id
    texts = [right, wrong, right + "\n"]
    ids = [char_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [ids[0] + [eos], ids[1] + [eos], ids[2]]  # all as long as the cap; the third stopped there without EOS
    assert len({len(i) for i in ids}) == 1
    recipe = make_recipe(tmp_path, generator_dir, "exact", max_new_tokens=len(ids[2]),
                         reward={"mode": "dense", "source": "exact", "dense_form": "score"})
    fn = RewardFunction(recipe, problems, char_tokenizer)
    returns = fn(["1 +2 +4\n"] * 3, texts, ids, [0, 0, 0])
    # the checker's prefix-correctness as step values (score form: p_k); the cut one gets the penalty alone
    assert fn.last["rewards"].event_values == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-1.0]]
    assert returns == pytest.approx([1.0, 0.0, -1.0])  # process min: the lowest step score; cut: the penalty
    assert fn.last["rewards"].truncated == [False, False, True]


class _StepScorer:
    """A stand-in PRM: 0.9 for every step of every solution (what matters here is which samples count as answered)."""

    kind = "prm"

    def score_steps(self, problems, solutions, sep="\n", batch_size=64):
        from rlprm.steps import split_steps

        return [[0.9] * len(split_steps(s, sep)) for s in solutions]


def test_math500_reference_solutions_count_as_answered_on_grpos_reward_path(tmp_path, generator_dir):
    """Issue 23 finding 1: on MATH every answered response was rewarded as "missing answer" (0 of 200 references
    answered), so every GRPO advantage was 0. The 500 reference solutions of MATH500, paragraphs as steps, go
    through GRPO's reward function as sampled completions: nearly all are answered and graded right."""
    import json

    from rlprm.models import build_bpe_tokenizer
    from rlprm.data.problems import load_jsonl_problems
    from rlprm.rl.grpo import RewardFunction
    from tests.conftest import shared_file

    path = shared_file("math/math500_test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    problems = load_jsonl_problems(path)
    texts = ["\n\n".join(p.strip() for p in r["solution"].split("\n\n") if p.strip()) for r in rows]
    tok = build_bpe_tokenizer(texts[:100], vocab_size=400, model_max_length=8192)
    eos = tok.eos_token_id
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    reward = {"mode": "sparse", "source": "ground_truth", "missing_answer_reward": -1.0}
    recipe = make_recipe(tmp_path, generator_dir, "m", reward=reward, max_new_tokens=max(map(len, ids)))
    recipe.task.step_separator = "\n\n"
    fn = RewardFunction(recipe, problems, tok)
    returns = fn([p.prompt for p in problems], texts, ids, list(range(len(problems))))
    tr = fn.last["rewards"]
    answered = 1 - tr.stats["missing_answer_frac"]
    right = sum(r == 1.0 for r in returns) / len(returns)
    print(f"MATH500 references through GRPO's reward path: answered {answered:.3f}, graded right {right:.3f}")
    assert answered == 1.0 and right >= 0.99  # measured: 500 of 500 answered, 500 graded right
    assert [r == -1.0 for r in returns] == tr.missing_answer  # only unanswered ones get the penalty

    # dense process rewards (a stand-in PRM): the answered ones get step values, not the penalty
    recipe.reward = recipe.reward.model_copy(update={"mode": "dense", "source": "prm", "dense_form": "score"})
    few = [i for i in range(len(texts)) if len(ids[i]) < 200][:8]
    fn = RewardFunction(recipe, problems, tok, reward_model=_StepScorer())
    returns = fn([problems[i].prompt for i in few], [texts[i] for i in few], [ids[i] for i in few], few)
    tr = fn.last["rewards"]
    assert not any(tr.missing_answer)
    assert all(v == pytest.approx([0.9] * len(v)) and len(v) >= 1 for v in tr.event_values)


class _FixedScorer:
    """A stand-in PRM that gives each solution text the step probabilities the test sets for it."""

    kind = "prm"

    def __init__(self, by_text):
        self.by_text = by_text

    def score_steps(self, problems, solutions, sep="\n", batch_size=64):
        return [list(self.by_text[s]) for s in solutions]


@pytest.mark.parametrize("process_form", ["min", "mean", "sum"])
def test_dense_log_prob_step_values_are_each_steps_own(process_form, tmp_path, generator_dir, char_tokenizer):
    """Issue 23 finding 2: with dense_form log_prob GRPO read floored RUNNING SUMS as step values: [.6, .1, .1] and
    [.6, .5, .5] both gave [-0.511, -0.389, 0.0], and the checker's [1, 0, 0, 0] gave [0, -0.9, 0, 0] (wrong steps
    3-4 looked perfect). Now each step's value is its own log p_k, floored one by one at missing + 0.1 = -0.9 (so an
    answered solution's min or mean stays above a missing answer's -1)."""
    import math

    from rlprm.data.problems import from_arithmetic
    from rlprm.rl.grpo import RewardFunction, grpo_advantages
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import Problem, render_step

    problems = from_arithmetic([Problem(1, (("+", 2), ("+", 4)))])
    a = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")])
    b = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 8), answer_step("8")])
    eos = char_tokenizer.eos_token_id
    ids = [char_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in (a, b)]
    recipe = make_recipe(tmp_path, generator_dir, "lp", max_new_tokens=64, process_advantage=process_form,
                         reward={"mode": "dense", "source": "prm", "dense_form": "log_prob",
                                 "missing_answer_reward": -1.0})
    fn = RewardFunction(recipe, problems, char_tokenizer, reward_model=_FixedScorer({a: [.6, .1, .1], b: [.6, .5, .5]}))
    with pytest.warns(UserWarning) if process_form == "sum" else no_warning():
        returns = fn(["1 +2 +4\n"] * 2, [a, b], ids, [0, 0])
        adv = grpo_advantages(recipe, fn.last, group_size=2, width=max(map(len, ids)))
    values = fn.last["rewards"].event_values
    assert values[0] == pytest.approx([math.log(.6), -0.9, -0.9])
    assert values[1] == pytest.approx([math.log(.6), math.log(.5), math.log(.5)])
    # the solution's value under the process form, what TRL logs: b is the better one
    agg = {"min": min, "mean": lambda v: sum(v) / len(v), "sum": sum}[process_form]
    assert returns == pytest.approx([agg(values[0]), agg(values[1])]) and returns[1] > returns[0]
    assert adv[1, 0] > adv[0, 0]


def test_exact_checker_wrong_steps_never_look_perfect(tmp_path, generator_dir, char_tokenizer):
    """The checker's prefix-correctness [1, 0, 0, 0] under log_prob: every step from the first wrong one on is worth
    the floor -0.9, the lowest value; before, steps 3-4 got 0.0 (perfect) and the worst step the highest advantage."""
    from rlprm.data.problems import from_arithmetic
    from rlprm.rl.grpo import RewardFunction, grpo_advantages
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import Problem, render_step

    problems = from_arithmetic([Problem(1, (("+", 2), ("+", 4), ("+", 1)))])
    right = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), render_step("+", 7, 1, 8),
                          answer_step("8")])
    wrong = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 9), render_step("+", 9, 1, 10),
                          answer_step("10")])
    eos = char_tokenizer.eos_token_id
    ids = [char_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in (right, wrong)]
    recipe = make_recipe(tmp_path, generator_dir, "ex", max_new_tokens=64,
                         reward={"mode": "dense", "source": "exact", "dense_form": "log_prob"})
    fn = RewardFunction(recipe, problems, char_tokenizer)
    fn(["1 +2 +4 +1\n"] * 2, [right, wrong], ids, [0, 0])
    tr = fn.last["rewards"]  # the checker's prefix-correctness [1, 1, 1, 1] and [1, 0, 0, 0], as log_prob values
    assert tr.event_values == [pytest.approx([0.0] * 4), pytest.approx([0.0, -0.9, -0.9, -0.9])]
    adv = grpo_advantages(recipe, fn.last, group_size=2, width=max(map(len, ids)))
    ends = tr.event_positions[1]
    # the wrong solution's tokens get a negative advantage up to its last step, never the highest one
    assert (adv[1, : ends[-1] + 1] < 0).all() and adv[1].max() < adv[0, : tr.event_positions[0][-1] + 1].min()
