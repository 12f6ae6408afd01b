"""RL entry point: `python rlprm/train_rl.py RECIPE [key=value ...] [--resume]`.

Also runs under the DeepSpeed launcher, which puts `--local_rank=N` in front
of the script's own arguments (accepted; the rank is read from the environment):

    deepspeed rlprm/train_rl.py RECIPE                  # one process: the plain torch loop
    deepspeed --num_gpus 2 rlprm/train_rl.py RECIPE     # two data-parallel processes (CPU: gloo), ZeRO-2
    deepspeed --hostfile hostfile --num_nodes 2 rlprm/train_rl.py RECIPE   # several nodes (docs/rl.md)

PPO on several processes, or with a `deepspeed:` key, trains through DeepSpeed
engines (rlprm/rl/distributed.py); GRPO and rejection sampling train through
their TRL trainer's DDP in the same process group, which also lets them start
under `torchrun` or `accelerate launch --multi_gpu`. Only the global rank 0
(RANK, not LOCAL_RANK) writes metrics, checkpoints and the export.
`rlprm train-rl RECIPE` is the same job through the `rlprm` command.

Exit codes (rlprm/errors.py): 0 done, 2 bad input (recipe, missing generator or
reward model), 4 the run stopped (non-finite rewards or losses; the last good
checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script path: make the repository's `rlprm` importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def build_parser() -> argparse.ArgumentParser:
    from rlprm.errors import ArgumentParser

    parser = ArgumentParser(
        prog="train_rl.py",
        description="Fine-tune the generator with RL (rl.algorithm: ppo, grpo or rejection_sampling) from dense PRM, "
                    "sparse ORM or ground-truth rewards, "
                    "as the recipe's `rl` and `reward` sections say. Writes metrics.jsonl, a checkpoint per epoch "
                    "and an exported HF folder (RUN_DIR/export).",
    )
    parser.add_argument("recipe",
                        help="a recipe YAML file (recipes/prm_dense.yaml) or a shipped recipe's name (prm_dense)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values, e.g. rl.epochs=1")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's latest checkpoint (weights, optimizers, epoch, RNG)")
    parser.add_argument("--resume-or-start", action="store_true",
                        help="resume when run.output_dir holds a checkpoint, else start (for job scripts that rerun "
                             "the same command); --resume alone refuses a folder without one")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--no-progress", action="store_true", help="print no per-iteration lines")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> int:
    """The job; raises what it cannot do (each error's `exit_code` says what it means: rlprm/errors.py)."""
    import os

    from rlprm.config import load_recipe, recipe_to_yaml
    from rlprm.launch import launcher_rank

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    from rlprm.rl.distributed import launched_world_size

    world = launched_world_size()
    if world > 1 and recipe.run.threads == 0:
        # N processes each taking every core oversubscribe the machine (2x slower: docs/design.md section 10)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    from rlprm.inputs import check_job
    from rlprm.prerequisites import ensure_prerequisites

    resume_or_start = getattr(args, "resume_or_start", False)
    # every input (paths, hub ids, data files, the resume state) is judged before a prerequisite build takes minutes
    check_job(recipe, "train-rl", resume=args.resume, resume_or_start=resume_or_start)
    # a missing generator / PRM / ORM that an embedded recipe produces is built (once) before anything else
    ensure_prerequisites(recipe, progress=not args.no_progress)
    from rlprm.rl import train

    final = train(recipe, resume=args.resume or resume_or_start, progress=not args.no_progress)
    if launcher_rank() != 0:
        return 0  # rank 0 reports for all
    acc = final.get("eval/answer_accuracy")
    proc = final.get("eval/process_accuracy")
    line = f"policy exported to {final['export_dir']}"
    if acc is not None:
        line += f"\n  held-out answer accuracy {acc:.1%}" + (f", process accuracy {proc:.1%}" if proc is not None else "")
    print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    from rlprm.errors import run_reporting_errors

    # intermixed: `RECIPE --resume key=value` works as well as `RECIPE key=value --resume`
    return run_reporting_errors(run, build_parser().parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
