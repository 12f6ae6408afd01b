"""Reward-model metrics: pure functions on plain lists, no torch.

- `auroc`: rank-based (Mann-Whitney U) with average ranks for ties, so a
  constant scorer gets exactly 0.5; None when one class is absent.
- `step_accuracy`: thresholded step predictions against step labels.
- `predict_first_error` / `first_error_f1`: ProcessBench's metric. A solution's
  predicted first error is its first step scored below the threshold (None if
  none is); accuracy is measured separately on solutions that have an error
  (the predicted index must be exactly the labelled one) and on error-free
  solutions (nothing may be flagged), and F1 is their harmonic mean, so a
  model that flags everything or nothing scores 0.
- `blind_spot_rate`: the ORM's blind spot made measurable. Within each
  problem, every pair of (right answer reached with a wrong step, fully
  correct) solutions; the share of pairs where the reward model scores the
  wrong-process one higher (ties count half).
- `best_of_n_accuracy`: per problem, whether the top-scored solution is good.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable, Sequence


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels`; None when only one class is present."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # 1-based average rank of the tie block
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def step_accuracy(probs: Sequence[float], labels: Sequence[bool], threshold: float = 0.5) -> float | None:
    """Share of steps whose prediction (prob >= threshold means correct) matches the label; None for no steps."""
    if len(probs) != len(labels):
        raise ValueError(f"{len(probs)} probabilities but {len(labels)} labels")
    if not probs:
        return None
    return sum((p >= threshold) == bool(y) for p, y in zip(probs, labels)) / len(probs)


def predict_first_error(step_probs: Sequence[float], threshold: float = 0.5) -> int | None:
    """Index of the first step scored below `threshold`; None when every step passes."""
    return next((i for i, p in enumerate(step_probs) if p < threshold), None)


def first_error_f1(gold: Sequence[int | None], predicted: Sequence[int | None]) -> dict[str, float | int | None]:
    """ProcessBench-style scores. `gold[i]`: index of the first wrong step of solution i, None if it has none.

    Returns error_accuracy (exact index on solutions with an error), correct_accuracy (nothing
    flagged on error-free ones), f1 (their harmonic mean; None when either group is empty) and the
    two group sizes.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    err = [(g, p) for g, p in zip(gold, predicted) if g is not None]
    ok = [p for g, p in zip(gold, predicted) if g is None]
    acc_err = sum(g == p for g, p in err) / len(err) if err else None
    acc_ok = sum(p is None for p in ok) / len(ok) if ok else None
    if acc_err is None or acc_ok is None:
        f1 = None
    elif acc_err + acc_ok == 0:
        f1 = 0.0
    else:
        f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"error_accuracy": acc_err, "correct_accuracy": acc_ok, "f1": f1, "num_error": len(err), "num_correct": len(ok)}


def blind_spot_rate(
    groups: Sequence[Hashable],
    scores: Sequence[float],
    answer_correct: Sequence[bool],
    process_correct: Sequence[bool],
) -> tuple[float | None, int]:
    """(rate, pairs): how often a right-answer-wrong-process solution outscores a fully correct one of the same problem.

    Pairs are pooled over problems; a tie counts half. The rate is None when no problem has both kinds.
    """
    if not (len(groups) == len(scores) == len(answer_correct) == len(process_correct)):
        raise ValueError("groups, scores, answer_correct and process_correct must have the same length")
    lucky: dict = defaultdict(list)  # right answer, wrong process
    good: dict = defaultdict(list)   # fully correct
    for g, s, a, p in zip(groups, scores, answer_correct, process_correct):
        if p:
            good[g].append(s)
        elif a:
            lucky[g].append(s)
    wins, pairs = 0.0, 0
    for g, bad_scores in lucky.items():
        for b in bad_scores:
            for c in good.get(g, ()):
                pairs += 1
                wins += 1.0 if b > c else 0.5 if b == c else 0.0
    return (wins / pairs if pairs else None), pairs


def best_of_n_accuracy(groups: Sequence[Hashable], scores: Sequence[float], good: Sequence[bool]) -> float | None:
    """Share of problems whose highest-scored solution is good (ties: the first one listed)."""
    best: dict = {}
    for g, s, ok in zip(groups, scores, good):
        if g not in best or s > best[g][0]:
            best[g] = (s, ok)
    return sum(ok for _, ok in best.values()) / len(best) if best else None


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None
