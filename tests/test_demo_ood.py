"""The demo's out-of-distribution table: summary.json's `ood` key and report.md's table, from hand-made pools."""

from __future__ import annotations

import json

import yaml

from rlprm.config import load_recipe
from rlprm.shipped import recipes_dir


def pool_folder(folder, prm_prefers_right: bool, problems=4, arithmetic=None):
    """A best-of-N folder, 2 samples per problem: sample 0 right (every step right), sample 1 wrong. The ORM always
    prefers the wrong one; the PRM the right one or, with prm_prefers_right False, the wrong one. At N=2 every
    resample holds both samples of every problem, so each selector's value is exact."""
    from rlprm.data.problems import SampleGrade, TaskProblem
    from rlprm.evaluation.evaluate import Pool, save_pool

    good = SampleGrade(["1 + 1 = 2", "# Answer: 2"], "2", True, True, True, None)
    bad = SampleGrade(["1 + 1 = 3", "# Answer: 3"], "3", False, True, False, 0)
    prm = [[0.9, 0.9], [0.2, 0.3]] if prm_prefers_right else [[0.2, 0.3], [0.9, 0.9]]
    pool = Pool([TaskProblem(f"test-{i}", f"p{i}\n", "2", text=f"p{i}") for i in range(problems)],
                [["right", "wrong"]] * problems, [[good, bad] for _ in range(problems)],
                {"prm": [prm] * problems, "orm": [[[0.1], [0.8]]] * problems}, {"prm": "prm", "orm": "orm"},
                {"confidence": [[-0.1, -3.0]] * problems, "likelihood": [[-9.0, -1.0]] * problems})
    folder.mkdir(parents=True)
    save_pool(pool, folder / "pool.jsonl")
    recipe = {"run": {"name": folder.name, "seed": 0}, "task": {"name": "arithmetic"}}
    if arithmetic:
        recipe["task"]["arithmetic"] = arithmetic
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def test_ood_table_puts_ood_beside_in_distribution(tmp_path):
    from rlprm.experiments.demo_report import DemoLayout, write_demo_report

    kind = {"min_ops": 4, "max_ops": 5, "operand_max": 9, "final_ops": ["mod10", "last_digit", "none"]}
    layout = DemoLayout(seeds=2)
    layout.generator = pool_folder(tmp_path / "prepare", True, arithmetic={"min_ops": 2, "max_ops": 3})
    layout.generators["start"] = [pool_folder(tmp_path / f"start{s}", True) for s in range(2)]
    # out of distribution the PRM turns: it prefers the wrong sample, the in-distribution baseline the right one
    layout.ood = [pool_folder(tmp_path / f"ood{s}", False, arithmetic=kind) for s in range(2)]
    report = write_demo_report(layout, tmp_path / "report", {}, resamples=100)
    o = json.loads((tmp_path / "report" / "summary.json").read_text())["ood"]
    assert o["n"] == 2 and o["kind"] == kind and "2 seed pool(s)" in o["intervals"]
    assert o["training_kind"] == {"min_ops": 2, "max_ops": 3}
    exact = lambda v: {"mean": v, "lo": v, "hi": v}  # noqa: E731
    assert o["ood"]["prm_prod"]["accuracy"] == exact(0.0) and o["ood"]["prm_prod"]["process_correct"] == exact(0.0)
    assert o["in_distribution"]["prm_prod"]["accuracy"] == exact(1.0)
    assert o["ood"]["orm"]["accuracy"] == o["in_distribution"]["orm"]["accuracy"] == exact(0.0)
    assert o["ood"]["pass@n"]["accuracy"] == exact(1.0) and "process_correct" not in o["ood"]["majority"]
    assert o["ood_diff"]["prm_prod_minus_orm"]["accuracy"] == exact(0.0)
    assert o["in_distribution_diff"]["prm_prod_minus_orm"]["accuracy"] == exact(1.0)
    assert o["in_distribution_diff"]["prm_prod_minus_orm"]["process_correct"] == exact(1.0)
    assert set(o["ood_diff"]) == {"prm_prod_minus_majority", "prm_prod_minus_orm"}
    # every sample of the pools: one right, one wrong per problem; every problem has a fully correct sample
    assert o["pool"] == o["in_distribution_pool"] == {"answer_accuracy": 0.5, "process_accuracy": 0.5,
                                                      "well_formed": 1.0, "problems_with_a_correct_chain": 1.0}
    # the OOD pools are no generator of the best-of-N section
    assert set(json.loads((tmp_path / "report" / "summary.json").read_text())["bon"]) == {"start"}
    text = report.read_text()
    assert "Every sample: OOD 50.0% answer right, 50.0% every step right" in text
    assert "## Out of distribution" in text and "(4-5 operations of 1-9, finals mod10, last_digit, none; training: 2-3 operations of 1-9)" in text
    assert "| prm_prod | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] |" in text
    assert "| prm_prod - orm (paired) | +0.0 [+0.0, +0.0] | +100.0 [+100.0, +100.0] |" in text


def test_ood_summary_without_a_baseline_and_without_ood_pools(tmp_path):
    from rlprm.experiments.demo_report import DemoLayout, bon_statistics, ood_markdown, ood_summary, \
        write_demo_report

    stats = bon_statistics([pool_folder(tmp_path / "ood", True)], resamples=50)
    o = ood_summary(stats, None, {})
    assert o["n"] == 2 and "in_distribution" not in o and o["ood"]["prm_prod"]["accuracy"]["mean"] == 1.0
    assert "the OOD recipe's problems" in "\n".join(ood_markdown(o)) and ood_markdown({}) == []
    layout = DemoLayout(generators={"start": [pool_folder(tmp_path / "start", True)]})
    write_demo_report(layout, tmp_path / "report", {}, resamples=50)  # a demo without the OOD stage
    assert "ood" not in json.loads((tmp_path / "report" / "summary.json").read_text())


def test_ood_recipe_draws_longer_chains_than_training_and_held_out_by_construction():
    from rlprm.data.problems import eval_problems

    ood = load_recipe(recipes_dir() / "ood_eval.yaml", ["eval.num_problems=20"])
    train = load_recipe(recipes_dir() / "arith_prepare.yaml")
    assert ood.task.arithmetic.min_ops > train.task.arithmetic.max_ops and ood.run.seed == train.run.seed
    problems = eval_problems(ood, ood.eval.num_problems)
    assert len(problems) == 20 and all(len(p.arith.ops) in (4, 5) for p in problems)
    assert {len(p.arith.ops) for p in problems} == {4, 5}
    # the held-out final of the recipe's header: max / min problems, every character in the task's charset
    from rlprm.tasks.arithmetic import CHARSET, reference_solution

    final = load_recipe(recipes_dir() / "ood_eval.yaml", ["task.arithmetic.min_ops=2", "task.arithmetic.max_ops=3",
                                                          "task.arithmetic.final_ops=[max, min]"])
    held = eval_problems(final, 10)
    assert {p.arith.final for p in held} <= {"max", "min"} and len({p.arith.final for p in held}) == 2
    assert all(set(p.prompt + "\n".join(reference_solution(p.arith))) <= set(CHARSET) for p in held)
