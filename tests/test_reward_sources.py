"""rlprm/reward/sources.py: one object per reward.source, each giving the grades, step scores and rewards expected on
hand-made texts; a user's Python function as a source, and the errors that name a bad one."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from rlprm.config import Recipe, RecipeError, RewardConfig, validate_recipe
from rlprm.reward.sources import SOURCES, RewardSourceError, load_function, reward_source, source_class
from rlprm.reward.tokens import RewardError

# 93 + 3 - 4: a right solution, one with a wrong second step, one without an answer
RIGHT = "93 + 3 = 96\n96 - 4 = 92\n# Answer\n\n92\n"
WRONG = "93 + 3 = 96\n96 - 4 = 91\n# Answer\n\n91\n"
NONE = "93 + 3 = 96\n96 - 4 = 92\n"
TEXTS = [RIGHT, WRONG, NONE]


def problems(n=3):
    from rlprm.data.problems import from_arithmetic
    from rlprm.tasks.arithmetic import Problem

    return from_arithmetic([Problem(93, (("+", 3), ("-", 4)))]) * n


def recipe(algorithm="ppo", **reward):
    rl = {"algorithm": algorithm, "max_new_tokens": 200}
    if algorithm == "grpo":
        rl["process_advantage"] = "min"
    return Recipe.model_validate({"reward": {"missing_answer_reward": -1.0, **reward}, "rl": rl})


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


class FakePRM:
    """A reward model that gives every text its own fixed step probabilities, and counts its calls."""

    kind = "prm"

    def __init__(self, table):
        self.table, self.calls = table, []

    def score_steps(self, problems, solutions, sep=None, batch_size=32):
        self.calls.append((list(problems), list(solutions)))
        return [list(self.table[s]) for s in solutions]

    def score(self, problems, solutions, aggregate="prod", sep=None, batch_size=32):
        from rlprm.reward.model import aggregate as agg

        return [agg(s, aggregate) for s in self.score_steps(problems, solutions, sep)]


def test_every_config_source_has_one_class():
    from rlprm.config import RewardConfig

    choices = typing.get_args(RewardConfig.model_fields["source"].annotation)
    assert set(SOURCES) == set(choices)
    for name, cls in SOURCES.items():
        assert cls.name == name


def test_grades_are_the_tasks_verdicts_for_every_source():
    grades = reward_source(recipe()).grade(problems(), TEXTS)
    assert [g.answer_correct for g in grades] == [True, False, False]
    assert [g.answered for g in grades] == [True, True, False]
    assert [g.step_correct[:2] for g in grades] == [[True, True], [True, False], [True, True]]


def test_ground_truth_source(char_tokenizer):
    src = reward_source(recipe(source="ground_truth"))
    grades = src.grade(problems(), TEXTS)
    assert src.step_scores(problems(), TEXTS, grades=grades) is None
    ids = [ids_of(char_tokenizer, t) for t in TEXTS]
    tr = src.rewards(TEXTS, ids, grades, None, tokenizer=char_tokenizer)
    assert tr.returns.tolist() == [1.0, 0.0, -1.0]  # right, wrong, no answer
    scores, eligible, thresholded = src.ranking(problems(), TEXTS, grades)
    assert scores == [1.0, 0.0, 0.0] and eligible == [True, False, False] and not thresholded


def test_exact_source_is_prefix_correctness(char_tokenizer):
    src = reward_source(recipe(mode="dense", source="exact", dense_form="min_form"))
    grades = src.grade(problems(), TEXTS)
    scores = src.step_scores(problems(), TEXTS, grades=grades)
    assert scores[:2] == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    ids = [ids_of(char_tokenizer, t) for t in TEXTS]
    tr = src.rewards(TEXTS, ids, grades, scores, tokenizer=char_tokenizer)
    assert tr.returns.tolist()[:2] == pytest.approx([1.0, 0.0]) and tr.returns[2].item() == -1.0
    assert source_class(recipe(source="exact")) is SOURCES["exact"]
    with pytest.raises(RewardSourceError, match="arithmetic"):
        SOURCES["exact"].check(Recipe.model_validate({"task": {"name": "gsm8k", "test_path": __file__}}))


def test_prm_source_scores_with_its_model_and_ranks_answered_samples(char_tokenizer):
    prm = FakePRM({RIGHT: [0.9, 0.8, 0.9], WRONG: [0.9, 0.2, 0.5], NONE: [0.9, 0.7]})
    src = reward_source(recipe(mode="dense", source="prm", dense_form="min_form"), prm)
    grades = src.grade(problems(), TEXTS)
    scores = src.step_scores(problems(), TEXTS, grades=grades)
    assert scores == [[0.9, 0.8, 0.9], [0.9, 0.2, 0.5], [0.9, 0.7]]
    assert prm.calls[0][0] == [p.text for p in problems()]  # the bare problem statements, in sample order
    ids = [ids_of(char_tokenizer, t) for t in TEXTS]
    tr = src.rewards(TEXTS, ids, grades, scores, tokenizer=char_tokenizer)
    assert tr.returns.tolist() == pytest.approx([0.8, 0.2, -1.0])  # min_form: the lowest step; no answer
    sparse = reward_source(recipe(source="prm", sparse_aggregate="prod"), prm)
    ranked, eligible, thresholded = sparse.ranking(problems(), TEXTS, grades)
    assert ranked == pytest.approx([0.648, 0.09, 0.63]) and eligible == [True, True, False] and thresholded
    with pytest.raises(RewardSourceError, match="is a prm"):
        reward_source(recipe(source="orm"), prm)
    nan = reward_source(recipe(source="prm"), FakePRM({RIGHT: [math.nan], WRONG: [0.5], NONE: [0.5]}))
    with pytest.raises(RewardError, match="non-finite"):
        nan.ranking(problems(), TEXTS, grades)


def test_confidence_source_reads_the_starts_logprobs(char_tokenizer):
    src = reward_source(recipe(mode="dense", source="confidence", dense_form="min_form"))
    assert src.reads_start_logprobs
    ids = [ids_of(char_tokenizer, RIGHT)]  # steps end at tokens 11, 23, 36; EOS at 37
    logp = torch.full((1, 38), -0.01)
    logp[0, 5], logp[0, 20], logp[0, 30] = -0.2, -0.7, -0.4
    mask = torch.ones(1, 38, dtype=torch.bool)
    scores = src.step_scores(problems(1), [RIGHT], ids, start_logprobs=logp, mask=mask, tokenizer=char_tokenizer)
    assert scores == [pytest.approx([math.exp(-0.2), math.exp(-0.7), math.exp(-0.4)])]
    with pytest.raises(RewardError, match="log-probs"):
        src.step_scores(problems(1), [RIGHT], ids, tokenizer=char_tokenizer)


# a user's reward functions (reward.function: "tests.test_reward_sources:NAME")
def shorter_is_better(problems, solutions, **kwargs):
    """Sparse: 1 / number of lines."""
    assert kwargs["sep"] == "\n" and kwargs["answers"] == ["92"] * len(solutions)
    return [1.0 / len(s.splitlines()) for s in solutions]


def half_per_step(problems, solutions, **kwargs):
    """Dense: 0.5 for every step."""
    from rlprm.steps import split_steps

    return [[0.5] * len(split_steps(s, kwargs["sep"])) for s in solutions]


def too_high(problems, solutions, **kwargs):
    return [2.0 for _ in solutions]


def too_few(problems, solutions, **kwargs):
    return [0.5]


NOT_CALLABLE = 3


def test_python_function_source(char_tokenizer):
    spec = "tests.test_reward_sources:shorter_is_better"
    src = reward_source(recipe(source="python", function=spec))
    grades = src.grade(problems(), TEXTS)
    ids = [ids_of(char_tokenizer, t) for t in TEXTS]
    scores = src.step_scores(problems(), TEXTS, ids, grades)
    assert scores == [[pytest.approx(1 / 5)], [pytest.approx(1 / 5)], [pytest.approx(1 / 2)]]
    tr = src.rewards(TEXTS, ids, grades, scores, tokenizer=char_tokenizer)
    assert tr.returns.tolist() == pytest.approx([0.2, 0.2, -1.0])  # the unanswered one gets the missing reward
    ranked, eligible, thresholded = src.ranking(problems(), TEXTS, grades)
    assert ranked == pytest.approx([0.2, 0.2, 0.5]) and eligible == [True, True, False] and thresholded
    dense = reward_source(recipe("grpo", mode="dense", source="python", dense_form="score",
                                 function="tests.test_reward_sources:half_per_step"))
    scores = dense.step_scores(problems(), TEXTS, ids, grades)
    assert scores == [[0.5] * 3, [0.5] * 3, [0.5] * 2]
    tr = dense.rewards(TEXTS, ids, grades, scores, tokenizer=char_tokenizer)
    assert tr.objective.tolist() == pytest.approx([0.5, 0.5, -1.0])  # GRPO's min of the step values


@pytest.mark.parametrize("name, match", [
    ("too_high", r"reward.function tests.test_reward_sources:too_high: solution 0 got 2.0; .*\[0, 1\]"),
    ("too_few", r"reward.function tests.test_reward_sources:too_few returned 1 entries for 3 solutions"),
])
def test_a_bad_function_return_names_the_function(name, match):
    src = reward_source(recipe(source="python", function=f"tests.test_reward_sources:{name}"))
    with pytest.raises(RewardError, match=match):
        src.step_scores(problems(), TEXTS)


def test_a_function_that_cannot_be_loaded_is_named():
    with pytest.raises(RewardSourceError, match="cannot import module 'tests.no_such_module'"):
        load_function("tests.no_such_module:f")
    with pytest.raises(RewardSourceError, match="has no attribute 'nope'"):
        load_function("tests.test_reward_sources:nope")
    with pytest.raises(RewardSourceError, match="not a callable"):
        load_function("tests.test_reward_sources:NOT_CALLABLE")
    with pytest.raises(ValueError, match="needs reward.function"):
        RewardConfig(source="python")
    with pytest.raises(ValueError, match="read by reward.source python only"):
        RewardConfig(source="prm", function="a:b")


def test_held_out_reward_is_the_sources_solution_reward(char_tokenizer):
    from rlprm.evaluation.evaluate import Pool, held_out_reward

    ps = problems(1)
    ids = [[ids_of(char_tokenizer, t) for t in TEXTS]]
    pool = Pool(ps, [TEXTS], [reward_source(recipe()).grade(ps * 3, TEXTS)], response_ids=ids)
    r = recipe(source="python", function="tests.test_reward_sources:shorter_is_better")
    assert held_out_reward(r, pool, char_tokenizer) == pytest.approx((0.2 + 0.2 - 1.0) / 3)
    assert held_out_reward(recipe(), pool, char_tokenizer) == pytest.approx(0.0)  # 1, 0, -1


def test_moved_reward_model_keys_name_their_new_home(tmp_path):
    for key in ("adapter", "reference_model", "implicit_beta", "system_prompt"):
        with pytest.raises(RecipeError, match=rf"rm\.{key}: moved: `reward\.{key}`"):
            validate_recipe({"rm": {key: "qwen_prm"}}, tmp_path)
    assert validate_recipe({"reward": {"adapter": "qwen_prm"}}, tmp_path).reward.adapter == "qwen_prm"


CALLS: list = []


def answer_length_steps(problems, solutions, **kwargs):
    """Dense: each step scores by its length (longer steps lower), and every call is recorded."""
    from rlprm.steps import split_steps

    CALLS.append((list(problems), list(solutions), kwargs["completion_ids"]))
    return [[1.0 / (1 + len(step) / 10) for step in split_steps(s, kwargs["sep"])] for s in solutions]


def test_a_python_function_trains_ppo_and_scores_the_held_out_reward(answering_generator, tmp_path):
    """reward.source python end to end: PPO's rollouts and the held-out samples are scored by the user's function
    (its scores reach the rewards: the logged reward is not the missing-answer reward of every sample)."""
    from rlprm.rl import train
    from rlprm.tracking import read_metrics

    from .conftest import RL_SEED

    CALLS.clear()
    data = {"run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "seed": RL_SEED, "threads": 1},
            "model": {"generator": str(answering_generator)},
            "reward": {"mode": "dense", "source": "python", "dense_form": "min_form",
                       "function": "tests.test_reward_sources:answer_length_steps"},
            "rl": {"epochs": 1, "problems_per_epoch": 2, "prompts_per_iteration": 2, "samples_per_problem": 2,
                   "max_new_tokens": 80, "minibatch_size": 2, "ppo_epochs": 1, "learning_rate": 1e-3,
                   "value_learning_rate": 1e-3, "eval_n_max": 2, "eval_num_problems": 2},
            "eval": {"resamples": 5}, "tracking": {"wandb": "disabled"}}
    train(validate_recipe(data, tmp_path), progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rollout = [c for c in CALLS if len(c[1]) == 4 and c[2] is not None]
    problems_seen, texts, ids = rollout[0]  # the rollout: 2 prompts x 2 samples, token ids handed over with the texts
    assert len(set(problems_seen)) == 2 and len(ids) == 4 and all(len(x) >= len(t) for x, t in zip(ids, texts))
    step = next(r for r in records if "rl/reward" in r)
    assert step["reward/missing_answer_frac"] < 1 and step["rl/reward"] > -1  # some answered sample was scored
    assert all(r["eval/reward"] is not None for r in records if "eval/answer_accuracy" in r)
