"""Active learning (`rlprm select`, `rlprm active-learning`) and labelling (`rlprm label`)."""

import json
import random

import pytest

from rlprm.experiments.active import (CONVINCING, CONVINCING_WRONG, UNIFORM, convincing_slots, mix_slots,
                          plan_generation, select_indices, select_uniform, surface)
from rlprm.config import ArithmeticConfig, RecipeError, load_recipe
from rlprm.data.prm800k import load_prm800k
from rlprm.data.stepwise import CORRECT, INCORRECT, label_arithmetic_sample
from rlprm.files import atomic_write_jsonl as write_lines
from rlprm.reward.label import (LabelError, apply_ratings, first_error_from_probs, label_lines, parse_problem_text,
                         ratings_from_first_error, unlabelled_line)
from rlprm.tasks.arithmetic import corrupt_solution, make_problems, reference_solution

from .conftest import RECIPES  # the tiny saved generator fixture `generator` is conftest's too

# --------------------------------------------------------------------------- selection math


def test_convincing_slots_spread_the_fraction_evenly():
    assert convincing_slots(5, 2, 0.8) == [2, 1, 2, 1, 2]  # 8 of 10 slots
    assert convincing_slots(3, 2, 0.0) == [0, 0, 0]
    assert convincing_slots(3, 2, 1.0) == [2, 2, 2]
    assert sum(convincing_slots(64, 4, 0.8)) == round(64 * 4 * 0.8)


def test_select_indices_ranks_wrong_answers_by_score():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    right = [True, False, True, False, False]
    rng = random.Random(0)
    assert select_indices(scores, right, 2, 2, "uniform", rng) == [(1, CONVINCING_WRONG), (3, CONVINCING_WRONG)]
    # the paper's other slots: the most convincing remaining sample, whatever its answer
    assert select_indices(scores, right, 2, 1, "convincing", rng) == [(1, CONVINCING_WRONG), (0, CONVINCING)]
    picked = select_indices(scores, right, 2, 1, "uniform", rng)
    assert picked[0] == (1, CONVINCING_WRONG) and picked[1][1] == UNIFORM and picked[1][0] in (0, 2, 3, 4)
    # already-labelled samples are never picked again
    avail = [True, False, True, True, True]
    assert select_indices(scores, right, 1, 1, "uniform", rng, avail) == [(3, CONVINCING_WRONG)]
    # too few wrong answers: the gap is filled; too few samples: fewer picks
    assert select_indices(scores, [True] * 5, 2, 2, "convincing", rng) == [(0, CONVINCING), (1, CONVINCING)]
    assert len(select_indices(scores, right, 9, 9, "uniform", rng)) == 5
    assert len(select_uniform([True, False, True], 5, rng)) == 2


def test_data_efficiency_on_hand_made_curves():
    from rlprm.experiments.efficiency import EXACT, FIRST_POINT, REACHED, UNIFORM_NEVER, efficiency_factor, labels_to_reach

    uniform = ([100, 200, 300], [0.1, 0.2, 0.3])
    eff = efficiency_factor(*uniform, [100], [0.2], level=0.2)
    assert eff["uniform_labels"] == pytest.approx(200) and eff["factor"] == pytest.approx(2.0)
    assert eff["status"] == EXACT
    eff = efficiency_factor(*uniform, [200], [0.35], level=0.35)  # beyond uniform's best: the factor is at least
    assert eff["status"] == UNIFORM_NEVER and eff["bound"] == pytest.approx(1.5)
    # uniform's curve is made monotone (0.1, 0.3, 0.3) before interpolating
    wiggly = ([100, 200, 300], [0.1, 0.3, 0.2])
    assert labels_to_reach(*wiggly, 0.2) == (pytest.approx(150), REACHED)
    assert efficiency_factor(*wiggly, [150], [0.2], level=0.2)["factor"] == pytest.approx(1.0)
    assert labels_to_reach(*wiggly, 0.05) == (100, FIRST_POINT)  # at or below uniform's first point


def test_efficiency_factor_on_hand_made_curves():
    from rlprm.experiments.efficiency import (ACTIVE_NEVER, EXACT, NEITHER, UNIFORM_NEVER, efficiency_factor, factor_level,
                                  labels_to_reach)

    labels = [100, 200, 400]
    uniform, active = [0.2, 0.4, 0.6], [0.2, 0.6, 0.7]
    # active reaches uniform's best (0.6, at 400 labels) with 200: twice as data-efficient
    f = efficiency_factor(labels, uniform, labels, active, 0.6)
    assert f["status"] == EXACT and f["factor"] == pytest.approx(2.0)
    assert (f["uniform_labels"], f["active_labels"]) == (pytest.approx(400), pytest.approx(200))
    # interpolated between budgets: 0.5 is uniform's midpoint of 200..400 and 3/4 of active's way from 100 to 200
    assert efficiency_factor(labels, uniform, labels, active, 0.5)["factor"] == pytest.approx(300 / 175)
    # a curve that never reaches the level: no number, only what the budgets show
    f = efficiency_factor(labels, uniform, labels, active, 0.65)
    assert f["status"] == UNIFORM_NEVER and f["factor"] is None and f["bound"] == pytest.approx(400 / 300)
    f = efficiency_factor(labels, active, labels, uniform, 0.65)
    assert f["status"] == ACTIVE_NEVER and f["factor"] is None and f["bound"] == pytest.approx(300 / 400)
    assert efficiency_factor(labels, uniform, labels, active, 0.9)["status"] == NEITHER
    assert labels_to_reach(labels, [0.5, 0.4, 0.3], 0.45) == (100, "first_point")  # made monotone: 0.5 throughout
    assert factor_level(labels, uniform, 0.9) == pytest.approx(0.56)


def test_factor_interval_over_seeds():
    from rlprm.experiments.efficiency import ACTIVE_NEVER, EXACT, factor_interval

    budgets = [100, 200, 400, 800]
    # every seed: active at b labels is where uniform is at 2b (shifted per seed), so the factor is 2 in every resample
    uniform = [[0.2 + d, 0.4 + d, 0.6 + d, 0.8 + d] for d in (0.0, 0.01, -0.02)]
    active = [[0.2 + d, 0.6 + d, 0.8 + d, 0.8 + d] for d in (0.0, 0.01, -0.02)]
    f = factor_interval(budgets, uniform, budgets, active, level_share=0.9, resamples=200)
    assert f["status"] == EXACT and f["mean"] == pytest.approx(2.0) and f["seeds"] == 3
    assert f["lo"] == pytest.approx(2.0) and f["hi"] == pytest.approx(2.0) and f["resolved"] == 1.0
    # an active curve that stays below uniform's level: said so, with the bound the budgets give
    f = factor_interval(budgets, uniform, budgets, [[0.2, 0.3, 0.3, 0.3]] * 3, resamples=200)
    assert f["status"] == ACTIVE_NEVER and f["mean"] is None and f["hi"] == 0.0
    with pytest.raises(ValueError, match="missing"):
        factor_interval(budgets, uniform, budgets, [[0.2, float("nan"), 0.3, 0.3]] * 3)


def test_threshold_chosen_on_validation():
    from rlprm.experiments.efficiency import choose_threshold

    # errors sit at p 0.3; right steps at 0.4 and up: only a threshold in (0.3, 0.4] finds them and spares the rest
    probs = [[0.9, 0.3, 0.2], [0.4, 0.9], [0.95, 0.45, 0.3]]
    gold = [1, None, 2]
    t, f1 = choose_threshold(probs, gold, [0.1, 0.35, 0.5, 0.9])
    assert t == 0.35 and f1 == 1.0
    assert choose_threshold([[0.9]], [None], [0.3, 0.5]) == (0.5, None)  # no erroneous solution: no F1


def test_prm_quality_on_hand_made_probabilities():
    """Best-of-N and step AUROC on the test problems, first-error F1 at the threshold the validation ones choose."""
    from rlprm.experiments.active import prm_quality
    from rlprm.data.stepwise import LabelledSolution

    def rec(group, first_error, n=3, answer=True):
        labels = [CORRECT] * n if first_error is None else [CORRECT] * first_error + [INCORRECT] + [None] * (n - first_error - 1)
        return LabelledSolution(problem=group, steps=[f"s{k}" for k in range(n)], labels=labels, answer_correct=answer,
                                process_correct=first_error is None and answer, first_error=first_error, group=group)

    # validation: errors score 0.3, right steps 0.4+: the grid's 0.35 is the only perfect threshold
    val = [rec("v", 1), rec("v", None)]
    val_p = [[0.9, 0.3, 0.2], [0.4, 0.9, 0.8]]
    # test: a1 and b0 have errors (b0 a right answer on a wrong step); b2 is past eval_n = 2
    test = [rec("a", None), rec("a", 0, answer=False), rec("b", 2), rec("b", None), rec("b", None)]
    test_p = [[0.9, 0.9, 0.9], [0.32, 0.5, 0.5], [0.99, 0.99, 0.33], [0.45, 0.45, 0.45], [0.9, 0.9, 0.9]]
    q = prm_quality(val, val_p, test, test_p, eval_n=2, aggregate_how="min", grid=[0.2, 0.35, 0.5])
    assert q["threshold"] == 0.35 and q["validation_f1"] == 1.0
    assert q["best_of_n_process_accuracy"] == 1.0 and q["best_of_n_answer_accuracy"] == 1.0  # min picks a0, b1
    # at 0.35 every first error is found and nothing else; at 0.5, b1 (0.45) is flagged too: F1 2 * 1 * 2/3 / (5/3)
    assert q["first_error_f1"] == 1.0 and q["first_error_f1_at_0.5"] == pytest.approx(0.8)
    # prod picks b0 (0.32 > 0.09): right answer, wrong step; b2 (prod 0.73) would have won had it been in the N
    q = prm_quality(val, val_p, test, test_p, eval_n=2, aggregate_how="prod", grid=[0.2, 0.35, 0.5])
    assert q["best_of_n_process_accuracy"] == 0.5 and q["best_of_n_answer_accuracy"] == 1.0
    # step AUROC over the labelled test steps: wrong ones 0.32, 0.33; right ones 0.45 and up
    assert q["step_auroc"] == 1.0


def test_selection_mix_exact_counts():
    """An active set of `need` labels holds exactly round(need * share) convincing wrong-answer solutions, the
    highest-scored wrong ones of each problem, the rest filled as the recipe says."""
    from types import SimpleNamespace

    assert mix_slots([2, 2, 1], 0.4) == [1, 1, 0] and mix_slots([2, 2, 2, 2, 1], 0.4) == [1, 1, 0, 1, 1]
    assert mix_slots([2] * 5, 0.8) == convincing_slots(5, 2, 0.8)
    # 5 problems x 4 samples; sample j of problem p scores (p + 1) * 10 + j; samples 0 and 2 have wrong answers
    groups = [[SimpleNamespace(problem=f"p{p}", steps=[f"{p}.{j}"], answer_correct=j % 2 == 1, score=(p + 1) * 10 + j)
               for j in range(4)] for p in range(5)]
    by_text = {r.steps[0]: r.score / 100 for g in groups for r in g}

    class FakePRM:
        def score_steps(self, problems, steps, batch_size=64):
            return [[by_text[s[0]]] for s in steps]

    quotas = [2, 2, 2, 2, 1]  # 9 labels: the last problem cut to one
    for share, fill, n_wrong in ((0.0, "convincing", 0), (0.4, "convincing", 4), (0.8, "uniform", 7), (1.0, "convincing", 9)):
        picks = surface(FakePRM(), groups, range(5), 2, share, fill, "prod", random.Random(0), quotas=quotas)
        whys = [why for _, _, why, _ in picks]
        assert len(picks) == 9 and [sum(p == q for p, *_ in picks) for q in range(5)] == quotas
        assert whys.count(CONVINCING_WRONG) == n_wrong
        assert whys.count(CONVINCING if fill == "convincing" else UNIFORM) == 9 - n_wrong
        for p, i, why, _ in picks:
            if why == CONVINCING_WRONG:  # the highest-scored wrong answer first: sample 2, then 0
                assert not groups[p][i].answer_correct
        assert all(i == 2 for p, i, why, _ in picks if why == CONVINCING_WRONG and quotas[p] == 2
                   and mix_slots(quotas, share)[p] == 1)
    # share 0 with fill convincing: each problem's top-scored samples whatever their answer (3 and 2)
    picks = surface(FakePRM(), groups, range(5), 2, 0.0, "convincing", "prod", random.Random(0), quotas=quotas)
    assert sorted(i for p, i, *_ in picks if p == 0) == [2, 3]


def test_labelled_solutions_sorted_by_habit():
    """The checker's kind of a solution: a dropped carry wins over the shortcut and a slip; kinds are counted per
    arm in the report beside the pool's base rates."""
    from rlprm.experiments.active import kind_counts, solution_kind
    from rlprm.experiments.active_report import KINDS, kinds_markdown, kinds_summary
    from rlprm.tasks.arithmetic import Problem, carry_drop_solution, shortcut_solution

    def record(problem, steps):
        sample, _ = label_arithmetic_sample(problem, "\n".join(steps) + "\n", "\n")
        return sample

    drop = Problem(38, (("+", 5), ("+", 1)), "none")  # 38 + 5 = 33, 33 + 1 = 34: answer 34, not 44
    assert carry_drop_solution(drop)[:2] == ["38 + 5 = 33", "33 + 1 = 34"]
    short = Problem(93, (("+", 3), ("-", 4)), "mod10")
    slip = ["38 + 5 = 42", "42 + 1 = 43", "# Answer\n\n43"]
    got = [solution_kind(record(drop, carry_drop_solution(drop))), solution_kind(record(short, shortcut_solution(short))),
           solution_kind(record(drop, slip)), solution_kind(record(drop, reference_solution(drop))),
           solution_kind(record(drop, ["38 + 5 = 33", "33 + 1 = 35", "# Answer\n\n35"]))]  # drop, then a slip
    assert got == ["dropped_carry", "shortcut", "slip", "right", "dropped_carry"]
    assert record(drop, carry_drop_solution(drop)).answer_correct is False  # the habit changes this answer
    assert record(short, shortcut_solution(short)).answer_correct is True
    assert kind_counts(got) == {"dropped_carry": 2, "shortcut": 1, "slip": 1, "right": 1}
    # the report: per arm over rounds (shares of its new labels), the pool's rates, per round counts
    mix = {"uniform": {8: {"new_labels": 4, "dropped_carry": 1, "shortcut": 1, "slip": 0, "right": 2},
                       16: {"new_labels": 4, "dropped_carry": 0, "shortcut": 2, "slip": 1, "right": 1}},
           "active@0.8": {8: {"new_labels": 4, "dropped_carry": 3, "shortcut": 0, "slip": 1, "right": 0,
                              "convincing_wrong_answer": 3, "cw_dropped_carry": 2, "cw_slip": 1},
                          16: {"new_labels": 4, "dropped_carry": 4, "shortcut": 0, "slip": 0, "right": 0,
                               "convincing_wrong_answer": 3, "cw_dropped_carry": 3}}}
    got = kinds_summary(mix)["active@0.8"]
    assert {k: got[k] for k in KINDS} == {"dropped_carry": 7, "shortcut": 0, "slip": 1, "right": 0}
    assert got["new_labels"] == 8 and got["convincing_wrong_answer"] == 6 and got["cw_dropped_carry"] == 5
    text = kinds_markdown(mix, {"all": {"dropped_carry": 1, "shortcut": 1, "slip": 1, "right": 1},
                                "wrong_answer": {"dropped_carry": 1, "shortcut": 0, "slip": 3, "right": 0}})
    assert "| active@0.8 | 8 | 87.5 | 0.0 | 12.5 | 0.0 |" in text and "| uniform | 8 | 12.5 | 37.5 | 12.5 | 37.5 |" in text
    assert "| active@0.8: its convincing wrong-answer picks | 6 | 83.3 | 0.0 | 16.7 | 0.0 |" in text
    assert "uniform: its convincing" not in text
    assert "| pool: wrong answer only | 4 | 25.0 | 0.0 | 75.0 | 0.0 |" in text and "| 16 | 0/2/1/1 | 4/0/0/0 |" in text
    assert kinds_markdown({"uniform": {8: {"new_labels": 4, "convincing_wrong_answer": 0}}}, {}) == ""  # old rows


def test_label_budget_counts_solutions_exactly():
    """plan_generation: the quotas of a generation add up to exactly the labels it may spend, k per problem,
    fewer where a problem has fewer samples; problems without samples are skipped; running out is an error."""
    from rlprm.experiments.active import ActiveLearningError, label_budgets

    ids, quotas, nxt = plan_generation([3, 0, 1, 2, 4], 0, [2, 0, 1, 2, 2], 2, 4)
    assert (ids, quotas, nxt) == ([3, 0], [2, 2], 2)
    # problem 1 has no sample (skipped), problem 2 one; the last one is cut to what is left
    ids, quotas, nxt = plan_generation([3, 0, 1, 2, 4], 2, [2, 0, 1, 2, 2], 2, 2)
    assert (ids, quotas, nxt) == ([2, 4], [1, 1], 5)
    with pytest.raises(ActiveLearningError, match="runs out"):
        plan_generation([0, 1], 0, [2, 2], 2, 5)
    recipe = load_recipe(RECIPES / "active_learning.yaml")
    assert label_budgets(recipe.active) == [16, 32, 64, 128, 256, 512]
    recipe = load_recipe(RECIPES / "active_learning.yaml", ["active.budgets=[]", "active.seed_labels=8",
                                                             "active.labels_per_generation=4", "active.generations=2"])
    assert label_budgets(recipe.active) == [8, 12, 16]
    with pytest.raises(RecipeError, match="strictly increasing"):
        load_recipe(RECIPES / "active_learning.yaml", ["active.budgets=[8,8]"])


def test_the_active_section_is_validated():
    recipe = load_recipe(RECIPES / "active_learning.yaml")
    assert recipe.active.top_k == 2 and recipe.active.seeds == [0, 1, 2]
    with pytest.raises(RecipeError, match="active.topk"):
        load_recipe(RECIPES / "active_learning.yaml", ["active.topk=3"])
    with pytest.raises(RecipeError, match="convincing_fraction"):
        load_recipe(RECIPES / "active_learning.yaml", ["active.convincing_fraction=1.5"])


# --------------------------------------------------------------------------- PRM800K lines and labelling


def test_problem_text_parsed_for_the_checker_or_refused_with_the_way_out():
    p = make_problems(ArithmeticConfig(), 1, seed=5)[0]
    assert parse_problem_text(p.text) == p  # the format itself is tested in test_arithmetic.py
    with pytest.raises(LabelError, match=r"not an arithmetic-task problem .*--with PRM_DIR"):
        parse_problem_text("What is 2 + 2?")


def _samples(n=40):
    """Checker-labelled records: reference solutions and corrupted ones (some still reach the right answer)."""
    rng = random.Random(1)
    out = []
    for i, p in enumerate(make_problems(ArithmeticConfig(), n, seed=9)):
        steps = reference_solution(p) if i % 3 == 0 else corrupt_solution(p, rng)[0]
        record, status = label_arithmetic_sample(p, "\n".join(steps), "\n")
        assert status == "ok"
        out.append(record)
    return out


def test_selected_lines_round_trip_through_the_prm800k_loader(tmp_path):
    records = _samples()
    assert {r.process_correct for r in records} == {True, False}
    lines = [unlabelled_line(r.problem, r.steps, verifier_score=0.25, generation=3, ground_truth_answer="7",
                             selection=CONVINCING_WRONG) for r in records]
    q = lines[0]["question"]
    assert q["pre_generated_steps"] == records[0].steps and q["pre_generated_verifier_score"] == 0.25
    assert q["pre_generated_answer"] == records[0].steps[-1].split("\n")[-1] and lines[0]["generation"] == 3
    # unrated: the loader reads it but finds no labels
    write_lines(tmp_path / "unrated.jsonl", lines)
    unrated, counts = load_prm800k(tmp_path / "unrated.jsonl")
    assert all(y is None for r in unrated for y in r.labels) and counts["null_ratings"] == len(lines)

    labelled, counts = label_lines(lines, "checker")
    assert counts["found_error"] == sum(not r.process_correct for r in records)
    write_lines(tmp_path / "labelled.jsonl", labelled)
    back, _ = load_prm800k(tmp_path / "labelled.jsonl")
    assert len(back) == len(records)  # one trajectory per line, no alternatives
    for orig, got in zip(records, back):
        assert got.problem == orig.problem and got.first_error == orig.first_error
        assert got.process_correct == orig.process_correct
        # phase 2 stops at the first error: the trajectory is the labelled prefix, with the same labels
        n = len(got.steps)
        assert got.steps == orig.steps[:n] and got.labels == orig.labels[:n]
        assert all(y is None for y in orig.labels[n:])
        if orig.first_error is not None:
            assert got.labels[-1] == INCORRECT and got.meta["finish_reason"] == "found_error"
        else:
            assert got.labels == [CORRECT] * len(orig.steps) and got.answer_correct


def test_ratings_follow_phase_two():
    assert ratings_from_first_error(4, None) == ([1, 1, 1, 1], "solution")
    assert ratings_from_first_error(4, 2) == ([1, 1, -1], "found_error")
    assert ratings_from_first_error(3, 3) == ([1, 1, 1], "give_up")
    line = apply_ratings(unlabelled_line("1 +2 +3", ["1 + 2 = 3", "3 + 3 = 7", "# Answer\n\n7"], verifier_score=None,
                                         generation=1), 1, "me")
    steps = line["label"]["steps"]
    assert [s["chosen_completion"] for s in steps] == [0, None] and line["labeler"] == "me"
    assert first_error_from_probs([0.9, 0.6, 0.4, 0.2]) == 2 and first_error_from_probs([0.9], 0.5) is None


def test_a_prm_labels_for_another_and_the_cli(tmp_path, char_tokenizer):
    from rlprm.cli import main

    from .test_reward_models import tiny_rm

    rm = tiny_rm(char_tokenizer)
    rm.save(tmp_path / "big_prm")
    records = _samples(12)
    lines = [unlabelled_line(r.problem, r.steps, verifier_score=None, generation=1) for r in records]
    write_lines(tmp_path / "in.jsonl", lines)
    assert main(["label", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "prm.jsonl"),
                 "--with", str(tmp_path / "big_prm"), "--threshold", "0.5"]) == 0
    probs = rm.score_steps([r.problem for r in records], [r.steps for r in records])
    got = [json.loads(t) for t in (tmp_path / "prm.jsonl").read_text().splitlines()]
    for line, p in zip(got, probs):
        ratings = [s["completions"][0]["rating"] for s in line["label"]["steps"]]
        assert ratings == ratings_from_first_error(len(p), first_error_from_probs(p))[0]
        assert line["labeler"].startswith("prm:")
    assert main(["label", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "checker.jsonl")]) == 0
    back, _ = load_prm800k(tmp_path / "checker.jsonl")
    assert [r.first_error for r in back] == [r.first_error for r in records]
    (tmp_path / "bad.jsonl").write_text('{"question": {"problem": "x"}}\n')
    assert main(["label", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_a_public_prm_labels_through_the_loader(tmp_path, capsys):
    """`rlprm label --with` and the loop's labeller load any PRM the way every command does: a stand-in hub PRM
    (its family detected, or named with --adapter / active.labeller_adapter) rates the lines by its own scores."""
    from rlprm.experiments.active import label_records, load_loop_labeller
    from rlprm.cli import main
    from rlprm.reward.adapters import HubPRM, load_reward_model
    from rlprm.testing.standins import save_standin

    records = _samples(8)
    lines = [unlabelled_line(r.problem, r.steps, verifier_score=None, generation=1) for r in records]
    write_lines(tmp_path / "in.jsonl", lines)
    problems, steps = [r.problem for r in records], [r.steps for r in records]
    for family, extra in (("qwen_prm", []), ("math_shepherd", ["--adapter", "math_shepherd"])):
        folder = save_standin(family, tmp_path / family)
        out = tmp_path / f"{family}.jsonl"
        probs = load_reward_model(folder, family).score_steps(problems, steps)
        # a random stand-in's probabilities sit in a narrow band: a threshold inside it makes the ratings differ
        threshold = sorted(x for p in probs for x in p)[sum(map(len, probs)) // 3]
        assert main(["label", str(tmp_path / "in.jsonl"), "--out", str(out), "--with", str(folder), *extra,
                     "--threshold", repr(threshold)]) == 0
        got = [json.loads(t) for t in out.read_text().splitlines()]
        firsts = [first_error_from_probs(p, threshold) for p in probs]
        assert len(set(firsts)) > 1, "the stand-in must not rate every line alike"
        for line, first, p in zip(got, firsts, probs):
            assert [s["completions"][0]["rating"] for s in line["label"]["steps"]] == \
                ratings_from_first_error(len(p), first)[0]
            assert line["labeler"] == f"prm:{folder.resolve()}"
    # math_shepherd's files do not name their family: without --adapter the command says so
    assert main(["label", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "x.jsonl"),
                 "--with", str(tmp_path / "math_shepherd")]) == 2
    assert "math_shepherd" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()

    # the loop's labeller: loaded once, through load_for_recipe
    recipe = load_recipe(RECIPES / "active_learning.yaml", [f"active.labeller={tmp_path / 'math_shepherd'}",
                                                             "active.labeller_adapter=math_shepherd", "run.device=cpu"])
    labeller = load_loop_labeller(recipe)
    assert isinstance(labeller, HubPRM) and labeller.adapter == "math_shepherd"
    probs = load_reward_model(tmp_path / "math_shepherd", "math_shepherd").score_steps(problems, steps)
    threshold = sorted(x for p in probs for x in p)[sum(map(len, probs)) // 3]
    back = label_records(lines, labeller, "\n", threshold)
    assert [r.first_error for r in back] == [first_error_from_probs(p, threshold) for p in probs]
    assert len({r.first_error for r in back}) > 1


# --------------------------------------------------------------------------- the jobs, tiny


TINY = ["tracking.wandb=disabled", "run.device=cpu", "run.threads=1", "rm.data.train_problems=12",
        "rm.data.samples_per_problem=4", "rm.data.eval_problems=4", "rm.data.eval_samples_per_problem=4",
        "rm.data.max_new_tokens=40", "rm.batch_size=4", "active.seeds=[0]", "active.budgets=[3,8,12]",
        "active.convincing_shares=[0.8]", "active.train_steps=2", "active.eval_n=4", "active.bootstrap_resamples=100",
        "active.lanes=1"]  # one process: a lane's child costs seconds to start; the end-to-end test runs both


def test_select_and_loop_end_to_end(tmp_path, generator, char_tokenizer):  # noqa: F811
    from rlprm.experiments.active import run_loop, select
    from rlprm.tracking import read_metrics

    from .test_reward_models import tiny_rm

    recipe = load_recipe(RECIPES / "active_learning.yaml", [f"model.generator={generator}",
                                                             f"run.output_dir={tmp_path / 'run'}",
                                                             f"rm.data.cache_dir={tmp_path / 'cache'}", *TINY,
                                                             "active.lanes=2"])
    summary = run_loop(recipe, progress=False)
    run = tmp_path / "run"
    assert (run / "active_learning.png").stat().st_size > 0
    table = (run / "report.md").read_text()
    assert "| 3 | uniform |" in table and "| 12 | active@0.8 |" in table and "factor" in table
    rows = [json.loads(t) for t in (run / "tables" / "active_learning.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["labels"]) for r in rows] == [("uniform", 3), ("active@0.8", 3), ("uniform", 8),
                                                            ("active@0.8", 8), ("uniform", 12), ("active@0.8", 12)]
    assert len(read_metrics(run / "metrics.jsonl")) == 6
    # the budget is counted in labelled solutions, exactly: one labelled line per label, cumulative per arm
    for arm in ("uniform", "active@0.8"):
        files = [run / "labels" / "seed0_gen0.jsonl"] + [run / "labels" / f"seed0_gen{g}_{arm}.jsonl" for g in (1, 2)]
        lines = [[json.loads(t) for t in f.read_text().splitlines()] for f in files]
        assert [len(x) for x in lines] == [3, 5, 4]
        steps = [sum(len(line["label"]["steps"]) for line in x) for x in lines]
        got = [r for r in rows if r["strategy"] == arm]
        assert [r["labelled_steps"] for r in got] == [steps[0], steps[0] + steps[1], sum(steps)]
        assert [r["new_labels"] for r in got] == [3, 5, 4]
    assert [r["new_convincing_wrong_answer"] for r in rows if r["strategy"] == "active@0.8"][1:] == [4, 3]  # round(.8 * 5), round(.8 * 4)
    # what each round labelled, by kind: the counts add up, agree with the label files, and reach the report
    from rlprm.experiments.active import KINDS, solution_kind
    from rlprm.experiments.active_report import KINDS as REPORT_KINDS

    assert KINDS is REPORT_KINDS
    for r in rows:
        assert sum(r[f"new_{kind}"] for kind in KINDS) == r["new_labels"]
        assert sum(r[f"new_cw_{kind}"] for kind in KINDS) == r["new_convincing_wrong_answer"]
        assert r["new_cw_right"] == 0  # a convincing wrong-answer pick never has every step right
    back, _ = load_prm800k(run / "labels" / "seed0_gen2_active@0.8.jsonl", alternatives=False)
    last = [r for r in rows if r["strategy"] == "active@0.8"][-1]
    assert [last[f"new_{kind}"] for kind in KINDS] == [[solution_kind(b) for b in back].count(kind) for kind in KINDS]
    assert "## What the arms labelled" in table
    # summary.json: the factor per metric (headline share) and per share, curves with bands, baselines
    saved = json.loads((run / "summary.json").read_text())
    for metric in ("best_of_n_process_accuracy", "best_of_n_answer_accuracy", "step_auroc", "first_error_f1"):
        assert {"mean", "lo", "hi", "status"} <= set(saved["factor"][metric])
        assert set(saved["factor"][metric]["by_share"]) == {"0.8"}
        assert {"mean", "lo", "hi"} <= set(saved["factor"][metric]["by_share"]["0.8"])
        assert set(saved["curves"]["uniform"]["12"][metric]) == {"mean", "lo", "hi"}
    assert saved["label_unit"] == "solutions" and saved["budgets"] == [3, 8, 12]
    assert set(saved["baselines"]) == {"confidence", "random"} and summary["factor"] == saved["factor"]
    assert sum(saved["kinds"]["uniform"][kind] for kind in KINDS) == saved["kinds"]["uniform"]["new_labels"] == 9
    assert sum(saved["pool_kinds"]["all"].values()) == summary["pool_samples"]
    # every generation went through PRM800K files; active picks carry their reason and the PRM score
    active_lines = [json.loads(t) for t in (run / "labels" / "seed0_gen1_active@0.8.jsonl").read_text().splitlines()]
    assert len(active_lines) == 5 and all(line["label"]["finish_reason"] for line in active_lines)
    assert {line["selection"] for line in active_lines} <= {CONVINCING_WRONG, CONVINCING}  # fill: convincing
    assert all(isinstance(line["question"]["pre_generated_verifier_score"], float) for line in active_lines)
    # the pool was sampled once into the cache, not into the run folder
    assert (tmp_path / "cache").exists() is False and (run / "pool" / "rm_samples_train.jsonl").is_file()

    # select with a PRM: top_k per problem, convincing wrong-answer ones really have a wrong answer
    tiny_rm(char_tokenizer).save(tmp_path / "prm")
    recipe = load_recipe(RECIPES / "active_learning.yaml", [f"model.generator={generator}",
                                                             f"run.output_dir={tmp_path / 'run'}",
                                                             f"rm.data.cache_dir={tmp_path / 'run' / 'pool'}",
                                                             f"active.prm={tmp_path / 'prm'}", *TINY])
    counts = select(recipe, progress=False)
    assert counts["lines"] == 12 * 2 and counts["problems"] == 12
    assert counts["convincing_wrong_answer_checked_wrong"] == counts.get(CONVINCING_WRONG, 0)
    lines = [json.loads(t) for t in (run / "to_label.jsonl").read_text().splitlines()]
    by_problem = {}
    for line in lines:
        by_problem.setdefault(line["question"]["problem"], []).append(line)
    for group in by_problem.values():
        wrong = [x["question"]["pre_generated_verifier_score"] for x in group if x["selection"] == CONVINCING_WRONG]
        assert wrong == sorted(wrong, reverse=True)

    # select with a public PRM (a stand-in; its family detected, then named): it ranks by its own scores
    from rlprm.reward.adapters import load_reward_model
    from rlprm.testing.standins import save_standin
    from rlprm.reward.model import aggregate

    for family, how in (("qwen_prm", []), ("rlhflow", ["active.prm_adapter=rlhflow"])):
        folder = save_standin(family, tmp_path / family)
        recipe = load_recipe(RECIPES / "active_learning.yaml", [
            f"model.generator={generator}", f"run.output_dir={tmp_path / 'run'}",
            f"rm.data.cache_dir={tmp_path / 'run' / 'pool'}", f"active.prm={folder}", *how,
            f"active.output={tmp_path / family}.jsonl", *TINY])
        counts = select(recipe, progress=False)
        assert counts["lines"] == 12 * 2
        lines = [json.loads(t) for t in (tmp_path / f"{family}.jsonl").read_text().splitlines()]
        rm = load_reward_model(folder, family)
        got = [x["question"]["pre_generated_verifier_score"] for x in lines]
        want = [aggregate(p, "prod") for p in rm.score_steps([x["question"]["problem"] for x in lines],
                                                             [x["question"]["pre_generated_steps"] for x in lines])]
        assert got == pytest.approx(want, abs=1e-5)

    # 2 lanes ran each seed's start and each arm in child processes; every job is seeded, so one
    # process gives the same rows (times aside) in the same order
    assert summary["lanes"] == 2 and summary["wall_seconds"] > 0 and summary["loop_cpu_seconds"] > 0
    alone = run_loop(load_recipe(RECIPES / "active_learning.yaml", [
        f"model.generator={generator}", f"run.output_dir={tmp_path / 'one_lane'}",
        f"rm.data.cache_dir={tmp_path / 'cache'}", *TINY]), progress=False)
    assert alone["lanes"] == 1
    one = [json.loads(t) for t in (tmp_path / "one_lane" / "tables" / "active_learning.jsonl").read_text().splitlines()]
    timeless = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in rs]  # noqa: E731
    assert timeless(one) == timeless(rows)


def test_a_prm_labels_inside_the_loop(tmp_path, generator, char_tokenizer):  # noqa: F811
    """active.labeller: PRM_DIR: every file of the loop is rated by that PRM (the `label --with` machinery), not by
    the checker, and the PRMs of the loop train on those labels."""
    from rlprm.experiments.active import run_loop
    from rlprm.data.prm800k import load_prm800k
    from rlprm.reward.label import first_error_from_probs

    from .test_reward_models import tiny_rm

    big = tiny_rm(char_tokenizer, seed=3)
    big.save(tmp_path / "big_prm")
    # a random PRM's probabilities sit in a narrow band: a threshold inside it makes its verdicts differ
    some = _samples(40)
    probs = sorted(x for p in big.score_steps([r.problem for r in some], [r.steps for r in some]) for x in p)
    recipe = load_recipe(RECIPES / "active_learning.yaml", [
        f"model.generator={generator}", f"run.output_dir={tmp_path / 'run'}", f"rm.data.cache_dir={tmp_path / 'c'}",
        *TINY, "active.budgets=[4,8]", "active.convincing_shares=[1.0]", f"active.labeller={tmp_path / 'big_prm'}",
        f"rm.threshold={probs[len(probs) // 4]!r}"])
    run_loop(recipe, progress=False)
    files = sorted((tmp_path / "run" / "labels").glob("*.jsonl"))
    assert [f.name for f in files] == ["seed0_gen0.jsonl", "seed0_gen1_active@1.jsonl", "seed0_gen1_uniform.jsonl"]
    lines = [json.loads(t) for f in files for t in f.read_text().splitlines()]
    assert len(lines) == 12 and {line["labeler"] for line in lines} == {f"prm:{(tmp_path / 'big_prm').resolve()}"}
    probs = big.score_steps([x["question"]["problem"] for x in lines], [x["question"]["pre_generated_steps"] for x in lines])
    firsts = [first_error_from_probs(p, recipe.rm.threshold) for p in probs]
    checker = [json.loads(t) for t in (tmp_path / "run" / "pool" / "rm_samples_train.jsonl").read_text().splitlines()[1:]]
    truth = {(r["problem"], tuple(r["steps"])): r["first_error"] for r in checker}
    assert len(set(firsts)) > 1 and firsts != [truth[(x["question"]["problem"], tuple(x["question"]["pre_generated_steps"]))]
                                             for x in lines]  # the PRM's verdicts, not the checker's
    for f in files:
        back, _ = load_prm800k(f, alternatives=False)
        got = [next((k for k, y in enumerate(r.labels) if y == INCORRECT), None) for r in back]
        want = [first_error_from_probs(p, recipe.rm.threshold) for p in big.score_steps(
            [r.problem for r in back], [json.loads(t)["question"]["pre_generated_steps"] for t in f.read_text().splitlines()])]
        assert got == want


def test_cli_select_without_a_prm_exits_2(tmp_path, capsys):
    from rlprm.cli import main

    code = main(["select", str(RECIPES / "active_learning.yaml"), f"run.output_dir={tmp_path}", "tracking.wandb=disabled"])
    assert code == 2 and "active.prm" in capsys.readouterr().err
    code = main(["active-learning", str(RECIPES / "active_learning.yaml"), f"run.output_dir={tmp_path}",
                 "tracking.wandb=disabled", "active.labeller=/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "active.labeller: /nonexistent does not exist" in err  # refused before anything loads


@pytest.mark.slow
def test_active_learning_cli_every_share_three_seeds(tmp_path, generator):  # noqa: F811
    """The shipped recipe's shape (3 seeds, the four convincing shares) at toy budgets, through the command."""
    from rlprm.cli import main

    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("active.seeds", "active.convincing_shares"))]
    assert main(["active-learning", str(RECIPES / "active_learning.yaml"), f"model.generator={generator}",
                 f"run.output_dir={run}", f"rm.data.cache_dir={tmp_path / 'cache'}", "--no-progress", *overrides,
                 "active.seeds=[0,1,2]"]) == 0
    saved = json.loads((run / "summary.json").read_text())
    assert saved["arms"] == ["uniform", "active@0", "active@0.4", "active@0.8", "active@1"]
    assert saved["seeds"] == [0, 1, 2] and saved["headline_share"] == 0.8
    for metric in ("best_of_n_process_accuracy", "best_of_n_answer_accuracy", "step_auroc", "first_error_f1"):
        assert set(saved["factor"][metric]["by_share"]) == {"0", "0.4", "0.8", "1"}
    # every arm of a seed labels the same count; the mix follows the share exactly (5 then 4 new labels)
    mix = saved["mix"]
    assert [mix[f"active@{s}"]["8"]["convincing_wrong_answer"] for s in ("0", "0.4", "0.8", "1")] == [0, 6, 12, 15]
    assert all(mix[arm]["8"]["new_labels"] == 15 for arm in mix)


def test_a_schedule_larger_than_the_pool_fails_before_training(tmp_path, generator):  # noqa: F811
    from rlprm.experiments.active import ActiveLearningError, run_loop

    recipe = load_recipe(RECIPES / "active_learning.yaml", [f"model.generator={generator}",
                                                             f"run.output_dir={tmp_path / 'run'}",
                                                             f"rm.data.cache_dir={tmp_path / 'cache'}", *TINY,
                                                             "active.budgets=[4,40]"])
    with pytest.raises(ActiveLearningError, match="runs out of problems"):
        run_loop(recipe, progress=False)
    assert not (tmp_path / "run" / "labels").exists()  # nothing labelled, nothing trained
