import random

import pytest

from rlprm.reward.metrics import (auroc, best_of_n_accuracy, blind_spot_rate, first_error_f1, predict_first_error,
                              step_accuracy)


def pairwise_auroc(scores, labels):
    """The definition: P(score of a random positive > score of a random negative), ties half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5  # a constant scorer
    # ties across classes count half: pos {0.5, 0.9} vs neg {0.5, 0.5} -> (0.5 + 0.5 + 1 + 1) / 4
    assert auroc([0.5, 0.5, 0.5, 0.9], [False, True, False, True]) == 0.75


def test_auroc_one_class_is_none_and_lengths_checked():
    assert auroc([0.1, 0.2], [1, 1]) is None
    assert auroc([], []) is None
    with pytest.raises(ValueError):
        auroc([0.1], [1, 0])


def test_auroc_matches_pairwise_definition_with_many_ties():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = [rng.choice([0.1, 0.2, 0.3, 0.5, 0.7]) for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        if 0 < sum(labels) < n:
            assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels))


def test_step_accuracy():
    assert step_accuracy([0.9, 0.2, 0.6, 0.4], [True, False, False, True]) == 0.5
    assert step_accuracy([0.5], [True]) == 1.0  # the threshold itself counts as correct
    assert step_accuracy([0.7, 0.7], [True, False], threshold=0.8) == 0.5
    assert step_accuracy([], []) is None


def test_predict_first_error():
    assert predict_first_error([0.9, 0.8, 0.3, 0.1]) == 2
    assert predict_first_error([0.9, 0.8]) is None
    assert predict_first_error([]) is None
    assert predict_first_error([0.9, 0.6], threshold=0.7) == 1


def test_first_error_f1_hand_case():
    gold = [None, None, 2, 0, 1]
    pred = [None, 3, 2, None, 1]
    out = first_error_f1(gold, pred)
    assert out["correct_accuracy"] == 0.5  # one of the two error-free solutions left unflagged
    assert out["error_accuracy"] == pytest.approx(2 / 3)  # exact index on two of three
    assert out["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (out["num_error"], out["num_correct"]) == (3, 2)


def test_first_error_f1_extremes():
    # flagging everything at step 0 finds no error-free solution: F1 0 even if some errors are at step 0
    assert first_error_f1([None, 0, 1], [0, 0, 0])["f1"] == 0.0
    assert first_error_f1([None, 0], [None, 0])["f1"] == 1.0
    assert first_error_f1([1, 2], [1, 2])["f1"] is None  # no error-free solutions: undefined


def test_blind_spot_rate_hand_case():
    # problem a: lucky (right answer, wrong step) 0.9 vs good 0.5 and 0.95 -> 1 win of 2
    # problem b: lucky 0.2 vs good 0.2 -> a tie, half; a wrong-answer solution never counts
    groups = ["a", "a", "a", "b", "b", "b"]
    scores = [0.9, 0.5, 0.95, 0.2, 0.2, 0.99]
    answer = [True, True, True, True, True, False]
    process = [False, True, True, False, True, False]
    rate, pairs = blind_spot_rate(groups, scores, answer, process)
    assert pairs == 3
    assert rate == pytest.approx((1 + 0 + 0.5) / 3)


def test_blind_spot_rate_without_pairs():
    assert blind_spot_rate(["a", "b"], [0.1, 0.2], [True, True], [False, True]) == (None, 0)


def test_best_of_n_accuracy():
    groups = ["a", "a", "b", "b", "c"]
    scores = [0.2, 0.9, 0.8, 0.1, 0.5]
    good = [False, True, False, True, True]
    assert best_of_n_accuracy(groups, scores, good) == pytest.approx(2 / 3)
    assert best_of_n_accuracy([], [], []) is None
