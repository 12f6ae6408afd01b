"""The one RL run skeleton: setup, the epoch loop, cleanup. PPO, GRPO and rejection sampling plug into it.

torchtune's recipe shape (setup / train / cleanup), with composition: an
`Algorithm` supplies only what is its own (its checks, its extra models and
optimizers, its update for one epoch, its checkpoint state); everything the
three algorithms share lives here, once:

    setup     going down once, in the order the run uses them: 1. checks, before anything is
              loaded (the models named, the algorithm's own, the rollout engine); 2. processes (DeepSpeed
              engines for PPO, the trainers' DDP for GRPO and rejection sampling), the run folder (fresh
              start or --resume), seeds; 3. the held-out `exclude` set and the evaluation set
              (data/problems.py); 4. every model through one loader (rl/models.py: tokenizer, policy,
              frozen reference for PPO, with LoRA the policy's base with its adapters off, and the reward
              model when the source uses one); 5. the reward source (reward/sources.py), built from the
              reward model loaded; 6. the algorithm's own models and optimizers; 7. the checkpoint's
              counters, RNG and algorithm state; 8. the tracker (rank 0 only); torch threads
    train     the starting point's best-of-N (fresh runs), then per epoch:
              1. the epoch's problems (a function of (seed, epoch): resume replays them)
              2. the algorithm's update for that epoch (logs one record per iteration)
              3. best-of-N on held-out problems (rank 0; the others wait)
              4. a checkpoint (rank 0 writes whole weights; the others wait)
    cleanup   summary, weight digests compared across ranks, export, threads restored

Resume is one code path for every algorithm: a checkpoint holds the
algorithm's state, the counters, the RNG (restored by `load_state`) and the
length of metrics.jsonl when it was written and the summary so far, so what a
killed run logged after it is cut off (`tracking.cut_metrics`) and recomputed,
W&B is told to skip the steps it already has, and a run killed after its last
checkpoint still ends with its summary. On CPU with the same seed a run killed at any point
and resumed ends with the metrics of an uninterrupted one (tests/test_rl_run.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rlprm.config import Recipe
from rlprm.errors import EXIT_BAD_INPUT, EXIT_STOPPED, InputError


class RLError(RuntimeError):
    """An RL run cannot go on (non-finite rewards or losses, a broken contract); the message says what to do."""

    exit_code = EXIT_STOPPED  # 4: the run stopped; the last good checkpoint is kept


class RLInputError(RLError, InputError):
    """An RL run cannot start: a missing generator or reward model, sizes that do not fit, a folder that needs --resume."""

    exit_code = EXIT_BAD_INPUT  # 2


# --------------------------------------------------------------------------- shared small pieces


def mean(values) -> float | None:
    """The mean of the values that are not None; None when there are none (logged as null, never as NaN)."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def check_finite(name: str, value, run_dir: Path, dist=None) -> None:
    """Raise RLError if `value` holds NaN/inf; with several ranks, on EVERY rank if any rank has one (none hangs)."""
    import torch

    bad = ~torch.isfinite(value) if hasattr(value, "shape") else not math.isfinite(float(value))
    bad = bool(bad.any() if hasattr(bad, "any") else bad)
    if dist is not None and dist.active:
        here = bad
        bad = dist.any_rank(bad)
        if bad and not here:
            name = f"{name} (on another rank)"
    if bad:
        raise RLError(f"{name} is not finite (NaN/inf); stopping before it reaches the weights. "
                      f"{last_good(run_dir)}. Lower rl.learning_rate (or the KL coefficient), check the reward "
                      "model's scores, then run again (with --resume to continue from the checkpoint)")


def last_good(run_dir: Path) -> str:
    """`the last good checkpoint is ...` (or that there is none yet), for the messages of a stopped run."""
    from rlprm.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"


def reward_scale(recipe: Recipe) -> str:
    """What eval/reward (the reward source's `solution_reward`) measures and on which scale, in words, for the epoch
    line: the per-iteration reward of each algorithm is its own (PPO's return with the KL penalty, TRL's summed
    rewards), so only this one compares across algorithms."""
    from rlprm.reward.sources import source_class

    return source_class(recipe).describe(recipe)


def process_part(metrics: dict, key: str = "rl/process_accuracy") -> str:
    """`  process 41.2%` for an iteration's progress line where the task has a step checker, else "": the number
    that tells a process-supervised run from an outcome one, printed beside answer accuracy by every algorithm."""
    value = metrics.get(key)
    return "" if value is None else f"  process {value:.1%}"


def epoch_line(recipe: Recipe, metrics: dict, epoch: int) -> str:
    """One line per held-out evaluation: answer and process accuracy (process: where the task has a checker), trace
    error, shortcut rate and dropped-carry rate, and the run's reward with its scale, the same for every algorithm."""
    def pct(key):
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.1%}"

    line = (f"epoch {epoch}/{recipe.rl.epochs} held-out: answer {pct('eval/answer_accuracy')}")
    if metrics.get("eval/process_accuracy") is not None:
        line += (f"  process {pct('eval/process_accuracy')}  trace error {pct('eval/trace_error')}  "
                 f"shortcut {pct('eval/shortcut_rate')}")
        if metrics.get("eval/carry_drop_rate") is not None:  # the answer-changing habit, beside the shortcut
            line += f"  dropped carry {pct('eval/carry_drop_rate')}"
    reward = metrics.get("eval/reward")
    if reward is not None:
        line += f"  reward {reward:+.3f} ({reward_scale(recipe)})"
    return line


def check_models(recipe: Recipe) -> None:
    """Raise RLInputError for a missing generator or reward model, naming the command that builds it.

    The commands come from `prerequisites.BUILDERS` (the embedded recipes that produce them): the entry point
    builds such a model itself; this check speaks when a caller skipped that step.
    """
    from rlprm.prerequisites import builder_hint, generator_hint
    from rlprm.reward.sources import RewardSourceError, source_class

    if recipe.model.generator == "tiny":
        raise RLInputError("model.generator is `tiny` (an untrained model); point it at a trained generator, e.g. "
                           f"the one {generator_hint()} builds")
    needed = [("model.generator", recipe.model.generator)]
    # only a trained reward model needs model.reward_model; exact, confidence and python score without one
    try:
        needed += source_class(recipe).check(recipe)
    except RewardSourceError as exc:
        raise RLInputError(str(exc)) from None
    if recipe.task.name != "arithmetic" and recipe.task.train_path is None:
        raise RLInputError(f"task `{recipe.task.name}` needs task.train_path (a JSONL of training problems) for RL")
    for key, ref in needed:
        if ref.startswith("/") and not Path(ref).exists():
            hint = builder_hint(ref)
            raise RLInputError(f"{key} {ref} does not exist" + (f"; build it first with `{hint}`" if hint else ""))


def check_rollout(recipe: Recipe) -> None:
    """Raise RLInputError for rl.rollout vllm under ZeRO-3 (PPO, rejection sampling): refreshing the engine reads
    whole weights, which ZeRO-3 partitions across the ranks (GRPO's TRL engine gathers them itself)."""
    import json

    if recipe.rl.rollout != "vllm" or recipe.rl.algorithm == "grpo" or recipe.deepspeed is None:
        return
    try:
        stage = (json.loads(Path(recipe.deepspeed).read_text()).get("zero_optimization") or {}).get("stage", 0)
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config is reported where it is read (rl/distributed.py)
    if stage == 3:
        raise RLInputError(f"rl.rollout vllm with ZeRO-3 ({recipe.deepspeed}) is not supported yet for "
                           f"{recipe.rl.algorithm}: refreshing the engine needs whole weights; use "
                           "deepspeed_configs/zero2.json or rl.rollout: hf")


# --------------------------------------------------------------------------- the algorithm's part


class Algorithm(Protocol):
    """What one RL algorithm supplies to the skeleton (rl/ppo.py, rl/grpo.py, rl/rejection.py)."""

    name: str
    needs_reference: bool
    """The skeleton sets `run.reference` (PPO's KL and confidence rewards): a frozen copy of the generator, or
    with LoRA the policy's own base with its adapters off (`rl/reference.py`)."""

    def check(self, recipe: Recipe) -> None:
        """Raise RLInputError for what can be refused before any model is loaded."""

    def distributed(self, recipe: Recipe):
        """The `rl.distributed.Dist` this algorithm runs under (one process unless it supports more)."""

    def setup(self, run: "Run") -> None:
        """Build what is the algorithm's own (critic, optimizers, trainer), after the shared models."""

    def load_state_dict(self, state: dict) -> None:
        """Take back what `state_dict` saved (the RNG and counters are the skeleton's); `state["rank_state"]` is
        what this rank's `rank_state` returned, if the algorithm has one."""

    def state_dict(self) -> dict:
        """The algorithm's part of a checkpoint (torch-saveable)."""

    # optional: `rank_state() -> dict | None`, what this rank alone holds (PPO under DeepSpeed: its ZeRO shard of
    # the optimizers), written into the checkpoint beside every other rank's and handed back in `load_state_dict`

    def extra_models(self) -> dict:
        """Models saved beside the policy in a checkpoint (checkpoints/epoch-N/extra/NAME), e.g. the critic."""

    def train_epoch(self, run: "Run", epoch: int, problems: list) -> None:
        """One epoch's update on `problems`; logs each iteration through `run.log` (advancing `run.step`)."""


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything an epoch update reads: built once by `setup`, shared by every algorithm."""

    recipe: Recipe
    progress: bool
    run_dir: Path
    dist: object
    device: str
    ckpt: Path | None
    tokenizer: object = None
    policy: object = None
    reference: object = None
    reward_model: object = None
    reward_source: object = None
    """The recipe's `reward.sources.RewardSource`: every algorithm scores its samples with it."""
    tracker: object = None
    sampler: object = None
    """Who samples for the between-epoch best-of-N (rlprm/rollout.py, set by the algorithm); None: HF generate."""
    state: dict | None = None
    """The checkpoint's state.pt (None on a fresh start)."""
    start_epoch: int = 0
    step: int = 0
    """The logging step: iterations (PPO, GRPO) or SFT steps (rejection sampling); every record is logged at it."""
    exclude: set = field(default_factory=set)
    eval_set: list = field(default_factory=list)
    final: dict = field(default_factory=dict)
    """The last value of every metric logged (the summary)."""

    def log(self, record: dict) -> None:
        """One record at the current step: metrics.jsonl and W&B (rank 0), and the summary's latest values."""
        self.tracker.log(record, step=self.step)
        self.final.update(record)

    def evaluate(self, epoch: int) -> None:
        # best-of-N on held-out problems, scored by the run's own reward model if it has one; on rank 0 only
        # (the weights are the same everywhere), while the other ranks wait at the barrier
        from rlprm.evaluation.evaluate import between_epochs

        if not self.recipe.rl.eval_n_max:
            return
        # under ZeRO-3 every rank gathers the policy (a collective), so that rank 0 alone can run it
        with self.dist.whole_weights(self.policy):
            if self.dist.is_main:
                metrics = between_epochs(self.recipe, self.policy, self.tokenizer, self.eval_set, self.reward_model,
                                         epoch, reference=self.reference, sampler=self.sampler)
                if metrics:
                    self.log(metrics)
                    if self.progress:
                        print(epoch_line(self.recipe, metrics, epoch), flush=True)
        self.dist.barrier()

    def checkpoint(self, epoch: int, algorithm: Algorithm) -> None:
        # weights, the algorithm's state, counters, metrics.jsonl's length (and the RNG, added by save_checkpoint);
        # rank 0 writes it (the weights are identical on every rank), the others wait for it
        from rlprm.checkpoint import rng_state, save_checkpoint

        rank_rng = self.dist.gather(rng_state()) if self.dist.active else None  # every rank's own sampling stream
        # what only this rank holds (its ZeRO shard of the optimizers; None on every rank without DeepSpeed)
        own = getattr(algorithm, "rank_state", lambda: None)()
        extra = algorithm.extra_models()
        with self.dist.whole_weights(self.policy, *extra.values()):  # ZeRO-3: whole weights, never shards
            if self.dist.is_main:
                size = self.tracker.metrics_path.stat().st_size if self.tracker.metrics_path.exists() else 0
                save_checkpoint(self.run_dir, epoch, self.policy, self.tokenizer,
                                {**algorithm.state_dict(), "step": self.step, "metrics_bytes": size,
                                 "final": dict(self.final)},
                                extra_models=extra, rank_rng=rank_rng,
                                rank_states=None if own is None else self.dist.from_every_rank(own))
            elif own is not None:
                self.dist.send_to_main(own)  # into the same atomic folder as the weights, written by rank 0
            del own
        self.dist.barrier()


def check_run(recipe: Recipe, algorithm: Algorithm) -> None:
    """Every refusal that needs no model, in one pass before anything is loaded or written: the models the recipe
    names (`check_models`), the algorithm's own (`Algorithm.check`), the rollout engine (`check_rollout`)."""
    check_models(recipe)
    algorithm.check(recipe)
    check_rollout(recipe)


def open_run(recipe: Recipe, algorithm: Algorithm, resume: bool, progress: bool) -> Run:
    """The processes, the device, the run folder (a fresh start, or the checkpoint to resume from) and the seeds."""
    from rlprm.checkpoint import start_or_resume
    from rlprm.models import resolve_device
    from rlprm.rl.distributed import device_for

    dist = algorithm.distributed(recipe)
    run_dir = Path(recipe.run.output_dir)
    device = device_for(dist, resolve_device(recipe.run.device))
    ckpt = start_or_resume(run_dir, resume, RLInputError, writes=dist.is_main)
    seen_by_rank = dist.gather(ckpt.name if ckpt is not None else None)
    if len(set(seen_by_rank)) > 1:  # several nodes, each with its own disk: they would train from different weights
        raise RLInputError(f"the ranks see different checkpoints in {run_dir} ({seen_by_rank}, in rank order): put "
                           "run.output_dir on a file system every node shares to resume a multi-node run")
    dist.seed_everything(recipe.run.seed)  # the same on every rank: a new value head starts identical everywhere
    return Run(recipe, progress, run_dir, dist, device, ckpt)


def resume_state(run: Run, algorithm: Algorithm) -> int | None:
    """On resume: the checkpoint's state (this rank's RNG restored, so the next epoch replays), the algorithm's
    part handed back, the counters and the summary so far; returns the last step W&B already has (None: fresh)."""
    from rlprm.checkpoint import load_state
    from rlprm.tracking import cut_metrics

    if run.ckpt is None:
        return None
    run.state = load_state(run.ckpt, rank=run.dist.rank)
    algorithm.load_state_dict(run.state)
    run.start_epoch, run.step = run.state["epoch"], run.state["step"]
    run.final = dict(run.state.get("final", {}))  # the summary so far: a resumed run's equals an uninterrupted one's
    print(f"resuming from {run.ckpt} (epoch {run.start_epoch}, step {run.step})")
    if run.dist.is_main:  # what a killed run logged after this checkpoint is cut off and recomputed
        return cut_metrics(run.run_dir / "metrics.jsonl", run.step, run.state.get("metrics_bytes"))
    return None


def setup(recipe: Recipe, algorithm: Algorithm, resume: bool, progress: bool) -> Run:
    """Build the run going down once, in the order the run uses it: checks, run folder, problems, models, rewards,
    the algorithm's own part, the checkpoint's state, the tracker (docs/design.md, "The path of a recipe")."""
    from rlprm.data.problems import eval_problems, held_out_arithmetic
    from rlprm.reward.sources import RewardSourceError, reward_source, source_class
    from rlprm.rl.models import load_models
    from rlprm.tracking import NullTracker, Tracker

    rl, rcfg = recipe.rl, recipe.reward
    # 1. checks, before anything is loaded or written
    check_run(recipe, algorithm)
    # 2. processes, device, run folder (fresh or resumed), seeds
    run = open_run(recipe, algorithm, resume, progress)
    # 3. problems: the held-out ones that training leaves out, and the evaluation set (their own seeded streams)
    if recipe.task.name == "arithmetic":
        run.exclude = {p.text for p in held_out_arithmetic(recipe, max(recipe.prepare_eval.num_problems,
                                                                       rl.eval_num_problems))}
    run.eval_set = eval_problems(recipe, rl.eval_num_problems) if rl.eval_n_max else []
    # 4. models, every kind through one loader: tokenizer, policy (the checkpoint's on resume), reference, reward model
    models = load_models(recipe, run.ckpt, run.device, reference=algorithm.needs_reference,
                         reward_model=source_class(recipe).uses_reward_model)
    run.tokenizer, run.policy = models.tokenizer, models.policy
    run.reference, run.reward_model = models.reference, models.reward_model
    # 5. rewards: the one object PPO, GRPO, rejection sampling and the held-out reward score with, from what loaded
    try:
        run.reward_source = reward_source(recipe, run.reward_model)
    except RewardSourceError as exc:  # a reward model of the other kind; a python function that does not import
        raise RLInputError(str(exc)) from None
    # 6. the algorithm's own models and optimizers; from here each rank draws its own sampling noise (rank 0: unchanged)
    algorithm.setup(run)
    run.dist.split_streams(recipe.run.seed)
    # 7. the checkpoint's state on resume (after 6: the algorithm's part goes into what it built)
    seen = resume_state(run, algorithm)
    # 8. the tracker: only rank 0 writes (metrics.jsonl, W&B, summary); the others' numbers reach it through
    # dist.mean_metrics
    run.tracker = (Tracker(run.run_dir, recipe, job="rl", tags=["rl", rl.algorithm, rcfg.mode, rcfg.source],
                           resume=run.ckpt is not None, wandb_seen_step=seen)
                   if run.dist.is_main else NullTracker())
    return run


def cleanup(run: Run, algorithm: Algorithm) -> dict:
    """Summary, the ranks' weight digests compared, and the export; returns the final metrics."""
    from rlprm.checkpoint import export
    from rlprm.rl.distributed import weights_digest

    dist, final = run.dist, run.final
    sync = {}
    if dist.deepspeed or dist.active:
        # every rank's own digest of its weights: data parallelism must leave them identical (ZeRO-3: the
        # gathered weights, so that a digest covers every parameter, not this rank's shard)
        models = {"policy": run.policy, **algorithm.extra_models()}
        with dist.whole_weights(*models.values()):
            digests = {name: weights_digest(model) for name, model in models.items()}
        sync = {"dist/world_size": dist.world, "dist/zero_stage": dist.zero_stage,
                **{f"dist/{name}_sha256": dist.gather(digest) for name, digest in digests.items()}}
        final.update(sync)
    # also when a resume found nothing left to train: a run killed after its last checkpoint has no summary yet
    if final:
        run.tracker.summary({**{k: v for k, v in final.items() if isinstance(v, (int, float)) or v is None}, **sync})
    if run.start_epoch >= run.recipe.rl.epochs and dist.is_main:
        print(f"{run.run_dir} already finished its {run.recipe.rl.epochs} epochs; raise rl.epochs to train on")
    digests = {k: v for k, v in sync.items() if k.endswith("_sha256")}
    if any(len(set(v)) > 1 for v in digests.values()):
        raise RLError(f"the {dist.world} ranks ended with different weights ({sync}); this is a bug in the "
                      "data-parallel setup, please report it with the recipe")
    # the final policy as a plain HF folder (LoRA merged; the summary first: export copies it)
    out = export(run.run_dir) if dist.is_main else run.run_dir / "export"
    dist.barrier()
    final["export_dir"] = str(out)
    return final


def run_algorithm(recipe: Recipe, algorithm: Algorithm, resume: bool = False, progress: bool = True) -> dict:
    """setup, then per epoch 1. problems 2. update 3. best-of-N 4. checkpoint, then cleanup."""
    import torch

    from rlprm.data.problems import epoch_problems

    threads_before = torch.get_num_threads()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)  # restored at the end: callers (tests) keep their setting
    run = None
    try:
        run = setup(recipe, algorithm, resume, progress)
        if run.ckpt is None:
            run.evaluate(0)  # the starting point, for before/after comparisons
        for epoch in range(run.start_epoch, recipe.rl.epochs):
            # 1. the epoch's problems: a function of (seed, epoch) only, so that a resumed run replays them
            problems = epoch_problems(recipe, epoch, run.exclude)
            # 2. the algorithm's update (one record per iteration, logged as it goes)
            algorithm.train_epoch(run, epoch, problems)
            # 3. best-of-N on held-out problems, every rl.eval_every epochs and after the last
            if (epoch + 1) % recipe.rl.eval_every == 0 or epoch + 1 == recipe.rl.epochs:
                run.evaluate(epoch + 1)
            # 4. checkpoint
            run.checkpoint(epoch + 1, algorithm)
        return cleanup(run, algorithm)
    except BaseException as exc:
        if run is not None:
            run.dist.announce_failure(exc)  # the ranks waiting at a barrier stop now, naming this rank
        raise
    finally:
        torch.set_num_threads(threads_before)
        if run is not None and run.tracker is not None:
            run.tracker.finish()


__all__ = ["Algorithm", "RLError", "RLInputError", "Run", "check_finite", "check_models",
           "check_rollout", "check_run", "cleanup", "epoch_line", "last_good", "mean", "open_run", "resume_state",
           "reward_scale", "run_algorithm", "setup"]
