"""Every input of a job checked before anything is written, built or loaded.

Recipe validation (rlprm/config.py) judges the recipe as text; this module
judges what it points at, for the command that will read it, before the job
creates its run folder or builds a prerequisite:

- model folders: they exist (or, for `train-rl` and `train-rm`, an embedded
  recipe builds them), hold a config and weights, and a policy's folder holds
  its tokenizer;
- hub ids: in the local cache, or the hub reachable (with HF_HUB_OFFLINE set,
  or no network, loading one would otherwise retry for minutes and end in a
  traceback);
- data files: every problem / ProcessBench file parses and is not empty;
- the resume state of `train-rl`: `--resume` needs a checkpoint, a fresh start
  needs a folder without one.

A problem raises `JobInputError` (exit 2): one line per problem, each naming
the key and the file, so the first line already says what to fix.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from rlprm.config import Recipe
from rlprm.errors import JobInputError

KEYWORDS = ("tiny", "generator", "policy", "checker")
"""Model values that name no folder and no hub id (config.py's ModelRef keywords)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""Any one of these makes a folder's tokenizer loadable (fast, sentencepiece, BPE or WordPiece)."""

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


# --------------------------------------------------------------------------- models


def models_read(recipe: Recipe, command: str) -> list[tuple[str, str, bool]]:
    """(recipe key, value, is a policy whose tokenizer is loaded) of every model `command` reads."""
    from rlprm.reward.sources import source_class

    m, rm = recipe.model, recipe.rm
    refs: list[tuple[str, str | None, bool]] = []
    implicit = False
    if command == "train-rm":
        if rm.data.source == "arithmetic" or rm.backbone == "generator":
            refs.append(("model.generator", m.generator, True))
        refs.append(("rm.backbone", rm.backbone, True))
    elif command == "eval":
        refs.append(("model.generator", m.generator, True))
        refs += [(f"eval.reward_models.{name}", ref, False) for name, ref in recipe.eval.reward_models.items()]
        implicit = "implicit" in recipe.eval.reward_model_adapters.values()
    elif command == "bench-prm":
        refs.append(("model.reward_model", m.reward_model, False))
        if recipe.bench.arithmetic_problems:
            refs.append(("model.generator", m.generator, True))
        implicit = recipe.reward.adapter == "implicit"
    elif command == "train-rl":
        refs.append(("model.generator", m.generator, True))
        if source_class(recipe).uses_reward_model:  # the other sources load no reward model
            refs.append(("model.reward_model", m.reward_model, False))
        refs.append(("rl.value_model", getattr(recipe.rl, "value_model", "policy"), False))
        implicit = source_class(recipe).uses_reward_model and recipe.reward.adapter == "implicit"
    elif command == "select":
        refs.append(("model.generator", m.generator, True))
        refs.append(("active.prm", recipe.active.prm, False) if recipe.active.prm is not None
                    else ("model.reward_model", m.reward_model, False))
        implicit = (recipe.active.prm_adapter or recipe.reward.adapter) == "implicit"
    elif command == "active-learning":
        refs += [("model.generator", m.generator, True), ("active.labeller", recipe.active.labeller, False)]
        implicit = recipe.active.labeller_adapter == "implicit"
    elif command == "synthetic-supervision":
        refs += [("model.generator", m.generator, True), ("synthetic.large_prm", recipe.synthetic.large_prm, False)]
        implicit = recipe.synthetic.large_prm_adapter == "implicit"
    if implicit:
        refs.append(("reward.reference_model", recipe.reward.reference_model, False))
    return [(key, ref, policy) for key, ref, policy in refs if ref is not None and ref not in KEYWORDS]


def folder_problem(key: str, path: Path, policy: bool) -> str | None:
    """What keeps the model folder at `path` from loading, or None."""
    if not path.exists():
        return f"{key}: {path} does not exist"
    if not path.is_dir():
        return f"{key}: {path} is a file, not a model folder (point {key} at the folder holding config.json)"
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        empty = "" if any(path.iterdir()) else " and is empty"
        return (f"{key}: {path} is not a model folder (no config.json){empty}; point {key} at a folder written by "
                "save_pretrained, or at a hub id")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return f"{key}: {path} has a config.json but no weights ({', '.join(WEIGHT_FILES[:3])}, ...)"
    broken = weights_problem(path)
    if broken:
        return f"{key}: {broken}; copy the folder again, or point {key} at another model"
    # a truncated or hand-edited file fails deep inside transformers (a KeyError traceback): judged here
    # (rlprm_rm.json: an rlprm reward model's convention, read before its weights)
    for name, needs in (("config.json", "model_type"), ("tokenizer.json", None), ("rlprm_rm.json", None)):
        if not (path / name).is_file():
            continue
        try:
            content = json.loads((path / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{key}: {path / name} is not valid JSON ({exc}; a truncated copy?)"
        if needs and not (isinstance(content, dict) and needs in content):
            return (f"{key}: {path / name} has no `{needs}`, so transformers cannot tell the architecture (a "
                    "truncated or hand-written file?); copy it again from the model it came from")
    if policy and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (f"{key}: {path} has weights but no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save the "
                f"tokenizer beside the weights (tokenizer.save_pretrained(\"{path}\")), or copy those files from the "
                "model it was fine-tuned from")
    return None


SAFETENSORS_HEADER_MAX = 100 * 2**20
"""The largest header the safetensors format allows (bytes); a larger length field is garbage."""


def safetensors_problem(file: Path) -> str | None:
    """What makes a .safetensors file unreadable, judged from its header alone (no tensor is read, so a 15 GB
    file costs a few kB): the 8-byte header length, the JSON header, and a file size equal to the header's end
    plus the last tensor's end (the format's own rule; a truncated copy fails it)."""
    import struct

    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > min(SAFETENSORS_HEADER_MAX, size - 8):
                return f"{file} is not a readable safetensors file (its header length field says {n} bytes, the " \
                       f"file has {size}): truncated or corrupt"
            header = json.loads(f.read(n))
    except OSError as exc:
        return f"{file} cannot be read ({exc})"
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{file} has a corrupt safetensors header ({type(exc).__name__}: {str(exc)[:120]})"
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    want = 8 + n + max(ends, default=0)
    if size != want:
        return (f"{file} is {size} bytes but its header describes {want}: "
                f"{'truncated' if size < want else 'extra bytes at the end'} (a partial copy or download?)")
    return None


def weights_problem(path: Path) -> str | None:
    """What makes a model folder's weight files unreadable, or None: every safetensors file (the shards its
    index names included) by its header (`safetensors_problem`), a pytorch_model.bin by its zip directory (the
    end of the file: a truncated one has none)."""
    import zipfile

    files = [path / n for n in ("model.safetensors", "adapter_model.safetensors") if (path / n).is_file()]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{index} is not a valid weight index ({type(exc).__name__}: {str(exc)[:120]})"
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return f"{index} names {len(missing)} shard(s) the folder lacks: {', '.join(missing[:3])}"
        files += [path / s for s in shards]
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            return problem
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        # torch.save writes a zip archive; an older pickle-only file has no zip directory and is let through
        if (path / name).is_file() and _zip_header(path / name) and not zipfile.is_zipfile(path / name):
            return f"{path / name} is a truncated zip archive (torch.save's format): a partial copy"
    return None


def _zip_header(file: Path) -> bool:
    with file.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host (or the HTTPS proxy that reaches it) opens within `timeout`
    seconds, name lookup included."""
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)),
                 None)
    # behind a proxy the hub's own host may not resolve at all: the proxy is what must answer
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy
                   else endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # a name lookup ignores the socket timeout; a daemon thread bounds it
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout * 2)
    return bool(result and result[0])


def hub_problem(key: str, ref: str) -> str | None:
    """Why hub id `ref` cannot be loaded from here (not cached, and offline or the hub unreachable), or None."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None
    try:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return None  # cached: loads without the network
    except ValueError:  # not even the shape of a repo id (config.py lets a bare name through as one)
        return (f"{key}: {ref} is neither a local folder nor a Hugging Face hub id (`org/name`); point {key} at a "
                "model folder or a hub id")
    where = f"point {key} at a local folder, or download it where there is network (`hf download {ref}`)"
    offline = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline:
        return (f"{key}: {ref} is a Hugging Face hub id that is not in the local cache ({constants.HF_HUB_CACHE}), "
                f"and {offline[0]} is set, so it cannot be downloaded: {where}")
    if not hub_reachable():
        return (f"{key}: {ref} is a Hugging Face hub id that is not in the local cache ({constants.HF_HUB_CACHE}), "
                f"and the hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached from "
                f"here: {where}")
    return None


def ref_problem(key: str, ref: str, policy: bool = False) -> str | None:
    """What keeps a model given on the command line (not in a recipe: resolved against the current directory) from
    loading, by the rule of config.py's ModelRef: a path if it looks like one or exists, else a hub id."""
    from rlprm.config import HUB_ID

    if ref in KEYWORDS:
        return None
    path = Path(os.path.expanduser(ref))
    if ref.startswith((".", "/", "~")) or path.exists() or not HUB_ID.match(ref) and ("/" in ref or "\\" in ref):
        return folder_problem(key, path.resolve(), policy)
    return hub_problem(key, ref)


def model_problems(recipe: Recipe, command: str) -> list[str]:
    """One line per model `command` reads that cannot be loaded; a missing folder that an embedded recipe builds is
    fine for the commands that build it first (train-rl, and train-rm for its generator)."""
    from rlprm.prerequisites import builder_hint, embedded_products, find_builder, recipe_folder
    from rlprm.reward.sources import source_class

    near = recipe_folder(recipe)
    problems = []
    if command == "select" and recipe.active.prm is None and recipe.model.reward_model is None:
        problems.append("active.prm: not set, and model.reward_model neither: `rlprm select` scores the pool with a "
                        "PRM; set active.prm (or model.reward_model) to a PRM folder or hub id")
    if command == "bench-prm" and recipe.model.reward_model is None:
        problems.append("model.reward_model: not set: `rlprm bench-prm` benchmarks a PRM; set it to a folder or hub id")
    if command == "train-rl" and source_class(recipe).uses_reward_model and recipe.model.reward_model is None:
        problems.append(f"model.reward_model: not set, but reward.source is {recipe.reward.source}: point it at a "
                        "folder written by `rlprm train-rm` (or a public PRM's folder or hub id)")
    for key, ref, policy in models_read(recipe, command):
        if not ref.startswith("/"):
            problem = hub_problem(key, ref)
        else:
            path = Path(ref)
            builds = command == "train-rl" or (command == "train-rm" and key == "model.generator")
            if (builds and not path.is_file() and folder_problem(key, path, False) is not None
                    and find_builder(path, near) is not None):
                continue  # missing or incomplete, and an embedded recipe (re)builds it before the job
            problem = folder_problem(key, path, policy)
            if problem and not path.exists():
                hint = builder_hint(path, near)
                if hint:
                    problem += f"; build it first with `{hint}`"
                elif key in ("model.generator", "model.reward_model"):
                    products = embedded_products()
                    problem += (" (a typo?), and no embedded recipe builds it" + (
                        f" (they build: {'; '.join(products)})" if products else ""))
                else:
                    problem += " (a typo?)"
        if problem:
            problems.append(problem)
    return problems


# --------------------------------------------------------------------------- data


def _problem_file(key: str, path: Path | None, template: str, source=None) -> str | None:
    from rlprm.data.problems import ProblemFileError, load_jsonl_problems
    from rlprm.shipped import path_rule

    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return (f"{key}: file not found: {path} ({path_rule(source)}; edit the recipe or override, e.g. "
                f"{key}=/data/math/test.jsonl)")
    with open(path, "rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            return f"{key}: {path} is a Git LFS pointer stub, not the data: run `git lfs pull` in that clone"
    try:
        problems = load_jsonl_problems(path, template=template)
    except ProblemFileError as exc:
        return f"{key}: {exc}"
    if not problems:
        return (f"{key}: {path} has no problems (an empty file?): each line is a JSON object with `problem` (or "
                "`question`) and `answer`")
    return None


def data_problems(recipe: Recipe, command: str) -> list[str]:
    """One line per data file `command` reads that is missing, empty or does not parse (file:line named)."""
    from rlprm.data.processbench import ProcessBenchError, load_processbench

    problems = []
    task = recipe.task
    if task.name != "arithmetic" and command in ("eval", "train-rl"):
        files = [("task.test_path", task.test_path)]
        if command == "train-rl":
            files.insert(0, ("task.train_path", task.train_path))
        problems += [p for key, path in files if (p := _problem_file(key, path, task.prompt_template, recipe.source))]
    bench_files = []
    if command == "train-rm":
        bench_files = [("rm.data.processbench_paths", p) for p in recipe.rm.data.processbench_paths]
    elif command == "bench-prm":
        bench_files = [("bench.processbench_paths", p) for p in recipe.bench.processbench_paths]
        if recipe.bench.tune_threshold_on is not None:
            bench_files.append(("bench.tune_threshold_on", recipe.bench.tune_threshold_on))
    if command == "bench-prm":
        from rlprm.reward.bench import prm800k_records
        from rlprm.data.prm800k import PRM800KError

        for path in recipe.bench.prm800k_paths:
            try:
                prm800k_records(recipe, Path(path))
            except PRM800KError as exc:
                problems.append(f"bench.prm800k_paths: {exc}")
    for key, path in bench_files:
        if not Path(path).is_file():
            problems.append(f"{key}: file not found: {path} (edit the recipe or override, e.g. {key}=[/data/file])")
            continue
        try:
            if not load_processbench(path):
                problems.append(f"{key}: {path} holds no items")
        except ProcessBenchError as exc:
            problems.append(f"{key}: {exc}")
    return problems


# --------------------------------------------------------------------------- the RL algorithm's sizes


def rl_problems(recipe: Recipe) -> list[str]:
    """What the RL algorithm would refuse about its sizes and rollout on the processes launched, before any model
    loads (its own check runs again in the job); judged here so that no prerequisite is built for a job that
    cannot run."""
    from rlprm.rl.distributed import launched_world_size
    from rlprm.rl.run import RLInputError, check_rollout

    world = launched_world_size()
    algo = recipe.rl.algorithm
    problems = []
    if algo == "rejection_sampling" and recipe.reward.mode == "dense":
        problems.append("reward.mode is dense, but rejection sampling ranks whole solutions: set reward.mode: sparse "
                        "(a PRM's step scores are aggregated by reward.sparse_aggregate)")
    if algo in ("grpo", "rejection_sampling") and recipe.deepspeed is not None:
        # each epoch builds a new TRL trainer around one optimizer, which a ZeRO engine would own
        problems.append(f"deepspeed: rl.algorithm {algo} takes no `deepspeed:` config: its TRL trainer runs data "
                        "parallel (DDP) on the processes the launcher starts; remove the key (LoRA, "
                        "model.lora.enabled, keeps the memory small)")
    checks = [lambda: check_rollout(recipe)]
    if algo == "grpo":
        from rlprm.rl.grpo import check_sizes

        checks.append(lambda: check_sizes(recipe, world))
    elif algo == "rejection_sampling":
        from rlprm.rl.rejection import check_world

        checks.append(lambda: check_world(recipe, world))
    elif recipe.rl.prompts_per_iteration < world:
        problems.append(f"rl.prompts_per_iteration ({recipe.rl.prompts_per_iteration}) is below the number of "
                        f"processes ({world}): every rank needs at least one prompt per iteration")
    for check in checks:
        try:
            check()
        except RLInputError as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------- resume


def resume_problem(recipe: Recipe, resume: bool, resume_or_start: bool = False) -> str | None:
    """`--resume` needs a checkpoint (a typo in run.output_dir would otherwise start a whole new run), and a fresh
    start must not mix with an earlier run's checkpoints."""
    from rlprm.checkpoint import latest_checkpoint

    run_dir = Path(recipe.run.output_dir)
    if resume_or_start:
        return None
    found = latest_checkpoint(run_dir)
    if resume and found is None:
        state = "does not exist" if not run_dir.exists() else "has no complete checkpoint (checkpoints/latest)"
        return (f"--resume: run.output_dir {run_dir} {state}, so there is nothing to resume: check run.output_dir "
                "(a typo?), drop --resume to start a new run, or pass --resume-or-start to resume when there is a "
                "checkpoint and start otherwise")
    if not resume and found is not None:
        return (f"run.output_dir {run_dir} already holds checkpoints: continue it with --resume, or set another "
                "run.output_dir (or delete the folder) to start over")
    return None


# --------------------------------------------------------------------------- the whole job


def check_job(recipe: Recipe, command: str, resume: bool | None = None, resume_or_start: bool = False) -> None:
    """Raise JobInputError listing every input of `command` that cannot be used (nothing is written or built).

    `resume` (train-rl): the --resume flag; None skips the resume check."""
    problems = []
    if resume is not None:
        problem = resume_problem(recipe, resume, resume_or_start)
        if problem:
            problems.append(problem)
    if command == "train-rl":
        problems += rl_problems(recipe)
    problems += model_problems(recipe, command)
    problems += data_problems(recipe, command)
    if problems:
        raise JobInputError("\n".join(problems))


__all__ = ["JobInputError", "KEYWORDS", "TOKENIZER_FILES", "check_job", "data_problems", "folder_problem",
           "hub_problem", "hub_reachable", "model_problems", "models_read", "ref_problem", "resume_problem",
           "rl_problems", "safetensors_problem", "weights_problem"]
