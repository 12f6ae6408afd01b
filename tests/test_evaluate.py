import json
import math

import numpy as np
import pytest

from rlprm.evaluation.evaluate import (
    CONFIDENCE, DIFFERENCES_KEY, LIKELIHOOD, MAJORITY, ORACLE, RANDOM, WEIGHTED, Pool, bon_bootstrap, bon_curves,
    bon_curves_seeds, bon_differences, load_pool, markdown_table, parse_difference, plot_by_generator, plot_curves,
    powers_of_two, sample_rates, save_pool, selector_scores,
)
from rlprm.data.problems import SampleGrade, TaskProblem

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


def test_curves_at_full_n_resample_problems():
    """At N = n every selector's pick is fixed per problem, so only the problem resampling moves a curve: a
    selector right on every problem (or on none) is a point, one right on one problem of two is not."""
    pool = hand_pool()
    curves = bon_curves(pool, selector_scores(pool), [1, 4], resamples=400, seed=0, weighted_by="prm_prod")
    at4 = {name: c[4]["accuracy"] for name, c in curves.items()}
    # A: prm picks a0 (right); orm picks a1 (wrong); majority picks 7 (wrong); weighted: 5 has 0.9 > 0.1 + 0.3
    # B: prm_prod picks b1 (right, wrong process); orm picks b2 (no answer); majority 1 (right)
    for name, value in [("prm_prod", 1.0), ("orm", 0.0), (WEIGHTED, 1.0), (ORACLE, 1.0)]:
        assert at4[name] == {"mean": value, "lo": value, "hi": value}, name
    # majority is right on B only: resampled problem sets score 0, 1/2 or 1
    assert abs(at4[MAJORITY]["mean"] - 0.5) < 0.06 and at4[MAJORITY]["lo"] == 0.0 and at4[MAJORITY]["hi"] == 1.0
    proc = curves["prm_prod"][4]["process_correct"]
    assert abs(proc["mean"] - 0.5) < 0.06 and (proc["lo"], proc["hi"]) == (0.0, 1.0)
    assert abs(curves["prm_prod"][4]["right_answer_wrong_process"]["mean"] - 0.5) < 0.06
    # at N=1 every selector is a random pick: 3 right out of 8 samples
    n1 = curves[RANDOM][1]["accuracy"]
    assert abs(n1["mean"] - 3 / 8) < 0.06 and n1["lo"] <= n1["mean"] <= n1["hi"]
    assert curves["prm_prod"][1]["accuracy"]["mean"] == n1["mean"]  # paired: the same single draw


def test_curves_are_seeded():
    pool = hand_pool()
    a = bon_curves(pool, selector_scores(pool), [1, 2, 4], resamples=30, seed=3)
    b = bon_curves(pool, selector_scores(pool), [1, 2, 4], resamples=30, seed=3)
    c = bon_curves(pool, selector_scores(pool), [1, 2, 4], resamples=30, seed=4)
    assert a == b and a != c


def same_answer_pool(rows, gold="5"):
    """One problem per row of (answer, correct) samples, one step each, process = answer correctness."""
    grades = [[_grade(ans, ok, ok) for ans, ok in row] for row in rows]
    problems = [TaskProblem(f"p{i}", f"P{i}\n", gold, text=f"P{i}") for i in range(len(rows))]
    return Pool(problems, [[f"s{i}{j}" for j in range(len(row))] for i, row in enumerate(rows)], grades)


def test_interval_at_full_n_is_not_a_point_when_problems_differ():
    # one easy problem, one hard, one half-and-half: the problem draw alone moves accuracy at N = n
    pool = same_answer_pool([[("5", True)] * 4, [("7", False)] * 4, [("5", True), ("5", True), ("7", False),
                                                                    ("7", False)]])
    curves = bon_curves(pool, {}, [1, 4], resamples=300, seed=1)
    for name in (RANDOM, MAJORITY, ORACLE):
        point = curves[name][4]["accuracy"]
        assert point["lo"] < point["mean"] < point["hi"], name
    assert curves[ORACLE][4]["accuracy"]["hi"] == 1.0 and curves[ORACLE][4]["accuracy"]["lo"] <= 1 / 3


def test_one_problem_with_identical_samples_is_a_point():
    pool = same_answer_pool([[("5", True)] * 4])
    scores = {"prm_prod": np.full((1, 4), 0.3), CONFIDENCE: np.full((1, 4), -0.2)}
    curves = bon_curves(pool, scores, [1, 2, 4], resamples=50)
    assert set(curves) == {"prm_prod", CONFIDENCE, RANDOM, ORACLE, MAJORITY, WEIGHTED}
    for name, c in curves.items():
        for N, point in c.items():
            assert point["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}, (name, N)


def test_difference_of_always_right_minus_never_right_is_exactly_one():
    rows = [[("5", True), ("7", False), ("5", True), ("8", False)], [("5", True), ("6", False), ("6", False),
                                                                    ("6", False)]]
    pool = same_answer_pool(rows)
    correct = pool.correct().astype(float)
    scores = {"good": correct, "bad": 1.0 - correct}
    diffs = bon_differences(pool, scores, [1, 4], pairs=["good-bad", ("bad", "good")], resamples=200)
    assert diffs["good_minus_bad"][4]["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert diffs["good_minus_bad"][4]["process_correct"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert diffs["bad_minus_good"][4]["accuracy"] == {"mean": -1.0, "lo": -1.0, "hi": -1.0}
    # at N=1 both take the one drawn sample: paired draws make the difference exactly 0
    assert diffs["good_minus_bad"][1]["accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}


def test_paired_differences_of_identical_selectors_are_exactly_zero():
    pool = hand_pool()
    s = selector_scores(pool)["prm_prod"]
    scores = {"x": s, "y": s.copy(), "flat": np.zeros_like(s)}
    diffs = bon_differences(pool, scores, [1, 2, 4], pairs=["x-y", ("flat", RANDOM)], resamples=100, seed=5)
    # a constant score takes the first of the random order, which is exactly the random selector's pick
    for name in ("x_minus_y", "flat_minus_random"):
        for N in (1, 2, 4):
            for metric in ("accuracy", "process_correct"):
                assert diffs[name][N][metric] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}, (name, N, metric)
    curves, again = bon_bootstrap(pool, scores, [1, 2, 4], ["x-y"], resamples=100, seed=5)
    assert again["x_minus_y"] == diffs["x_minus_y"] and curves["x"] == curves["y"]


def test_default_differences_and_their_process_intervals():
    pool = hand_pool()
    pool.sample_scores[CONFIDENCE] = [[-0.1, -2.0, -3.0, -1.0], [-0.5, -0.2, -4.0, -1.0]]
    pool.sample_scores[LIKELIHOOD] = [[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -3.0, -4.0]]
    curves, diffs = bon_bootstrap(pool, selector_scores(pool), [1, 4], resamples=100)
    assert list(diffs) == [f"prm_prod_minus_{b}" for b in ("orm", MAJORITY, CONFIDENCE, LIKELIHOOD, RANDOM)]
    assert set(diffs["prm_prod_minus_orm"][4]) == {"accuracy", "process_correct"}
    assert set(diffs["prm_prod_minus_majority"][4]) == {"accuracy"}  # a vote picks an answer, not a solution
    # prm_prod is right on both problems at N=4, orm on none
    assert diffs["prm_prod_minus_orm"][4]["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    # without a PRM there is no default difference; without an ORM the others remain
    assert bon_differences(pool, {"orm": selector_scores(pool)["orm"]}, [4], resamples=10) == {}
    pool.kinds.pop("orm")
    pool.step_scores.pop("orm")
    assert "prm_prod_minus_orm" not in bon_differences(pool, selector_scores(pool), [4], resamples=10)


def test_parse_difference_handles_hyphenated_names():
    selectors = ["my-prm_prod", "orm", MAJORITY]
    assert parse_difference("my-prm_prod-orm", selectors) == ("my-prm_prod", "orm")
    assert parse_difference("orm-majority", selectors) == ("orm", MAJORITY)
    with pytest.raises(ValueError, match="not `A-B`"):
        parse_difference("prm_prod-orm", selectors)
    with pytest.raises(ValueError, match="not `A-B`"):
        bon_differences(hand_pool(), selector_scores(hand_pool()), [4], pairs=["prm_prod-nope"], resamples=5)


def test_confidence_selector_picks_the_most_confident_sample():
    # the most confident sample (highest lowest-token log-prob) is the right one in A and a wrong one in B
    pool = hand_pool()
    pool.sample_scores[CONFIDENCE] = [[-0.1, -2.0, -3.0, -1.0], [-5.0, -0.2, -4.0, -0.05]]
    pool.sample_scores[LIKELIHOOD] = [[-9.0, -2.0, -3.0, -1.0], [-1.0, -2.0, -3.0, -4.0]]
    scores = selector_scores(pool)
    assert scores[CONFIDENCE].tolist() == pool.sample_scores[CONFIDENCE]
    curves = bon_curves(pool, scores, [4], resamples=200)
    conf = curves[CONFIDENCE][4]["accuracy"]
    # confidence: A -> a0 (right), B -> b3 (wrong); likelihood: A -> a3 (wrong), B -> b0 (right, right steps)
    assert abs(conf["mean"] - 0.5) < 0.1 and (conf["lo"], conf["hi"]) == (0, 1)
    assert curves[LIKELIHOOD][4]["process_correct"] == curves[LIKELIHOOD][4]["accuracy"]  # b0's steps are right
    diffs = bon_differences(pool, scores, [4], pairs=[(CONFIDENCE, LIKELIHOOD)], resamples=200)
    # paired: a resample of k copies of A (of 2) scores (k - (2 - k)) / 2 = k - 1: -1 with B twice, +1 with A twice
    d = diffs["confidence_minus_likelihood"][4]["accuracy"]
    assert (d["lo"], d["hi"]) == (-1.0, 1.0) and abs(d["mean"]) < 0.2
    one = same_answer_pool([[("5", True), ("7", False), ("8", False)]])
    one.sample_scores[CONFIDENCE] = [[-0.5, -0.1, -0.3]]
    picked = bon_curves(one, selector_scores(one), [3], resamples=20)[CONFIDENCE][3]["accuracy"]
    assert picked == {"mean": 0.0, "lo": 0.0, "hi": 0.0}  # the max (-0.1) is the wrong answer 7
    one.sample_scores[CONFIDENCE] = [[-0.05, -0.1, -0.3]]
    picked = bon_curves(one, selector_scores(one), [3], resamples=20)[CONFIDENCE][3]["accuracy"]
    assert picked == {"mean": 1.0, "lo": 1.0, "hi": 1.0}


def test_weighted_vote_never_goes_to_a_class_without_votes():
    # every sample says 5 (right) with weight 0: only that class got votes, whatever the weights
    pool = same_answer_pool([[("5", True)] * 4, [("5", True)] * 4])
    for w in (0.0, 1e-12):
        curves = bon_curves(pool, {"prm_prod": np.full((2, 4), w)}, [1, 2, 4], resamples=200, weighted_by="prm_prod")
        for N in (1, 2, 4):
            assert curves[WEIGHTED][N]["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}, (w, N)
            assert curves[MAJORITY][N]["accuracy"]["mean"] == 1.0


def test_vote_ties_between_voted_classes_stay_random():
    pool = same_answer_pool([[("5", True), ("7", False)]])
    curves = bon_curves(pool, {"prm_prod": np.full((1, 2), 0.5)}, [2], resamples=400, seed=2)
    for name in (MAJORITY, WEIGHTED):
        assert 0.4 < curves[name][2]["accuracy"]["mean"] < 0.6, name
    # a heavier class wins outright
    curves = bon_curves(pool, {"prm_prod": np.array([[0.6, 0.5]])}, [2], resamples=50)
    assert curves[WEIGHTED][2]["accuracy"]["mean"] == 1.0


def test_seeds_share_the_problem_draw_and_average_within_a_resample():
    # seed 1 solves A only, seed 2 solves B only: each alone swings with the problem draw, their mean never does
    s1 = same_answer_pool([[("5", True)] * 3, [("7", False)] * 3])
    s2 = same_answer_pool([[("7", False)] * 3, [("5", True)] * 3])
    for pool in (s1, s2):
        alone = bon_curves(pool, {}, [1, 3], resamples=200)[RANDOM][3]["accuracy"]
        assert alone["lo"] == 0.0 and alone["hi"] == 1.0
    both = bon_curves_seeds([s1, s2], [{}, {}], [1, 3], resamples=200)
    for name in (RANDOM, MAJORITY, ORACLE):
        for N in (1, 3):
            assert both[name][N]["accuracy"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}, (name, N)
    # same seed twice = that seed alone
    assert bon_curves_seeds([s1, s1], [{}, {}], [3], resamples=100, seed=4)[RANDOM][3]["accuracy"]["mean"] == \
        pytest.approx(bon_curves(s1, {}, [3], resamples=100, seed=4)[RANDOM][3]["accuracy"]["mean"], abs=0.1)
    # a selector right on every problem of every seed is a point; differences work across seeds too
    c1, c2 = s1.correct().astype(float), s2.correct().astype(float)
    curves, diffs = bon_bootstrap([s1, s2], [{"good": c1}, {"good": c2}], [3], [("good", RANDOM)], resamples=100)
    assert curves["good"][3]["accuracy"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert diffs["good_minus_random"][3]["accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    other = same_answer_pool([[("5", True)] * 3, [("7", False)] * 3])
    other.problems[0] = TaskProblem("zz", "Z\n", "5")
    with pytest.raises(ValueError, match="same problems"):
        bon_curves_seeds([s1, other], [{}, {}], [3], resamples=5)
    with pytest.raises(ValueError, match="every N"):
        bon_curves(s1, {}, [4], resamples=5)


def test_resampling_seeds_widens_the_interval_and_keeps_differences_paired():
    """Two training seeds of the same pool: with seed 0 both models pick the right sample everywhere, with seed 1
    both pick a wrong one. Averaged over seeds each is 0.5 in every resample; with the seeds resampled it is 0, 0.5
    or 1, but the two models draw the same seeds, so their difference stays exactly 0."""
    pool = same_answer_pool([[("5", True), ("7", False), ("8", False)]] * 4)
    good = np.tile([1.0, 0.0, 0.0], (4, 1))
    bad = np.tile([0.0, 1.0, 0.0], (4, 1))
    scores = [{"a": good, "b": good.copy()}, {"a": bad, "b": bad.copy()}]
    fixed, diffs = bon_bootstrap([pool, pool], scores, [3], [("a", "b")], resamples=300, seed=2)
    assert fixed["a"][3]["accuracy"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    wide, diffs = bon_bootstrap([pool, pool], scores, [3], [("a", "b")], resamples=300, seed=2, resample_seeds=True)
    assert (wide["a"][3]["accuracy"]["lo"], wide["a"][3]["accuracy"]["hi"]) == (0.0, 1.0)
    assert abs(wide["a"][3]["accuracy"]["mean"] - 0.5) < 0.08
    assert diffs["a_minus_b"][3]["accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    # one seed: resampling seeds changes nothing, the problem and sample draws are the same
    one = bon_bootstrap(pool, scores[0], [1, 3], resamples=100, seed=3)[0]
    assert bon_bootstrap(pool, scores[0], [1, 3], resamples=100, seed=3, resample_seeds=True)[0] == one


def test_large_pool_runs_in_chunks():
    """200 problems x 64 samples x 1000 resamples (the real scale) runs, in chunks, with a problem-level spread."""
    rng = np.random.default_rng(0)
    P, n = 200, 64
    skill = rng.random(P)
    rows = [[("5", True) if rng.random() < skill[i] else (str(rng.integers(6, 9)), False) for _ in range(n)]
            for i in range(P)]
    pool = same_answer_pool(rows)
    scores = {"prm_prod": rng.random((P, n)) + 0.5 * pool.correct()}
    curves = bon_curves(pool, scores, powers_of_two(n), resamples=1000)
    top = curves["prm_prod"][64]["accuracy"]
    assert 0 < top["hi"] - top["lo"] < 0.2  # problem-level spread, not a point
    assert curves[ORACLE][64]["accuracy"]["mean"] >= top["mean"] >= curves[RANDOM][64]["accuracy"]["mean"]


def test_pool_round_trip_and_report(tmp_path):
    pool = hand_pool()
    pool.sample_scores[CONFIDENCE] = [[-0.1, -2.0, -3.0, -1.0], [-0.5, -0.2, -4.0, -1.0]]
    pool.grades[0][0].shortcut = True
    pool.grades[0][1].shortcut = False
    save_pool(pool, tmp_path / "pool.jsonl")
    again = load_pool(tmp_path / "pool.jsonl")
    assert again.texts == pool.texts and again.step_scores == pool.step_scores and again.kinds == pool.kinds
    assert again.sample_scores == pool.sample_scores
    assert [g.shortcut for g in again.grades[0]] == [True, False, None, None]
    assert [g.answer for g in again.grades[1]] == ["1", "1", None, "2"]
    curves, diffs = bon_bootstrap(again, selector_scores(again), powers_of_two(4), resamples=20)
    assert "prm_prod_minus_confidence" in diffs
    table = markdown_table(curves, differences=diffs)
    assert "| prm_prod |" in table and "N=4" in table and "right answer, wrong step" in table
    assert "| prm_prod - orm | " in table and "+100.0 [+100.0, +100.0]" in table
    assert "Paired differences in process-correct rate" in table
    assert "Paired differences" not in markdown_table(curves)
    plot_curves(curves, tmp_path / "bon.png")
    assert (tmp_path / "bon.png").stat().st_size > 1000


def test_bon_plot_gives_every_selector_its_own_look(tmp_path):
    """15 selectors (as `rlprm eval` draws with 2 PRMs under 4 aggregations): no two share colour and line style,
    and the figure is written (its legend sits outside the axes; no pixel test)."""
    from rlprm.evaluation.evaluate import selector_styles

    names = [f"prm{i}_{agg}" for i in range(3) for agg in ("prod", "min", "last", "mean")] + ["majority", "random",
                                                                                               "pass@n"]
    styles = selector_styles(names)
    looks = {(tuple(s["color"]), s["linestyle"]) for s in styles.values()}
    assert len(names) == 15 and len(looks) == 15
    assert styles["random"]["linestyle"] == "--"
    point = {"accuracy": {"mean": 0.5, "lo": 0.4, "hi": 0.6}}
    curves = {name: {1: point, 2: point, 4: point} for name in names}
    plot_curves(curves, tmp_path / "bon.png", title="fifteen selectors")
    assert (tmp_path / "bon.png").stat().st_size > 1000


def test_old_pool_files_still_load(tmp_path):
    """A pool.jsonl written before sample scores and shortcut verdicts existed."""
    pool = hand_pool()
    save_pool(pool, tmp_path / "pool.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    lines[0].pop("sample_scores")
    for row in lines[1:]:
        for sample in row["samples"]:
            sample.pop("sample_scores"), sample.pop("shortcut"), sample.pop("carry_drop")
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    old = load_pool(tmp_path / "old.jsonl")
    assert old.sample_scores == {} and all(g.shortcut is None and g.carry_drop is None for row in old.grades for g in row)
    curves, diffs = bon_bootstrap(old, selector_scores(old), [1, 4], resamples=10)
    assert CONFIDENCE not in curves and list(diffs) == ["prm_prod_minus_orm", "prm_prod_minus_majority",
                                                        "prm_prod_minus_random"]


def test_plot_by_generator(tmp_path):
    pool = hand_pool()
    start = bon_curves(pool, selector_scores(pool), [1, 2, 4], resamples=20)
    tuned = json.loads(json.dumps({**start, DIFFERENCES_KEY: {}}))  # as read back from bon_curves.json
    path = tmp_path / "fig.png"
    plot_by_generator({"start": start, "ppo_dense_prm": tuned}, path, selectors=["prm_prod", "orm", MAJORITY])
    assert path.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp*"))
    plot_by_generator({"start": start}, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 1000


def test_sample_rates_report_trace_error_and_shortcuts(tmp_path):
    pool = hand_pool()  # right answers: a0 (right steps), b0 (right steps), b1 (a wrong step)
    for row in pool.grades:
        for g in row:
            g.shortcut = False
            g.carry_drop = False
    pool.grades[1][1].shortcut = True
    pool.grades[0][1].carry_drop = pool.grades[0][2].carry_drop = True
    rates = sample_rates(pool)
    assert rates["eval/answer_accuracy"] == 3 / 8 and rates["eval/process_accuracy"] == 2 / 8
    assert rates["eval/trace_error"] == pytest.approx(1 / 3) and rates["eval/shortcut_rate"] == 1 / 8
    assert rates["eval/carry_drop_rate"] == 2 / 8
    # saved and read back, the verdicts stay
    save_pool(pool, tmp_path / "pool.jsonl")
    assert sample_rates(load_pool(tmp_path / "pool.jsonl"))["eval/carry_drop_rate"] == 2 / 8
    math_pool = same_answer_pool([[("5", True), ("7", False)]])
    math_pool.grades[0][0] = _grade("5", True, None)
    rates = sample_rates(math_pool)
    assert rates["eval/trace_error"] is None and rates["eval/shortcut_rate"] is None


def test_grades_flag_the_last_digit_shortcut():
    from rlprm.config import ArithmeticConfig
    from rlprm.data.problems import from_arithmetic, grade_samples
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import make_problems, reference_solution, shortcut_solution

    problem = next(p for p in make_problems(ArithmeticConfig(), 50, seed=0) if shortcut_solution(p))
    task = from_arithmetic([problem])
    short, ref = grade_samples(task, [[render_steps(shortcut_solution(problem)),
                                       render_steps(reference_solution(problem))]])[0]
    assert short.shortcut is True and short.answer_correct and not short.process_correct
    assert ref.shortcut is False and ref.process_correct and ref.carry_drop is False
    from rlprm.tasks.arithmetic import Problem, carry_drop_solution

    carry = Problem(38, (("+", 5), ("+", 1)), "none")
    drop, = grade_samples(from_arithmetic([carry]), [[render_steps(carry_drop_solution(carry))]])[0]
    assert drop.carry_drop is True and drop.shortcut is False and not drop.answer_correct
    other = TaskProblem("m", "What is 2+2?\n", "4", text="What is 2+2?")
    assert grade_samples([other], [["# Answer\n\n4"]])[0][0].shortcut is None


def test_eval_differences_are_validated_at_recipe_load(tmp_path):
    from rlprm.config import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    # every selector name rlprm.evaluation.evaluate makes is accepted (config.py keeps its own list of them)
    ok = ("eval: {reward_models: {prm: ./prm, orm: ./orm}, differences: "
          f"[prm_prod-orm, prm_min-{CONFIDENCE}, {MAJORITY}-{WEIGHTED}, {RANDOM}-{ORACLE}, {LIKELIHOOD}-{RANDOM}]}}\n")
    path.write_text(ok)
    assert load_recipe(path).eval.differences[0] == "prm_prod-orm"
    for bad in ["prm_prod", "prm_prod-nope", "orm-orm", "prm_best-orm"]:
        path.write_text(f"eval: {{reward_models: {{prm: ./prm, orm: ./orm}}, differences: [{bad}]}}\n")
        with pytest.raises(RecipeError, match="differences entry"):
            load_recipe(path)


def _independent_logprobs(model, prompt_ids, completion):
    """log p of each completion token, one unpadded forward pass per token (no batching, no cache)."""
    import torch

    out = []
    with torch.no_grad():
        for k in range(len(completion)):
            logits = model(torch.tensor([prompt_ids + completion[:k]])).logits[0, -1].double()
            out.append(float(torch.log_softmax(logits, -1)[completion[k]]))
    return out


def test_response_logprobs_match_a_per_token_computation(tiny_generator, char_tokenizer):
    from rlprm.evaluation.evaluate import response_logprobs

    eos = char_tokenizer.eos_token_id
    enc = lambda text: char_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = ["12 + 3\n", "7 -1 max\n", "5\n"]
    completions = [enc("12 + 3 = 15\n") + [eos], enc("7"), enc("5 + 5 = 10\n# Answer\n\n0") + [eos]]
    got = response_logprobs(tiny_generator, char_tokenizer, prompts, completions, batch_size=2)
    for prompt, completion, lp in zip(prompts, completions, got):
        want = _independent_logprobs(tiny_generator, char_tokenizer(prompt)["input_ids"], completion)
        assert lp.shape == (len(completion),) and lp == pytest.approx(want, abs=1e-5)
    # a budget of one row per batch changes nothing
    again = response_logprobs(tiny_generator, char_tokenizer, prompts, completions, max_logits=1)
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(got, again))


def test_sample_pool_stores_the_generators_confidence(tiny_generator, char_tokenizer):
    """Stored confidence / likelihood = min / sum of independently computed token log-probs at temperature 1."""
    from rlprm.config import ArithmeticConfig
    from rlprm.evaluation.evaluate import sample_pool
    from rlprm.data.problems import from_arithmetic
    from rlprm.sampling import sample
    from rlprm.tasks.arithmetic import make_problems

    problems = from_arithmetic(make_problems(ArithmeticConfig(), 3, seed=0))
    kw = dict(n=6, temperature=0.7, max_new_tokens=12, batch_size=8, seed=3)
    pool = sample_pool(tiny_generator, char_tokenizer, problems, progress=False, **{**kw, "n": kw["n"]})
    ids = sample(tiny_generator, char_tokenizer, [p.prompt for p in problems], **kw).token_ids
    ended = 0
    for i, problem in enumerate(problems):
        prompt_ids = char_tokenizer(problem.prompt)["input_ids"]
        for j, completion in enumerate(ids[i]):
            if len(completion) < kw["max_new_tokens"]:  # stopped on EOS: the EOS token is scored too
                completion = completion + [char_tokenizer.eos_token_id]
                ended += 1
            want = _independent_logprobs(tiny_generator, prompt_ids, completion)
            assert pool.sample_scores[CONFIDENCE][i][j] == pytest.approx(min(want), abs=1e-5)
            assert pool.sample_scores[LIKELIHOOD][i][j] == pytest.approx(sum(want), abs=1e-4)
    assert ended > 0  # the EOS case was exercised
    scores = selector_scores(pool)
    assert scores[CONFIDENCE].shape == (3, 6) and (scores[CONFIDENCE] >= scores[LIKELIHOOD]).all()


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
    from rlprm.evaluation.evaluate import best_of_n
    from rlprm.data.problems import from_arithmetic
    from rlprm.tasks.arithmetic import make_problems

    problems = from_arithmetic(make_problems(ArithmeticConfig(), 4, seed=0))
    metrics, pool = best_of_n(tiny_generator, char_tokenizer, problems, n_max=4, max_new_tokens=20, resamples=10)
    assert pool.n == 4 and len(pool.grades) == 4
    assert "bon/pass@n/N=4/accuracy" in metrics and "bon/majority/N=1/accuracy" in metrics
    assert all(0.0 <= v <= 1.0 for v in metrics.values() if not math.isnan(v))
    assert "bon/confidence/N=4/accuracy" in metrics and "bon/likelihood/N=1/process_correct" in metrics


def test_math500_pipeline_with_a_stand_in_model(tmp_path):
    """Samples, extracts, grades and reports on real MATH500 problems, whatever the (tiny, random) model's accuracy."""
    from rlprm.config import TinyModelConfig
    from rlprm.evaluation.evaluate import best_of_n, markdown_table
    from rlprm.models import build_bpe_tokenizer, build_tiny_causal_lm
    from rlprm.data.problems import load_jsonl_problems

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
    from rlprm.data.problems import grade_samples

    verdict = grade_samples(problems[:1], [["r = 3\n# Answer\n\n(3, \\frac{\\pi}{2})\n"]])[0][0]
    assert verdict.answer_correct and verdict.answer == "(3, \\frac{\\pi}{2})"


def test_gsm8k_problems_load():
    from rlprm.data.problems import load_jsonl_problems

    problems = load_jsonl_problems(shared_file("math/gsm8k_test.jsonl"), limit=5)
    assert problems[0].gold == "18" and len(problems) == 5


def test_bad_problem_file_names_the_line(tmp_path):
    from rlprm.data.problems import ProblemFileError, load_jsonl_problems

    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(ProblemFileError, match=f"{path}:2: not valid JSON"):
        load_jsonl_problems(path)
    path.write_text('{"problem": "a"}\n')
    with pytest.raises(ProblemFileError, match=":1: needs string fields"):
        load_jsonl_problems(path)


def test_rlprm_eval_job_end_to_end(tmp_path, char_tokenizer):
    """`rlprm eval` on tiny models built here: pool, scores from a PRM and an ORM, table, plot, metrics."""
    from rlprm.cli import main
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

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
    assert {"prm_prod", "prm_min", "orm", "majority", "weighted_majority", "random", "pass@n", "confidence",
            "likelihood"} <= set(curves)
    assert list(curves["differences"]) == ["prm_prod_minus_orm", "prm_prod_minus_majority",
                                           "prm_prod_minus_confidence", "prm_prod_minus_likelihood",
                                           "prm_prod_minus_random"]
    assert set(curves["differences"]["prm_prod_minus_orm"]["4"]) == {"accuracy", "process_correct"}
    assert "Paired differences in accuracy" in (out / "bon.md").read_text()
    rows = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["samples"]) == 4 for r in rows[1:])
    assert set(rows[1]["samples"][0]["scores"]) == {"prm", "orm"}
    assert rows[0]["sample_scores"] == ["confidence", "likelihood"]
    assert set(rows[1]["samples"][0]["sample_scores"]) == {"confidence", "likelihood"}
    assert rows[1]["samples"][0]["shortcut"] in (True, False)
    summary = json.loads((out / "summary.json").read_text())
    assert "bon_diff/prm_prod_minus_orm/N=4/accuracy" in summary and "bon/confidence/N=4/accuracy" in summary
    # the recipe's own differences replace the defaults
    recipe.write_text(recipe.read_text().replace("resamples: 10,", "resamples: 10, differences: [orm-random],"))
    assert main(["eval", str(recipe), "--no-progress"]) == 0
    curves = json.loads((out / "bon_curves.json").read_text())
    assert list(curves["differences"]) == ["orm_minus_random"]


def test_rlprm_eval_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    from rlprm.cli import main

    recipe = tmp_path / "bon.yaml"
    recipe.write_text("model: {generator: ./nope}\ntracking: {wandb: disabled}\n")
    assert main(["eval", str(recipe)]) == 2
    assert "rlprm prepare" in capsys.readouterr().err


def _rl_pool(tok):
    """Four sampled responses to one arithmetic problem, as RL and evaluation see them: right, wrong from its
    second step, no answer, and the right text cut by the length cap (no EOS): (pool, their step probabilities
    from a stand-in PRM, rl.max_new_tokens)."""
    from rlprm.data.problems import from_arithmetic, grade_samples
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import Problem, render_step

    problems = from_arithmetic([Problem(1, (("+", 2), ("+", 4)))])
    right = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")])
    wrong = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 8), answer_step("8")])
    none = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7)])
    texts = [right, wrong, none, right + "\n"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [x + [tok.eos_token_id] for x in ids[:3]] + [ids[3]]
    cap = len(ids[3])  # the last one stopped at the cap without EOS
    pool = Pool(problems, [texts], grade_samples(problems, [texts], "\n"), response_ids=[ids])
    pool.step_scores["prm"] = [[[.9, .8, .9], [.9, .1, .2], [.9, .8], [.9, .8, .9]]]
    pool.kinds["prm"] = "prm"
    return pool, cap


@pytest.mark.parametrize("algorithm, reward, process, by_hand", [
    # PPO, log_prob: log(.9 * .8 * .9); log(.018) floored at missing + 0.1; the missing and the cut ones -1
    ("ppo", {"mode": "dense", "source": "prm", "dense_form": "log_prob"}, "min",
     [math.log(.648), -0.9, -1.0, -1.0]),
    ("ppo", {"mode": "dense", "source": "prm", "dense_form": "min_form"}, "min", [0.8, 0.1, -1.0, -1.0]),
    ("ppo", {"mode": "dense", "source": "exact", "dense_form": "log_prob"}, "min", [0.0, -0.9, -1.0, -1.0]),
    ("ppo", {"mode": "sparse", "source": "ground_truth"}, "min", [1.0, 0.0, -1.0, -1.0]),
    ("ppo", {"mode": "sparse", "source": "prm", "sparse_aggregate": "prod"}, "min", [.648, .018, -1.0, -1.0]),
    # GRPO: each step's own value, floored one by one; the process form's min / mean of them
    ("grpo", {"mode": "dense", "source": "prm", "dense_form": "log_prob"}, "min", [math.log(.8), -0.9, -1.0, -1.0]),
    ("grpo", {"mode": "dense", "source": "prm", "dense_form": "score"}, "mean", [2.6 / 3, 1.2 / 3, -1.0, -1.0]),
    ("grpo", {"mode": "dense", "source": "exact", "dense_form": "log_prob"}, "min", [0.0, -0.9, -1.0, -1.0]),
])
def test_held_out_reward_is_the_training_objective(char_tokenizer, tmp_path, algorithm, reward, process, by_hand):
    """Issue 23 (build item 7): the held-out reward is what training computes on the same samples: the cut one
    and the unanswered one get the missing-answer reward, answered returns are floored, the dense form is the
    run's. Before, it was answered-by-`\\boxed`-or-`# Answer`, unfloored (log .018 = -4.0) and blind to the cap."""
    from rlprm.config import Recipe
    from rlprm.evaluation.evaluate import held_out_reward
    import torch

    from rlprm.reward.sources import training_rewards

    pool, cap = _rl_pool(char_tokenizer)
    recipe = Recipe.model_validate({"reward": {**reward, "missing_answer_reward": -1.0},
                                    "rl": {"algorithm": algorithm, "max_new_tokens": cap,
                                           **({"process_advantage": process} if algorithm == "grpo" else {})}})
    grades = pool.grades[0]
    assert [g.answered for g in grades] == [True, True, False, True] and grades[3].answer_correct
    # training's own call on these samples (PPO and GRPO both make it), and GRPO's reward function end to end
    scores = pool.step_scores["prm"][0] if reward["source"] == "prm" else None
    if reward["source"] == "exact":  # the checker's prefix-correctness, as the exact source scores
        from rlprm.reward.tokens import prefix_correct_probs

        scores = [prefix_correct_probs(g.step_correct) for g in grades]
    tr = training_rewards(recipe, pool.texts[0], pool.response_ids[0], grades, scores=scores, tokenizer=char_tokenizer)
    assert tr.truncated == [False, False, False, True] and tr.missing_answer == [False, False, True, True]
    assert tr.objective.tolist() == pytest.approx(by_hand, abs=1e-6)
    if algorithm == "ppo":
        assert torch.allclose(tr.objective, tr.returns, atol=1e-6)
    else:
        from rlprm.rl.grpo import RewardFunction

        class Scorer:
            kind = "prm"

            def score_steps(self, problems, solutions, sep="\n", batch_size=64):
                return [list(s) for s in pool.step_scores["prm"][0]]

        fn = RewardFunction(recipe, pool.problems, char_tokenizer,
                            reward_model=Scorer() if reward["source"] == "prm" else None, run_dir=tmp_path)
        returns = fn([pool.problems[0].prompt] * 4, pool.texts[0], pool.response_ids[0], [0, 0, 0, 0])
        assert returns == pytest.approx(by_hand, abs=1e-6)
    assert held_out_reward(recipe, pool, char_tokenizer) == pytest.approx(float(np.mean(by_hand)), abs=1e-6)
    # what it cannot compute here, it does not guess
    assert held_out_reward(recipe, Pool(pool.problems, pool.texts, pool.grades, pool.step_scores), char_tokenizer) \
        is None
    assert held_out_reward(recipe, pool, None) is None
    confidence = Recipe.model_validate({"reward": {"mode": "dense", "source": "confidence", "dense_form": "min_form"}})
    assert held_out_reward(confidence, pool, char_tokenizer) is None  # needs the starting generator
