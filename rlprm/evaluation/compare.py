"""`rlprm compare RUN_DIR...`: one report (tables and plots) across runs, seeds averaged.

Reads what every job leaves in its run folder (metrics.jsonl, summary.json,
recipe.yaml; see rlprm/tracking.py), or the same values from W&B runs of a
group, and writes into OUT:

    report.md         tables: RL runs (answer and process accuracy at the start
                      and the end, right answer on a wrong step, KL), best-of-N
                      per selector and generator, other runs' headline numbers
    rl_curves.png     answer and process accuracy vs RL epoch, one line per run
    bon_curves.png    best-of-N accuracy vs N, one panel per selector, one line per run

Runs that share a name (`run.name` of their recipe) and differ in `run.seed`
are repetitions of one experiment: each number is reported as mean ± standard
deviation over the seeds (n = number of seeds), and plots draw the mean with a
band of ± one standard deviation. So a difference between two runs can be read
against the spread between seeds of one run.

Nothing here knows how a run was produced: any folder with a metrics.jsonl
(real-scale runs included) is accepted, and a kind is inferred from the keys:
`rl` (per-epoch `eval/answer_accuracy` and `rl/*` records), `bon` (an
`rlprm eval` job: `eval/n_max` in the summary), `other` (prepare, train-rm).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlprm.errors import InputError
from rlprm.files import atomic_write_text, save_figure

BON_KEY = re.compile(r"^bon/(?P<selector>.+)/N=(?P<n>\d+)/(?P<metric>[a-z_]+)$")
# headline numbers of non-RL, non-best-of-N runs (prepare, train-rm), shown when present
OTHER_KEYS = ["process_accuracy", "answer_accuracy", "well_formed", "right_answer_wrong_process",
              "eval/step_auroc", "eval/solution_auroc", "eval/first_error_f1", "eval/blind_spot_rate"]


class CompareError(InputError, ValueError):
    """No usable run, or a folder that is not a run (the message names it)."""


@dataclass
class RunData:
    """What compare needs from one run, wherever it was read from."""

    label: str
    """Experiment name (the recipe's run.name): runs with the same label are seeds of one experiment."""
    seed: int | None
    source: str
    """The folder or W&B path it came from."""
    records: list[dict]
    """metrics.jsonl lines (or W&B history rows)."""
    summary: dict
    export: str | None = None
    """The exported generator folder, when the run has one."""
    kind: str = field(init=False)

    def __post_init__(self):
        if any("eval/answer_accuracy" in r for r in self.records) and any(
                k.startswith("rl/") for r in self.records for k in r):
            self.kind = "rl"
        elif "eval/n_max" in self.summary:
            self.kind = "bon"
        else:
            self.kind = "other"


# --------------------------------------------------------------------------- reading


def read_run(path: str | Path) -> RunData:
    """A run folder -> RunData. Raises CompareError naming the folder if it holds no metrics.jsonl."""
    folder = Path(path)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{folder}: not a run folder (no metrics.jsonl)")
    records = []
    with open(metrics) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # a run killed mid-write leaves a torn last line: keep what is whole, name what is not
                raise CompareError(f"{metrics}:{lineno}: not valid JSON (a run that crashed mid-write?)") from None
    summary = {}
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    elif records:
        # a run still going (or crashed) has no summary: its last values stand in
        for r in records:
            summary.update(r)
    label, seed = folder.name, None
    if (folder / "recipe.yaml").is_file():
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
        label = (recipe.get("run") or {}).get("name") or label
        seed = (recipe.get("run") or {}).get("seed")
    export = folder / "export"
    return RunData(label, seed, str(folder), records, summary, str(export) if (export / "config.json").is_file() else None)


def read_wandb_group(group: str, project: str = "rlprm", entity: str | None = None) -> list[RunData]:
    """Every W&B run of `group` in `entity/project` -> RunData (needs network and a W&B key)."""
    import wandb  # heavy and optional: only when the user asks for W&B

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    out = []
    for run in api.runs(path, filters={"group": group}):
        config = dict(run.config or {})
        run_cfg = config.get("run") or {}
        records = [dict(row) for row in run.scan_history()]
        for i, row in enumerate(records):
            row.setdefault("step", row.get("_step", i))
        summary = {k: v for k, v in dict(run.summary or {}).items() if not k.startswith("_")}
        out.append(RunData(run_cfg.get("name") or run.name, run_cfg.get("seed"), f"wandb:{path}/{run.id}",
                           records, summary))
    if not out:
        raise CompareError(f"W&B has no runs in group {group!r} of project {path!r}")
    return out


# --------------------------------------------------------------------------- numbers


def mean_spread(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), n) of the finite values; (nan, nan, 0) if none."""
    vals = [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def fmt(values: list[float], percent: bool = True, digits: int = 1) -> str:
    """`49.6` for one seed, `49.6 ± 2.1 (n=3)` for several, `-` for none."""
    mean, sd, n = mean_spread(values)
    if n == 0:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * mean:.{digits}f}"
    if n > 1:
        text += f" ± {scale * sd:.{digits}f} (n={n})"
    return text


# two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher expansion around z
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (no scipy in the project's dependencies)."""
    if df < 1:
        raise ValueError("t quantile needs df >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seed_interval(values: list[float]) -> dict:
    """{mean, lo, hi, n}: the mean over seeds and its 95% t-interval (mean +- t(0.975, n-1) s.d./sqrt(n)).

    One seed gives its value as mean = lo = hi (n=1: no interval can be had); none gives NaNs and n=0."""
    mean, sd, n = mean_spread(values)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired_seed_differences(a: dict[int, float], b: dict[int, float]) -> dict:
    """seed_interval of a[s] - b[s] over the seeds both runs have (seed -> value); n=0 when they share none."""
    shared = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    return seed_interval([a[s] - b[s] for s in shared])


def group_runs(runs: list[RunData]) -> dict[str, list[RunData]]:
    """label -> its runs (seeds), in first-seen order."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def rl_curve(run: RunData, key: str) -> dict[float, float]:
    """epoch -> value of `key` from the per-epoch evaluation records."""
    out = {}
    for r in run.records:
        if key in r and r.get(key) is not None and "epoch" in r:
            out[float(r["epoch"])] = float(r[key])
    return out


def bon_table(run: RunData, metric: str = "accuracy") -> dict[str, dict[int, float]]:
    """selector -> {N: value} from a run's summary (flat `bon/SEL/N=k/metric` keys)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for key, value in run.summary.items():
        m = BON_KEY.match(key)
        if m and m["metric"] == metric and isinstance(value, (int, float)):
            out[m["selector"]][int(m["n"])] = float(value)
    return dict(out)


# --------------------------------------------------------------------------- plots


def plot_rl(groups: dict[str, list[RunData]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, title in zip(axes, ["eval/answer_accuracy", "eval/process_accuracy"],
                              ["answer accuracy (held out)", "process accuracy: every step right"]):
        for label, runs in groups.items():
            curves = [rl_curve(r, key) for r in runs]
            epochs = sorted({e for c in curves for e in c})
            if not epochs:
                continue
            stats = [mean_spread([c.get(e) for c in curves]) for e in epochs]
            mean = [100 * s[0] for s in stats]
            line, = ax.plot(epochs, mean, marker="o", markersize=3,
                            label=label + (f" (n={len(runs)})" if len(runs) > 1 else ""))
            if len(runs) > 1:
                ax.fill_between(epochs, [100 * (s[0] - s[1]) for s in stats], [100 * (s[0] + s[1]) for s in stats],
                                color=line.get_color(), alpha=0.15)
        ax.set_xlabel("RL epoch")
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def plot_bon(groups: dict[str, list[RunData]], selectors: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(selectors))
    rows = math.ceil(len(selectors) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, selector in zip(axes.flat, selectors):
        for label, runs in groups.items():
            tables = [bon_table(r).get(selector, {}) for r in runs]
            ns = sorted({n for t in tables for n in t})
            if not ns:
                continue
            stats = [mean_spread([t.get(n) for t in tables]) for n in ns]
            line, = ax.plot(ns, [100 * s[0] for s in stats], marker="o", markersize=3, label=label)
            if len(runs) > 1:
                ax.fill_between(ns, [100 * (s[0] - s[1]) for s in stats], [100 * (s[0] + s[1]) for s in stats],
                                color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_title(selector, fontsize=10)
        ax.set_xlabel("N")
        ax.set_ylabel("% solved")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(selectors):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- report


def _first_last(run: RunData, key: str) -> tuple[float | None, float | None]:
    curve = rl_curve(run, key)
    if not curve:
        return None, None
    return curve[min(curve)], curve[max(curve)]


def rl_section(groups: dict[str, list[RunData]]) -> list[str]:
    lines = ["## RL runs", "",
             "Held-out evaluation before RL (epoch 0, the starting generator), every rl.eval_every epochs and after the last. "
             "Process accuracy: share of sampled solutions with every step right; "
             "right answer, wrong step: share whose answer is right although a step is wrong. "
             "Trace error: of the right-answer samples, the share with a wrong step; shortcut rate: share of "
             "samples that write the last-digit shortcut; carry-drop rate: share of samples that drop a carry or "
             "borrow, the habit that changes the answer (arithmetic task; `-` where steps cannot be checked).", "",
             "| run | seeds | answer acc. start | answer acc. end | process acc. start | process acc. end "
             "| right answer, wrong step (end) | KL to start (end) | trace error start | trace error end "
             "| shortcut rate start | shortcut rate end | carry-drop rate start | carry-drop rate end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in groups.items():
        a = [_first_last(r, "eval/answer_accuracy") for r in runs]
        p = [_first_last(r, "eval/process_accuracy") for r in runs]
        rawp = [bon_table(r, "right_answer_wrong_process").get("random", {}).get(1) for r in runs]
        kl = [r.summary.get("rl/kl") for r in runs]
        # the two numbers that tell a process run from an outcome run beyond accuracy
        te = [_first_last(r, "eval/trace_error") for r in runs]
        sc = [_first_last(r, "eval/shortcut_rate") for r in runs]
        cd = [_first_last(r, "eval/carry_drop_rate") for r in runs]
        lines.append(f"| {label} | {len(runs)} | {fmt([x[0] for x in a])} | {fmt([x[1] for x in a])} | "
                     f"{fmt([x[0] for x in p])} | {fmt([x[1] for x in p])} | {fmt(rawp)} | "
                     f"{fmt(kl, percent=False, digits=3)} | {fmt([x[0] for x in te])} | {fmt([x[1] for x in te])} | "
                     f"{fmt([x[0] for x in sc])} | {fmt([x[1] for x in sc])} | "
                     f"{fmt([x[0] for x in cd])} | {fmt([x[1] for x in cd])} |")
    return lines + [""]


def bon_section(groups: dict[str, list[RunData]], selectors: list[str]) -> list[str]:
    lines = ["## Best-of-N", "",
             "Share of problems whose chosen solution has the right answer (%), by selector and N; "
             "one table per selector, one row per generator.", ""]
    for selector in selectors:
        ns = sorted({n for runs in groups.values() for r in runs for n in bon_table(r).get(selector, {})})
        if not ns:
            continue
        lines += [f"### {selector}", "", "| generator | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for label, runs in groups.items():
            tables = [bon_table(r).get(selector, {}) for r in runs]
            if any(tables):
                lines.append(f"| {label} | " + " | ".join(fmt([t.get(n) for t in tables]) for n in ns) + " |")
        lines.append("")
    # on the arithmetic task: how often the chosen solution is fully right, and how often right on wrong steps
    n_top = max((n for runs in groups.values() for r in runs for t in bon_table(r, "process_correct").values()
                 for n in t), default=None)
    if n_top is not None:
        lines += [f"### Chosen solutions at N={n_top}: every step right / right answer on a wrong step (%)", "",
                  "| generator | selector | every step right | right answer, wrong step |", "|---|---|---|---|"]
        for label, runs in groups.items():
            for selector in selectors:
                pc = [bon_table(r, "process_correct").get(selector, {}).get(n_top) for r in runs]
                rw = [bon_table(r, "right_answer_wrong_process").get(selector, {}).get(n_top) for r in runs]
                if any(v is not None for v in pc):
                    lines.append(f"| {label} | {selector} | {fmt(pc)} | {fmt(rw)} |")
        lines.append("")
    return lines


def other_section(groups: dict[str, list[RunData]]) -> list[str]:
    keys = [k for k in OTHER_KEYS if any(k in r.summary for runs in groups.values() for r in runs)]
    if not keys:
        return []
    lines = ["## Other runs", "", "| run | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for label, runs in groups.items():
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(
            fmt([r.summary.get(k) for r in runs], percent=False, digits=3) for k in keys) + " |")
    return lines + [""]


def compare(runs: list[RunData], out_dir: str | Path, title: str = "rlprm compare") -> Path:
    """Write report.md (and the plots it links) into out_dir; returns the report's path."""
    if not runs:
        raise CompareError("no runs to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[RunData]] = defaultdict(list)
    for run in runs:
        by_kind[run.kind].append(run)
    lines = [f"# {title}", "",
             f"{len(runs)} run(s). Several seeds of one run (same `run.name`) are shown as mean ± standard "
             "deviation (n = seeds); plots draw the mean with a ± 1 s.d. band.", ""]
    if by_kind["rl"]:
        groups = group_runs(by_kind["rl"])
        plot_rl(groups, out / "rl_curves.png")
        lines += rl_section(groups) + ["![answer and process accuracy vs RL epoch](rl_curves.png)", ""]
    if by_kind["bon"]:
        groups = group_runs(by_kind["bon"])
        selectors = list(dict.fromkeys(s for runs in groups.values() for r in runs for s in bon_table(r)))
        if selectors:  # best-of-N runs without curves in their summary (a run that stopped early) have no plot
            plot_bon(groups, selectors, out / "bon_curves.png")
            lines += bon_section(groups, selectors) + ["![best-of-N per selector](bon_curves.png)", ""]
    if by_kind["other"]:
        lines += other_section(group_runs(by_kind["other"]))
    lines += ["## Runs", "", "| run | kind | seed | source | exported generator |", "|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.label} | {run.kind} | {run.seed if run.seed is not None else '-'} | `{run.source}` | "
                     f"{'`' + run.export + '`' if run.export else '-'} |")
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def main(run_dirs: list[str], out: str | None = None, wandb_group: str | None = None,
         wandb_project: str = "rlprm", wandb_entity: str | None = None) -> Path:
    """The `rlprm compare` command: local folders and/or a W&B group -> report.md."""
    runs = [read_run(d) for d in run_dirs]
    if wandb_group:
        runs += read_wandb_group(wandb_group, wandb_project, wandb_entity)
    if not runs:
        raise CompareError("give run folders (RUN_DIR...) or --wandb-group GROUP")
    out_dir = out or (Path(run_dirs[0]).parent / "compare" if run_dirs else Path("runs") / f"compare-{wandb_group}")
    return compare(runs, out_dir)
