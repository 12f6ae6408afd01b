"""The active-learning report: report.md, active_learning.png and the summary (summary.json).

Input: the loop's rows, one per (arm, seed, budget) with the PRM's quality on the held-out test problems.
Curves are means over seeds with a bootstrap band over seeds; the data-efficiency factor of each active arm
against uniform selection, per metric, comes from rlprm/experiments/efficiency.py (read at one quality level, with its
bootstrap interval over seeds, and a status where a curve never reaches the level).
"""

from __future__ import annotations

import math
from pathlib import Path

from rlprm.experiments.efficiency import ACTIVE_NEVER, EXACT, NEITHER, UNIFORM_NEVER, factor_interval, json_number, seed_band
from rlprm.files import atomic_write_text, save_figure

METRICS = (("best_of_n_process_accuracy", "best-of-N: all steps right"),
           ("best_of_n_answer_accuracy", "best-of-N: answer right"),
           ("step_auroc", "step AUROC"),
           ("first_error_f1", "first-error F1 (validation threshold)"))


def arms_of(rows: list[dict]) -> list[str]:
    """Arm names in first-seen order (uniform first)."""
    return list(dict.fromkeys(r["strategy"] for r in rows))


def matrix(rows: list[dict], arm: str, metric: str, seeds: list[int], budgets: list[int]):
    """(seeds, budgets) values of one arm's metric (None where missing)."""
    at = {(r["seed"], r["labels"]): r.get(metric) for r in rows if r["strategy"] == arm}
    return [[at.get((s, b)) for b in budgets] for s in seeds]


def arm_name(share: float) -> str:
    """The loop's name of the active arm whose set is `share` convincing wrong-answer solutions."""
    return f"active@{share:g}"


def headline_share(cfg) -> float:
    return cfg.convincing_fraction if cfg.convincing_fraction in cfg.convincing_shares else cfg.convincing_shares[-1]


def factors(rows: list[dict], cfg, budgets: list[int]) -> dict:
    """{metric: {share (str): factor_interval's dict, or {"status": "undefined"} where a value is missing}}."""
    seeds = sorted({r["seed"] for r in rows})
    out: dict = {}
    for metric, _ in METRICS:
        qu = matrix(rows, "uniform", metric, seeds, budgets)
        out[metric] = {}
        for share in cfg.convincing_shares:
            qa = matrix(rows, arm_name(share), metric, seeds, budgets)
            if any(v is None for row in qu + qa for v in row):
                out[metric][f"{share:g}"] = {"status": "undefined", "mean": None, "lo": None, "hi": None}
                continue
            out[metric][f"{share:g}"] = factor_interval(budgets, qu, budgets, qa, cfg.factor_level_share,
                                                        cfg.bootstrap_resamples, seed=0)
    return out


def curves(rows: list[dict], budgets: list[int], resamples: int) -> dict:
    """{arm: {labels: {metric | labelled_steps: {mean, lo, hi}}}}: the mean over seeds and its bootstrap band."""
    seeds = sorted({r["seed"] for r in rows})
    out: dict = {}
    for arm in arms_of(rows):
        out[arm] = {}
        for j, b in enumerate(budgets):
            point = {}
            for metric in [m for m, _ in METRICS] + ["labelled_steps"]:
                values = [row[j] for row in matrix(rows, arm, metric, seeds, budgets)]
                point[metric] = seed_band([math.nan if v is None else v for v in values], resamples)
            out[arm][b] = point
    return out


def _pct(p: dict) -> str:
    if p.get("mean") is None:
        return "n/a"
    return f"{100 * p['mean']:.1f} [{100 * p['lo']:.1f}, {100 * p['hi']:.1f}]"


def _num(x) -> str:
    return "inf" if x is not None and math.isinf(x) else "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def factor_text(f: dict) -> str:
    """One table cell: the factor and its interval, or what the budgets show instead."""
    status = f.get("status")
    if status == EXACT:
        return f"{_num(f['mean'])} [{_num(f['lo'])}, {_num(f['hi'])}]"
    if status == UNIFORM_NEVER:
        return f">= {_num(f['bound'])} (uniform never reaches it) [{_num(f['lo'])}, {_num(f['hi'])}]"
    if status == ACTIVE_NEVER:
        return f"<= {_num(f['bound'])} (active never reaches it) [{_num(f['lo'])}, {_num(f['hi'])}]"
    if status == NEITHER:
        return "neither curve reaches the level"
    return "n/a (a value is missing)"


def _clean(obj):
    """JSON-safe copy: inf / NaN -> None (the factor's `status` says why)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return json_number(obj)


def markdown(rows, cfg, budgets, c: dict, f: dict, baselines: dict, mix: dict) -> str:
    seeds = sorted({r["seed"] for r in rows})
    arms = arms_of(rows)
    h = f"{headline_share(cfg):g}"
    lines = [f"# Active learning vs uniform selection ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
             f"{', '.join(map(str, seeds))})", "",
             f"Labels = labelled SOLUTIONS (one solution sent to the labeller is one label; labelled steps beside). "
             f"Every arm starts from the same uniform seed set of {budgets[0]} and labels the same number of "
             f"solutions of the same problems at each budget. Active arm `active@s`: per problem the top "
             f"{cfg.top_k} by the current PRM's `{cfg.aggregate}` score, a share s of them convincing wrong-answer "
             f"(highest-scored with a wrong final answer), the rest `{cfg.fill}`. Each PRM: {cfg.train_steps} "
             f"optimizer steps from the recipe's rm settings, from labels alone. Quality on the held-out TEST "
             f"problems: best-of-{cfg.eval_n} (`{cfg.eval_aggregate}` of step probabilities), step AUROC, "
             f"first-error F1 at the threshold with the best F1 on the VALIDATION problems "
             f"({cfg.validation_share:.0%} of the held-out problems). Mean over seeds "
             f"[95% bootstrap interval over seeds].", ""]
    for name, b in baselines.items():
        parts = [f"{label} {100 * b[m]:.1f}%" for m, label in METRICS if b.get(m) is not None]
        lines.append(f"- baseline `{name}`: " + ", ".join(parts))
    lines += ["", "## Quality against labels", "",
              "| labels | arm | labelled steps | new labels: convincing wrong-answer | "
              + " | ".join(f"{label} (%)" for _, label in METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(METRICS)]
    for b in budgets:
        for arm in arms:
            p = c[arm][b]
            m = mix.get(arm, {}).get(b)
            share = f"{m['convincing_wrong_answer']}/{m['new_labels']}" if m else ""
            steps = p["labelled_steps"]["mean"]
            lines.append(f"| {b} | {arm} | {steps:.0f} | {share} | "
                         + " | ".join(_pct(p[metric]) for metric, _ in METRICS) + " |")
    lines += ["", f"## Data-efficiency factor (labels uniform needs / labels active needs for the same quality)", "",
              f"Read at the quality uniform's seed-mean curve reaches {cfg.factor_level_share:.0%} of the way from "
              "its first point to its best; curves made monotone and interpolated, never extrapolated. "
              "Mean [95% bootstrap interval over seeds; a resample where active never reaches the level counts "
              f"as 0]. Headline arm: `active@{h}`.", "",
              "| metric | " + " | ".join(f"active@{s}" for s in f[METRICS[0][0]]) + " |",
              "|---|" + "---|" * len(f[METRICS[0][0]])]
    for metric, label in METRICS:
        lines.append(f"| {label} | " + " | ".join(factor_text(x) for x in f[metric].values()) + " |")
    return "\n".join(lines) + "\n"


KINDS = ("dropped_carry", "shortcut", "slip", "right")
"""What a labelled solution is, by the checker (rlprm/experiments/active.py `solution_kind`): the habits the
generator learned are systematic errors a PRM can learn once, a slip is a one-off. Counted per arm and round, they
say whether a selection surfaces the systematic error."""
KIND_LABELS = {"dropped_carry": "dropped carry", "shortcut": "last-digit shortcut", "slip": "other error (slip)",
               "right": "every step right"}


def kinds_summary(mix: dict) -> dict:
    """{arm: {kind: count, "new_labels": n}}: what each arm labelled after the shared seed set, over every round
    and seed."""
    out: dict = {}
    for arm, by_budget in mix.items():
        tot = out.setdefault(arm, {kind: 0 for kind in KINDS} | {"new_labels": 0, "convincing_wrong_answer": 0}
                             | {f"cw_{kind}": 0 for kind in KINDS})
        for m in by_budget.values():
            tot["new_labels"] += m["new_labels"]
            tot["convincing_wrong_answer"] += m.get("convincing_wrong_answer", 0)
            for kind in KINDS:
                tot[kind] += m.get(kind, 0)
                tot[f"cw_{kind}"] += m.get(f"cw_{kind}", 0)
    return out


def kinds_markdown(mix: dict, pool: dict) -> str:
    """The section saying what each arm's new labels were, by the checker: per arm over all rounds (share of the
    arm's new labels), the pool's base rates beside it, then per round."""
    if not mix or not any(kind in m for by in mix.values() for m in by.values() for kind in KINDS):
        return ""
    head = "| " + " | ".join(f"{KIND_LABELS[k]} (%)" for k in KINDS) + " |"
    lines = ["", "## What the arms labelled (new labels after the seed set, every seed)", "",
             "By the checker: `dropped carry` = some step drops a carry or borrow (the answer-changing habit), "
             "`last-digit shortcut` = some step writes only a result's last digit (the habit that keeps the answer "
             "right), `slip` = another wrong step, `every step right`. Uniform picks follow the pool's rates; the "
             "convincing wrong-answer slots pick among the pool's wrong-answer solutions.", "",
             "| arm | new labels " + head, "|---|---|" + "---|" * len(KINDS)]
    for arm, tot in kinds_summary(mix).items():
        n = max(1, tot["new_labels"])
        lines.append(f"| {arm} | {tot['new_labels']} | " + " | ".join(f"{100 * tot[k] / n:.1f}" for k in KINDS) + " |")
        if tot["convincing_wrong_answer"]:  # the selection itself: compare with the pool's wrong-answer rates
            n = tot["convincing_wrong_answer"]
            lines.append(f"| {arm}: its convincing wrong-answer picks | {n} | "
                         + " | ".join(f"{100 * tot[f'cw_{k}'] / n:.1f}" for k in KINDS) + " |")
    for name, counts in (("pool: every solution", pool.get("all")), ("pool: wrong answer only", pool.get("wrong_answer"))):
        if counts:
            n = max(1, sum(counts.values()))
            lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(f"{100 * counts[k] / n:.1f}" for k in KINDS)
                         + " |")
    lines += ["", "Per round (labels after the round; counts summed over seeds: "
              + " / ".join(KIND_LABELS[k] for k in KINDS) + "):", "",
              "| labels | " + " | ".join(mix) + " |", "|---|" + "---|" * len(mix)]
    for b in sorted({b for by in mix.values() for b in by}):
        cells = ["/".join(str(mix[arm][b].get(k, 0)) for k in KINDS) if b in mix[arm] else "" for arm in mix]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(c: dict, cfg, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.3 * len(METRICS), 3.9), dpi=110)
    for ax, (metric, label) in zip(axes, METRICS):
        for arm, points in c.items():
            keep = [(b, points[b][metric]) for b in budgets if points[b][metric]["mean"] is not None]
            if not keep:
                continue
            xs = [b for b, _ in keep]
            line, = ax.plot(xs, [100 * p["mean"] for _, p in keep], "--" if arm == "uniform" else "-", marker="o",
                            markersize=3, label=arm)
            ax.fill_between(xs, [100 * p["lo"] for _, p in keep], [100 * p["hi"] for _, p in keep],
                            color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled solutions")
        ax.set_ylabel("%")
        ax.set_title(label if "best" not in metric else f"{label} (N={cfg.eval_n})", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(rows: list[dict], cfg, budgets: list[int], run_dir: Path, baselines: dict,
                 pool: dict | None = None) -> dict:
    """Write RUN_DIR/report.md and active_learning.png; return the summary (JSON-safe) for summary.json.

    `pool`: the pool's kind counts ({"all": {kind: n}, "wrong_answer": {kind: n}}), the base rates beside what each
    arm labelled."""
    c = curves(rows, budgets, cfg.bootstrap_resamples)
    f = factors(rows, cfg, budgets)
    mix: dict = {}
    for r in rows:
        if r["generation"] > 0:
            m = mix.setdefault(r["strategy"], {}).setdefault(r["labels"], {"new_labels": 0, "convincing_wrong_answer": 0})
            m["new_labels"] += r["new_labels"]
            m["convincing_wrong_answer"] += r["new_convincing_wrong_answer"]
            for kind in KINDS:
                m[kind] = m.get(kind, 0) + r.get(f"new_{kind}", 0)
                m[f"cw_{kind}"] = m.get(f"cw_{kind}", 0) + r.get(f"new_cw_{kind}", 0)
    text = markdown(rows, cfg, budgets, c, f, baselines, mix) + kinds_markdown(mix, pool or {})
    atomic_write_text(run_dir / "report.md", text)
    plot(c, cfg, budgets, run_dir / "active_learning.png")
    print(text)
    h = f"{headline_share(cfg):g}"
    factor = {metric: {**by_share[h], "share": headline_share(cfg), "by_share": by_share}
              for metric, by_share in f.items()}
    return _clean({"label_unit": "solutions", "budgets": budgets, "seeds": sorted({r["seed"] for r in rows}),
                   "arms": arms_of(rows), "quality_metric": cfg.quality_metric, "headline_share": headline_share(cfg),
                   "factor_level_share": cfg.factor_level_share, "factor": factor, "curves": c, "mix": mix,
                   "kinds": kinds_summary(mix), "pool_kinds": pool or {},
                   "baselines": baselines, "report": str(run_dir / "report.md"),
                   "plot": str(run_dir / "active_learning.png")})
