"""Build a recipe's missing prerequisites (the tiny generator, the PRM, the ORM) before the job starts.

So that `deepspeed rlprm/train_rl.py recipes/prm_dense.yaml` works as the very
first command on a fresh clone, a model path that a recipe names but that does
not exist yet is built, if (and only if) it is the output of an embedded recipe:

    runs/arith/generator         <- rlprm prepare  recipes/arith_prepare.yaml
    runs/arith_prm/reward_model  <- rlprm train-rm recipes/prm_train.yaml
    runs/arith_orm/reward_model  <- rlprm train-rm recipes/orm_train.yaml

The mapping is a convention, not a list of hard-coded paths: each embedded
recipe is loaded and its product is `run.output_dir / <product>`, so moving a
recipe's output_dir moves what it can stand in for. Prerequisites chain (the
PRM recipe needs the generator, which is built first). A product that exists
and is complete (the files that loading needs) is reused, never rebuilt. A
missing path that no embedded recipe produces is an error naming the key.

Builds run as `python -m rlprm.cli ...` subprocesses with the distributed
environment removed: under the DeepSpeed launcher the build must not see
RANK/WORLD_SIZE (each stage is a one-process job). A file lock beside the
product makes concurrent launches (several ranks, two terminals) wait for one
build instead of racing; the builders themselves write their products
atomically, so a crash leaves nothing half-written to be mistaken for done.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlprm.config import Recipe, RecipeError, load_recipe
from rlprm.errors import InputError
from rlprm.launch import launcher_rank
from rlprm.shipped import is_shipped, package_dir, path_rule, recipes_dir

RECIPES_DIR = recipes_dir()
"""Where the embedded recipes live: the shipped ones (a module attribute so tests can point it at tiny stand-ins)."""

_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK")


class PrerequisiteError(InputError, RuntimeError):
    """A prerequisite is missing and cannot be built, or its build failed; the message names the key."""


@dataclass(frozen=True)
class Builder:
    """An embedded recipe that produces a model folder."""

    command: str
    """The `rlprm` subcommand that runs it."""
    recipe: str
    """File name under RECIPES_DIR."""
    product: str
    """Sub-folder of the recipe's run.output_dir that it writes."""
    required_files: tuple[str, ...]
    """Files a complete product holds (besides weights)."""
    minutes: float
    """Rough wall time on 2 CPU cores, for the log line."""

    @property
    def cli(self) -> str:
        """The command a person types to run it: `rlprm prepare recipes/arith_prepare.yaml` in a clone, `rlprm prepare
        arith_prepare` (the shipped recipe's name) where rlprm is installed from a wheel."""
        if is_shipped(Path(RECIPES_DIR) / self.recipe):
            return f"rlprm {self.command} {Path(self.recipe).stem}"
        return f"rlprm {self.command} recipes/{self.recipe}"


BUILDERS: tuple[Builder, ...] = (
    Builder("prepare", "arith_prepare.yaml", "generator", ("config.json",), 5.0),
    Builder("train-rm", "prm_train.yaml", "reward_model", ("config.json", "rlprm_rm.json"), 4.5),
    Builder("train-rm", "orm_train.yaml", "reward_model", ("config.json", "rlprm_rm.json"), 4.5),
)

MANUAL_BUILDERS: tuple[tuple[str, str, str], ...] = (
    ("prm_train_prm800k.yaml", "reward_model", "deepspeed --num_gpus 8 rlprm/train_rm.py recipes/prm_train_prm800k.yaml"),
)
"""(recipe, product, command) of embedded recipes that are never run automatically: they need a user's data and GPUs."""

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


def is_complete(path: Path, required_files: tuple[str, ...] = ("config.json",)) -> bool:
    """A model folder that loading can use: its required files and some weights."""
    path = Path(path)
    return (path.is_dir() and all((path / f).is_file() for f in required_files)
            and any((path / w).is_file() for w in _WEIGHTS))


def required_models(recipe: Recipe) -> list[tuple[str, Path]]:
    """(recipe key, local path) of every model folder the job reads; hub ids and keywords are not paths."""
    refs: list[tuple[str, str | None]] = [("model.generator", recipe.model.generator)]
    from rlprm.reward.sources import source_class

    # only a trained PRM/ORM is read; ground_truth, exact (the checker), confidence (the generator's own
    # log-probs) and python load no reward model, so a model.reward_model left in such a recipe is neither read nor
    # built
    if source_class(recipe).uses_reward_model:
        refs.append(("model.reward_model", recipe.model.reward_model))
    value_model = getattr(recipe.rl, "value_model", "policy")  # PPO's critic; the other algorithms have none
    if value_model != "policy":
        refs.append(("rl.value_model", value_model))
    return [(key, Path(ref)) for key, ref in refs if ref is not None and ref.startswith("/")]


def _build_prerequisites(recipe: Recipe) -> list[tuple[str, Path]]:
    """What an embedded build recipe itself reads (train-rm reads the generator it samples from)."""
    gen = recipe.model.generator
    return [("model.generator", Path(gen))] if gen.startswith("/") else []


def recipe_dirs(near: Path | None = None) -> list[Path]:
    """Where embedded recipes are looked for: beside the recipe the user passed (`near`, its folder), then the
    package's RECIPES_DIR. A second checkout sharing a virtualenv installed from the first one builds into its
    own runs/, and an installed wheel (no recipes/ beside the package) finds the clone's recipes."""
    dirs = [Path(near)] if near is not None and any((Path(near) / b.recipe).is_file() for b in BUILDERS) else []
    return dirs + [Path(d) for d in [RECIPES_DIR] if Path(d) not in dirs]


def find_builder(path: Path, near: Path | None = None) -> tuple[Builder, Path, Recipe] | None:
    """The embedded recipe whose product is `path`, with its file and loaded recipe; None if there is none.

    `near`: the folder of the recipe being run, searched before the package's (see `recipe_dirs`)."""
    target = Path(os.path.normpath(path))
    for folder in recipe_dirs(near):
        for builder in BUILDERS:
            file = folder / builder.recipe
            if not file.is_file():
                continue
            try:
                built = load_recipe(file)
            except RecipeError:
                continue  # a broken embedded recipe cannot build anything; the caller reports the path as unbuildable
            if Path(os.path.normpath(Path(built.run.output_dir) / builder.product)) == target:
                return builder, file, built
    return None


def builder_hint(path: str | Path, near: Path | None = None) -> str | None:
    """The command that builds the model folder at `path` (e.g. `rlprm prepare recipes/arith_prepare.yaml`), for an
    error message; None when no embedded recipe produces it."""
    found = find_builder(Path(path), near)
    if not found:
        return None
    builder, file, _ = found
    return builder.cli if file.parent == Path(RECIPES_DIR) else f"rlprm {builder.command} {file}"


def embedded_products() -> list[str]:
    """`rlprm CMD recipes/FILE` -> PRODUCT for every embedded recipe that loads, for an error message."""
    products = []
    for builder in BUILDERS:
        try:
            out = Path(load_recipe(Path(RECIPES_DIR) / builder.recipe).run.output_dir) / builder.product
        except RecipeError:
            continue
        products.append(f"`{builder.cli}` -> {out}")
    return products


def generator_hint() -> str:
    """How to get a trained generator, for an error message: the embedded recipe that makes one, and where."""
    builder = next(b for b in BUILDERS if b.product == "generator")
    try:
        out = Path(load_recipe(Path(RECIPES_DIR) / builder.recipe).run.output_dir) / builder.product
    except (RecipeError, OSError):
        return f"`{builder.cli}`"
    return f"`{builder.cli}` (it writes {out})"


@contextmanager
def _file_lock(path: Path):
    """An exclusive lock held while one process builds; others block here, then find the product built."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unbuildable(key: str, path: Path) -> PrerequisiteError:
    state = "is incomplete (no config.json or no weights)" if path.exists() else "does not exist"
    for recipe_name, product, command in MANUAL_BUILDERS:
        try:
            out = Path(load_recipe(Path(RECIPES_DIR) / recipe_name).run.output_dir) / product
        except RecipeError:
            continue
        if Path(os.path.normpath(out)) == Path(os.path.normpath(path)):
            return PrerequisiteError(
                f"{key}: {path} {state}. It is the output of recipes/{recipe_name}, which is not run automatically "
                f"(it needs your data and GPUs): run `{command}` first, or point {key} at a trained model")
    products = embedded_products()
    made = ("; the embedded recipes build: " + "; ".join(products)) if products else ""
    return PrerequisiteError(
        f"{key}: {path} {state}, and it is not the output of an embedded recipe, so it cannot be built "
        f"automatically. Build it yourself and point {key} at it (or at a Hugging Face id){made}")


def _run_build(builder: Builder, file: Path, progress: bool, log, wandb: str | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    # the build runs in this job's working directory (a shipped recipe's outputs resolve against it, never against
    # site-packages) with this very package importable first, installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(package_dir().parent)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "rlprm.cli", builder.command, str(file)]
    if wandb is not None:
        cmd.append(f"tracking.wandb={wandb}")  # the job's own: `tracking.wandb=disabled` means no W&B run at all
    if not progress:
        cmd.append("--no-progress")
    # the child's output goes straight to this job's console and log: the build is part of this run's story
    sys.stdout.flush()
    sys.stderr.flush()
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise PrerequisiteError(f"building with `rlprm {builder.command} {file}` failed (exit code {rc}); "
                                "its output above says why. Fix that, or build it yourself and run again")


def ensure(key: str, path: Path, progress: bool = True, log=print, _chain: tuple = (), wandb: str | None = None,
           near: Path | None = None) -> bool:
    """Make sure the model folder at `path` (read through recipe key `key`) exists; returns True if it was built.

    `wandb`: the tracking.wandb setting the build runs with (the job's own; None: the embedded recipe's).
    `near`: the folder of the job's recipe, where embedded recipes are looked for first (`recipe_dirs`)."""
    path = Path(path)
    found = find_builder(path, near)
    required = found[0].required_files if found else ("config.json",)
    if is_complete(path, required):
        return False
    if found is None:
        raise _unbuildable(key, path)
    builder, file, built = found
    if file in _chain:
        raise PrerequisiteError(f"{key}: the embedded recipes depend on each other in a loop: "
                                + " -> ".join(str(f) for f in (*_chain, file)))
    # 1. what the build itself reads comes first (the PRM samples the generator)
    for sub_key, sub_path in _build_prerequisites(built):
        ensure(f"{file.name}: {sub_key}", sub_path, progress, log, (*_chain, file), wandb=wandb, near=file.parent)
    # 2. one process builds, the others wait and find it done
    with _file_lock(path.parent / f".{path.name}.build.lock"):
        if is_complete(path, required):
            log(f"[prerequisites] {key}: {path} was built by another process meanwhile; using it")
            return False
        log(f"[prerequisites] {key}: {path} is missing; building it with `{builder.cli}` "
            f"(about {builder.minutes:g} min on 2 CPU cores; done once, then reused)")
        t0 = time.monotonic()
        _run_build(builder, file, progress, log, wandb=wandb)
        if not is_complete(path, required):
            raise PrerequisiteError(f"{key}: `rlprm {builder.command} {file}` finished but {path} is still "
                                    f"incomplete (expected {', '.join(required)} and weights)")
        log(f"[prerequisites] {key}: built {path} in {time.monotonic() - t0:.0f} s")
    return True


def recipe_folder(recipe: Recipe) -> Path | None:
    """The folder of the file `recipe` was loaded from (None for one built in code)."""
    return Path(recipe.source).parent if recipe.source is not None else None


def check_task_files(recipe: Recipe) -> None:
    """The problem files of a MATH / GSM8K task exist and are not Git LFS pointer stubs; else PrerequisiteError."""
    problems = []
    if recipe.task.name != "arithmetic":
        for key, path in (("task.train_path", recipe.task.train_path), ("task.test_path", recipe.task.test_path)):
            if path is None:
                continue
            if not Path(path).is_file():
                problems.append(f"{key}: file not found: {path} ({path_rule(recipe.source)}; edit the recipe or "
                                f"override, e.g. {key}=/data/math/train.jsonl)")
                continue
            with open(path, "rb") as f:
                head = f.read(64)
            if head.startswith(b"version https://git-lfs"):
                problems.append(f"{key}: {path} is a Git LFS pointer stub, not the data: run `git lfs install && "
                                "git lfs pull` in that clone")
    if problems:
        raise PrerequisiteError("\n".join(problems))  # one line each, key first: the first line says what to fix


def ensure_prerequisites(recipe: Recipe, progress: bool = True, log=None) -> list[str]:
    """Build every missing model folder the recipe reads that an embedded recipe produces; returns the keys built.

    Raises PrerequisiteError for missing task files, a missing path no embedded recipe produces, or a failed build.
    """
    check_task_files(recipe)
    # under a multi-process launch every rank checks (and waits for a build), but only rank 0 says "present"
    quiet = log is None and launcher_rank() != 0
    log = log or (lambda line: print(line, flush=True))
    built = []
    for key, path in required_models(recipe):
        if ensure(key, path, progress, log, wandb=recipe.tracking.wandb, near=recipe_folder(recipe)):
            built.append(key)
        elif not quiet:
            log(f"[prerequisites] {key}: {path} (present; not rebuilt)")
    return built


__all__ = ["BUILDERS", "Builder", "MANUAL_BUILDERS", "PrerequisiteError", "RECIPES_DIR", "builder_hint",
           "check_task_files", "embedded_products", "ensure", "ensure_prerequisites", "find_builder", "generator_hint",
           "is_complete",
           "recipe_dirs", "recipe_folder", "required_models"]
