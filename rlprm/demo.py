"""`rlprm demo` / `make demo`: process vs outcome supervision, end to end, on a CPU.

The stages, each a shipped recipe run in this process with the smaller
budgets of DEMO_OVERRIDES (same code paths as the full-size commands):

    prepare          recipes/arith_prepare.yaml  the tiny generator            -> OUT/prepare/generator
    rm-prm           recipes/prm_train.yaml      samples, exact step labels, PRM -> OUT/prm/reward_model
    rm-orm           recipes/orm_train.yaml      the same samples, answer labels -> OUT/orm/reward_model
    per seed S:
    bon-start-sS     recipes/bon_eval.yaml       best-of-N of the starting generator
    rl-*-sS          recipes/prm_dense.yaml, orm_sparse.yaml, outcome_gt.yaml: PPO three ways,
                     same sample budget and seed                           -> OUT/seed-S/rl_*/export
    bon-*-sS         best-of-N of each final generator
    compare          rlprm compare over all of the above                   -> OUT/report/report.md

Skipping: a stage that finishes writes `.demo-stage.json` into its folder,
last and atomically, holding a key made of its resolved recipe and the keys of
the stages it reads from. A re-run skips every stage whose marker matches and
whose outputs are still there, so after a crash only the interrupted stage
(and what follows) runs again; a stage whose settings changed, or whose input
stage was redone, runs again by itself. `--force` redoes every stage,
`--force NAME...` the named ones (a prefix such as `rl` or `bon` names a
group), and what depends on them.

Seeds: `--seeds N` repeats the RL runs and the best-of-N evaluations with
run.seed = 0..N-1 (training problems, sampling and evaluation problems all
follow the seed); the generator and the two reward models are shared (seed 0),
so the spread measures RL and evaluation noise. The report then gives mean ±
s.d. per number.

The generator keeps the full recipe's `sft.steps` (fewer are not enough for
the arithmetic to click); its process-accuracy target is relaxed from 0.30 to
0.10: when SFT was budgeted in wall-clock time its outcome varied from run to
run (two runs of about 670 steps each gave 46% and 10.5% on this project's
2-core machine). SFT now runs a fixed step count, so one seed gives one
generator; the relaxed target stays until that count is calibrated.
`--generator PATH` starts from an existing generator instead (no prepare stage).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
MARKER = ".demo-stage.json"

# Budgets of the demo (2 CPU cores, under 15 minutes for one seed); keys are stage groups.
# `rlprm demo --set GROUP:key=value` changes one for a run.
DEMO_OVERRIDES: dict[str, list[str]] = {
    # the generator keeps the recipe's sft.steps: after 321 steps it wrote well-formed chains with 0% process
    # accuracy; the arithmetic clicks only after about 500-600 steps
    "prepare": ["prepare_eval.num_problems=200",          # 500
                "prepare_eval.min_process_accuracy=0.10"],  # 0.30: two runs of ~670 steps gave 46% and 10.5%
    "rm": ["rm.data.train_problems=192",                  # 1024 (x 8 samples each)
           "rm.data.eval_problems=48",                    # 128
           "rm.data.eval_samples_per_problem=8",          # 16
           "rm.time_budget_s=45"],                        # 170
    # the RL recipes' own budget (3 epochs x 3 iterations x 32 prompts x 4 samples, about 90 s each): with one
    # iteration per epoch every run was still recovering from its first updates when it ended
    "rl": ["rl.epochs=3",
           "rl.problems_per_epoch=96",
           "rl.prompts_per_iteration=32",
           "rl.eval_problems=64",
           "rl.eval_n=4"],
    "bon": ["eval.n_max=16",                              # 64
            "eval.num_problems=40",                       # 200
            "eval.resamples=100",
            "eval.aggregations=[prod, min]"],
}
RL_RUNS = [("rl-prm-dense", "prm_dense.yaml", "prm"), ("rl-orm-sparse", "orm_sparse.yaml", "orm"),
           ("rl-outcome-gt", "outcome_gt.yaml", None)]


def _say(line: str) -> None:
    print(line, flush=True)  # stage lines must show up at once, also when stdout is a log file


class DemoError(RuntimeError):
    """A stage failed or produced incomplete output (the message names the stage and how to go on)."""


@dataclass
class Stage:
    """One step of the pipeline: `run()` writes into `out_dir`; `outputs` must exist afterwards."""

    name: str
    out_dir: Path
    run: Callable[[], object]
    key: str
    """What defines the output (the resolved recipe); a changed key means the stage runs again."""
    deps: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    """Files (relative to out_dir) that a complete stage has."""


# --------------------------------------------------------------------------- the stage runner


def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None  # absent, or unreadable: the stage is not complete


def _write_marker(out_dir: Path, record: dict) -> None:
    path = Path(out_dir) / MARKER
    tmp = path.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # the marker appears whole, and only after everything else


def _forced(name: str, force) -> bool:
    if force is True:
        return True
    return any(name == f or name.startswith(f + "-") for f in (force or []))


def run_stages(stages: list[Stage], root: Path, force=None, log: Callable[[str], None] = _say) -> list[dict]:
    """Run or skip each stage in order; returns one record per stage (name, status, seconds).

    force: None (skip what is complete), True (redo all) or a list of stage names / name prefixes.
    A failing stage raises DemoError after the earlier stages' markers are safely written.
    """
    root = Path(root).resolve()
    run_ids: dict[str, str] = {}
    records = []
    for i, st in enumerate(stages, 1):
        out = Path(st.out_dir).resolve()
        if root not in out.parents:
            raise DemoError(f"stage {st.name}: {out} is outside the demo folder {root}; refusing to write there")
        missing_dep = [d for d in st.deps if d not in run_ids]
        if missing_dep:
            raise DemoError(f"stage {st.name} depends on {missing_dep}, which do not come before it")
        key = hashlib.sha256("\n".join([st.key, *(run_ids[d] for d in st.deps)]).encode()).hexdigest()[:16]
        head = f"[{i}/{len(stages)}] {st.name}"
        marker = read_marker(out)
        complete = marker is not None and all((out / o).exists() for o in st.outputs)
        if complete and marker.get("key") == key and not _forced(st.name, force):
            run_ids[st.name] = marker["run_id"]
            log(f"{head}: complete, skipped (took {marker.get('seconds', 0):.0f} s; `--force {st.name}` redoes it)")
            records.append({"stage": st.name, "status": "skipped", "seconds": marker.get("seconds"), "dir": str(out)})
            continue
        why = ("forced" if _forced(st.name, force) else "not run yet" if marker is None
               else "its settings or inputs changed" if complete else "its output is incomplete")
        log(f"{head}: running ({why}) -> {out}")
        if out.exists():
            (out / MARKER).unlink(missing_ok=True)  # first the marker: a crash while clearing leaves no false "done"
            shutil.rmtree(out)
        out.mkdir(parents=True)
        t0 = time.monotonic()
        try:
            st.run()
        except DemoError:
            raise
        except Exception as exc:
            raise DemoError(f"stage {st.name} failed after {time.monotonic() - t0:.0f} s: {type(exc).__name__}: {exc}\n"
                            f"Completed stages are kept; run the same command again to go on from {st.name}.") from exc
        seconds = time.monotonic() - t0
        missing = [o for o in st.outputs if not (out / o).exists()]
        if missing:
            raise DemoError(f"stage {st.name} finished but {out} lacks {', '.join(missing)}")
        run_ids[st.name] = uuid.uuid4().hex
        _write_marker(out, {"stage": st.name, "key": key, "run_id": run_ids[st.name], "seconds": round(seconds, 1),
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log(f"{head}: done in {seconds:.0f} s")
        records.append({"stage": st.name, "status": "ran", "seconds": round(seconds, 1), "dir": str(out)})
    return records


# --------------------------------------------------------------------------- the demo's stages


def _group_overrides(group: str, extra: dict[str, list[str]]) -> list[str]:
    return DEMO_OVERRIDES.get(group, []) + extra.get(group, [])


def build_stages(out: Path, seeds: int = 1, wandb: str = "disabled", extra: dict[str, list[str]] | None = None,
                 progress: bool = True, generator: str | Path | None = None) -> list[Stage]:
    """The demo pipeline under `out`. Every recipe is loaded and validated here, before anything runs.

    generator: an existing generator folder to start from instead of the `prepare` stage.
    """
    from rlprm.config import load_recipe, recipe_to_yaml

    out, extra = Path(out).resolve(), extra or {}
    tracking = [f"tracking.wandb={wandb}", "tracking.group=demo"]
    stages: list[Stage] = []

    def add(name, recipe_file, group, out_dir, overrides, job, deps, outputs):
        deps = [d for d in deps if d != "prepare" or generator is None]
        recipe = load_recipe(RECIPES / recipe_file,
                             overrides + _group_overrides(group, extra) + [f"run.output_dir={out_dir}"] + tracking)
        stages.append(Stage(name, out_dir, lambda r=recipe: job(r), recipe_to_yaml(recipe) + external, deps, outputs))

    given = generator is not None
    generator = Path(generator).resolve() if given else out / "prepare" / "generator"
    if given and not (generator / "config.json").is_file():
        raise DemoError(f"--generator {generator}: not a model folder (no config.json)")
    # an outside generator is no stage: its files' sizes and times stand in for a marker, so that
    # retraining it in place redoes everything that read it
    external = "" if not given else "\n# generator files: " + ", ".join(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(generator.iterdir()) if f.is_file())
    prm, orm = out / "prm" / "reward_model", out / "orm" / "reward_model"
    samples = out / "prm" / "rm_samples"  # owned by the PRM stage: redone with it, read by the ORM stage
    if not given:
        add("prepare", "arith_prepare.yaml", "prepare", out / "prepare", [], lambda r: _prepare(r, progress), [],
            ["generator/config.json"])
    rm = [f"model.generator={generator}", f"rm.data.cache_dir={samples}"]
    add("rm-prm", "prm_train.yaml", "rm", out / "prm", rm, lambda r: _train_rm(r, progress), ["prepare"],
        ["reward_model/config.json"])
    add("rm-orm", "orm_train.yaml", "rm", out / "orm", rm, lambda r: _train_rm(r, progress), ["prepare", "rm-prm"],
        ["reward_model/config.json"])
    bon_rms = [f"eval.reward_models.prm={prm}", f"eval.reward_models.orm={orm}", "eval.weighted_vote_by=prm_prod"]
    for seed in range(seeds):
        sdir = out / f"seed-{seed}"
        add(f"bon-start-s{seed}", "bon_eval.yaml", "bon", sdir / "bon_start",
            bon_rms + ["run.name=bon-start", f"run.seed={seed}", f"model.generator={generator}"],
            lambda r: _bon(r, progress), ["prepare", "rm-prm", "rm-orm"], ["bon_curves.json"])
        for name, recipe_file, rm_kind in RL_RUNS:
            rm_path = {"prm": prm, "orm": orm}.get(rm_kind)
            add(f"{name}-s{seed}", recipe_file, "rl", sdir / name.replace("-", "_"),
                [f"run.seed={seed}", f"model.generator={generator}"]
                + ([f"model.reward_model={rm_path}"] if rm_path else []),
                lambda r: _rl(r, progress), ["prepare"] + ([f"rm-{rm_kind}"] if rm_kind else []),
                ["export/config.json"])
        for name, _, _ in RL_RUNS:
            final = name.replace("rl-", "bon-")
            add(f"{final}-s{seed}", "bon_eval.yaml", "bon", sdir / final.replace("-", "_"),
                bon_rms + [f"run.name={final}", f"run.seed={seed}",
                           f"model.generator={sdir / name.replace('-', '_') / 'export'}"],
                lambda r: _bon(r, progress), ["rm-prm", "rm-orm", f"{name}-s{seed}"], ["bon_curves.json"])
    return stages


def compare_stage(out: Path, stages: list[Stage]) -> Stage:
    """The report over every run folder of `stages` (generator, reward models, RL, best-of-N)."""
    from rlprm.compare import compare, read_run

    dirs = [st.out_dir for st in stages if st.name.startswith(("prepare", "rm-", "rl-", "bon-"))]
    report = Path(out) / "report"
    return Stage("compare", report,
                 lambda: compare([read_run(d) for d in dirs], report, title="Process vs outcome supervision (demo)"),
                 key="\n".join(map(str, dirs)), deps=[st.name for st in stages if st.out_dir in dirs],
                 outputs=["report.md"])


def _prepare(recipe, progress):
    from rlprm.prepare import PrepareError, prepare

    try:
        return prepare(recipe, progress=progress)
    except PrepareError as exc:
        raise DemoError(f"stage prepare: {exc}\nGive it more steps, e.g. `rlprm demo --set "
                        f"prepare:sft.steps=1000 --force prepare`") from None


def _train_rm(recipe, progress):
    from rlprm.train_rm import train_rm

    return train_rm(recipe, progress=progress)


def _rl(recipe, progress):
    from rlprm.rl.ppo import check_prerequisites, train_ppo

    check_prerequisites(recipe)
    return train_ppo(recipe, resume=False, progress=progress)


def _bon(recipe, progress):
    from rlprm.evaluate import run_eval

    return run_eval(recipe, progress=progress)


def _peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux; children: the grading workers
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 2**20, 2)


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """`GROUP:key=value` items -> {group: [key=value, ...]}; GROUP is one of DEMO_OVERRIDES' keys."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        group, sep, override = item.partition(":")
        if not sep or group not in DEMO_OVERRIDES or "=" not in override:
            raise DemoError(f"--set {item!r}: expected GROUP:key=value with GROUP one of "
                            f"{', '.join(DEMO_OVERRIDES)}, e.g. prepare:sft.steps=1000")
        out.setdefault(group, []).append(override)
    return out


def run_demo(out: str | Path = ROOT / "runs" / "demo", seeds: int = 1, force=None, wandb: str = "disabled",
             sets: list[str] | None = None, progress: bool = True, log: Callable[[str], None] = _say,
             generator: str | Path | None = None) -> dict:
    """The whole demo; returns (and writes to OUT/demo_summary.json) the stage timings and the report path."""
    out = Path(out).resolve()
    if seeds < 1:
        raise DemoError("--seeds must be at least 1")
    t0 = time.monotonic()
    stages = build_stages(out, seeds, wandb, parse_sets(sets or []), progress, generator)
    stages.append(compare_stage(out, stages))
    log(f"demo: {len(stages)} stages into {out} (seeds: {seeds})")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"out": str(out), "seeds": seeds, "argv": sys.argv[1:], "status": "running"}
    try:
        summary["stages"] = run_stages(stages, out, force, log)
        # the work behind the outputs, skipped stages counted at the time they took when they ran
        summary["stage_seconds_total"] = round(sum(r["seconds"] or 0 for r in summary["stages"]), 1)
        summary["status"] = "done"
    except DemoError as exc:
        summary.update(status="failed", error=str(exc))
        raise
    finally:
        summary.update(wall_seconds=round(time.monotonic() - t0, 1), peak_rss_gib=_peak_rss_gib())
        tmp = out / "demo_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(out / "demo_summary.json")
    report = out / "report" / "report.md"
    summary["report"] = str(report)
    exports = [str(st.out_dir / "export") for st in stages if st.name.startswith("rl-")]
    log(f"demo: done in {summary['wall_seconds']:.0f} s (peak memory {summary['peak_rss_gib']} GiB)\n"
        f"  report: {report}\n  exported generators:\n    " + "\n    ".join(exports))
    return summary
