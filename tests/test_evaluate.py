import math

import numpy as np
import pytest

from rlprm.evaluate import (
    MAJORITY, ORACLE, RANDOM, WEIGHTED, Pool, bon_curves, load_pool, markdown_table, plot_curves,
    powers_of_two, save_pool, selector_scores,
)
from rlprm.problems import SampleGrade, TaskProblem

from .conftest import shared_file


def _grade(answer, correct, process=None, steps=("s",)):
    return SampleGrade(list(steps), answer, correct, answer is not None, process)


def hand_pool():
    """Problem A: the PRM's favourite is the one right answer, and the wrong answer 7 has the majority."""
    a = [_grade("5", True, True), _grade("7", False, False), _grade("7", False, False), _grade("8", False, False)]
    b = [_grade("1", True, True), _grade("1", True, False), _grade(None, False, False), _grade("2", False, False)]
    pool = Pool([TaskProblem("a", "A\n", "5", text="A"), TaskProblem("b", "B\n", "1", text="B")],
                [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]], [a, b])
    pool.step_scores["prm"] = [[[0.9, 1.0], [0.5, 0.2], [0.6, 0.5], [0.3]], [[0.2], [0.95], [0.1], [0.05]]]
    pool.kinds["prm"] = "prm"
    pool.step_scores["orm"] = [[[0.1], [0.8], [0.7], [0.2]], [[0.6], [0.5], [0.9], [0.1]]]
    pool.kinds["orm"] = "orm"
    return pool


def test_selector_scores_aggregate_prm_steps():
    scores = selector_scores(hand_pool())
    assert set(scores) == {"prm_prod", "prm_min", "prm_last", "prm_mean", "orm"}
    assert scores["prm_prod"][0].tolist() == pytest.approx([0.9, 0.1, 0.3, 0.3])
    assert scores["prm_min"][0].tolist() == pytest.approx([0.9, 0.2, 0.5, 0.3])
    assert scores["prm_last"][0].tolist() == pytest.approx([1.0, 0.2, 0.5, 0.3])
    assert scores["orm"][1].tolist() == pytest.approx([0.6, 0.5, 0.9, 0.1])


def test_curves_at_full_n_are_exact():
    pool = hand_pool()
    curves = bon_curves(pool, selector_scores(pool), [1, 4], resamples=50, seed=0, weighted_by="prm_prod")
    at4 = {name: c[4]["accuracy"]["mean"] for name, c in curves.items()}
    # A: prm picks a0 (right); orm picks a1 (wrong); majority picks 7 (wrong); weighted: 5 has 0.9 > 0.1 + 0.3
    # B: prm_prod picks b1 (right, wrong process); orm picks b2 (no answer); majority 1 (right)
    assert at4["prm_prod"] == 1.0 and at4["orm"] == 0.0
    assert at4[MAJORITY] == 0.5 and at4[WEIGHTED] == 1.0 and at4[ORACLE] == 1.0
    assert curves["prm_prod"][4]["process_correct"]["mean"] == 0.5
    assert curves["prm_prod"][4]["right_answer_wrong_process"]["mean"] == 0.5
    for name in set(curves) - {RANDOM}:  # at N = n only the random pick still varies
        point = curves[name][4]["accuracy"]
        assert point["lo"] == point["hi"] == point["mean"]
    # at N=1 every selector is a random pick: 3 right out of 8 samples
    n1 = curves[RANDOM][1]["accuracy"]
    assert abs(n1["mean"] - 3 / 8) < 0.1 and n1["lo"] <= n1["mean"] <= n1["hi"]


def test_curves_are_seeded():
    pool = hand_pool()
    a = bon_curves(pool, selector_scores(pool), [1, 2, 4], resamples=30, seed=3)
    b = bon_curves(pool, selector_scores(pool), [1, 2, 4], resamples=30, seed=3)
    assert a == b


def test_pool_round_trip_and_report(tmp_path):
    pool = hand_pool()
    save_pool(pool, tmp_path / "pool.jsonl")
    again = load_pool(tmp_path / "pool.jsonl")
    assert again.texts == pool.texts and again.step_scores == pool.step_scores and again.kinds == pool.kinds
    assert [g.answer for g in again.grades[1]] == ["1", "1", None, "2"]
    curves = bon_curves(again, selector_scores(again), powers_of_two(4), resamples=20)
    table = markdown_table(curves)
    assert "| prm_prod |" in table and "N=4" in table and "right answer, wrong step" in table
    plot_curves(curves, tmp_path / "bon.png")
    assert (tmp_path / "bon.png").stat().st_size > 1000


def test_powers_of_two():
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert powers_of_two(6) == [1, 2, 4, 6]
    assert powers_of_two(1) == [1]


@pytest.fixture(scope="module")
def tiny_generator(char_tokenizer):
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm

    return build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
                                char_tokenizer)


def test_best_of_n_api_on_arithmetic(tiny_generator, char_tokenizer):
    from rlprm.config import ArithmeticConfig
    from rlprm.evaluate import best_of_n
    from rlprm.problems import from_arithmetic
    from rlprm.tasks.arithmetic import make_problems

    problems = from_arithmetic(make_problems(ArithmeticConfig(), 4, seed=0))
    metrics, pool = best_of_n(tiny_generator, char_tokenizer, problems, n_max=4, max_new_tokens=20, resamples=10)
    assert pool.n == 4 and len(pool.grades) == 4
    assert "bon/pass@n/N=4/accuracy" in metrics and "bon/majority/N=1/accuracy" in metrics
    assert all(0.0 <= v <= 1.0 for v in metrics.values() if not math.isnan(v))


def test_math500_pipeline_with_a_stand_in_model(tmp_path):
    """Samples, extracts, grades and reports on real MATH500 problems, whatever the (tiny, random) model's accuracy."""
    from rlprm.config import TinyModelConfig
    from rlprm.evaluate import best_of_n, markdown_table
    from rlprm.models import build_bpe_tokenizer, build_tiny_causal_lm
    from rlprm.problems import load_jsonl_problems

    path = shared_file("math/math500_test.jsonl")
    problems = load_jsonl_problems(path, limit=3)
    assert problems[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)" and problems[0].prompt.endswith("\n")
    tokenizer = build_bpe_tokenizer([p.prompt for p in problems] + ["# Answer\n\n\\boxed{3}"], vocab_size=300,
                                    model_max_length=1024)
    model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                                 max_positions=1024), tokenizer)
    metrics, pool = best_of_n(model, tokenizer, problems, n_max=2, max_new_tokens=8, resamples=5)
    assert len(pool.grades) == 3 and all(len(row) == 2 for row in pool.grades)
    assert all(g.process_correct is None for row in pool.grades for g in row)  # MATH: answers only
    assert "bon/majority/N=2/accuracy" in metrics
    # a right answer written by hand grades right through the same path
    from rlprm.problems import grade_samples

    verdict = grade_samples(problems[:1], [["r = 3\n# Answer\n\n(3, \\frac{\\pi}{2})\n"]])[0][0]
    assert verdict.answer_correct and verdict.answer == "(3, \\frac{\\pi}{2})"


def test_gsm8k_problems_load():
    from rlprm.problems import load_jsonl_problems

    problems = load_jsonl_problems(shared_file("math/gsm8k_test.jsonl"), limit=5)
    assert problems[0].gold == "18" and len(problems) == 5


def test_bad_problem_file_names_the_line(tmp_path):
    from rlprm.problems import ProblemFileError, load_jsonl_problems

    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(ProblemFileError, match=f"{path}:2: not valid JSON"):
        load_jsonl_problems(path)
    path.write_text('{"problem": "a"}\n')
    with pytest.raises(ProblemFileError, match=":1: needs string fields"):
        load_jsonl_problems(path)


def test_rlprm_eval_job_end_to_end(tmp_path, char_tokenizer):
    """`rlprm eval` on tiny models built here: pool, scores from a PRM and an ORM, table, plot, metrics."""
    import json

    from rlprm.cli import main
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward_models import RewardModel, make_convention, reward_model_from_causal_lm

    lm = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
                              char_tokenizer)
    lm.save_pretrained(tmp_path / "gen")
    char_tokenizer.save_pretrained(tmp_path / "gen")
    for kind in ("prm", "orm"):
        conv = make_convention(kind, "\n")
        RewardModel(reward_model_from_causal_lm(conv, lm, char_tokenizer), char_tokenizer, conv).save(tmp_path / kind)
    recipe = tmp_path / "bon.yaml"
    recipe.write_text(
        "run: {output_dir: out}\nmodel: {generator: ./gen}\ntracking: {wandb: disabled}\n"
        "eval: {n_max: 4, num_problems: 3, resamples: 10, max_new_tokens: 24, reward_models: {prm: ./prm, orm: ./orm}}\n"
    )
    assert main(["eval", str(recipe), "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in ("pool.jsonl", "bon.md", "bon.png", "bon_curves.json", "metrics.jsonl", "tables/samples.jsonl"):
        assert (out / name).exists(), name
    curves = json.loads((out / "bon_curves.json").read_text())
    assert {"prm_prod", "prm_min", "orm", "majority", "weighted_majority", "random", "pass@n"} <= set(curves)
    rows = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["samples"]) == 4 for r in rows[1:])
    assert set(rows[1]["samples"][0]["scores"]) == {"prm", "orm"}


def test_rlprm_eval_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    from rlprm.cli import main

    recipe = tmp_path / "bon.yaml"
    recipe.write_text("model: {generator: ./nope}\ntracking: {wandb: disabled}\n")
    assert main(["eval", str(recipe)]) == 2
    assert "rlprm prepare" in capsys.readouterr().err
