"""Tests for rlprm.grading: extraction, equivalence, sandboxing, speed guards.

Real data (MATH500, GSM8K, PRM800K samples) comes from ../shared/data and is
skipped with a reason when that folder is absent. Hand-written cases live in
tests/data/grading_cases.jsonl (category, pred, gold, expected).
"""

from __future__ import annotations

import ast
import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from rlprm import grading
from rlprm.grading import Grader, GraderError, extract_answer, rules, worker
from tests.grading_forms import equivalent_forms, near_misses

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CASES = Path(__file__).resolve().parent / "data" / "grading_cases.jsonl"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the grading sandbox is POSIX-only")


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} not found: real-data tests need the shared data folder (../shared/data)")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grader():
    """One started pool for most tests. A secret in the environment must not reach it."""
    os.environ["RLPRM_TEST_SECRET_TOKEN"] = "hunter2"
    try:
        g = Grader(timeout=5).start()
    finally:
        del os.environ["RLPRM_TEST_SECRET_TOKEN"]
    yield g
    g.close()


def _mismatches(got, pairs, expected):
    return [(p, g, e) for r, (p, g), e in zip(got, pairs, expected) if r != e]


# --------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("Step one.\n\n# Answer\n\n5", "5"),
    ("So it is 1/2.\n# Answer\n\n\\frac{1}{2}", "\\frac{1}{2}"),
    ("# Answer: 42", "42"),
    ("# Answer 42", "42"),
    ("# Answer\n\n$x=3$.", "x=3"),
    ("# Answer\n\n\\boxed{7}", "7"),
    ("# Answer\n\n12\n\nsome trailing chatter", "12"),
    ("We get \\boxed{3} and then\n\n# Answer\n\n4", "4"),
    ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("the answer is \\boxed 5", "5"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 1,234", "1,234"),
    ("no final answer here", None),
    ("", None),
    (None, None),
    ("truncated \\boxed{12", None),
    ("# Answer\n\n", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_is_linear_on_huge_hostile_text():
    text = "\\boxed{" * 50_000 + "{" * 200_000 + "#### " + "9" * 100_000
    t = time.perf_counter()
    extract_answer(text)
    extract_answer("# Answer" * 50_000)
    assert time.perf_counter() - t < 2.0


def test_extract_gsm8k_solutions():
    rows = _jsonl(_shared("math/gsm8k_test.jsonl"))
    for row in rows:
        assert extract_answer(row["answer"]) == row["answer"].split("####")[-1].strip()


def test_extract_and_grade_prm800k_samples(grader):
    phase1 = _jsonl(_shared("prm800k/sample_phase1.jsonl"))
    phase2 = _jsonl(_shared("prm800k/sample_phase2.jsonl"))
    for row in phase2:
        q = row["question"]
        got = extract_answer("\n".join(q["pre_generated_steps"]))
        assert got == q["pre_generated_answer"].strip().removeprefix("\\(").removesuffix("\\)")
        # Every phase-2 sample ends in a wrong answer.
        assert grader.grade("\n".join(q["pre_generated_steps"]), q["ground_truth_answer"]) is False
    solutions, golds = [], []
    for row in phase1:
        steps = []
        for step in row["label"]["steps"]:
            if step.get("human_completion"):
                steps.append(step["human_completion"]["text"])
            elif step.get("chosen_completion") is not None:
                steps.append(step["completions"][step["chosen_completion"]]["text"])
        solutions.append("\n".join(steps))
        golds.append(row["question"]["ground_truth_answer"])
    results = grader.grade_many(solutions, golds)
    for row, ok in zip(phase1, results):
        # Finished phase-1 samples reach the right answer (e.g. "5" for gold "x=5",
        # "\dfrac{5}{9}" for "\frac 59"); the one that gave up has none.
        assert ok is (row["label"]["finish_reason"] == "solution")


# --------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------

def test_hand_written_cases_by_category(grader):
    cases = _jsonl(CASES)
    got = grader.is_equiv_many([(c["pred"], c["gold"]) for c in cases])
    per = collections.defaultdict(lambda: [0, 0])
    wrong = []
    for c, r in zip(cases, got):
        per[c["category"]][1] += 1
        if r == c["expected"]:
            per[c["category"]][0] += 1
        else:
            wrong.append(c)
    print({k: f"{a}/{n}" for k, (a, n) in per.items()})
    assert not wrong, wrong
    assert set(per) == {"math_verify_known_miss", "math_conventions", "near_miss", "hedge", "lookalike"}


def test_math500_golds_equal_themselves_and_rewrites(grader):
    golds = [r["answer"] for r in _jsonl(_shared("math/math500_test.jsonl"))]
    pairs, expected = [], []
    for g in golds:
        for p in [g] + equivalent_forms(g):
            pairs.append((p, g))
            expected.append(True)
    assert len(pairs) > 4 * len(golds)
    got = grader.is_equiv_many(pairs)
    assert not _mismatches(got, pairs, expected)


def test_math500_near_misses_rejected(grader):
    golds = [r["answer"] for r in _jsonl(_shared("math/math500_test.jsonl"))]
    pairs = [(p, g) for g in golds for p in near_misses(g)]
    assert len(pairs) > 2 * len(golds)
    got = grader.is_equiv_many(pairs)
    assert not _mismatches(got, pairs, [False] * len(pairs))


def test_gsm8k_golds(grader):
    rows = _jsonl(_shared("math/gsm8k_test.jsonl"))
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    assert any("," in g for g in golds)  # the set has comma-grouped golds
    pairs, expected = [], []
    for g in golds:
        plain = g.replace(",", "")
        for p in {g, plain, f"{int(plain):,}", f"\\${plain}", f"{plain}.00", f"\\boxed{{{plain}}}"}:
            pairs.append((p, g))
            expected.append(True)
        for p in (str(int(plain) + 1), str(int(plain) - 1), f"{plain}.5"):
            pairs.append((p, g))
            expected.append(False)
    got = grader.is_equiv_many(pairs)
    assert not _mismatches(got, pairs, expected)
    # The data set's own solutions grade as correct through extraction.
    assert all(grader.grade_many([r["answer"] for r in rows[:200]], golds[:200]))


def test_module_level_functions():
    assert grading.is_equiv("\\dfrac{1}{2}", "0.5")
    assert not grading.is_equiv("3.2100001", "3.21")
    assert grading.is_equiv_many([("1", "1"), ("2", "3")]) == [True, False]
    assert grading.grade("so\n\n# Answer\n\n\\frac{14}{3}", "\\frac{14}{3}")
    assert not grading.grade("I could not solve it.", "5")
    assert grading.grade_many(["\\boxed{5}", "#### 6"], ["5", "5"]) == [True, False]
    assert grading.default_grader() is grading.default_grader()


def test_inputs_that_are_not_answers(grader):
    assert grader.is_equiv(None, "5") is False
    assert grader.is_equiv("5", None) is False
    assert grader.is_equiv("", "5") is False
    assert grader.is_equiv("   ", "5") is False
    assert grader.is_equiv(5, "5") is True
    with pytest.raises(TypeError):
        grader.is_equiv(["5"], "5")


# --------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------

def test_redundant_braces_pass_the_nesting_screen_real_nesting_does_not():
    """Dropping redundant groups (issue 23: `{{{...{9}...}}}` 12 deep was refused) must not open the door to what
    the nesting screen and the hazard check keep out: nesting with content at every level, and a power tower
    hidden in redundant groups."""
    g = Grader(timeout=5, workers=1)
    try:
        assert g.is_equiv("{" * 12 + "9" + "}" * 12, "9") is True
        assert g.stats["rejected_hostile"] == 0
        assert g.is_equiv("".join("{a" for _ in range(15)) + "}" * 15, "a") is False
        assert g.stats["rejected_hostile"] == 1
        tower = "{" * 12 + "10^{{{10^{{{10^{10}}}}}}}" + "}" * 12
        assert g.is_equiv(tower, "1") is False
        assert g.stats["rejected_hazard"] == 1 and g.stats["timeouts"] == 0
    finally:
        g.close()


def _payloads(marker: Path) -> list[str]:
    m = str(marker)
    return [
        f"__import__('os').system('touch {m}')",
        f"__import__('pathlib').Path('{m}').touch()",
        f"\\boxed{{__import__(\"os\").system(\"touch {m}\")}}",
        f"exec(\"import os; os.system('touch {m}')\")",
        f"eval(\"__import__('os').system('touch {m}')\")",
        f"(lambda: __import__('os').system('touch {m}'))()",
        f"import os; os.system('touch {m}')",
        f"import pathlib; pathlib.Path('{m}').write_text('x')",
        f"open('{m}', 'w')",
        f"1 + __builtins__.__import__('os').system('touch {m}')",
        f"ＥＶＡＬ(\"open('{m}','w')\")",  # fullwidth: Python itself NFKC-normalises names
        f"x = os.system('touch {m}')",
        f"\\text{{__import__('os').system('touch {m}')}}",
        f"getattr(__import__('os'), 'system')('touch {m}')",
    ]


def test_code_payloads_never_run(grader, tmp_path):
    marker = tmp_path / "pwned"
    payloads = _payloads(marker)
    before = grader.stats["rejected_hostile"]
    got = grader.is_equiv_many([(p, g) for p in payloads for g in ("0", "1", "x")])
    assert not any(got)
    assert grader.stats["rejected_hostile"] - before == 3 * len(payloads)
    assert not marker.exists()


def test_payloads_reach_math_verify_without_running(tmp_path):
    """Past our screening, math-verify as we call it (LaTeX extraction only) still
    does not evaluate text: run the worker's own function in this process."""
    marker = tmp_path / "pwned"
    for p in _payloads(marker):
        worker.worker_equiv(p, "0", 2)
        worker.mv_parse(p, 2)
    assert not marker.exists()


def test_worker_refuses_code_payloads_sent_past_screening(tmp_path):
    """A worker screens again: payloads written straight down its pipe, skipping the
    caller's screening and normalisation, are False and never run."""
    from rlprm.grading.pool import BOOT_TIMEOUT, _Worker

    marker = tmp_path / "pwned"
    payloads = _payloads(marker)
    w = _Worker(grading.DEFAULT_MEMORY_MB, debug=False)
    try:
        assert w.rx.poll(BOOT_TIMEOUT), "the worker did not start"
        assert json.loads(w.rx.recv_bytes())["ready"] is True
        w.tx.send_bytes(json.dumps({"items": [[p, "0"] for p in payloads], "alarm": 2}).encode())
        got = []
        for _ in payloads:
            assert w.rx.poll(30), "the worker stopped answering"
            got.append(json.loads(w.rx.recv_bytes()))
        assert w.proc.poll() is None  # still alive: refused, not crashed
    finally:
        w.kill()
    assert [m["k"] for m in got] == list(range(len(payloads)))
    assert [m["ok"] for m in got] == [False] * len(payloads)
    assert [m["err"] for m in got] == [None] * len(payloads)
    assert not marker.exists()


HOSTILE = [
    "10^{10^{10^{10}}}",
    "9^{9^9}",
    "(10**7)!",
    "(10^7)!",
    "10!!!!",
    "2^{10000000}",
    "10^10^10",
    "1" * 100_000,
    "{" * 200 + "1" + "}" * 200,
    "(" * 200 + "1" + ")" * 200,
    "\\frac{" * 60 + "1" + "}{2}" * 60,
    "{{{{{{{{{{1}}}}}}}}}}",
    "\\sqrt{" * 10 + "2" + "}" * 10,
    "x^{x^{x^{x}}}",
    "\\frac{1}{0}",
    "0^0",
    "\\infty - \\infty",
    "\x00\x01\x02",
    "\\boxed{" * 30 + "}" * 30,
    "\\begin{pmatrix}" + "1&" * 400 + "1\\end{pmatrix}",
    "x" * 999,
]


def test_hostile_strings_return_within_timeout(tmp_path):
    timeout = 2.0
    with Grader(timeout=timeout).start() as g:
        worst = 0.0
        for i, h in enumerate(HOSTILE):
            # A gold with a tower of its own lets the tower preds past screening,
            # so the sandbox (alarm or hard kill) has to stop them.
            for gold in ("10", "x") + (("10^{10^{10}}",) if i < 7 else ()):
                t = time.perf_counter()
                assert g.is_equiv(h, gold) is False, (h[:50], gold)
                worst = max(worst, time.perf_counter() - t)
        # timeout + killing + a little scheduling noise on a shared 2-core machine
        assert worst < timeout + 3.0, worst
        stats = g.stats
    assert stats["rejected_too_long"] >= 2
    assert stats["rejected_hostile"] >= 3
    assert stats["rejected_hazard"] >= 5
    assert stats["sent_to_workers"] >= 7
    assert stats["crashes"] == 0


def test_string_handling_never_raises_on_junk():
    """Everything that runs on model text in the caller's process, fuzzed."""
    import random

    rng = random.Random(0)
    tokens = ["\\frac", "\\sqrt", "\\", "{", "}", "(", ")", "[", "]", "^", "_", "!", "1", "23",
              ".", ",", "\\,", "\\!", "{,}", "\\overline{", "\\text{", " or ", "$", "\\$", "%",
              "\\left", "\\right", "\\boxed{", "°", "∞", "−", "²", "х", "=", "x", "\\pi", " ",
              "\\infty", "#### ", "# Answer", "\n", "\\dfrac", "e", "/", "-", "+", "\\times10^{"]
    for _ in range(3000):
        a = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 14)))
        b = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 6)))
        extract_answer(a)
        rules.hazard(a)
        rules.nesting_depth(a)
        na, nb = rules.normalize(a), rules.normalize(b)
        rules.decide_local(na, nb)
        rules.hazard(na)
        equivalent_forms(a)
        near_misses(a)


def test_answers_over_length_cap_rejected_without_parsing(grader):
    before = grader.stats
    big = "1" * 100_000
    t = time.perf_counter()
    assert grader.is_equiv(big, big) is False
    assert grader.is_equiv("5", "5" + " " * 5000) is False
    assert time.perf_counter() - t < 0.5
    after = grader.stats
    assert after["rejected_too_long"] - before["rejected_too_long"] == 2
    assert after["sent_to_workers"] == before["sent_to_workers"]


# --------------------------------------------------------------------------
# Sandbox: hard timeout, crashes, limits, environment
# --------------------------------------------------------------------------

# Comparing against a power-tower gold makes math-verify compute until its own
# alarm (>= 1 s). With a 0.4 s timeout our hard kill must fire first.
SLOW_PAIR = ("5", "10^{10^{10}}")


def test_hard_timeout_kills_worker_and_batch_goes_on():
    with Grader(workers=1, timeout=0.4).start() as g:
        pid0 = g.worker_pids()
        pairs = [("\\frac{1}{2}", "0.5"), SLOW_PAIR, ("x^2+2x+1", "(x+1)^2"), ("(1,2)", "(2,1)")]
        t = time.perf_counter()
        got = g.is_equiv_many(pairs)
        assert time.perf_counter() - t < 15
        assert got == [True, False, True, False]
        assert g.stats["timeouts"] == 1
        assert g.worker_pids() != pid0  # replaced
        assert g.is_equiv("\\sqrt{8}", "2\\sqrt{2}") is True
        assert g.stats["timeouts"] == 1


def test_worker_crash_is_counted_and_replaced():
    with Grader(workers=1, timeout=30).start() as g:
        (pid,) = g.worker_pids()
        pairs = [SLOW_PAIR, ("(x+1)^2", "x^2+2x+1"), ("2", "3"), ("\\{1,2\\}", "\\{2,1\\}")]
        out: list = []
        th = threading.Thread(target=lambda: out.append(g.is_equiv_many(pairs)))
        th.start()
        time.sleep(0.5)  # the slow pair keeps the worker busy for 15 s (its alarm)
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        th.join(timeout=60)
        assert not th.is_alive()
        assert out == [[False, True, False, True]]
        assert g.stats["crashes"] == 1
        assert g.stats["timeouts"] == 0
        assert pid not in g.worker_pids()
        assert g.is_equiv("6-5i", "-5i+6") is True


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
def test_worker_limits_and_environment(grader):
    assert grader.is_equiv("1", "1")  # make sure the pool is up
    pids = grader.worker_pids()
    assert len(pids) == grader.workers
    for pid in pids:
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(l for l in limits.splitlines() if l.startswith("Max address space"))
        assert str(grading.DEFAULT_MEMORY_MB << 20) in line
        line = next(l for l in limits.splitlines() if l.startswith("Max file size"))
        assert line.split()[3] == "0"
        env = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"RLPRM_TEST_SECRET_TOKEN" not in env and b"hunter2" not in env


def test_memory_cap_applies():
    # What a worker applies to itself after warm-up: an allocation past the cap
    # fails with MemoryError (graded False) instead of swapping the machine.
    import subprocess

    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from rlprm.grading.worker import apply_limits\n"
        "apply_limits(256)\n"
        "try:\n"
        "    block = bytearray(512 << 20)\n"
        "    print('allocated')\n"
        "except MemoryError:\n"
        "    print('capped')\n"
        "import os\n"
        "try:\n"
        "    os.system('true') and None\n"
        "    pid = os.fork()\n"
        "    if pid == 0: os._exit(0)\n"
        "    print('forked')\n"
        "except OSError:\n"
        "    print('no fork')\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                         timeout=60).stdout.split()
    assert out[0] == "capped"
    if os.geteuid() != 0:  # root ignores RLIMIT_NPROC
        assert out[-1] == "no fork"


GRADING_DIR = Path(grading.__file__).resolve().parent


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """``(level, module)`` of every import in a file, or of its top-level ones."""
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


def _stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def test_rules_module_imports_only_the_standard_library():
    """rules.py runs in the sandboxed worker and on model text in the caller: the
    standard library only, anywhere in the file, and nothing relative."""
    found = _imports(GRADING_DIR / "rules.py")
    assert (0, "re") in found  # the walk saw the imports
    assert [(level, m) for level, m in found if level or not _stdlib(m)] == []


def test_worker_module_imports_only_rules_and_the_standard_library():
    """At import the worker needs its sibling rules.py and the standard library;
    math-verify is imported inside functions, on first use."""
    path = GRADING_DIR / "worker.py"
    top = _imports(path, top_level_only=True)
    assert (1, "rules") in top
    assert [(level, m) for level, m in top if (level and m != "rules") or (not level and not _stdlib(m))] == []
    lazy = [(level, m) for level, m in _imports(path) if (level, m) not in top]
    assert [(level, m) for level, m in lazy if level or not (_stdlib(m) or m == "math_verify")] == []


def test_worker_boot_loads_neither_the_package_nor_site_packages():
    """The worker's boot code, run up to its serving loop without site-packages: it
    loads worker.py and rules.py as a bare package, and nothing outside the
    standard library (not ``rlprm``, not this package's ``__init__``)."""
    import subprocess

    boot = grading.pool._BOOT.replace("._worker_main(cfg)", "")
    assert boot != grading.pool._BOOT
    code = boot + ("print(json.dumps(sorted(m for m in sys.modules if m not in ('__main__', '__mp_main__')\n"
                   "                        and m.split('.')[0] not in sys.stdlib_module_names)))\n")
    cfg = json.dumps({"path": [], "package": str(GRADING_DIR)})
    out = subprocess.run([sys.executable, "-E", "-S", "-c", code, cfg], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["_rlprm_grading", "_rlprm_grading.rules", "_rlprm_grading.worker"]


def test_closed_grader_refuses_work():
    g = Grader(workers=1)
    g.close()
    with pytest.raises(GraderError):
        g.is_equiv("(x+1)^2", "x^2+2x+1")
    # Pairs settled without a worker need no pool.
    assert g.is_equiv("1", "1") is True


def test_close_stops_workers():
    with Grader(workers=2).start() as g:
        pids = g.worker_pids()
        assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------

def test_concurrent_callers_from_threads(grader):
    cases = _jsonl(CASES)
    pairs = [(c["pred"], c["gold"]) for c in cases]
    expected = [c["expected"] for c in cases]
    errors: list = []
    results: dict[int, list] = {}

    def batch(k: int) -> None:
        try:
            results[k] = grader.is_equiv_many(pairs)
        except BaseException as exc:  # noqa: BLE001 - report any failure from the thread
            errors.append(exc)

    def singles(k: int) -> None:
        try:
            results[k] = [grader.is_equiv(p, g) for p, g in pairs[::4]]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=batch, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=singles, args=(k,)) for k in range(3, 6)]
    threads.append(threading.Thread(target=lambda: results.__setitem__(6, [
        grading.is_equiv("\\dfrac{3}{4}", "0.75"), grading.is_equiv("3", "4")])))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for k in range(3):
        assert results[k] == expected
    for k in range(3, 6):
        assert results[k] == expected[::4]
    assert results[6] == [True, False]
