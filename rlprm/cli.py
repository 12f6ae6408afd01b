"""The `rlprm` command.

Every subcommand that runs a job takes a recipe, then any number of
`key.sub=value` overrides, and validates everything before loading a model:

    rlprm prepare recipes/arith_prepare.yaml sft.time_budget_s=120
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

    p = sub.add_parser("check", help="validate a recipe and exit",
                       description="Load and validate a recipe (with overrides); print nothing but errors.")
    _recipe_args(p)

    sub.add_parser("explain", help="print every recipe key with its type, default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "explain":
        print(explain())
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
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
