"""Synthetic supervision (`rlprm synthetic-supervision`): labellings, their error rates, the job end to end (tiny)."""

import json
import random

import numpy as np
import pytest

from rlprm.config import ArithmeticConfig, RecipeError, load_recipe
from rlprm.data.stepwise import CORRECT, INCORRECT, LabelledSolution, label_arithmetic_sample
from rlprm.experiments.synthetic import (OUTCOME_GRADER, OUTCOME_LARGE, PROCESS_CHECKER, PROCESS_LARGE,
                                         SyntheticSupervisionError, budget_subsets, judged_all_correct, label_errors,
                                         training_sets, usable_budgets)
from rlprm.tasks.arithmetic import corrupt_solution, make_problems, reference_solution, shortcut_solution

from .conftest import RECIPES  # the tiny saved generator fixture `generator` is conftest's too


def _checked(problem, steps):
    record, status = label_arithmetic_sample(problem, "\n".join(steps), "\n")
    assert status == "ok"
    return record


def _prm_says(record, first_error):
    """The record as a PRM labeller returns it (phase 2: up to its first judged error)."""
    n = len(record.steps) if first_error is None else first_error + 1
    labels = [CORRECT] * n if first_error is None else [CORRECT] * first_error + [INCORRECT]
    return LabelledSolution(problem=record.problem, steps=record.steps[:n], labels=labels)


def test_labellings_and_their_errors_against_the_checker():
    """Four solutions, hand-judged: a right one, a shortcut chain (right answer, every step wrong), a slip the
    PRM misses, a right one the PRM wrongly flags at step 1."""
    problems = [p for p in make_problems(ArithmeticConfig(), 200, seed=4) if shortcut_solution(p) is not None][:4]
    rng = random.Random(0)
    right = _checked(problems[0], reference_solution(problems[0]))
    shortcut = _checked(problems[1], shortcut_solution(problems[1]))
    slip = _checked(problems[2], corrupt_solution(problems[2], rng)[0])
    flagged = _checked(problems[3], reference_solution(problems[3]))
    assert right.process_correct and flagged.process_correct and not shortcut.process_correct
    assert shortcut.answer_correct and not slip.process_correct
    samples = [right, shortcut, slip, flagged]
    prm = [_prm_says(right, None), _prm_says(shortcut, shortcut.first_error), _prm_says(slip, None),
           _prm_says(flagged, 1)]
    assert [judged_all_correct(p, len(s.steps)) for p, s in zip(prm, samples)] == [True, False, True, False]

    errors = label_errors(samples, prm)
    # process labels: first errors differ on the slip and the flagged one
    assert errors[PROCESS_LARGE]["vs_process"] == pytest.approx(2 / 4)
    # step labels both give: the slip's steps up to its first error, the flagged one's first two
    both = (slip.first_error + 1) + 2 + len(right.steps) + (shortcut.first_error + 1)
    assert errors[PROCESS_LARGE]["steps"] == both and errors[PROCESS_LARGE]["step_error"] == pytest.approx(2 / both)
    # outcome from the large PRM: wrong on the slip (judged right) and the flagged one (judged wrong)
    assert errors[OUTCOME_LARGE]["vs_process"] == pytest.approx(2 / 4)
    # the grader is right about every answer but calls the shortcut chain good
    assert errors[OUTCOME_GRADER]["vs_process"] == pytest.approx((1 + slip.answer_correct) / 4)
    assert errors[OUTCOME_GRADER]["vs_answer"] == 0.0

    sets = training_sets(samples, prm, [PROCESS_LARGE, OUTCOME_LARGE, OUTCOME_GRADER, PROCESS_CHECKER])
    assert sets[PROCESS_LARGE] == prm and sets[PROCESS_CHECKER] == samples
    assert [r.answer_correct for r in sets[OUTCOME_LARGE]] == [True, False, True, False]
    assert [r.answer_correct for r in sets[OUTCOME_GRADER]] == [r.answer_correct for r in samples]
    for name in (OUTCOME_LARGE, OUTCOME_GRADER):  # the same whole solutions, no step labels
        assert [r.steps for r in sets[name]] == [r.steps for r in samples]
        assert all(y is None for r in sets[name] for y in r.labels)


def test_the_synthetic_section_is_validated():
    recipe = load_recipe(RECIPES / "synthetic_supervision.yaml")
    assert recipe.synthetic.labellings == [PROCESS_LARGE, OUTCOME_LARGE, OUTCOME_GRADER]
    assert recipe.rm.scorer == "lm" and recipe.synthetic.large_prm is None
    with pytest.raises(RecipeError, match="labellings"):
        load_recipe(RECIPES / "synthetic_supervision.yaml", ["synthetic.labellings=[process_oracle]"])


def test_budget_subsets_are_nested_seeded_and_checked():
    subsets = budget_subsets(40, [4, 8, 16, 40], seed=[0, 1])
    assert [len(s) for s in subsets] == [4, 8, 16, 40]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) < set(large)
    assert subsets[-1] == list(range(40))  # the whole pool, in pool order: the single-budget run is unchanged
    assert budget_subsets(40, [4, 8, 16, 40], seed=[0, 1]) == subsets  # seeded
    others = [budget_subsets(40, [8], seed=[0, s])[0] for s in range(2, 6)]
    assert any(o != subsets[1] for o in others)  # another seed, another draw
    with pytest.raises(SyntheticSupervisionError, match="synthetic.budgets"):
        budget_subsets(40, [8, 41], seed=0)
    assert usable_budgets([], 37) == [37]
    assert usable_budgets([8, 16, 40], 37) == [8, 16, 37]  # a few unusable samples: the largest is all there are
    with pytest.raises(SyntheticSupervisionError, match="lower the largest budgets"):
        usable_budgets([8, 32, 40], 30)


@pytest.mark.parametrize("budgets, message", [
    ("[64, 32]", "synthetic.budgets .* must be positive and strictly increasing"),
    ("[0, 32]", "synthetic.budgets .* must be positive and strictly increasing"),
    ("[64, 2048]", r"synthetic.budgets: the largest, 2048, is more than the fresh samples .* = 1024\): lower it"),
])
def test_budgets_are_validated_with_the_fix(budgets, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "synthetic_supervision.yaml", [f"synthetic.budgets={budgets}"])


def test_budget_curves_and_their_differences_from_paired_hand_made_scores(tmp_path):
    """Four held-out problems, one right sample of three each. At 2 labels the process and large-PRM outcome
    models pick the right sample with seed 0 and a wrong one with seed 1 (the grader's model always a wrong one);
    at 4 labels both pick the right one with either seed. The differences come from the same problem and seed
    draws, so process - outcome is exactly 0 at 2 labels although each curve spans 0 to 100%."""
    from rlprm.config import SyntheticConfig
    from rlprm.experiments.synthetic import bootstrap_budgets, write_report

    from .test_evaluate import same_answer_pool

    pool = same_answer_pool([[("5", True), ("7", False), ("8", False)]] * 4)
    good, bad = np.tile([1.0, 0.0, 0.0], (4, 1)), np.tile([0.0, 1.0, 0.0], (4, 1))
    fixed = {"large_prm": good, "confidence": bad}
    scores = {2: [{**fixed, PROCESS_LARGE: good, OUTCOME_LARGE: good, OUTCOME_GRADER: bad},
                  {**fixed, PROCESS_LARGE: bad, OUTCOME_LARGE: bad, OUTCOME_GRADER: bad}],
              4: [{**fixed, PROCESS_LARGE: good, OUTCOME_LARGE: good, OUTCOME_GRADER: bad}] * 2}
    cfg = SyntheticConfig(resamples=300)
    results = bootstrap_budgets(cfg, pool, scores, [2, 4], 3)
    errors = {name: {"vs_process": 0.1, "vs_answer": None, "step_error": None} for name in cfg.labellings}
    summary = write_report(tmp_path, cfg, results, errors, "hand-made", 8, {})
    at = summary["synthetic_budget"]
    diff = summary["synthetic_budget_diff"]
    assert summary["budgets"] == [2, 4] and summary["budget_n"] == 3
    one, zero = {"mean": 1.0, "lo": 1.0, "hi": 1.0}, {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert at["4"][PROCESS_LARGE]["accuracy"] == one and at["4"][PROCESS_LARGE]["process_correct"] == one
    assert at["4"][OUTCOME_GRADER]["accuracy"] == zero
    two = at["2"][PROCESS_LARGE]["accuracy"]
    assert (two["lo"], two["hi"]) == (0.0, 1.0) and abs(two["mean"] - 0.5) < 0.1  # the seeds are resampled
    assert diff["2"][f"{PROCESS_LARGE}_minus_{OUTCOME_LARGE}"]["accuracy"] == zero  # paired
    assert diff["2"][f"{PROCESS_LARGE}_minus_{OUTCOME_GRADER}"]["process_correct"]["hi"] == 1.0
    assert diff["4"][f"{PROCESS_LARGE}_minus_{OUTCOME_GRADER}"]["process_correct"] == one
    # the curve over N at the largest budget, as before budgets existed
    assert set(summary["synthetic"][PROCESS_LARGE]) == {"1", "2", "3"}
    assert summary["synthetic"][PROCESS_LARGE]["3"]["accuracy"] == one
    assert (tmp_path / "synthetic_budgets.png").stat().st_size > 0
    assert (tmp_path / "synthetic_supervision.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "Across label budgets" in report and "| 2 | " in report and "+100.0 [+100.0, +100.0]" in report


TINY = ["tracking.wandb=disabled", "run.device=cpu", "run.threads=1", "rm.data.train_problems=8",
        "rm.data.samples_per_problem=2", "rm.data.synthetic_per_problem=3", "rm.data.eval_problems=4",
        "rm.data.eval_samples_per_problem=4", "rm.data.max_new_tokens=40", "rm.batch_size=4", "rm.max_steps=2",
        "synthetic.large_problems=4", "synthetic.problems=4", "synthetic.train_steps=2", "synthetic.seeds=[0,1]",
        "synthetic.eval_n=4", "synthetic.resamples=100", "synthetic.budgets=[]",
        "synthetic.lanes=1"]  # one process: a lane's child costs seconds to start; the end-to-end test runs both


def test_synthetic_supervision_end_to_end(tmp_path, generator):  # noqa: F811
    from rlprm.cli import main

    run = tmp_path / "run"
    code = main(["synthetic-supervision", str(RECIPES / "synthetic_supervision.yaml"), f"model.generator={generator}",
                 f"run.output_dir={run}", f"rm.data.cache_dir={tmp_path / 'cache'}", "--no-progress", *TINY,
                 "synthetic.budgets=[2,8]", "synthetic.seeds=[1]", "synthetic.lanes=2"])  # one seed: as many models as before budgets
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    # two label budgets (the largest is every usable fresh sample), each labelling at best-of-4 with intervals
    assert summary["budgets"][0] == 2 and 2 < summary["budgets"][1] <= 8  # TINY: 4 fresh problems x 2 samples
    for budget in map(str, summary["budgets"]):
        for name in (PROCESS_LARGE, OUTCOME_LARGE, OUTCOME_GRADER):
            point = summary["synthetic_budget"][budget][name]["process_correct"]
            assert point["lo"] <= point["mean"] <= point["hi"]
        assert set(summary["synthetic_budget_diff"][budget]) >= {f"{PROCESS_LARGE}_minus_{OUTCOME_LARGE}",
                                                                 f"{PROCESS_LARGE}_minus_{OUTCOME_GRADER}"}
    assert (run / "synthetic_budgets.png").stat().st_size > 0
    so_far = json.loads((run / "budgets_so_far.json").read_text())  # written after each budget
    assert so_far["synthetic_budget"] == summary["synthetic_budget"]
    for name in (PROCESS_LARGE, OUTCOME_LARGE, OUTCOME_GRADER):
        assert set(summary["synthetic"][name]) == {"1", "2", "4"}
        for N in ("1", "2", "4"):
            point = summary["synthetic"][name][N]
            assert set(point) >= {"accuracy", "process_correct"}
            assert set(point["accuracy"]) == {"mean", "lo", "hi"} and set(point["process_correct"]) == {"mean", "lo", "hi"}
        assert set(summary["label_errors"][name]) >= {"vs_process", "vs_answer", "step_error"}
    assert {"large_prm", "confidence", "majority", "random"} <= set(summary["bon"])
    assert f"{PROCESS_LARGE}_minus_{OUTCOME_GRADER}" in summary["synthetic_diff"]
    # the large PRM was trained here, saved, and labelled the fresh samples through the label files
    lines = [json.loads(t) for t in (run / "labels" / "large_prm_labels.jsonl").read_text().splitlines()]
    assert lines and {x["labeler"] for x in lines} == {f"prm:{(run / 'large_prm').resolve()}"}
    assert (run / "large_prm" / "rlprm_rm.json").is_file() and (run / "synthetic_supervision.png").stat().st_size > 0
    report = (run / "report.md").read_text()
    assert "How often each labelling is wrong" in report and "Paired differences" in report
    # 2 lanes ran the small models in child processes; each is seeded, so one process gives the same
    # numbers (the large PRM trained above is given, so the labels are the same too)
    assert summary["lanes"] == 2 and summary["wall_seconds"] > 0
    phases = list(summary["phase_seconds"])
    assert phases[0].startswith("samples") and phases[-1] == "report"
    # 2 lanes: the grader's small models ran beside the large PRM's training
    assert any(p.startswith("the large PRM (trained here, 2 steps); beside it") for p in phases)
    one = tmp_path / "one_lane"
    assert main(["synthetic-supervision", str(RECIPES / "synthetic_supervision.yaml"), f"model.generator={generator}",
                 f"run.output_dir={one}", f"rm.data.cache_dir={tmp_path / 'cache'}", "--no-progress", *TINY,
                 "synthetic.budgets=[2,8]", "synthetic.seeds=[1]", "synthetic.lanes=1",
                 f"synthetic.large_prm={run / 'large_prm'}"]) == 0
    alone = json.loads((one / "summary.json").read_text())
    assert alone["lanes"] == 1 and alone["synthetic_budget"] == summary["synthetic_budget"]
    assert alone["synthetic"] == summary["synthetic"]


def test_a_given_large_prm_labels_and_an_orm_is_refused(tmp_path, generator, char_tokenizer, capsys):  # noqa: F811
    from rlprm.cli import main

    from .test_reward_models import tiny_rm

    tiny_rm(char_tokenizer, kind="orm").save(tmp_path / "orm")
    code = main(["synthetic-supervision", str(RECIPES / "synthetic_supervision.yaml"), f"model.generator={generator}",
                 f"run.output_dir={tmp_path / 'run'}", f"rm.data.cache_dir={tmp_path / 'cache'}", "--no-progress",
                 *TINY, f"synthetic.large_prm={tmp_path / 'orm'}"])
    assert code == 2 and "is an ORM" in capsys.readouterr().err


@pytest.mark.slow
def test_synthetic_supervision_with_the_checker_ceiling(tmp_path, generator):  # noqa: F811
    """The shipped recipe's shape (3 seeds) with the optional checker-labelled PRM, through the command."""
    from rlprm.cli import main

    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("synthetic.seeds")]
    assert main(["synthetic-supervision", str(RECIPES / "synthetic_supervision.yaml"), f"model.generator={generator}",
                 f"run.output_dir={run}", f"rm.data.cache_dir={tmp_path / 'cache'}", "--no-progress", *overrides,
                 "synthetic.seeds=[0,1,2]", f"synthetic.labellings=[{PROCESS_LARGE},{OUTCOME_LARGE},{OUTCOME_GRADER},"
                 f"{PROCESS_CHECKER}]"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["synthetic"]) == {PROCESS_LARGE, OUTCOME_LARGE, OUTCOME_GRADER, PROCESS_CHECKER}
    assert summary["label_errors"][PROCESS_CHECKER]["vs_process"] == 0.0 and summary["seeds"] == [0, 1, 2]
    assert f"{PROCESS_CHECKER}_minus_{PROCESS_LARGE}" in summary["synthetic_diff"]
