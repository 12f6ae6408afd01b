"""The `rlprm` command.

Every subcommand that runs a job takes a recipe, then any number of
`key.sub=value` overrides, and validates everything before loading a model:

    rlprm prepare recipes/arith_prepare.yaml sft.time_budget_s=120
    rlprm train-rm recipes/prm_train.yaml          # a process reward model
    rlprm eval recipes/bon_eval.yaml                # best-of-N curves
    rlprm train-rl recipes/prm_dense.yaml [--resume]  # PPO from dense PRM rewards
    rlprm export runs/rl_prm_dense                  # latest checkpoint -> plain HF folder
    rlprm check recipes/arith_prepare.yaml          # validate only
    rlprm prepare recipes/arith_prepare.yaml --print-config
    rlprm explain                                   # every recipe key, documented
"""

from __future__ import annotations

import argparse
import sys

from rlprm.config import RecipeError, explain, load_recipe, recipe_to_yaml

EXIT_BAD_INPUT = 2
EXIT_TARGETS_MISSED = 3


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. run.seed=1 sft.time_budget_s=60")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (defaults filled in, paths absolute) and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlprm",
        description="Process (PRM) and outcome (ORM) reward models and RL for math reasoning.",
        epilog="Run `rlprm explain` for every recipe key with its meaning and default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="train the tiny generator on the arithmetic task and check it",
                       description="Fine-tune the tiny generator with TRL's SFTTrainer on clean and corrupted "
                                   "solutions, sample it on held-out problems at temperature 1 and save it as "
                                   "RUN_DIR/generator only if it meets the recipe's targets (exit code 3 if not).")
    _recipe_args(p)

    p = sub.add_parser("train-rm", help="train and evaluate a PRM or an ORM",
                       description="Train a process (PRM) or outcome (ORM) reward model as the recipe's `rm` section "
                                   "says (on generator samples of the arithmetic task labelled by its exact checker, "
                                   "or on PRM800K), save RUN_DIR/reward_model and evaluate it on held-out data.")
    _recipe_args(p)

    p = sub.add_parser("eval", help="best-of-N evaluation: PRM vs ORM vs majority vote",
                       description="Sample eval.n_max solutions per held-out problem once, score them with every "
                                   "reward model in eval.reward_models, and write best-of-N curves (bon.png), a "
                                   "table (bon.md), the sample pool (pool.jsonl) and metrics into RUN_DIR.")
    _recipe_args(p)

    p = sub.add_parser("check", help="validate a recipe and exit",
                       description="Load and validate a recipe (with overrides); print nothing but errors.")
    _recipe_args(p)

    p = sub.add_parser("train-rl", help="RL fine-tuning of the generator (PPO) from PRM, ORM or ground-truth rewards",
                       description="Train the generator with PPO as the recipe's `rl` and `reward` sections say: "
                                   "metrics.jsonl, best-of-N between epochs, a checkpoint per epoch and "
                                   "RUN_DIR/export at the end. Same as `python rlprm/train_rl.py RECIPE`.")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (weights, optimizers, epoch, RNG)")

    p = sub.add_parser("export", help="export a run's latest checkpoint as a plain Hugging Face folder",
                       description="Write RUN_DIR's latest complete checkpoint (LoRA merged) with the recipe and "
                                   "summary to OUT (default RUN_DIR/export); it loads with from_pretrained.")
    p.add_argument("run_dir", help="a run folder holding checkpoints/ (e.g. runs/rl_prm_dense)")
    p.add_argument("--out", default=None, help="destination folder (default RUN_DIR/export)")

    sub.add_parser("explain", help="print every recipe key with its type, default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "explain":
        print(explain())
        return 0
    if args.command == "export":
        from rlprm.checkpoint import export

        try:
            out = export(args.run_dir, args.out)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"exported to {out}")
        return 0
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    if args.command == "check":
        print(f"{args.recipe}: ok")
        return 0
    if args.command == "prepare":
        from rlprm.prepare import PrepareError, prepare

        try:
            rates = prepare(recipe, progress=not args.no_progress)
        except PrepareError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_TARGETS_MISSED
        print(
            f"generator saved to {recipe.run.output_dir}/generator\n"
            f"  well-formed {rates['well_formed']:.1%}  answer accuracy {rates['answer_accuracy']:.1%}  "
            f"process accuracy {rates['process_accuracy']:.1%}  "
            f"(right answer, wrong step: {rates['right_answer_wrong_process']:.1%})\n"
            f"  {rates['train_steps']} steps in {rates['train_seconds']:.0f} s, wall {rates['wall_seconds']:.0f} s"
        )
        return 0
    if args.command == "train-rm":
        from rlprm.data.prm800k import PRM800KError
        from rlprm.data.processbench import ProcessBenchError
        from rlprm.reward_models import RewardModelError
        from rlprm.train_rm import TrainRMError, format_summary, train_rm

        try:
            summary = train_rm(recipe, progress=not args.no_progress)
        except (TrainRMError, PRM800KError, ProcessBenchError, RewardModelError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if summary:
            print(format_summary(summary))
        return 0
    if args.command == "eval":
        from rlprm.evaluate import markdown_table, run_eval
        from rlprm.problems import ProblemFileError
        from rlprm.reward_models import RewardModelError

        try:
            curves = run_eval(recipe, progress=not args.no_progress)
        except (FileNotFoundError, ProblemFileError, RewardModelError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(markdown_table(curves))
        print(f"plot: {recipe.run.output_dir}/bon.png   pool: {recipe.run.output_dir}/pool.jsonl")
        return 0
    if args.command == "train-rl":
        from rlprm.train_rl import run as train_rl

        # the recipe was validated above; run() reloads it with the same overrides
        return train_rl(argparse.Namespace(recipe=args.recipe, overrides=args.overrides, resume=args.resume,
                                           print_config=False, no_progress=args.no_progress))
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
