"""`rlprm bench-prm`: ProcessBench's metric on hand-made cases, and the command end to end with a stand-in."""

from __future__ import annotations

import json
import textwrap

import pytest

from rlprm.bench_prm import processbench_scores, tune_threshold
from .conftest import shared_file


def test_half_right_on_each_side_gives_f1_50():
    labels = [2, -1, 0, -1]
    probs = [[0.9, 0.8, 0.1, 0.2],  # first below 0.5 at 2 = label: right
             [0.9, 0.9],            # nothing flagged on an error-free one: right
             [0.9, 0.1],            # flagged at 1, the error was at 0: wrong
             [0.9, 0.4]]            # an error-free one flagged: wrong
    r = processbench_scores(labels, probs, 0.5)
    assert (r["error_acc"], r["correct_acc"], r["f1"]) == (50.0, 50.0, 50.0)
    assert r["num_error"] == 2 and r["num_correct"] == 2
    assert r["first_error_acc"] == 50.0


def test_flagging_everything_scores_zero_and_harmonic_mean():
    assert processbench_scores([0, -1], [[0.1], [0.1, 0.2]], 0.5)["f1"] == 0.0  # 100 and 0
    r = processbench_scores([1, -1, -1], [[0.9, 0.2], [0.8, 0.9], [0.3]], 0.5)  # 100 and 50
    assert r["f1"] == pytest.approx(2 * 100 * 50 / 150)
    # the threshold decides: at 0.25 the third solution passes too
    assert processbench_scores([1, -1, -1], [[0.9, 0.2], [0.8, 0.9], [0.3]], 0.25)["f1"] == 100.0
    assert processbench_scores([-1], [[0.9]], 0.5)["f1"] is None  # no erroneous solution: undefined


def test_step_auroc_uses_steps_up_to_the_first_error():
    # label 1: step 0 right, step 1 wrong, step 2 unlabelled (its 0.99 must not count)
    r = processbench_scores([1, -1], [[0.7, 0.2, 0.99], [0.6, 0.1]], 0.5)
    # right steps 0.7, 0.6, 0.1 against the wrong 0.2: 2 of 3 pairs ranked right
    assert r["step_auroc"] == pytest.approx(2 / 3)


def test_tuned_threshold_is_the_best_f1_on_the_tuning_data():
    labels, probs = [1, -1, -1], [[0.9, 0.2], [0.8, 0.9], [0.3]]
    assert tune_threshold(labels, probs, [0.1, 0.25, 0.5, 0.95]) == 0.25
    with pytest.raises(ValueError, match="erroneous and error-free"):
        tune_threshold([-1], [[0.9]], [0.5])


ITEMS = [
    {"id": "a", "generator": "g", "problem": "What is 12 + 5?", "steps": ["12 + 5 = 17", "# Answer\n\n17"],
     "final_answer_correct": True, "label": -1},
    {"id": "b", "generator": "g", "problem": "What is 3 * 4?", "steps": ["3 * 4 = 13", "# Answer\n\n13"],
     "final_answer_correct": False, "label": 0},
    {"id": "c", "generator": "g", "problem": "Solve 2x = 8.", "steps": ["x = 4", "So 2x = 8.", "# Answer\n\n4"],
     "final_answer_correct": True, "label": -1},
    {"id": "d", "generator": "g", "problem": "What is 9 - 2?", "steps": ["9 - 2 = 7", "7 + 1 = 9"],
     "final_answer_correct": False, "label": 1},
]


def _recipe(tmp_path, model, adapter, files, extra=""):
    path = tmp_path / "bench.yaml"
    lines = "\n".join(f"    - {f}" for f in files)
    path.write_text(textwrap.dedent(f"""\
        run: {{output_dir: {tmp_path / 'run'}, device: cpu}}
        tracking: {{wandb: disabled}}
        model: {{reward_model: {model}}}
        rm: {{adapter: {adapter}}}
        bench:
          batch_size: 3
          processbench_paths:
        """) + lines + "\n" + extra)
    return path


@pytest.mark.parametrize("family", ["qwen_prm", "rlhflow"])
def test_bench_prm_command_writes_table_json_plot(tmp_path, family, capsys):
    from rlprm.cli import main
    from rlprm.prm_adapters import load_reward_model
    from rlprm.prm_adapters.standins import save_standin

    model = save_standin(family, tmp_path / family)
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(ITEMS))
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps(ITEMS[::-1]))
    recipe = _recipe(tmp_path, model, family, [data], f"  tune_threshold_on: {tune}\n")
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| toy |" in out and "F1" in out
    run = tmp_path / "run"
    assert {"bench_prm.md", "bench_prm.json", "bench_prm.png", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    results = json.loads((run / "bench_prm.json").read_text())
    # the numbers are processbench_scores of the model's own step scores at the tuned threshold
    rm = load_reward_model(model, family)
    probs = rm.score_steps([i["problem"] for i in ITEMS], [i["steps"] for i in ITEMS])
    tuned = tune_threshold([i["label"] for i in ITEMS[::-1]], probs[::-1], [round(0.05 * k, 2) for k in range(1, 20)])
    assert results["threshold"] == tuned and results["adapter"] == family
    expected = processbench_scores([i["label"] for i in ITEMS], probs, tuned)
    got = results["subsets"]["toy"]
    for key in ("error_acc", "correct_acc", "f1", "step_auroc", "first_error_acc"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6) if expected[key] is not None else got[key] is None


def test_bench_prm_on_shared_processbench(tmp_path, capsys):
    from rlprm.cli import main
    from rlprm.prm_adapters.standins import save_standin

    files = [shared_file("processbench/gsm8k.json"), shared_file("processbench/math.json")]
    model = save_standin("value_head", tmp_path / "vh")
    recipe = _recipe(tmp_path, model, "value_head", files, "  limit: 6\n")
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "bench_prm.json").read_text())
    assert set(results["subsets"]) == {"gsm8k", "math"}
    for r in results["subsets"].values():
        assert r["num_error"] + r["num_correct"] + r["num_too_long"] == 6


def test_bench_prm_errors(tmp_path, capsys):
    from rlprm.cli import main
    from rlprm.prm_adapters.standins import save_standin

    model = save_standin("math_shepherd", tmp_path / "ms")
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(ITEMS))
    recipe = _recipe(tmp_path, model, "null", [data])
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 2  # an undetectable family, not named
    assert "rm.adapter" in capsys.readouterr().err
