"""Grading speed: rlprm.grading (sandboxed pool) against math-verify called directly.

Pairs: every MATH500 gold against itself, its rewritten equivalent forms and its
near misses (``equivalent_forms`` / ``near_misses`` from ``tests/grading_forms.py``).
The same pairs are graded, in the same run, by

* ``math_verify``: ``verify(parse("$\\boxed{gold}$"), parse("$\\boxed{pred}$"))``
  one pair after another (its recommended use; its alarms on), in a fresh
  interpreter warmed with the same pairs a worker grades at start-up;
* ``ours``: a started ``Grader`` (2 workers by default), as one batch
  (``is_equiv_many``) and as one call per pair (``is_equiv``, for latency);
* ``ours_all_in_sandbox``: the same with ``shortcuts=False``, so every pair
  crosses into a worker process: the cost of the sandbox itself;
* ``math_verify_bound_pairs``: both again on the pairs that our exact rules
  leave to math-verify, so both sides run the same parser.

Each measured pass gets a fresh grader and cold caches.
Worker start-up is paid once (``start()``) and reported separately. A few
hostile answers are graded last to show that nothing hangs.

Prints one JSON object. Usage::

    python benchmarks/grading.py              # all 500 golds (about a minute on 2 cores)
    python benchmarks/grading.py --limit 100  # the first 100 golds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlprm.grading import Grader  # noqa: E402
from rlprm.grading.rules import decide_local, normalize  # noqa: E402
from rlprm.grading.worker import WARMUP_PAIRS  # noqa: E402
from tests.grading_forms import equivalent_forms, near_misses  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "math" / "math500_test.jsonl"
HOSTILE = [
    "10^{10^{10^{10}}}", "9^{9^9}", "(10^7)!", "1" * 100_000, "{" * 200 + "1" + "}" * 200,
    "__import__('os').system('true')", "{{{{{{{{{1}}}}}}}}}",
]


def _pairs(limit: int | None) -> tuple[list[tuple[str, str]], list[bool]]:
    golds = [json.loads(line)["answer"] for line in DATA.read_text().splitlines() if line.strip()]
    if limit:
        golds = golds[:limit]
    pairs, expected = [], []
    for g in golds:
        for p in [g] + equivalent_forms(g):
            pairs.append((p, g))
            expected.append(True)
        for p in near_misses(g):
            pairs.append((p, g))
            expected.append(False)
    return pairs, expected


def _latency_summary(lat: list[float], total: float, n: int) -> dict:
    lat = sorted(lat)
    return {
        "grades_per_s": round(n / total, 1),
        "p50_ms": round(1000 * statistics.median(lat), 3),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
        "max_ms": round(1000 * lat[-1], 3),
    }


def _accuracy(got: list[bool], expected: list[bool]) -> dict:
    pos = [g for g, e in zip(got, expected) if e]
    neg = [g for g, e in zip(got, expected) if not e]
    return {
        "equivalent_accepted": f"{sum(pos)}/{len(pos)}",
        "near_misses_rejected": f"{len(neg) - sum(neg)}/{len(neg)}",
    }


def _math_verify_pass(pairs: list[tuple[str, str]]) -> tuple[dict, list[bool]]:
    from math_verify import parse, verify

    logging.disable(logging.CRITICAL)
    for pred, gold in WARMUP_PAIRS:  # the same warm-up a worker does at start
        verify(parse("$\\boxed{" + gold + "}$"), parse("$\\boxed{" + pred + "}$"))
    lat, got = [], []
    t0 = time.perf_counter()
    for pred, gold in pairs:
        t = time.perf_counter()
        ok = verify(parse("$\\boxed{" + gold + "}$"), parse("$\\boxed{" + pred + "}$"))
        lat.append(time.perf_counter() - t)
        got.append(bool(ok))
    return _latency_summary(lat, time.perf_counter() - t0, len(pairs)), got


def bench_math_verify(pairs: list[tuple[str, str]]) -> tuple[dict, list[bool]]:
    """Time math-verify in a fresh interpreter, as cold as a fresh worker."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(pairs, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--math-verify-pass", f.name],
                             check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    summary, got = json.loads(out)
    return summary, got


def _fresh(shortcuts: bool, workers: int | None) -> tuple[Grader, float]:
    """A started grader with cold caches, and its start-up time."""
    normalize.cache_clear()
    t = time.perf_counter()
    grader = Grader(workers=workers, shortcuts=shortcuts).start()
    return grader, time.perf_counter() - t


def bench_ours(pairs: list[tuple[str, str]], shortcuts: bool, workers: int | None) -> tuple[dict, list[bool]]:
    grader, startup = _fresh(shortcuts, workers)
    try:
        t0 = time.perf_counter()
        got = grader.is_equiv_many(pairs)
        batch = time.perf_counter() - t0
        stats = grader.stats
    finally:
        grader.close()
    grader, _ = _fresh(shortcuts, workers)
    try:
        lat = []
        t0 = time.perf_counter()
        for pred, gold in pairs:
            t = time.perf_counter()
            grader.is_equiv(pred, gold)
            lat.append(time.perf_counter() - t)
        single = time.perf_counter() - t0
        stats_single = grader.stats
    finally:
        grader.close()
    out = {"workers": grader.workers, "startup_s": round(startup, 3),
           "batch_grades_per_s": round(len(pairs) / batch, 1)}
    out.update({"single_" + k: v for k, v in _latency_summary(lat, single, len(pairs)).items()})
    out["share_settled_in_caller"] = round(stats["settled_locally"] / max(1, stats["graded"]), 3)
    out["timeouts"] = stats["timeouts"] + stats_single["timeouts"]
    out["crashes"] = stats["crashes"] + stats_single["crashes"]
    return out, got


def bench_hostile(timeout: float = 2.0) -> dict:
    with Grader(timeout=timeout).start() as grader:
        worst, hangs = 0.0, 0
        for h in HOSTILE:
            for gold in ("10", "10^{10^{10}}"):
                t = time.perf_counter()
                grader.is_equiv(h, gold)
                dt = time.perf_counter() - t
                worst = max(worst, dt)
                hangs += dt > timeout + 5
        return {"cases": 2 * len(HOSTILE), "timeout_s": timeout, "max_s": round(worst, 3),
                "hangs": hangs, "stats": grader.stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N MATH500 golds")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default min(2, cpus))")
    ap.add_argument("--math-verify-pass", help=argparse.SUPPRESS)  # internal: one timed pass
    args = ap.parse_args()
    if args.math_verify_pass:
        pairs = [tuple(p) for p in json.loads(Path(args.math_verify_pass).read_text())]
        print(json.dumps(_math_verify_pass(pairs)))
        return
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs the shared MATH500 file")
    pairs, expected = _pairs(args.limit)
    mv, mv_got = bench_math_verify(pairs)
    ours, ours_got = bench_ours(pairs, shortcuts=True, workers=args.workers)
    sandbox, _ = bench_ours(pairs, shortcuts=False, workers=args.workers)
    mv["accuracy"] = _accuracy(mv_got, expected)
    ours["accuracy"] = _accuracy(ours_got, expected)
    # The pairs our exact rules leave to math-verify: the same parser on both
    # sides, so this isolates what the sandbox costs (or gains from 2 workers).
    hard = [(p, g) for p, g in pairs if decide_local(normalize(p), normalize(g)) is None]
    mv_hard, _ = bench_math_verify(hard)
    ours_hard, _ = bench_ours(hard, shortcuts=True, workers=args.workers)
    result = {
        "pairs": len(pairs),
        "golds": min(args.limit or 500, 500),
        "math_verify": mv,
        "ours": ours,
        "ratio_batch": round(ours["batch_grades_per_s"] / mv["grades_per_s"], 2),
        "ratio_single": round(ours["single_grades_per_s"] / mv["grades_per_s"], 2),
        "ours_all_in_sandbox": sandbox,
        "ratio_all_in_sandbox_batch": round(sandbox["batch_grades_per_s"] / mv["grades_per_s"], 2),
        "math_verify_bound_pairs": {
            "pairs": len(hard),
            "math_verify": mv_hard,
            "ours": ours_hard,
            "ratio_batch": round(ours_hard["batch_grades_per_s"] / mv_hard["grades_per_s"], 2),
            "ratio_single": round(ours_hard["single_grades_per_s"] / mv_hard["grades_per_s"], 2),
        },
        "hostile": bench_hostile(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
