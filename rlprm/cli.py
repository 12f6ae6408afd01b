"""The `rlprm` command.

Every subcommand that runs a job takes a recipe, then any number of
`key.sub=value` overrides, and validates everything before loading a model:

    rlprm prepare recipes/arith_prepare.yaml sft.steps=300
    rlprm train-rm recipes/prm_train.yaml          # a process reward model
    rlprm eval recipes/bon_eval.yaml                # best-of-N curves
    rlprm bench-prm recipes/bench_prm.yaml          # ProcessBench F1 per subset of any PRM (ours or public)
    rlprm train-rl recipes/prm_dense.yaml [--resume]  # PPO from dense PRM rewards
    rlprm export runs/rl_prm_dense                  # latest checkpoint -> plain HF folder
    rlprm check recipes/arith_prepare.yaml          # validate only
    rlprm recipes                                   # the shipped recipes; each runs by name: rlprm check prm_dense
    rlprm prepare recipes/arith_prepare.yaml --print-config
    rlprm explain [RECIPE | --algorithm grpo]       # every recipe key, documented (rl: that algorithm's)
    rlprm demo [--seeds 3] [--force [STAGE...]]     # the whole process-vs-outcome pipeline, small budgets
    rlprm compare RUN_DIR... [--out DIR]            # report.md + plots across runs (seeds averaged)
    rlprm active-learning recipes/active_learning.yaml          # active vs uniform labelling: data efficiency
    rlprm synthetic-supervision recipes/synthetic_supervision.yaml  # a large PRM labels for small PRMs / ORMs

Each command is one row of COMMANDS: its help, its arguments and a handler.
Handlers raise; one wrapper (rlprm/errors.py) turns an error into `error:
MESSAGE` on stderr and its exit code: 2 bad input (a recipe, file or model;
the package's `InputError`s and FileNotFoundError), 3 `prepare` missed its
targets, 4 the RL run stopped, 1 a demo stage failed (128 + N: the demo was
stopped by signal N). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlprm.config import PRMAdapter, Recipe, explain, load_recipe, recipe_to_yaml
from rlprm.errors import ArgumentParser, run_reporting_errors


# --------------------------------------------------------------------------- arguments


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe (`rlprm recipes` lists "
                                       "them), e.g. prm_dense")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. run.seed=1 sft.steps=300")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (defaults filled in, paths absolute) and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _train_rl_args(parser: argparse.ArgumentParser) -> None:
    _recipe_args(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's latest checkpoint (weights, optimizers, epoch, RNG); "
                             "a folder without one is an error")
    parser.add_argument("--resume-or-start", action="store_true",
                        help="resume when the run folder holds a checkpoint, else start from the beginning (for job "
                             "scripts that rerun the same command)")


def _explain_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=None, help="a recipe YAML file: explain the keys of its rl.algorithm")
    parser.add_argument("--algorithm", choices=["ppo", "grpo", "rejection_sampling"], default=None,
                        help="explain the `rl` keys of this algorithm")


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder holding checkpoints/ (e.g. runs/rl_prm_dense)")
    parser.add_argument("--out", default=None, help="destination folder (default RUN_DIR/export)")


def _label_args(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("input", help="PRM800K JSONL to label (question.pre_generated_steps are rated)")
    p.add_argument("--out", required=True, help="labelled JSONL to write")
    p.add_argument("--with", dest="labeller", default="checker", metavar="checker|PRM",
                   help="who labels: `checker` (arithmetic task), or a PRM: a folder written by `rlprm train-rm`, or a "
                        "public PRM's folder or hub id")
    p.add_argument("--adapter", default=None, choices=typing.get_args(PRMAdapter),
                   help="(PRM) its family, as reward.adapter in a recipe (default: detected from its files)")
    p.add_argument("--reference-model", default=None,
                   help="(PRM, --adapter implicit) the reference LM, as reward.reference_model")
    p.add_argument("--implicit-beta", type=float, default=0.001, help="(PRM, --adapter implicit) beta (default 0.001)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="(PRM) weights dtype (default float32)")
    p.add_argument("--device", default="cpu", help="(PRM) torch device, e.g. cuda (default cpu)")
    p.add_argument("--threshold", type=float, default=0.5, help="(PRM) a step scored below this is wrong (default 0.5)")
    p.add_argument("--sep", default="\n", help="step separator used to render steps for the checker (default newline)")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=1, help="repeat RL and best-of-N over seeds 0..N-1 (mean and s.d. in the report)")
    p.add_argument("--generator", default=None, metavar="PATH",
                   help="start from this generator folder (e.g. runs/arith/generator) instead of the prepare stage")
    p.add_argument("--force", nargs="*", metavar="STAGE", default=None,
                   help="redo stages even if complete: all with no name, else the named ones or a prefix (prepare, rm, rl, bon, "
                        "rl-prm-dense-s0, ...); what depends on them is redone too")
    p.add_argument("--set", action="append", default=[], metavar="GROUP:key=value",
                   help="change a demo budget, e.g. prepare:sft.steps=1000 (groups: prepare, rm, rl, bon)")
    p.add_argument("--wandb", default="disabled", choices=["disabled", "auto", "online", "offline"],
                   help="W&B mode of every stage (default disabled; runs go to group `demo`)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--lanes", type=int, default=2,
                   help="RL and best-of-N stages run side by side, this many at a time, each in its own process with "
                        "one torch thread (default 2; 1 runs every stage in this process, one after another)")


def _compare_args(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders (each holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="report folder (default: compare/ beside the first RUN_DIR)")
    p.add_argument("--wandb-group", default=None, help="also read every W&B run of this group (needs a W&B key)")
    p.add_argument("--wandb-project", default="rlprm", help="W&B project of --wandb-group (default rlprm)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity of --wandb-group (default: yours)")


# --------------------------------------------------------------------------- handlers
# A recipe command's handler gets the validated recipe; the others get the parsed arguments only.


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _prepare(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.experiments.prepare import prepare

    rates = prepare(recipe, progress=not args.no_progress)
    print(
        f"generator saved to {recipe.run.output_dir}/generator\n"
        f"  well-formed {rates['well_formed']:.1%}  answer accuracy {rates['answer_accuracy']:.1%}  "
        f"process accuracy {rates['process_accuracy']:.1%}  "
        f"(right answer, wrong step: {rates['right_answer_wrong_process']:.1%})\n"
        f"  last-digit shortcut {rates['shortcut_rate']:.1%} of samples, trace error {rates['trace_error']:.1%}; "
        f"the generator's own confidence tells its shortcut chains from correct ones with AUROC "
        f"{_num(rates.get('confidence_auroc_shortcut'))} (likelihood {_num(rates.get('likelihood_auroc_shortcut'))})\n"
        f"  dropped carry {rates['carry_drop_rate']:.1%} of samples ({rates['carry_drop_answer_wrong']:.1%} with a wrong "
        f"answer); its own confidence AUROC {_num(rates.get('confidence_auroc_carry_drop'))}\n"
        f"  {rates['train_steps']} steps in {rates['train_seconds']:.0f} s, wall {rates['wall_seconds']:.0f} s"
    )
    missed = rates.get("targets_missed") or []
    if missed:
        # prepare_eval.enforce_targets false saved it anyway: the user must not mistake it for a generator that passed
        print("  WARNING: targets missed (saved anyway, prepare_eval.enforce_targets is false): " + "; ".join(missed),
              file=sys.stderr)


def _train_rm(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.train_rm import run_job

    run_job(recipe, progress=not args.no_progress)


def _eval(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.evaluation.evaluate import markdown_table
    from rlprm.evaluation.job import run_eval

    curves = run_eval(recipe, progress=not args.no_progress)
    print(markdown_table(curves))
    print(f"plot: {recipe.run.output_dir}/bon.png   pool: {recipe.run.output_dir}/pool.jsonl")


def _bench_prm(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.reward.bench import markdown, run_bench

    results = run_bench(recipe, progress=not args.no_progress)
    print(markdown(results, results["model"], results["adapter"]), end="")
    print(f"report: {recipe.run.output_dir}/bench_prm.md   json: bench_prm.json   plot: bench_prm.png")


def _check(recipe: Recipe, args: argparse.Namespace) -> None:
    print(f"{args.recipe}: ok")


def _select(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.experiments.active import select

    counts = select(recipe, progress=not args.no_progress)
    print(f"{counts['lines']} solutions of {counts['problems']} problems -> {counts['output']} "
          f"(convincing wrong-answer {counts.get('convincing_wrong_answer', 0)}, "
          f"uniform {counts.get('uniform', 0)}, convincing {counts.get('convincing', 0)}); "
          f"rate them with: rlprm label {counts['output']} --out LABELLED.jsonl")


def _active_learning(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.experiments.active import run_loop

    summary = run_loop(recipe, progress=not args.no_progress)
    print(f"report: {summary['report']}   plot: {summary['plot']}   summary: {recipe.run.output_dir}/summary.json   "
          f"wall {summary['wall_seconds']:.0f} s")


def _synthetic_supervision(recipe: Recipe, args: argparse.Namespace) -> None:
    from rlprm.experiments.synthetic import run_synthetic

    summary = run_synthetic(recipe, progress=not args.no_progress)
    print(f"report: {summary['report']}   plot: {summary['plot']}   summary: {recipe.run.output_dir}/summary.json   "
          f"wall {summary['wall_seconds']:.0f} s")


def _train_rl(args: argparse.Namespace) -> int:
    from rlprm.train_rl import run

    # rlprm/train_rl.py loads and validates the recipe itself (and under the DeepSpeed launcher, without this file)
    return run(args)


def _export(args: argparse.Namespace) -> None:
    from rlprm.checkpoint import export, latest_checkpoint

    # judged before export imports transformers (seconds): a mistyped folder is refused at once
    if latest_checkpoint(Path(args.run_dir)) is None:
        state = "does not exist" if not Path(args.run_dir).exists() else "has no complete checkpoint"
        raise FileNotFoundError(f"{args.run_dir} {state} (checkpoints/latest is missing): give the run folder of a "
                                "`rlprm train-rl` run (its run.output_dir) that finished at least one epoch")

    print(f"exported to {export(args.run_dir, args.out)}")


def _explain(args: argparse.Namespace) -> None:
    # the `rl` keys depend on rl.algorithm: a recipe's own, or the one named (a RecipeError exits 2); with a recipe,
    # each key shows the value that recipe runs with beside its default
    recipe = load_recipe(args.recipe) if args.recipe else None
    algorithm = args.algorithm or (recipe.rl.algorithm if recipe is not None else None)
    values = recipe.model_dump(mode="json") if recipe is not None else None
    if values is not None and algorithm != recipe.rl.algorithm:
        values = {**values, "rl": None}  # --algorithm names another algorithm: the recipe's rl values are not its keys
    print(explain(algorithm=algorithm, values=values))


def _recipes(args: argparse.Namespace) -> None:
    from rlprm.shipped import PATH_RULE, is_shipped, recipes_dir, shipped_names, summary

    names = shipped_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {summary(name)}")
    where = PATH_RULE if is_shipped(recipes_dir()) else "paths relative to the recipe file"
    print(f"\n{len(names)} recipes in {recipes_dir()}; run one by name (`rlprm check prm_dense`) or by file. "
          f"Paths: {where}", file=sys.stderr)


def _label(args: argparse.Namespace) -> None:
    from rlprm.inputs import JobInputError, ref_problem
    from rlprm.reward.label import label_file

    if args.labeller != "checker":
        problem = ref_problem("--with", args.labeller)  # before the PRM's libraries load (seconds)
        if problem:
            raise JobInputError(problem)
    counts = label_file(args.input, args.out, args.labeller, args.threshold,
                        args.sep.encode().decode("unicode_escape"), device=args.device, adapter=args.adapter,
                        reference=args.reference_model, beta=args.implicit_beta, dtype=args.dtype)
    print(f"labelled {counts['lines']} lines -> {args.out} "
          + " ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "lines"))


def _demo(args: argparse.Namespace) -> int | None:
    from rlprm.experiments.demo import DemoInterrupted, run_demo

    try:
        run_demo(args.out, seeds=args.seeds, force=True if args.force == [] else args.force, wandb=args.wandb,
                 sets=args.set, progress=not args.no_progress, generator=args.generator, lanes=args.lanes)
    except DemoInterrupted as exc:  # not an error (run_demo has said what it left): the signal's exit code
        return exc.exit_code
    return None


def _compare(args: argparse.Namespace) -> None:
    from rlprm.evaluation.compare import main as compare_main

    report = compare_main(args.run_dirs, args.out, args.wandb_group, args.wandb_project, args.wandb_entity)
    print(f"report: {report}")


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[..., int | None]
    """Called with (recipe, args) when `loads_recipe`, else with (args); returns the exit code (None: 0) or raises."""
    arguments: Callable[[argparse.ArgumentParser], None] | None = _recipe_args
    description: str | None = None
    loads_recipe: bool = True
    """The recipe is loaded (overrides applied, validated, --print-config answered) before `run` sees it."""


COMMANDS: dict[str, Command] = {
    "prepare": Command(
        "train the tiny generator on the arithmetic task and check it", _prepare,
        description="Fine-tune the tiny generator for sft.steps optimizer steps on clean and corrupted solutions, "
                    "sample it on held-out problems at temperature 1 and save it as RUN_DIR/generator only if it "
                    "meets the recipe's targets (exit code 3 if not)."),
    "train-rm": Command(
        "train and evaluate a PRM or an ORM", _train_rm,
        description="Train a process (PRM) or outcome (ORM) reward model as the recipe's `rm` section says (on "
                    "generator samples of the arithmetic task labelled by its exact checker, or on PRM800K), save "
                    "RUN_DIR/reward_model and evaluate it on held-out data."),
    "eval": Command(
        "best-of-N evaluation: PRM vs ORM vs majority vote", _eval,
        description="Sample eval.n_max solutions per held-out problem once, score them with every reward model in "
                    "eval.reward_models, and write best-of-N curves (bon.png), a table (bon.md), the sample pool "
                    "(pool.jsonl) and metrics into RUN_DIR."),
    "bench-prm": Command(
        "ProcessBench F1 per subset, step AUROC: any PRM, ours or public", _bench_prm,
        description="Score every solution of bench.processbench_paths, bench.prm800k_paths (PRM800K JSONL, e.g. "
                    "phase2_test) and, with bench.arithmetic_problems, model.generator's samples on held-out "
                    "arithmetic problems labelled by the exact checker, with model.reward_model (an rlprm folder, or "
                    "a public PRM of family reward.adapter: qwen_prm, math_shepherd, rlhflow, value_head, implicit; "
                    "detected where unambiguous) and write ProcessBench's error / correct accuracy and F1 per subset, "
                    "step AUROC and first-error accuracy to RUN_DIR/bench_prm.md, bench_prm.json and bench_prm.png. "
                    "Solutions longer than the PRM's positions are scored past them when its positions are rotary "
                    "(bench.too_long=extend, counted in the report) or left out (bench.too_long=skip)."),
    "check": Command(
        "validate a recipe and exit", _check,
        description="Load and validate a recipe (with overrides); print nothing but errors."),
    "train-rl": Command(
        "RL fine-tuning of the generator (PPO, GRPO or rejection sampling: rl.algorithm) from PRM, ORM, exact or "
        "ground-truth rewards", _train_rl, _train_rl_args, loads_recipe=False,
        description="Train the generator with rl.algorithm (ppo, grpo or rejection_sampling) as the recipe's `rl` and "
                    "`reward` sections say: metrics.jsonl, best-of-N between epochs, a checkpoint per epoch and "
                    "RUN_DIR/export at the end. Same as `python rlprm/train_rl.py RECIPE`."),
    "export": Command(
        "export a run's latest checkpoint as a plain Hugging Face folder", _export, _export_args, loads_recipe=False,
        description="Write RUN_DIR's latest complete checkpoint (LoRA merged) with the recipe and summary to OUT "
                    "(default RUN_DIR/export); it loads with from_pretrained."),
    "explain": Command(
        "print every recipe key with its type, default and meaning", _explain, _explain_args, loads_recipe=False,
        description="Every recipe key with its type, default and meaning. The `rl` section depends on rl.algorithm: "
                    "give a RECIPE (its algorithm) or --algorithm to see only the keys that apply; without either, "
                    "the shared keys and then each algorithm's own."),
    "select": Command(
        "surface convincing wrong-answer solutions for labelling (PRM800K JSONL)", _select,
        description="Score the pool (rm.data's training samples, N per problem, graded) with the current PRM "
                    "(active.prm) and write the top active.top_k per problem (active.convincing_fraction convincing "
                    "wrong-answer, the rest active.fill) as unrated PRM800K phase-2 lines to active.output (default "
                    "RUN_DIR/to_label.jsonl). Rate them with `rlprm label`."),
    "active-learning": Command(
        "active vs uniform selection: PRM quality against the number of labels", _active_learning,
        description="From one uniform seed set, up each label budget of active.budgets (labelled solutions): select, "
                    "label (active.labeller: the checker or a PRM folder) and retrain a fresh PRM (active.train_steps "
                    "steps, the rm settings of the default PRM), once with uniform picks and once per "
                    "active.convincing_shares (the share of convincing wrong-answer solutions in each active set), "
                    "over active.seeds. Writes RUN_DIR/report.md (quality per budget and arm: best-of-N process "
                    "and answer accuracy, step AUROC, first-error F1 at a validation-chosen threshold; the "
                    "data-efficiency factor per metric and share with a bootstrap interval over seeds), "
                    "active_learning.png (curves with bands), summary.json (factor.METRIC.{mean,lo,hi}), "
                    "labels/*.jsonl and metrics.jsonl."),
    "synthetic-supervision": Command(
        "a large PRM labels fresh samples; small PRMs / ORMs trained on its process or outcome labels, or the grader's",
        _synthetic_supervision,
        description="The paper's small-scale experiment. A large PRM (synthetic.large_prm, or one trained here for "
                    "rm.max_steps steps on the checker-labelled samples of the first synthetic.large_problems pool "
                    "problems) labels the generator samples of the next synthetic.problems problems through the "
                    "`rlprm label --with` machinery. Small reward models train on exactly those samples, one per "
                    "synthetic.labellings: a PRM on the large PRM's step labels, an ORM on its all-steps-right "
                    "verdict, an ORM on the final-answer grader's verdict (and optionally a PRM on the exact "
                    "checker's labels), at every label budget of synthetic.budgets (nested random subsets of the "
                    "samples, the same train steps). Writes RUN_DIR/report.md (how often each labelling is wrong "
                    "against the exact checker; best-of-n per budget and best-of-N at the largest budget, with "
                    "paired-bootstrap intervals over problems and seeds and the differences between labellings), "
                    "synthetic_budgets.png (best-of-n over the budgets), synthetic_supervision.png (best-of-N "
                    "curves) and summary.json (synthetic_budget.B.LABELLING.{accuracy,process_correct}.{mean,lo,hi}, "
                    "synthetic_budget_diff.B.A_minus_B..., synthetic.LABELLING.N... at the largest budget)."),
    "recipes": Command(
        "list the shipped recipes (run one by name: `rlprm train-rl prm_dense`)", _recipes, None, loads_recipe=False,
        description="List the recipes that ship with rlprm, each with its first comment line. Every recipe command "
                    "takes one by name (prm_dense) as well as a file. From an installed wheel, a shipped recipe's "
                    "relative paths resolve against the working directory as if it were ./recipes/NAME.yaml there: "
                    "its runs/ outputs go to ./runs/, never into site-packages."),
    "label": Command(
        "rate every step of PRM800K lines with the exact checker or a PRM", _label, _label_args, loads_recipe=False,
        description="Read PRM800K phase-2 lines (e.g. from `rlprm select`) and write them rated the phase-2 way (+1 "
                    "up to the first error, -1 there, nothing after). --with checker (default) uses the arithmetic "
                    "task's exact checker; --with PRM a PRM (a step below --threshold is the error): a large PRM "
                    "labelling data for a small one. The PRM is an rlprm folder or any public PRM (folder or hub id; "
                    "--adapter names its family where its files do not say it)."),
    "demo": Command(
        "process vs outcome supervision end to end at demo budgets (about 15 min on 2 cores)", _demo, _demo_args,
        loads_recipe=False,
        description="Prepare the generator, train a PRM and an ORM, run PPO five ways (dense PRM, sparse ORM, sparse "
                    "ground truth, dense exact checker, dense confidence control), best-of-N before (also at T=0.7) "
                    "and after, and the report into OUT/report/report.md and summary.json. Each stage is skipped when "
                    "its output is complete (see rlprm/experiments/demo.py)."),
    "compare": Command(
        "report.md with tables and plots across run folders (seeds averaged)", _compare, _compare_args,
        loads_recipe=False,
        description="Read metrics.jsonl / summary.json / recipe.yaml of each RUN_DIR (RL, best-of-N or other runs, any "
                    "scale), or W&B runs of a group, and write OUT/report.md with rl_curves.png and bon_curves.png. "
                    "Runs sharing run.name are seeds: mean +- s.d."),
}


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = ArgumentParser(
        prog="rlprm",
        description="Process (PRM) and outcome (ORM) reward models and RL for math reasoning.",
        epilog="Run `rlprm explain` for every recipe key with its meaning and default. Exit codes: 0 done, "
               "2 bad input, 3 `prepare` missed its targets, 4 the RL run stopped (its last good checkpoint is kept), "
               "1 anything else.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=command.help, description=command.description)
        if command.arguments is not None:
            command.arguments(parsers[name])
    return parser, parsers


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse with a command's flags allowed anywhere: `rlprm train-rl RECIPE a=1 --resume b=2` as train_rl.py does."""
    parser, parsers = _build()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in parsers:
        return parser.parse_args(argv)  # help and unknown commands
    # argparse cannot intermix through subparsers: the command's own parser reads the rest
    args = parsers[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _run(command: Command, args: argparse.Namespace) -> int | None:
    if not command.loads_recipe:
        return command.run(args)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    from rlprm.inputs import check_job

    # what the recipe points at (model folders, hub ids, data files) is judged before the job writes anything
    check_job(recipe, args.command)
    return command.run(recipe, args)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_reporting_errors(_run, COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
