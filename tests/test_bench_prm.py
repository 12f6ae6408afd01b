"""`rlprm bench-prm`: ProcessBench's metric on hand-made cases, and the command end to end with a stand-in on
ProcessBench files, PRM800K lines and the arithmetic task's held-out generator samples."""

from __future__ import annotations

import json
import textwrap

import pytest

from rlprm.reward.bench import processbench_scores, tune_threshold
from .conftest import shared_file, train_tiny_generator

HELD_OUT = 6  # bench.arithmetic_problems in the arithmetic test


@pytest.fixture(scope="module")
def held_out_generator(tmp_path_factory, char_tokenizer):
    """A tiny generator that has memorised the reference solutions of the recipe's first held-out problems (seed 0,
    default task): sampled at temperature 1 it writes right solutions and slips, so both labels occur. (A
    generator that never saw them writes garbage at this size: every first error at step 0.)"""
    from rlprm.config import ArithmeticConfig
    from rlprm.tasks.arithmetic import split_problems

    problems = split_problems(ArithmeticConfig(), 0, HELD_OUT, 0)[1]
    return train_tiny_generator(tmp_path_factory.mktemp("gen") / "generator", char_tokenizer, problems, steps=120)


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


def _recipe(tmp_path, model, adapter, files, extra="", key="processbench_paths", model_extra="", rm_extra=""):
    path = tmp_path / "bench.yaml"
    lines = "\n".join(f"    - {f}" for f in files)
    path.write_text(textwrap.dedent(f"""\
        run: {{output_dir: {tmp_path / 'run'}, device: cpu}}
        tracking: {{wandb: disabled}}
        model: {{reward_model: {model}{model_extra}}}
        reward: {{adapter: {adapter}}}
        rm: {{{rm_extra}}}
        bench:
          batch_size: 3
          {key}:{'' if files else ' []'}
        """) + lines + "\n" + extra)
    return path


@pytest.mark.parametrize("family", ["qwen_prm", "rlhflow"])
def test_bench_prm_command_writes_table_json_plot(tmp_path, family, capsys):
    from rlprm.cli import main
    from rlprm.reward.adapters import load_reward_model
    from rlprm.testing.standins import save_standin

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
    from rlprm.testing.standins import save_standin

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
    from rlprm.testing.standins import save_standin

    model = save_standin("math_shepherd", tmp_path / "ms")
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(ITEMS))
    recipe = _recipe(tmp_path, model, "null", [data])
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 2  # an undetectable family, not named
    assert "reward.adapter" in capsys.readouterr().err


def test_step_auroc_reads_given_step_truth():
    # no label on step 1 (a PRM800K rating read as `ignore`): only steps 0 and 2 count
    r = processbench_scores([2, -1], [[0.7, 0.1, 0.2], [0.6, 0.3]], 0.5, [[True, None, False], [True, True]])
    assert r["step_auroc"] == 1.0  # 0.7, 0.6, 0.3 right above the wrong 0.2; the unlabelled 0.1 left out


def test_bench_prm_on_prm800k_test_lines(tmp_path, capsys):
    """PRM800K lines as subsets: phase 2's gold first error is the step rated -1 where the labeller stopped;
    phase 1's finished solutions are error-free, and its `give_up` line settles no label (left out, counted)."""
    from rlprm.cli import main
    from rlprm.data.prm800k import load_prm800k
    from rlprm.reward.adapters import load_reward_model
    from rlprm.testing.standins import save_standin

    files = [shared_file("prm800k/sample_phase2.jsonl"), shared_file("prm800k/sample_phase1.jsonl")]
    model = save_standin("qwen_prm", tmp_path / "qwen")
    recipe = _recipe(tmp_path, model, "null", files, key="prm800k_paths")
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 0
    assert "| sample_phase2 | prm800k |" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "bench_prm.json").read_text())
    assert results["adapter"] == "qwen_prm" and set(results["subsets"]) == {"sample_phase1", "sample_phase2"}
    rm = load_reward_model(model)
    for path in files:
        raw = [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
        finished = [o["label"]["finish_reason"] in ("found_error", "solution") for o in raw]
        # written from the raw lines: the step where a phase-2 labeller stopped is the error; `solution`: none
        labels = [len(o["label"]["steps"]) - 1 if o["label"]["finish_reason"] == "found_error" else -1
                  for o, f in zip(raw, finished) if f]
        records = [r for r, f in zip(load_prm800k(path, alternatives=False)[0], finished) if f]
        probs = rm.score_steps([r.problem for r in records], [r.steps for r in records])
        expected = processbench_scores(labels, probs, 0.5)
        got = results["subsets"][path.stem]
        assert got["source"] == "prm800k" and got["num_no_label"] == len(raw) - len(labels)
        assert got["num_error"] + got["num_correct"] == len(labels)
        for key in ("error_acc", "correct_acc", "f1", "step_auroc", "first_error_acc"):
            assert (got[key] is None and expected[key] is None) or got[key] == pytest.approx(expected[key], abs=1e-6)
    assert results["subsets"]["sample_phase2"]["num_error"] == 10
    assert results["subsets"]["sample_phase1"]["num_no_label"] == 1


def test_bench_prm_on_held_out_arithmetic_samples(tmp_path, held_out_generator, capsys):
    """The recipe's generator sampled on held-out problems, every step labelled by the exact checker: the subset
    `arithmetic`, with ProcessBench's metric, step AUROC and first-error accuracy, in the same report."""
    from rlprm.cli import main
    from rlprm.config import load_recipe
    from rlprm.data.stepwise import read_records
    from rlprm.reward.adapters import load_reward_model
    from rlprm.testing.standins import save_standin
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import check, split_problems

    model = save_standin("rlhflow", tmp_path / "rlhflow")
    extra = f"  arithmetic_problems: {HELD_OUT}\n  arithmetic_samples_per_problem: 4\n"
    recipe = _recipe(tmp_path, model, "rlhflow", [], extra, model_extra=f", generator: {held_out_generator}",
                     rm_extra="data: {max_new_tokens: 60}")
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 0
    assert "| arithmetic | arithmetic |" in capsys.readouterr().out
    run = tmp_path / "run"
    results = json.loads((run / "bench_prm.json").read_text())
    got = results["subsets"]["arithmetic"]
    assert got["source"] == "arithmetic" and results["arithmetic_sampling"]["samples"] == 24

    # the samples: held-out problems, labelled by the exact checker
    cfg = load_recipe(recipe)
    held_out = {p.text: p for p in split_problems(cfg.task.arithmetic, 0, HELD_OUT, cfg.run.seed)[1]}
    _, records = read_records(run / "bench_samples_arithmetic.jsonl")
    assert records and {r.problem for r in records} <= set(held_out)
    labels, kept = [], []
    for r in records:
        result = check(held_out[r.problem], render_steps(r.steps), "\n")
        assert result.first_error == r.first_error
        if result.first_error is None or result.first_error < len(r.steps):
            labels.append(-1 if result.first_error is None else result.first_error)
            kept.append(r)
    assert {y == -1 for y in labels} == {True, False}, "the generator should write right and wrong solutions"
    probs = load_reward_model(model, "rlhflow").score_steps([r.problem for r in kept], [r.steps for r in kept])
    expected = processbench_scores(labels, probs, 0.5)
    assert got["num_no_label"] == len(records) - len(kept)
    for key in ("error_acc", "correct_acc", "f1", "step_auroc", "first_error_acc"):
        assert (got[key] is None and expected[key] is None) or got[key] == pytest.approx(expected[key], abs=1e-6)
    md = (run / "bench_prm.md").read_text()
    assert "| arithmetic | arithmetic |" in md and (run / "bench_prm.png").stat().st_size > 0


def test_bench_prm_says_what_is_missing(tmp_path, capsys):
    from rlprm.cli import main
    from rlprm.testing.standins import save_standin

    model = save_standin("value_head", tmp_path / "vh")
    assert main(["bench-prm", str(_recipe(tmp_path, model, "value_head", [])), "--no-progress"]) == 2
    assert "bench.prm800k_paths" in capsys.readouterr().err
    recipe = _recipe(tmp_path, model, "value_head", [], "  arithmetic_problems: 2\n")
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 2  # model.generator is `tiny`
    assert "model.generator" in capsys.readouterr().err


def _embedded_prm(path, char_tokenizer, max_positions: int, sep: str = "\n"):
    """An rlprm PRM like the embedded one (char tokenizer, Llama with rotary positions), with few positions."""
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

    config = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                             max_positions=max_positions)
    convention = make_convention("prm", sep)
    lm = build_tiny_causal_lm(config, char_tokenizer, seed=0)
    rm = RewardModel(reward_model_from_causal_lm(convention, lm, char_tokenizer).eval(), char_tokenizer, convention)
    return rm.save(path)


@pytest.mark.parametrize("too_long", ["extend", "skip"])
def test_bench_prm_scores_past_the_positions_of_a_rotary_prm(tmp_path, char_tokenizer, too_long):
    """Every toy item is longer than the PRM's 16 positions. `extend` scores them all (rotary positions exist for
    any index) and counts them; its numbers are the model's own scores, computed without the position check.
    `skip` leaves them out (the old behaviour). The report says the model is out of its domain and how much of
    the text its tokenizer cannot read."""
    from rlprm.cli import main
    from rlprm.reward.model import RewardModel

    model = _embedded_prm(tmp_path / "prm", char_tokenizer, max_positions=16)
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(ITEMS))
    recipe = _recipe(tmp_path, model, "rlprm", [data], f"  too_long: {too_long}\n")
    assert main(["bench-prm", str(recipe), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "bench_prm.json").read_text())
    got = results["subsets"]["toy"]
    assert results["max_positions"] == 16 and results["rotary_positions"] and results["too_long"] == too_long
    md = (run / "bench_prm.md").read_text()
    assert "out of its domain" in md
    if too_long == "skip":
        assert got["num_too_long"] == len(ITEMS) and got["num_scored"] == 0 and got["f1"] is None
        return
    assert got["num_beyond_positions"] == len(ITEMS) and got["num_scored"] == len(ITEMS) and got["num_too_long"] == 0
    rm = RewardModel.load(model)
    with pytest.raises(Exception, match="beyond this model's 16 positions"):
        rm.score_steps([i["problem"] for i in ITEMS], [i["steps"] for i in ITEMS])
    probs = rm.score_steps([i["problem"] for i in ITEMS], [i["steps"] for i in ITEMS], beyond_positions=True)
    expected = processbench_scores([i["label"] for i in ITEMS], probs, 0.5)
    for key in ("error_acc", "correct_acc", "f1", "step_auroc", "first_error_acc"):
        assert (got[key] is None and expected[key] is None) or got[key] == pytest.approx(expected[key], abs=1e-6)
    assert got["f1"] is not None
    # "What is", "Solve", "x" and "*" are outside the arithmetic task's characters: <unk> for the char tokenizer
    ids = [t for i in ITEMS for t in char_tokenizer(i["problem"] + "\n" + "\n".join(i["steps"]) + "\n",
                                                     add_special_tokens=False)["input_ids"]]
    assert 0 < got["unknown_token_share"] < 1
    assert char_tokenizer.unk_token_id in ids


def test_an_rlprm_prm_keeps_its_own_separator_on_data_split_into_steps(tmp_path, char_tokenizer):
    """prm_train_prm800k.yaml saves a PRM trained on "\n\n" paragraphs; bench_prm.yaml names no task separator, and
    its default "\n" refused that PRM. On data that comes split into steps the PRM's own separator is used; a
    separator the recipe names is still held against the PRM's."""
    from rlprm.cli import main

    model = _embedded_prm(tmp_path / "prm", char_tokenizer, max_positions=512, sep="\n\n")
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(ITEMS))
    assert main(["bench-prm", str(_recipe(tmp_path, model, "rlprm", [data])), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "bench_prm.json").read_text())["subsets"]["toy"]["num_scored"] == len(ITEMS)
    named = _recipe(tmp_path, model, "rlprm", [data], 'task: {step_separator: "\\n"}\n')
    assert main(["bench-prm", str(named), "--no-progress", "run.output_dir=" + str(tmp_path / "run2")]) == 2


def test_learned_positions_cannot_be_extended():
    from transformers import GPT2Config, LlamaConfig

    from rlprm.reward.bench import rotary

    assert rotary(LlamaConfig()) and not rotary(GPT2Config())
