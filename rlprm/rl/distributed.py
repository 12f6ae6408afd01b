"""Data-parallel RL through DeepSpeed: ranks, collectives, stop flags and engine wrapping.

One process per device (`deepspeed --num_gpus N rlprm/train_rl.py RECIPE`; on a
CPU-only machine "N GPUs" means N CPU processes talking over gloo). Every rank
holds the whole policy and value model (ZeRO-2 shards only the optimizer
state and gradients), samples its own share of each iteration's prompts,
scores them locally, and DeepSpeed averages the gradients, so all ranks step
to the same weights. Only rank 0 writes metrics, checkpoints and the export.

ZeRO-3 also shards the parameters of the trained models (the policy and the
critic; the reference and the reward model are never wrapped in an engine and
stay whole on every rank). A forward pass through a sharded model gathers each
layer from every rank, so it is a collective: training steps and the no-grad
passes of the loop run on every rank in step. What reads the weights outside
that lockstep goes through `Dist.whole_weights`, which gathers the whole model
on every rank for the block and takes DeepSpeed's hooks off (as DeepSpeed's
own `unwrap_model_for_generation` does, and one hook more): generation, where
ranks stop at different lengths and would otherwise wait for each other's
forward passes, rank 0's evaluation, the checkpoints (whole weights, written
by rank 0) and the weight digests.

Every collective here must be called by all ranks in the same order, or the
run hangs: the loops that call them do the same number of iterations on every
rank (equal shards), and a reason to stop on one rank is shared with
`Dist.stop_if_any` before anyone raises.

With one process and no `deepspeed:` key in the recipe, `Dist.single()` is
returned and nothing here imports DeepSpeed: the plain torch path stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rlprm.errors import EXIT_STOPPED, InputError
from rlprm.launch import launcher_local_rank, launcher_rank, single_process_env, unwrap
from rlprm.tracking import NullTracker  # noqa: F401  (re-exported until rl/ imports it from rlprm.tracking)

# Used when several processes are launched but the recipe names no DeepSpeed
# config: the same settings as deepspeed_configs/zero2.json, built in so that a
# pip-installed rlprm (without the repository's folder) can still run them.
DEFAULT_ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto"},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}


class DistributedError(InputError, RuntimeError):
    """The launch or the DeepSpeed config cannot work for RL; the message says what to change."""


class RankFailedError(DistributedError):
    """Another rank failed (it announced it, or the rendezvous store it hosted is gone): this rank stops too."""

    exit_code = EXIT_STOPPED  # the run stopped; not a bad input


# store keys (under the default process group's store); ranks differ only in what they add
FAILURE_KEY = "rlprm/failure"  # the first failing rank's message
FAILURES_KEY = "rlprm/failures"  # how many ranks announced a failure (the first one writes FAILURE_KEY)
SEEN_KEY = "rlprm/failure_seen"  # how many waiting ranks read it (the failing rank waits for them, briefly)
BARRIER_POLL_S = 0.5  # the longest pause between two looks at a barrier: a failure is seen within it
ACK_WAIT_S = 5.0  # how long a failing rank waits for the others to read its message before it exits


def launched_world_size() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 under plain python)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def wants_deepspeed(recipe) -> bool:
    """DeepSpeed engines are used when several processes run, or when the recipe names a DeepSpeed config."""
    return launched_world_size() > 1 or recipe.deepspeed is not None


def read_ds_config(recipe) -> dict:
    """The recipe's DeepSpeed JSON (or the built-in ZeRO-2 settings), checked for what RL here supports."""
    if recipe.deepspeed is None:
        return json.loads(json.dumps(DEFAULT_ZERO2))
    path = Path(recipe.deepspeed)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DistributedError(f"deepspeed: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise DistributedError(f"deepspeed: {path} must hold a JSON object")
    zero = config.get("zero_optimization", {}) or {}
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise DistributedError(f"deepspeed: {path} offloads to the CPU, which needs DeepSpeed's own optimizer "
                               "(DeepSpeedCPUAdam, JIT-compiled); PPO uses torch's AdamW: use "
                               "deepspeed_configs/zero3.json (or zero2.json)")
    if (config.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise DistributedError(f"deepspeed: {path} enables fp16, which PPO does not support; use bf16 "
                               "(model.dtype: bfloat16) or float32")
    return config


def fill_ds_config(config: dict, *, micro_batch: int, grad_clip: float, bf16: bool, hidden_size: int | None) -> dict:
    """Replace the "auto" values (as HF's integration would) with the RL loop's own settings.

    `micro_batch` is the per-rank minibatch; one optimizer step per minibatch
    (no gradient accumulation), so the effective batch is micro_batch * world.
    """
    config = json.loads(json.dumps(config))
    explicit = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                "gradient_clipping": grad_clip}
    for key, value in explicit.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]  # DeepSpeed derives it: micro * accumulation * world
    config.setdefault("bf16", {})
    if config["bf16"].get("enabled", "auto") == "auto":
        config["bf16"]["enabled"] = bf16
    if (config.get("fp16") or {}).get("enabled") in (None, False, "auto"):
        config.pop("fp16", None)  # "auto" would mean fp16 on GPUs; read_ds_config refused an explicit `true`
    zero = config.setdefault("zero_optimization", {})
    # HF fills hidden^2; with a floor, because each bucket is one collective: a tiny model's 128^2 buckets meant ~50
    # gloo calls per backward, and DeepSpeed's overhead ate the 2-process speed-up on CPU
    h = hidden_size or 1024
    bucket = max(h * h, 10_000_000)
    # ZeRO-3 (HF's values): gather buckets of 0.9 h^2, and parameters under 10 h elements (norms, biases) kept
    # whole on every rank, where gathering them would cost more than it saves
    stage3 = {"stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h}
    for key, value in {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket, **stage3}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    # our optimizer is torch's AdamW (docs/design.md section 10: DeepSpeed's own JIT-compiles for 40 s on CPU)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


@dataclass
class Dist:
    """Where this process stands: rank, world size and whether DeepSpeed engines are in use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    deepspeed: bool = False
    ds_config: dict = field(default_factory=dict)
    barriers: int = field(default=0, repr=False)  # barriers passed so far: the same count on every rank
    engines: dict = field(default_factory=dict, repr=False)  # id(model) -> the DeepSpeed engine `wrap` built for it

    @classmethod
    def single(cls) -> "Dist":
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Collectives are needed (more than one process)."""
        return self.world > 1

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the engines (0 without DeepSpeed)."""
        return int((self.ds_config.get("zero_optimization") or {}).get("stage", 0)) if self.deepspeed else 0

    # ------------------------------------------------------------------ collectives (no-ops on one process)

    def barrier(self) -> None:
        """Wait until every rank is here, or raise RankFailedError as soon as another rank has failed.

        No timeout: rank 0 may evaluate for hours while the others wait. A
        counter in the rendezvous store replaces `torch.distributed.barrier`,
        which could only give up at the process group's timeout.
        """
        if not self.active:
            return
        self.barriers += 1
        key = f"rlprm/barrier/{self.barriers}"
        try:
            store = _store()
            store.add(f"{key}/in", 1)
            self._wait_for_all(store, f"{key}/in")
            store.add(f"{key}/out", 1)
            if self.rank == 0:
                # it hosts the store: were it to exit (the run's last barrier) before the others have read the
                # count, they would find the store gone and take it for a crash
                self._wait_for_all(store, f"{key}/out")
        except RankFailedError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store's host is gone: torch raises several kinds for it
            raise RankFailedError(f"rank {self.rank} lost the rendezvous store at {_store_address()} (hosted by rank "
                                  f"0 under the DeepSpeed launcher): a rank has most likely died; see its log "
                                  f"above ({type(exc).__name__}: {exc})") from None

    def _wait_for_all(self, store, key: str) -> None:
        """Until the counter `key` reaches the world size; RankFailedError if a rank announces a failure meanwhile."""
        pause = 0.005
        while store.add(key, 0) < self.world:
            if store.check([FAILURE_KEY]):
                store.add(SEEN_KEY, 1)
                failure = store.get(FAILURE_KEY).decode()
                raise RankFailedError(f"{failure} (rank {self.rank} stops too)")
            time.sleep(pause)
            pause = min(2 * pause, BARRIER_POLL_S)

    def announce_failure(self, exc: BaseException) -> None:
        """Tell every rank that this one fails with `exc` (call it from an exception handler, then re-raise).

        The ranks waiting in `barrier` raise RankFailedError with this rank's
        message. The first failure's message is kept; a RankFailedError (a
        consequence of another rank's failure) is not announced again. Waits up
        to ACK_WAIT_S for the others to read it, so that a launcher that kills
        the siblings when this process exits does not cut their message short.
        Never raises: the original exception is what matters.
        """
        if not self.active or isinstance(exc, RankFailedError):
            return
        message = f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
        print(f"[rlprm] {message}; telling the other ranks", file=sys.stderr, flush=True)
        try:
            store = _store()
            if store.add(FAILURES_KEY, 1) == 1:
                store.set(FAILURE_KEY, message)
            deadline = time.monotonic() + ACK_WAIT_S
            while store.add(SEEN_KEY, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - best effort: the store may be gone with its host
            pass

    @contextmanager
    def fail_together(self):
        """Run a block whose exception every other rank hears of at its next `barrier` (then re-raise it here)."""
        try:
            yield
        except BaseException as exc:
            self.announce_failure(exc)
            raise

    # ------------------------------------------------------------------ random numbers

    def seed_everything(self, seed: int) -> None:
        """Seed python, numpy and torch (every CUDA device too) with `seed`, the same on EVERY rank.

        What is drawn next, a new value head's initial weights, is then
        identical on every rank. Call `split_streams` once the models are built.
        """
        import random

        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # seeds every CUDA device as well

    def split_streams(self, seed: int) -> None:
        """From here on each rank draws its own random numbers (sampling noise, minibatch order).

        Rank 0 keeps the stream `seed_everything` started, so that one process
        runs exactly as before; rank r > 0 is reseeded from (seed, r). Without
        this, ranks sampling their own prompts would all draw the same noise.
        """
        if self.rank == 0:
            return
        self.seed_everything(rank_seed(seed, self.rank))

    def masked_whiten(self, x, mask, shift_mean: bool = True, eps: float = 1e-8):
        """`x` standardised with the mean and unbiased variance of the masked positions of EVERY rank.

        x, mask: (B, T) on each rank (B and T may differ between ranks) -> (B, T).
        The same result as `core.masked_whiten` over all ranks' rows stacked
        (that function, exactly, on one process): every rank's advantages are
        on one scale, as if one process had whitened the whole batch. Two
        all-reduces of float64 sums (sum and count, then the squared
        deviations) keep it as exact as the one-process two-pass formula.
        Padding comes out as 0.
        """
        from rlprm.rl.core import masked_whiten

        if not self.active:
            return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
        import torch
        import torch.distributed as tdist

        m = mask.bool()
        xs = torch.where(m, x, torch.zeros_like(x)).double()  # padding may hold NaN/inf: never add it
        sums = torch.stack([xs.sum(), m.sum().double()])
        tdist.all_reduce(sums)
        n = sums[1].clamp(min=1)
        mean = sums[0] / n
        sq = torch.where(m, (xs - mean) ** 2, torch.zeros_like(xs)).sum().reshape(1)
        tdist.all_reduce(sq)
        var = sq[0] / n
        var = torch.where(sums[1] > 1, var * sums[1] / (sums[1] - 1).clamp(min=1), var)  # Bessel, as core's
        out = (x.double() - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
        return torch.where(m, out, torch.zeros_like(out)).to(x.dtype)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if not self.active:
            return bool(flag)
        import torch
        import torch.distributed as tdist

        t = torch.tensor([1.0 if flag else 0.0])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def stop_if_any(self, reason: str | None, exc_type: type[Exception]) -> None:
        """Raise `exc_type` on EVERY rank if any rank has a reason to stop (so no rank waits forever)."""
        if not self.active:
            if reason:
                raise exc_type(reason)
            return
        import torch.distributed as tdist

        reasons = [None] * self.world
        if self.any_rank(reason is not None):
            tdist.all_gather_object(reasons, reason)
            first = next((r, i) for i, r in enumerate(reasons) if r is not None)
            where = "" if reason is not None else f" (rank {first[1]})"
            raise exc_type(f"{first[0]}{where}")

    def mean_metrics(self, record: dict) -> dict:
        """Average every numeric value over the ranks (None and NaN ignored; equal shards make this the global mean)."""
        if not self.active:
            return record
        import math

        import torch
        import torch.distributed as tdist

        keys = sorted(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                      or v is None)
        # every rank logs the same keys (same code path); a key missing here would be a bug worth a clear error
        gathered = [None] * self.world
        tdist.all_gather_object(gathered, keys)
        if any(g != keys for g in gathered):
            raise DistributedError(f"ranks logged different metrics: {gathered}")
        vals = torch.tensor([float("nan") if record[k] is None else float(record[k]) for k in keys],
                            dtype=torch.float64)
        ok = torch.isfinite(vals)
        sums = torch.stack([torch.where(ok, vals, torch.zeros_like(vals)), ok.double()])
        tdist.all_reduce(sums)
        out = dict(record)
        for k, s, c in zip(keys, sums[0].tolist(), sums[1].tolist()):
            if c > 0:
                out[k] = s / c
            elif record[k] is not None and math.isnan(float(record[k])):
                out[k] = float("nan")
        return out

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks (the number itself on one process)."""
        if not self.active:
            return float(value)
        import torch
        import torch.distributed as tdist

        t = torch.tensor([float(value)], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as tdist

        out = [None] * self.world
        tdist.all_gather_object(out, value)
        return out

    def send_to_main(self, value) -> None:
        """Rank > 0: hand `value` (picklable, CPU tensors) to rank 0, which takes it in `from_every_rank`.

        Blocks until rank 0 has received it: call it where rank 0 iterates `from_every_rank` (the same block).
        """
        import torch.distributed as tdist

        tdist.send_object_list([value], dst=0)

    def from_every_rank(self, own):
        """Rank 0: `own`, then every other rank's `send_to_main` value in rank order, each received only when the
        previous one has been used (one rank's shard in memory at a time, not the world's, as a gather would)."""
        yield own
        del own
        if not self.active:
            return
        import torch.distributed as tdist

        for src in range(1, self.world):
            box = [None]
            tdist.recv_object_list(box, src=src)
            value = box.pop()
            yield value
            del value

    # ------------------------------------------------------------------ engines

    def wrap(self, model, optimizer):
        """A DeepSpeed engine around (model, optimizer); the plain model when DeepSpeed is off."""
        if not self.deepspeed:
            return model
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.engines[id(model)] = engine
        return engine

    @contextmanager
    def whole_weights(self, *models):
        """Every parameter of `models` whole on this rank for the block, each rank on its own.

        Under ZeRO-3 a model that `wrap` put in an engine holds only its shard:
        this gathers it on every rank (a collective: call it on EVERY rank, with
        the same models in the same order) and takes the engine's hooks off, so
        that forward passes inside the block need no other rank (generation,
        rank 0's evaluation), and `state_dict` holds whole tensors (checkpoints,
        digests). The shards come back on exit; weights changed inside the
        block are not kept. Costs a whole copy of each model per rank while it
        lasts. A no-op for models that are whole already (no DeepSpeed, ZeRO-1/2,
        the reference, the reward model).
        """
        engines = [self.engines[id(m)] for m in models if id(m) in self.engines] if self.zero_stage == 3 else []
        if not engines:
            yield
            return
        from contextlib import ExitStack

        import deepspeed

        with ExitStack() as stack:
            for engine in engines:
                stack.enter_context(deepspeed.zero.GatheredParameters(list(engine.module.parameters())))
                stack.enter_context(_zero3_hooks_off(engine))
            yield


def setup(recipe, micro_batch: int) -> Dist:
    """Start the process group when DeepSpeed is wanted (several processes, or a `deepspeed:` key); else Dist.single().

    `micro_batch` is the per-rank minibatch the RL loop will feed each engine.
    """
    if not wants_deepspeed(recipe):
        return Dist.single()
    import torch

    cpu = not torch.cuda.is_available() or recipe.run.device == "cpu"
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks it anyway; this silences its warning
    single_process_env()
    config = read_ds_config(recipe)
    import deepspeed

    hidden = None
    try:
        from transformers import AutoConfig

        hidden = getattr(AutoConfig.from_pretrained(recipe.model.generator,
                                                    trust_remote_code=recipe.model.trust_remote_code),
                         "hidden_size", None)
    except Exception:  # noqa: BLE001 - only sizes the buckets; a default works everywhere
        hidden = None
    config = fill_ds_config(config, micro_batch=micro_batch, grad_clip=recipe.rl.max_grad_norm,
                            bf16=recipe.model.dtype == "bfloat16", hidden_size=hidden)
    if cpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce on its first init (35-78 s on 2 cores,
        # cached in ~/.cache/torch_extensions) that only its inference all-reduce uses; training goes through gloo
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False)
    import torch.distributed as tdist

    rank, world = tdist.get_rank(), tdist.get_world_size()
    local_rank = launcher_local_rank()
    if not cpu:
        torch.cuda.set_device(local_rank)
    if cpu and world > 1 and not recipe.run.threads:
        # N processes on one machine each taking every core oversubscribe it (2x slower on 2 cores: docs/design.md s.10)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank=rank, world=world, local_rank=local_rank, deepspeed=True, ds_config=config)


@contextmanager
def _zero3_hooks_off(engine):
    """A ZeRO-3 engine's module with none of DeepSpeed's hooks for the block, then with them back.

    Every forward of a ZeRO-3 module runs hooks that gather layers and check the order of the
    gathers with the other ranks (both collectives). On gathered weights they are not needed, and
    ranks running different numbers of forward passes (generation) would wait for each other in them.
    DeepSpeed's own `stage3.unwrap_model_for_generation` removes the per-layer hooks but not the
    start-of-forward one, which still checks with the other ranks: hence this one (the internals of
    DeepSpeed 0.19, which pyproject.toml pins).
    """
    from deepspeed.runtime.zero import parameter_offload

    offload = engine.optimizer.parameter_offload
    stack_depth = len(parameter_offload.FWD_MODULE_STACK)
    offload._remove_module_hooks()  # the per-layer forward / backward hooks and the start-of-forward one
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload.setup_zero_stage3_hooks()  # all three back; the gather order is recorded afresh
        del parameter_offload.FWD_MODULE_STACK[stack_depth:]  # which pushed the module once more


def launch_env() -> tuple[int, int, int]:
    """(global rank, local rank, world size) as the launcher set them: RANK, LOCAL_RANK, WORLD_SIZE (0, 0, 1 without).

    RANK is the rank over every node; LOCAL_RANK only picks this node's device. On the second node of a
    `deepspeed --hostfile hostfile --num_nodes 2` launch with 2 slots each, the first process has RANK=2 and
    LOCAL_RANK=0: it is not the writer (`Dist.is_main` is the global rank 0 alone).
    """
    try:
        return launcher_rank(), launcher_local_rank(), launched_world_size()
    except ValueError:
        raise DistributedError(f"RANK={os.environ.get('RANK')!r} / LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} "
                               "are not numbers; launch with `deepspeed`, `torchrun` or `accelerate launch`") from None


def setup_process_group(recipe) -> Dist:
    """Join the launcher's processes WITHOUT DeepSpeed engines; Dist.single() on one process.

    For the algorithms that train through a transformers/TRL `Trainer` (GRPO,
    rejection sampling): the process group started here (gloo on CPU, NCCL on
    GPUs, from the launcher's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)
    is the one accelerate's state adopts when the trainer is built (it only
    starts its own when none exists), so the trainer's DDP all-reduce, TRL's
    gathers and our barriers share one world. Any launcher that sets those
    variables works: `deepspeed`, `torchrun`, `accelerate launch --multi_gpu`.
    """
    rank, local_rank, world = launch_env()
    if world == 1:
        return Dist.single()
    import torch
    import torch.distributed as tdist

    cpu = not torch.cuda.is_available() or recipe.run.device == "cpu"
    if not cpu:
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world)
    if tdist.get_rank() != rank or tdist.get_world_size() != world:
        raise DistributedError(f"the process group has rank {tdist.get_rank()} of {tdist.get_world_size()} but the "
                               f"launcher said RANK={rank} WORLD_SIZE={world}")
    if cpu and not recipe.run.threads:
        # N processes on one machine each taking every core oversubscribe it (2x slower on 2 cores: docs/design.md s.10)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)) or world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank=rank, world=world, local_rank=local_rank)


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s own seed from the run's: distinct for every rank; rank 0's is the run's own."""
    return seed + 1_000_000_007 * rank


def _store():
    """The default process group's key-value store (torch has no public getter for it)."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _store_address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def device_for(dist: Dist, device: str) -> str:
    """One GPU per rank (`cuda:LOCAL_RANK`); the CPU is shared."""
    return f"cuda:{dist.local_rank}" if device == "cuda" and (dist.deepspeed or dist.active) else device


def shard(items: list, dist: Dist) -> list:
    """This rank's share of `items`: every world-th item from its rank (all ranks get equally many).

    The caller trims `items` to a multiple of the world size first (see `trim`).
    """
    return items[dist.rank::dist.world]


def trim(items: list, dist: Dist) -> list:
    """`items` cut to a multiple of the world size, so that every rank does the same number of steps."""
    return items[: len(items) - len(items) % dist.world]


def to_cpu(obj):
    """`obj` with every tensor in it (nested in dicts, lists, tuples) on the CPU; other values as they are.

    Tensors already there are not copied: a rank's optimizer shard is as large as its share of the model, thrice."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def engine_optimizer_state(engine) -> dict:
    """This rank's part of a DeepSpeed engine's optimizer: under ZeRO its shard of the moments and fp32 masters."""
    return to_cpu(engine.optimizer.state_dict())


def load_engine_optimizer_state(engine, state: dict, rank: int, world: int) -> None:
    """Put back what `engine_optimizer_state` returned on rank `rank` of `world` (the same world and ZeRO stage).

    ZeRO's optimizers take the list of every rank's state and read their own rank's entry; the fp32 master
    weights come from it too (not re-derived from the model's weights, which may be bf16)."""
    import inspect

    load = engine.optimizer.load_state_dict
    if "state_dict_list" not in inspect.signature(load).parameters:
        load(state)  # no ZeRO, fp32: the torch optimizer itself
        return
    states = [state if r == rank else None for r in range(world)]
    params = inspect.signature(load).parameters
    load(states, **({"load_from_fp32_weights": True} if "load_from_fp32_weights" in params else {}))


def weights_digest(model) -> str:
    """sha256 over the parameter names and float32 values of `model`'s state dict (order-independent of storage)."""
    import torch

    h = hashlib.sha256()
    state = unwrap(model).state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


__all__ = ["DEFAULT_ZERO2", "Dist", "DistributedError", "NullTracker", "RankFailedError", "device_for",
           "fill_ds_config", "launch_env", "launched_world_size", "rank_seed", "read_ds_config", "setup",
           "setup_process_group", "shard", "single_process_env", "to_cpu", "trim", "unwrap", "wants_deepspeed",
           "weights_digest", "engine_optimizer_state", "load_engine_optimizer_state"]
