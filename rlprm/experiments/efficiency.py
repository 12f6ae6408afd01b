"""Data efficiency from quality-vs-labels curves, with intervals over seeds (pure functions).

The paper's headline for active learning is a factor: how many labels uniform
selection needs for the quality active selection reaches with one label. Here
it is read off the two curves at one quality LEVEL:

    factor = labels uniform needs to reach LEVEL / labels active needs to reach LEVEL

Each curve is first made monotone (a running maximum: more labels never need
to be worse than fewer) and the first crossing of LEVEL is interpolated
linearly between budgets. LEVEL is set on uniform's own curve, a share of the
way from its first point (the seed set, shared by both strategies) to its best
(`level_share`, 0.9 by default): near uniform's plateau, the quality the paper
asks for, yet not its single noisiest point.

A curve that never reaches LEVEL within its budgets gives no number, and the
result says so (`status`): `uniform_never` (active reached LEVEL, uniform did
not: the factor is at least max(uniform labels) / active labels, given as
`bound`), `active_never` (the factor is at most uniform labels / max(active
labels)), `neither`. Nothing is extrapolated past the budgets.

Intervals are a bootstrap over SEEDS: each resample draws the seeds with
replacement (the same draw for both strategies: a seed shares its seed set,
problem order and pool), averages each curve over the drawn seeds and recomputes
LEVEL and the factor. LEVEL comes from uniform's own resampled curve, so
uniform always reaches it; a resample where active does not counts as a factor
of zero (and `efficiency_factor` at any other level counts uniform never
reaching it as infinite), so the percentiles stay honest about such resamples
instead of dropping them; resamples where neither curve does are left out and
counted (`resolved`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

REACHED, FIRST_POINT, NEVER = "interpolated", "first_point", "never"
EXACT, UNIFORM_NEVER, ACTIVE_NEVER, NEITHER = "exact", "uniform_never", "active_never", "neither"


def monotone(labels: Sequence[float], quality: Sequence[float]) -> tuple[list[float], list[float]]:
    """(labels ascending, running maximum of quality) of one curve."""
    if len(labels) != len(quality) or not labels:
        raise ValueError(f"a curve needs as many quality values as label budgets (>= 1), got {len(labels)} and "
                         f"{len(quality)}")
    xs, ys, best = [], [], -math.inf
    for x, y in sorted(zip(labels, quality)):
        best = max(best, y)
        xs.append(float(x))
        ys.append(best)
    return xs, ys


def labels_to_reach(labels: Sequence[float], quality: Sequence[float], level: float) -> tuple[float | None, str]:
    """(labels, how) at which the monotone curve first reaches `level`.

    how: `interpolated` (between two budgets, or exactly at one past the first), `first_point` (already at or
    above `level` at the smallest budget: at most that many labels), `never` (labels None: not within the budgets).
    """
    xs, ys = monotone(labels, quality)
    if ys[0] >= level:
        return xs[0], FIRST_POINT
    for j in range(1, len(xs)):
        if ys[j] >= level:
            x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
            return x0 + (x1 - x0) * (level - y0) / (y1 - y0), REACHED
    return None, NEVER


def factor_level(labels_uniform: Sequence[float], quality_uniform: Sequence[float], level_share: float) -> float:
    """The quality the factor is read at: uniform's first point + level_share * (uniform's best - first point)."""
    xs, ys = monotone(labels_uniform, quality_uniform)
    return ys[0] + level_share * (ys[-1] - ys[0])


def efficiency_factor(labels_uniform: Sequence[float], quality_uniform: Sequence[float],
                      labels_active: Sequence[float], quality_active: Sequence[float], level: float) -> dict:
    """{level, uniform_labels, active_labels, factor, status, bound} at one quality level.

    status `exact`: both curves reach `level`, factor = uniform_labels / active_labels. Otherwise factor is None
    and `bound` says what the budgets do show: `uniform_never` -> factor >= bound (= max uniform labels / active
    labels), `active_never` -> factor <= bound (= uniform labels / max active labels), `neither` -> no bound.
    """
    nu, _ = labels_to_reach(labels_uniform, quality_uniform, level)
    na, _ = labels_to_reach(labels_active, quality_active, level)
    out = {"level": level, "uniform_labels": nu, "active_labels": na, "factor": None, "bound": None}
    if nu is not None and na is not None:
        out.update(factor=nu / na, status=EXACT)
    elif na is not None:
        out.update(status=UNIFORM_NEVER, bound=max(labels_uniform) / na)
    elif nu is not None:
        out.update(status=ACTIVE_NEVER, bound=nu / max(labels_active))
    else:
        out["status"] = NEITHER
    return out


def _factor_value(result: dict) -> float:
    """One number per resample: the factor, inf (uniform never reaches), 0 (active never does) or NaN (neither)."""
    return {EXACT: result["factor"], UNIFORM_NEVER: math.inf, ACTIVE_NEVER: 0.0}.get(result["status"], math.nan)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """2.5 / 97.5 percentiles without interpolation, so an infinite value stays infinite instead of NaN."""
    return (float(np.quantile(values, 0.025, method="inverted_cdf")),
            float(np.quantile(values, 0.975, method="inverted_cdf")))


def factor_interval(labels_uniform: Sequence[float], quality_uniform, labels_active: Sequence[float], quality_active,
                    level_share: float = 0.9, resamples: int = 2000, seed: int = 0) -> dict:
    """The factor on the seed-mean curves and its bootstrap interval over seeds.

    quality_uniform (S, Bu), quality_active (S, Ba): one row per seed, in the same seed order (None/NaN entries
    are not allowed: a metric missing at some point has no factor). Returns efficiency_factor's dict of the mean
    curves (`factor` as `mean`) plus `lo`, `hi` (percentiles over resamples; inf: some resamples found uniform
    never reaching the level), `resolved` (share of resamples with a number, finite or not) and `seeds`.
    """
    qu = np.asarray(quality_uniform, dtype=float)
    qa = np.asarray(quality_active, dtype=float)
    if qu.ndim != 2 or qa.ndim != 2 or qu.shape[0] != qa.shape[0] or qu.shape[0] == 0:
        raise ValueError(f"quality arrays must be (seeds, budgets) with the same seeds, got {qu.shape} and {qa.shape}")
    if np.isnan(qu).any() or np.isnan(qa).any():
        raise ValueError("a quality value is missing: no factor for this metric")
    S = qu.shape[0]

    def at(rows):
        mu, ma = qu[rows].mean(axis=0), qa[rows].mean(axis=0)
        level = factor_level(labels_uniform, mu, level_share)
        return efficiency_factor(labels_uniform, mu, labels_active, ma, level)

    point = at(np.arange(S))
    rng = np.random.default_rng(seed)
    values = np.array([_factor_value(at(rng.integers(0, S, size=S))) for _ in range(resamples)])
    kept = values[~np.isnan(values)]
    lo, hi = _percentiles(kept) if kept.size else (math.nan, math.nan)
    return {**point, "mean": point["factor"], "lo": lo, "hi": hi, "resolved": float(kept.size / resamples), "seeds": S}


def seed_band(values, resamples: int = 2000, seed: int = 0) -> dict:
    """{mean, lo, hi} of the mean over seeds: values (S,), bootstrap percentiles of the resampled mean (one seed:
    lo = hi = mean). NaN entries (a metric undefined for that seed) are left out."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    return {"mean": float(v.mean()), "lo": float(np.percentile(means, 2.5)), "hi": float(np.percentile(means, 97.5))}


def choose_threshold(step_probs: Sequence[Sequence[float]], gold_first_errors: Sequence[int | None],
                     grid: Sequence[float]) -> tuple[float, float | None]:
    """(threshold, F1 there): the grid value with the best first-error F1 on these (validation) solutions.

    Ties go to the value nearest 0.5, then the smaller. F1 None everywhere (one group empty): (0.5, None).
    """
    from rlprm.reward.metrics import first_error_f1, predict_first_error

    best = (0.5, None)
    for t in sorted(grid, key=lambda t: (abs(t - 0.5), t)):
        f1 = first_error_f1(gold_first_errors, [predict_first_error(p, t) for p in step_probs])["f1"]
        if f1 is not None and (best[1] is None or f1 > best[1]):
            best = (float(t), f1)
    return best


def json_number(x):
    """inf / NaN -> None for JSON (the `status` and `bound` keys say why)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
