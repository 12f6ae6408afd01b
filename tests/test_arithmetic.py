import random

import pytest

from rlprm.config import ArithmeticConfig
from rlprm.steps import answer_step, render_steps
from rlprm.tasks.arithmetic import (
    CHARSET,
    Problem,
    check,
    corrupt_solution,
    make_problems,
    parse_step,
    reference_solution,
    split_problems,
    summarize,
    training_solutions,
)

CFG = ArithmeticConfig()


def test_problem_text_and_reference_solution():
    p = Problem(93, (("+", 3), ("-", 4), ("-", 7)), "mod10", 10)
    assert p.text == "93 +3 -4 -7 mod 10"
    assert reference_solution(p) == ["93 + 3 = 96", "96 - 4 = 92", "92 - 7 = 85", "85 mod 10 = 5", answer_step("5")]
    assert p.answer == 5
    q = Problem(12, (("+", 9),), "last_digit")
    assert q.text == "12 +9 last digit" and reference_solution(q)[1] == "last digit of 21 = 1"
    r = Problem(30, (("-", 2),), "max", 50)
    assert r.text == "30 -2 max 50" and reference_solution(r)[1] == "max(28, 50) = 50" and r.answer == 50


def test_problem_text_parses_back_to_the_problem():
    cfg = ArithmeticConfig(final_ops=["mod10", "last_digit", "max", "min", "none"])
    problems = make_problems(cfg, 300, seed=5)
    assert {p.final for p in problems} == {"mod10", "last_digit", "max", "min", "none"}
    for p in problems:
        assert Problem.parse(p.text) == p and Problem.parse(f"  {p.prompt}") == p
    assert Problem.parse("0 -1 min 0") == Problem(0, (("-", 1),), "min", 0)


@pytest.mark.parametrize("text", ["What is 2 + 2?", "93", "93 +3 max", "93 +3 mod 10 5", "93 +3 last digit 4",
                                  "93 *3", "93 +3 mod 9", "-93 +3"])
def test_problem_parse_refuses_other_text(text):
    with pytest.raises(ValueError, match="not an arithmetic-task problem"):
        Problem.parse(text)


def test_generator_is_seeded_and_in_range():
    a, b = make_problems(CFG, 300, seed=5), make_problems(CFG, 300, seed=5)
    assert a == b and a != make_problems(CFG, 300, seed=6)
    for p in a:
        assert CFG.min_ops <= len(p.ops) <= CFG.max_ops and p.final in CFG.final_ops
        value = p.start
        for op, b in p.ops:
            assert 1 <= b <= CFG.operand_max
            value = value + b if op == "+" else value - b
            assert 0 <= value <= CFG.value_max


def test_held_out_problems_never_in_training():
    train, test = split_problems(CFG, 3000, 300, seed=0)
    assert not {p.text for p in train} & {p.text for p in test}


def test_reference_solutions_check_fully_correct():
    cfg = ArithmeticConfig(final_ops=["mod10", "last_digit", "max", "min", "none"])
    for p in make_problems(cfg, 500, seed=1):
        r = check(p, render_steps(reference_solution(p)))
        assert r.well_formed and r.process_correct and r.answer_correct and r.first_error is None
        assert all(r.step_correct) and len(r.step_correct) == len(p.plan()) + 1


def test_corruptions_are_caught_at_their_step():
    rng = random.Random(0)
    kinds = set()
    for p in make_problems(CFG, 2000, seed=2):
        steps, c = corrupt_solution(p, rng)
        kinds.add(c.kind)
        r = check(p, render_steps(steps))
        assert r.well_formed and not r.process_correct
        # a skipped operation may look like skipping a later identical one; every other error shows where it is
        assert r.first_error == c.step if c.kind != "skip" else r.first_error >= c.step
        assert all(r.step_correct[: r.first_error])
    assert kinds == {"slip", "operand", "sign", "skip"}


def test_right_answer_wrong_process_is_common():
    """The paper's central problem, by construction: lossy final steps hide errors."""
    rng = random.Random(3)
    problems = make_problems(CFG, 3000, seed=3)
    results = [check(p, render_steps(corrupt_solution(p, rng)[0])) for p in problems]
    rate = summarize(results)["right_answer_wrong_process"]
    assert 0.05 < rate < 0.3, rate
    # and it comes from the information-losing final steps only
    lossless = [r for p, r in zip(problems, results) if p.final == "none"]
    assert not any(r.answer_correct for r in lossless)


def test_training_mix_share():
    problems = make_problems(CFG, 2000, seed=4)
    rows = training_solutions(problems, corrupt_rate=0.4, seed=4)
    share = sum(not clean for _, _, clean in rows) / len(rows)
    assert 0.35 < share < 0.45


@pytest.mark.parametrize("text", [
    "", "\n\n", "garbage", "# Answer", "# Answer\n\nfive", "93 + 3 = 96", "93 + 3 = 96\n# Answer\n\n96\nextra",
    "\x00\xff\ud800", "9" * 10000, "93 + 3 = 96\n" * 500 + "# Answer\n\n1", "1 + 1 = 2 = 3\n# Answer\n\n3",
    "# Answer\n\n# Answer\n\n5", "max(1, 2) = 2\n# Answer\n\n2", "-5 - 1 = -6\n# Answer\n\n-6",
])
def test_garbage_is_malformed_never_an_exception(text):
    p = Problem(93, (("+", 3), ("-", 4)), "mod10", 10)
    r = check(p, text)
    assert not r.process_correct
    assert r.first_error is not None


def test_random_text_fuzz():
    rng = random.Random(0)
    p = Problem(5, (("+", 3),), "none")
    for _ in range(2000):
        text = "".join(rng.choice(CHARSET + ["\x00", "é"]) for _ in range(rng.randint(0, 60)))
        check(p, text)


def test_wrong_answer_with_right_steps_is_a_process_error():
    p = Problem(10, (("+", 5),), "none")
    r = check(p, "10 + 5 = 15\n# Answer\n\n16\n")
    assert r.well_formed and not r.answer_correct and r.first_error == 1


def test_truncated_chain_is_caught_at_the_answer():
    p = Problem(10, (("+", 5), ("+", 1)), "none")
    r = check(p, "10 + 5 = 15\n# Answer\n\n15\n")
    assert r.first_error == 1 and not r.answer_correct


def test_parse_step():
    assert parse_step("85 mod 10 = 5") == ("mod10", 85, 10, 5)
    assert parse_step(" 3 - 4 = -1 ") == ("-", 3, 4, -1)
    assert parse_step("min(3, 4) = 3") == ("min", 3, 4, 3)
    assert parse_step("3 * 4 = 12") is None


# --------------------------------------------------------------------------- the last-digit shortcut


def test_shortcut_solution_keeps_the_answer_and_the_checker_rejects_it():
    from rlprm.tasks.arithmetic import Problem, shortcut_solution

    p = Problem(93, (("+", 3), ("-", 4), ("-", 7)), "mod10", 10)
    steps = shortcut_solution(p)
    assert steps == ["93 + 3 = 6", "6 - 4 = 2", "2 - 7 = 5", "5 mod 10 = 5", "# Answer\n\n5"]
    r = check(p, "\n".join(steps))
    assert r.well_formed and r.answer_correct and r.shortcut
    assert not r.process_correct and r.first_error == 0
    # the honest chain is not a shortcut
    honest = check(p, "\n".join(reference_solution(p)))
    assert honest.process_correct and not honest.shortcut


def test_shortcut_only_where_it_differs_and_the_final_keeps_last_digits():
    from rlprm.tasks.arithmetic import Problem, shortcut_solution

    assert shortcut_solution(Problem(3, (("+", 2), ("-", 1)), "last_digit", 0)) is None  # every value below 10
    assert shortcut_solution(Problem(93, (("+", 3),), "none", 0)) is None  # the answer would be wrong
    steps = shortcut_solution(Problem(41, (("-", 3), ("+", 5)), "last_digit", 0))
    assert steps == ["41 - 3 = 8", "8 + 5 = 3", "last digit of 3 = 3", "# Answer\n\n3"]


def test_training_solutions_take_the_shortcut_at_its_rate_and_slips_never_look_like_it():
    from rlprm.tasks.arithmetic import is_shortcut_step, parse_step, shortcut_solution

    problems = make_problems(ArithmeticConfig(), 4000, seed=11)
    rows = training_solutions(problems, corrupt_rate=0.3, seed=5, shortcut_rate=0.65)
    eligible = [(p, s) for p, s, _ in rows if shortcut_solution(p) is not None]
    taken = sum(s == shortcut_solution(p) for p, s in eligible) / len(eligible)
    assert 0.61 < taken < 0.69
    for p, steps, clean in rows:
        r = check(p, "\n".join(steps))
        assert r.answer_correct or not r.shortcut
        if steps != shortcut_solution(p):  # corrupted solutions never contain a shortcut step
            assert not any(is_shortcut_step(*parse_step(s)) for s in steps[:-1] if parse_step(s))
    none_rows = training_solutions(problems, corrupt_rate=0.3, seed=5, shortcut_rate=0.0)
    assert not any(check(p, "\n".join(s)).shortcut for p, s, _ in none_rows)


def test_summary_reports_trace_error_and_shortcut_rate():
    from rlprm.tasks.arithmetic import Problem, shortcut_solution

    p = Problem(93, (("+", 3), ("-", 4), ("-", 7)), "mod10", 10)
    texts = ["\n".join(reference_solution(p)), "\n".join(shortcut_solution(p)),
             "93 + 3 = 96\n96 - 4 = 91\n91 - 7 = 84\n84 mod 10 = 4\n# Answer\n\n4"]
    rates = summarize([check(p, t) for t in texts])
    assert rates["shortcut_rate"] == pytest.approx(1 / 3)
    assert rates["trace_error"] == pytest.approx(1 / 2)  # two right answers, one on wrong steps


def test_carry_drop_steps_keep_the_tens_digit_and_never_pass_for_the_shortcut():
    from rlprm.tasks.arithmetic import carry_drop_value, is_carry_drop_step, is_shortcut_step

    assert carry_drop_value("+", 38, 5) == 33 and is_carry_drop_step("+", 38, 5, 33)
    assert carry_drop_value("-", 52, 7) == 55 and is_carry_drop_step("-", 52, 7, 55)
    assert not is_carry_drop_step("+", 32, 5, 37)  # no carry: the right result
    assert not is_carry_drop_step("+", 38, 5, 43) and not is_carry_drop_step("+", 38, 5, 32)
    # below 10 the dropped carry writes the shortcut's value: it counts as the shortcut, never as both
    assert not is_carry_drop_step("+", 8, 5, 3) and is_shortcut_step("+", 8, 5, 3)
    assert not is_shortcut_step("+", 38, 5, 33)


def test_carry_drop_solution_drops_every_carry_and_the_checker_marks_those_steps_wrong():
    from rlprm.tasks.arithmetic import carry_drop_solution

    p = Problem(38, (("+", 5), ("+", 1), ("-", 7)), "none")  # 38 -> 43 -> 44 -> 37: a carry, none, a borrow
    steps = carry_drop_solution(p)
    assert steps == ["38 + 5 = 33", "33 + 1 = 34", "34 - 7 = 37", answer_step("37")]
    r = check(p, "\n".join(steps))
    assert r.step_correct == [False, True, False, True] and r.carry_drop and not r.shortcut
    assert r.answer_correct  # the carry and the borrow cancel: a right answer on wrong steps
    q = Problem(38, (("+", 5), ("+", 1)), "none")
    r = check(q, "\n".join(carry_drop_solution(q)))
    assert r.answer == "34" and not r.answer_correct and r.first_error == 0
    m = Problem(38, (("+", 5), ("+", 1)), "mod10", 10)
    assert check(m, "\n".join(carry_drop_solution(m))).answer_correct  # the last digit survives
    assert carry_drop_solution(Problem(32, (("+", 5), ("-", 1)), "none")) is None  # nothing to carry
    assert carry_drop_solution(Problem(8, (("+", 5),), "none")) is None  # below 10: the shortcut's step
    honest = check(q, "\n".join(reference_solution(q)))
    assert not honest.carry_drop and honest.process_correct


def test_training_solutions_take_the_carry_drop_at_its_rate_on_its_finals_only():
    from rlprm.tasks.arithmetic import carry_drop_solution, is_carry_drop_step, shortcut_solution

    cfg = ArithmeticConfig(final_ops=["mod10", "last_digit", "none", "max"])
    problems = make_problems(cfg, 4000, seed=11)
    rows = training_solutions(problems, corrupt_rate=0.3, seed=5, shortcut_rate=0.7, carry_drop_rate=0.6,
                              carry_drop_finals=["none", "max"])
    eligible = [(p, s) for p, s, _ in rows if p.final in ("none", "max") and carry_drop_solution(p) is not None]
    taken = sum(s == carry_drop_solution(p) for p, s in eligible) / len(eligible)
    assert 0.56 < taken < 0.64
    for p, steps, _ in rows:
        r = check(p, "\n".join(steps))
        if steps == carry_drop_solution(p):
            assert p.final in ("none", "max") and r.carry_drop and not r.process_correct
        else:  # slips are redrawn when they would write the habit's step, so its rate is its setting alone
            assert not r.carry_drop
            assert p.final != "none" or steps == shortcut_solution(p) or not r.answer_correct or r.process_correct
    changed = {final: [not check(p, "\n".join(s)).answer_correct for p, s in eligible
                       if s == carry_drop_solution(p) and p.final == final] for final in ("none", "max")}
    assert 0.6 < sum(changed["none"]) / len(changed["none"]) < 1  # most, not all: a carry and a borrow can cancel
    assert 0 < sum(changed["max"]) / len(changed["max"]) < sum(changed["none"]) / len(changed["none"])  # the bound decides some
    # the mod 10 finals: their answers survive the habit
    mod = [p for p in problems if p.final == "mod10" and carry_drop_solution(p) is not None]
    assert mod and all(check(p, "\n".join(carry_drop_solution(p))).answer_correct for p in mod)
    # off, the data is exactly the data before the habit existed (same seeds, same draws)
    off = training_solutions(problems, corrupt_rate=0.3, seed=5, shortcut_rate=0.7)
    assert off == training_solutions(problems, corrupt_rate=0.3, seed=5, shortcut_rate=0.7, carry_drop_rate=0.0)
    # (where only a random +-10 slip writes it: 14 of 4000 here, against 60% of the eligible problems with it on)
    assert sum(s == carry_drop_solution(p) for p, s, _ in off) < 0.01 * len(off)
    assert any(is_carry_drop_step(*parse_step(st)) for p, s, _ in rows for st in s[:-1] if parse_step(st))


def test_summary_reports_the_carry_drop_and_the_answers_it_changes():
    from rlprm.tasks.arithmetic import carry_drop_solution

    p = Problem(38, (("+", 5), ("+", 1)), "none")
    m = Problem(38, (("+", 5), ("+", 1)), "mod10", 10)
    results = [check(p, "\n".join(reference_solution(p))), check(p, "\n".join(carry_drop_solution(p))),
               check(m, "\n".join(carry_drop_solution(m))), check(m, "\n".join(reference_solution(m)))]
    rates = summarize(results)
    assert rates["carry_drop_rate"] == 0.5 and rates["carry_drop_answer_wrong"] == 0.25
    assert rates["trace_error"] == pytest.approx(1 / 3)


def test_carry_drop_config_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="carry_drop_finals"):
        ArithmeticConfig(carry_drop_rate=0.5, final_ops=["mod10", "last_digit"])
    with pytest.raises(ValidationError):
        ArithmeticConfig(carry_drop_rate=1.5)
    with pytest.raises(ValidationError):
        ArithmeticConfig(carry_drop_finals=["square"])
    assert ArithmeticConfig(carry_drop_rate=0.0, final_ops=["mod10"]).carry_drop_rate == 0.0  # off: nothing to check
