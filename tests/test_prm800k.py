"""PRM800K and ProcessBench loaders, on the real lines in ../shared/data and on hand-made lines."""

import json

import pytest

from .conftest import shared_file
from rlprm.data.prm800k import PRM800KError, load_many, load_prm800k
from rlprm.data.processbench import ProcessBenchError, load_processbench
from rlprm.data.stepwise import CORRECT, INCORRECT, NEUTRAL


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main_records(records):
    return [r for r in records if "alternative_of_step" not in r.meta]


def step(*completions, chosen=0, human=None):
    return {"completions": [{"text": t, "rating": r, "flagged": None} for t, r in completions],
            "human_completion": human, "chosen_completion": chosen}


def line(steps, finish="solution", qc=False, screening=False, generation=None, pre=None):
    question = {"problem": "What is 1+1?", "ground_truth_answer": "2"}
    if pre is not None:
        question["pre_generated_steps"] = pre
    return {"labeler": "x", "timestamp": "t", "generation": generation, "is_quality_control_question": qc,
            "is_initial_screening_question": screening, "question": question,
            "label": {"steps": steps, "total_time": 1, "finish_reason": finish}}


def write_jsonl(tmp_path, objs, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


# --------------------------------------------------------------------------- the real lines


def test_phase1_real_lines_rebuild_trajectories():
    path = shared_file("prm800k/sample_phase1.jsonl")
    raw = lines(path)
    records, counts = load_prm800k(path)
    mains = main_records(records)
    assert counts["lines"] == 10 and counts["trajectories"] == len(mains) == 10
    # every trajectory is the chosen completion, or the human one, at each step
    for obj, record in zip(raw, mains):
        expected = []
        for s in obj["label"]["steps"]:
            if s["chosen_completion"] is not None:
                expected.append(s["completions"][s["chosen_completion"]]["text"])
            elif s["human_completion"] is not None:
                expected.append(s["human_completion"]["text"])
            else:
                break
        assert record.steps == expected
        assert record.problem == obj["question"]["problem"]
    first = mains[0]
    assert first.steps[1] == "We have $3p+e=1.24$ and $5p+e=1.82$."  # a labeler's own step: labelled correct
    assert first.labels == [CORRECT] * 6 and first.process_correct is True and first.answer_correct is True
    # the give-up line: the trajectory stops at the unrated step; nothing known about its outcome
    give_up = mains[1]
    assert raw[1]["label"]["finish_reason"] == "give_up" and give_up.process_correct is None
    # alternatives: extra prefixes labelled at their last step only, many of them wrong
    alts = [r for r in records if "alternative_of_step" in r.meta]
    assert counts["alternatives"] == len(alts) > 100
    assert all(r.labels[:-1] == [None] * (len(r.steps) - 1) and r.labels[-1] is not None for r in alts)
    assert sum(r.labels[-1] == INCORRECT for r in alts) > 50
    # the 9 null ratings of these lines are skipped and counted
    assert counts["null_ratings"] == 9
    assert counts["labelled_steps"] == sum(y is not None for r in records for y in r.labels)


def test_alternative_prefix_is_the_trajectory_prefix():
    path = shared_file("prm800k/sample_phase1.jsonl")
    records, _ = load_prm800k(path)
    by_source = {r.source: r for r in main_records(records)}
    for alt in (r for r in records if "alternative_of_step" in r.meta):
        k = alt.meta["alternative_of_step"]
        main = by_source[alt.source]
        assert alt.steps[:k] == main.steps[:k]
        if k < len(main.steps):
            assert alt.steps[k] != main.steps[k]


def test_phase2_real_lines_end_at_the_first_error():
    path = shared_file("prm800k/sample_phase2.jsonl")
    raw = lines(path)
    records, counts = load_prm800k(path)
    mains = main_records(records)
    assert len(mains) == 10
    for obj, record in zip(raw, mains):
        pre = obj["question"]["pre_generated_steps"]
        n = len(record.steps)
        assert record.steps == pre[:n]  # the pre-generated solution, up to the step where the error was found
        assert record.labels[-1] == INCORRECT and INCORRECT not in record.labels[:-1]
        assert record.first_error == n - 1 and record.process_correct is False
    # phase 2 alternatives sit at the error step only
    error_step = {r.source: r.first_error for r in mains}
    assert all(r.meta["alternative_of_step"] == error_step[r.source] for r in records if r not in mains)
    assert counts["alternatives"] == len(records) - 10


@pytest.mark.parametrize("neutral_as,expected", [
    ("positive", CORRECT), ("negative", INCORRECT), ("ignore", None), ("neutral", NEUTRAL)])
def test_neutral_as(neutral_as, expected):
    path = shared_file("prm800k/sample_phase2.jsonl")
    ratings = [s["completions"][0]["rating"] for s in lines(path)[0]["label"]["steps"]]
    assert ratings[1] == 0  # the second step of the first line is rated neutral
    record = main_records(load_prm800k(path, neutral_as=neutral_as)[0])[0]
    assert record.labels[1] == expected
    assert record.labels[0] == CORRECT and record.labels[-1] == INCORRECT


def test_load_many_sums_counts():
    p1, p2 = shared_file("prm800k/sample_phase1.jsonl"), shared_file("prm800k/sample_phase2.jsonl")
    records, counts = load_many([p1, p2], alternatives=False)
    assert counts["lines"] == 20 and len(records) == 20 and "alternatives" not in counts


# --------------------------------------------------------------------------- hand-made lines


def test_supervision_stops_after_the_first_wrong_step(tmp_path):
    obj = line([step(("a", 1)), step(("b", -1)), step(("c", 1)), step(("d", 1))], finish="solution")
    records, _ = load_prm800k(write_jsonl(tmp_path, [obj]))
    assert records[0].labels == [CORRECT, INCORRECT, None, None]
    assert records[0].first_error == 1 and records[0].process_correct is False


def test_alternatives_after_an_error_are_not_supervised(tmp_path):
    obj = line([step(("a", 1), ("a2", -1)), step(("b", -1)), step(("c", 1), ("c2", -1))])
    records, counts = load_prm800k(write_jsonl(tmp_path, [obj]))
    alts = [r for r in records if "alternative_of_step" in r.meta]
    assert [(r.steps, r.labels) for r in alts] == [(["a2"], [INCORRECT])]
    assert counts["alternatives"] == 1


def test_null_ratings_are_skipped_and_counted(tmp_path):
    obj = line([step(("a", None)), step(("b", 1), ("b2", None))])
    records, counts = load_prm800k(write_jsonl(tmp_path, [obj]))
    assert records[0].labels == [None, CORRECT] and records[0].process_correct is None
    assert counts["null_ratings"] == 2 and len(records) == 1


def test_phase2_error_step_is_the_pre_generated_one(tmp_path):
    obj = line([step(("a", 1)), step(("b", -1), ("b2", 1), ("b3", 0), chosen=None)], finish="found_error",
               generation=3, pre=["a", "b", "c"])
    records, _ = load_prm800k(write_jsonl(tmp_path, [obj]))
    assert records[0].steps == ["a", "b"] and records[0].labels == [CORRECT, INCORRECT]
    assert [(r.steps, r.labels) for r in records[1:]] == [(["a", "b2"], [None, CORRECT]), (["a", "b3"], [None, CORRECT])]


def test_quality_control_screening_and_bad_problems_dropped_by_default(tmp_path):
    good = line([step(("a", 1))])
    path = write_jsonl(tmp_path, [good, line([step(("q", 1))], qc=True), line([step(("s", 1))], screening=True),
                                  line([step(("x", 1))], finish="bad_problem")])
    records, counts = load_prm800k(path)
    assert [r.steps for r in records] == [["a"]]
    assert counts["dropped_quality_control"] == counts["dropped_screening"] == counts["dropped_bad_problem"] == 1
    records, _ = load_prm800k(path, keep_quality_control=True, keep_screening=True)
    assert [r.steps for r in records] == [["a"], ["q"], ["s"]]


def test_lfs_stub_is_recognised(tmp_path):
    stub = tmp_path / "phase2_train.jsonl"
    stub.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123456789\n")
    with pytest.raises(PRM800KError) as info:
        load_prm800k(stub)
    msg = str(info.value)
    assert "Git LFS pointer" in msg and "git lfs pull" in msg and "123456789" in msg


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path, [line([step(("a", 1))]), "{not json", line([step(("b", 1))])])
    with pytest.raises(PRM800KError) as info:
        load_prm800k(path)
    assert f"{path}:2: not valid JSON" in str(info.value) and "on_bad_line: skip" in str(info.value)
    records, counts = load_prm800k(path, on_bad_line="skip")
    assert [r.steps for r in records] == [["a"], ["b"]] and counts["skipped_bad_lines"] == 1


@pytest.mark.parametrize("bad,reason", [
    ({"question": {}, "label": {"steps": []}}, "question.problem"),
    (dict(line([step(("a", 1))]), label={"steps": "x"}), "label.steps"),
    (line([step(("a", 1), chosen=5)]), "chosen_completion 5"),
    (line([step(("a", 7))]), "rating 7"),
])
def test_schema_errors(tmp_path, bad, reason):
    path = write_jsonl(tmp_path, [bad])
    with pytest.raises(PRM800KError) as info:
        load_prm800k(path)
    assert f"{path}:1:" in str(info.value) and reason in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PRM800KError, match="not found"):
        load_prm800k(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PRM800KError, match="empty"):
        load_prm800k(tmp_path / "empty.jsonl")


# --------------------------------------------------------------------------- ProcessBench


def test_processbench_real_file():
    path = shared_file("processbench/gsm8k.json")
    raw = json.loads(path.read_text())
    records = load_processbench(path)
    assert len(records) == len(raw) == 400
    for item, r in zip(raw, records):
        assert r.steps == item["steps"] and r.problem == item["problem"]
        if item["label"] == -1:
            assert r.first_error is None and r.process_correct is True and r.labels == [CORRECT] * len(r.steps)
        else:
            k = item["label"]
            assert r.first_error == k and r.labels[k] == INCORRECT and r.labels[:k] == [CORRECT] * k
            assert all(y is None for y in r.labels[k + 1:])


def test_processbench_limit_takes_both_kinds():
    # the file lists every solution with an error first: a limit must not keep only those
    records = load_processbench(shared_file("processbench/math.json"), limit=20)
    assert len(records) == 20
    assert 5 < sum(r.first_error is None for r in records) < 15


def test_processbench_errors(tmp_path):
    bad = tmp_path / "pb.json"
    bad.write_text(json.dumps([{"id": "q", "problem": "p", "steps": ["a"], "label": 3}]))
    with pytest.raises(ProcessBenchError, match="label"):
        load_processbench(bad)
    bad.write_text("[{")
    with pytest.raises(ProcessBenchError, match="not valid JSON"):
        load_processbench(bad)
