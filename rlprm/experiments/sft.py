"""Supervised fine-tuning of the tiny generator: a plain torch loop, budgeted in optimizer steps.

`rlprm prepare` used TRL's SFTTrainer with a wall-clock schedule. Both went:
- the schedule is laid over `sft.steps` optimizer steps, so a slower machine
  trains as many steps as a fast one (it used to get fewer, hence a different
  and often worse generator); the same generator on another machine also needs
  the pinned CPU kernels and a fixed thread count (docs/reproducibility.md);
- each step is cheaper: benchmarks/sft_step.py, side by side at 1 thread on
  the recipe's shape (2026-12-01, a loaded 2-core machine), gave 2.04 steps/s
  for this loop against 1.44 for TRL's SFTTrainer with the lean loss (1.41x).
  The gain is the length-grouped passes (batch_loss): the same loop with one
  pass per batch ran 1.49 steps/s, about TRL's speed, and with an attention
  mask 1.35.

What it does is what the TRL set-up did: loss on the completion and the end
token only, random batches (grouping by length makes each batch one kind of
problem and the arithmetic never clicks), AdamW, gradient clipping, linear
warm-up, then the peak rate until sft.decay_start, then cosine decay. Each batch is padded to its own longest sequence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

IGNORE = -100
"""Label of a position that carries no loss (prompt and padding), as Hugging Face models expect."""


class SFTError(RuntimeError):
    """Training went wrong (a non-finite loss); the message says at which step and what to try."""


@dataclass
class Encoded:
    """Every training example as token ids, with where its completion starts."""

    ids: list[list[int]]
    """prompt + completion + end token, per example."""
    prompt_lengths: list[int]
    """Leading tokens of each example that belong to the prompt (no loss on them)."""


def encode_completions(tokenizer, prompts: list[str], completions: list[str]) -> Encoded:
    """Tokenize prompt + completion + EOS; the completion starts where the prompt's own tokens stop matching.

    The prompt is tokenized on its own too, as it will be when the generator is
    sampled: a tokenizer that merges across the boundary would otherwise train
    the model on a prompt it never sees at inference (TRL does the same).
    """
    eos = tokenizer.eos_token
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    texts = [p + (c if c.endswith(eos) else c + eos) for p, c in zip(prompts, completions)]
    # special tokens as at sampling time (our tokenizers put BOS in front); one batched call each (Rust, in
    # parallel): one call per solution took 4 s of the 30,000-solution set-up
    fulls = tokenizer(texts)["input_ids"] if texts else []
    alones = tokenizer(list(prompts))["input_ids"] if texts else []
    ids, starts = [], []
    for full, alone in zip(fulls, alones):
        start = 0
        while start < min(len(full), len(alone)) and full[start] == alone[start]:
            start += 1
        ids.append(full)
        starts.append(start)
    return Encoded(ids, starts)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float, decay_start: int = 0) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based): linear warm-up, the peak rate held until
    step `decay_start`, then cosine to `min_ratio` at the last step. decay_start at or below warm-up's end is the
    plain warm-up-then-cosine schedule. (Holding the peak before decaying is the warm-up-stable-decay idea of
    Hu et al., 2024, MiniCPM: here it keeps the rate high until the arithmetic clicks.)"""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = max(warmup_steps, decay_start)
    if step < start:
        return 1.0
    # max(1, ...): the scheduler also asks for the step after the last one, where warm-up may fill the budget
    done = (step - start + 1) / max(1, total_steps - start)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def padded_table(encoded: Encoded, pad_id: int):
    """(ids, labels, lengths): every example right-padded to the longest, so a batch is one gather and one slice."""
    import torch

    lengths = torch.tensor([len(x) for x in encoded.ids])
    width = int(lengths.max())
    ids = torch.full((len(encoded.ids), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    for i, (row, start) in enumerate(zip(encoded.ids, encoded.prompt_lengths)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start: len(row)] = ids[i, start: len(row)]
    return ids, labels, lengths


def batch_order(n: int, batch_size: int, steps: int, seed: int):
    """Index tensors of `steps` batches: random permutations of the examples, one after another, from a seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            # an epoch's leftover examples start the next epoch's first batch: every example is seen equally often
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        yield order[:batch_size]
        order = order[batch_size:]


LENGTH_GROUPS = 4
"""Each batch runs as this many forward/backward passes over its examples sorted by length (see train_sft)."""



def share_parts(groups: int, world: int, rank: int) -> list[int]:
    """Which of a batch's `groups` length-sorted parts rank `rank` of `world` runs: dealt in a snake (0 1 1 0 ...),
    so that every rank gets short and long parts alike and the ranks finish their passes at about the same time."""
    mine = []
    for i in range(groups):
        lap, pos = divmod(i, world)
        if (pos if lap % 2 == 0 else world - 1 - pos) == rank:
            mine.append(i)
    return mine


def batch_loss(model, ids, labels, lengths, rows, groups: int, rank: int = 0, world: int = 1):
    """Mean cross-entropy over the labelled tokens of batch `rows`, backpropagated; returns its value.

    The batch (random, as drawn) is sorted by length and cut into `groups` parts, each padded only to its
    own longest sequence: the examples run 42-98 tokens, and padding a whole batch to its longest computes
    about 35% more positions than there are tokens (4 parts: 9%). The loss is summed over all parts and
    divided by the batch's token count, so the gradient is the whole batch's, only summed in another order.

    With `world` > 1 this process runs only its share of the parts (`share_parts`), still divided by the
    WHOLE batch's token count: the ranks' gradients and values, summed, are the batch's.
    """
    import torch.nn.functional as F

    rows = rows[lengths[rows].argsort(stable=True)]  # stable: ties keep their drawn order on any machine
    n_tokens = int((labels[rows, 1:] != IGNORE).sum())
    parts = rows.chunk(groups)
    total = 0.0
    for i in share_parts(len(parts), world, rank):
        part = parts[i]
        longest = int(lengths[part].max())
        part_ids, part_labels = ids[part, :longest], labels[part, :longest]
        # no attention mask: padding is on the right and attention is causal, so no real token ever looks at
        # a pad, and pads carry no loss
        logits = model(input_ids=part_ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), part_labels[:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
    return total


@dataclass
class Tables:
    """A training set as padded tensors (padded_table's ids, labels, lengths)."""

    ids: object
    labels: object
    lengths: object


def train_sft(model, encoded: Encoded, cfg, pad_id: int, seed: int, device: str = "cpu", tracker=None,
              progress: bool = True, desc: str = "training generator", groups: int = LENGTH_GROUPS,
              clean: Encoded | None = None) -> dict:
    """Fine-tune `model` in place for `cfg.steps` optimizer steps (`cfg` is the recipe's SFTConfig).

    With `clean` (the reference solutions of the same problems) and `cfg.clean_steps`, the first clean_steps
    batches come from `clean`, the rest from `encoded`, under one optimizer and one schedule: the arithmetic is
    learned from consistent examples first, the habits (shortcut, slips) after.

    With `cfg.processes` > 1 (CPU only), that many spawned processes of one torch thread each train it
    together (`train_sft_processes`); 1 trains here, on this process's threads.

    Returns steps, mean training loss, the last logging window's loss, the wall seconds it took (reported,
    never used to stop) and the processes. Every `cfg.logging_steps` steps, `sft/loss`, `sft/learning_rate`,
    `sft/grad_norm`, `sft/epoch` and `sft/steps_per_second` go to the tracker.
    """
    import torch

    mixed = Tables(*padded_table(encoded, pad_id))
    clean_steps = min(getattr(cfg, "clean_steps", 0), cfg.steps) if clean is not None else 0
    clean_table = Tables(*padded_table(clean, pad_id)) if clean_steps else None
    processes = getattr(cfg, "processes", 1)
    torch.manual_seed(seed)  # here too with processes: what runs after training draws from the same state
    if processes > 1:
        if str(device) != "cpu":
            raise ValueError(f"sft.processes is {processes}, but processes split the work of CPU threads; "
                             f"on {device} set sft.processes: 1")
        return train_sft_processes(model, mixed, clean_table, clean_steps, cfg, seed, processes, tracker=tracker,
                                   progress=progress, desc=desc, groups=groups)
    for table in (mixed, clean_table):
        if table is not None:
            table.ids, table.labels = table.ids.to(device), table.labels.to(device)
    model.to(device)
    result = sft_loop(model, mixed, clean_table, clean_steps, cfg, seed, groups, tracker=tracker,
                      progress=progress, desc=desc)
    model.eval()
    return result


def sft_loop(model, mixed: Tables, clean: Tables | None, clean_steps: int, cfg, seed: int, groups: int,
             tracker=None, progress: bool = True, desc: str = "", rank: int = 0, world: int = 1,
             all_reduce=None) -> dict:
    """The optimizer steps of train_sft, in one process or in rank `rank` of `world`.

    With world > 1, every rank draws the same batches (the same seeded generators), backpropagates its share
    of each (batch_loss) and calls `all_reduce(flat)` on its gradients and loss value in one flat buffer, which
    must sum them over the ranks in place; every rank then clips and steps alike, so the weights stay the same
    on every rank. Only rank 0 logs and shows the bar.
    """
    import torch
    from tqdm.auto import tqdm

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, getattr(cfg, "decay_start", 0)))
    flat = torch.zeros(sum(p.numel() for p in params) + 1) if world > 1 else None
    clean_batches = batch_order(len(clean.ids), cfg.batch_size, clean_steps, seed + 1) if clean_steps else None
    mixed_batches = batch_order(len(mixed.ids), cfg.batch_size, cfg.steps - clean_steps, seed)

    lead = rank == 0
    bar = tqdm(total=cfg.steps, desc=desc, unit="step", disable=not (progress and lead))
    total_loss, window_loss, window_steps, window_t0 = 0.0, 0.0, 0, time.monotonic()
    last_window = float("nan")
    t0 = time.monotonic()
    for step in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        table, rows = (clean, next(clean_batches)) if step < clean_steps else (mixed, next(mixed_batches))
        value = batch_loss(model, table.ids, table.labels, table.lengths, rows, groups, rank, world)
        if flat is not None:
            value = sum_over_ranks(params, value, flat, all_reduce)
        if not math.isfinite(value):
            bar.close()
            raise SFTError(f"the SFT loss is not finite (NaN/inf) at step {step + 1}; lower sft.learning_rate "
                           "or sft.max_grad_norm")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        total_loss += value
        window_loss += value
        window_steps += 1
        bar.update(1)
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.steps:
            last_window = window_loss / window_steps
            bar.set_postfix(loss=f"{last_window:.3f}", refresh=False)
            now = time.monotonic()
            if tracker is not None and lead:
                tracker.log({"sft/loss": last_window, "sft/learning_rate": lr,
                             "sft/grad_norm": grad_norm, "sft/epoch": (step + 1) * cfg.batch_size / len(mixed.ids),
                             "sft/steps_per_second": window_steps / max(now - window_t0, 1e-9)}, step=step + 1)
            window_loss, window_steps, window_t0 = 0.0, 0, now
    bar.close()
    seconds = time.monotonic() - t0
    return {"steps": cfg.steps, "train_loss": total_loss / cfg.steps, "final_loss": last_window,
            "seconds": seconds, "steps_per_second": cfg.steps / seconds, "processes": world}


def sum_over_ranks(params, value: float, flat, all_reduce) -> float:
    """Sum this rank's gradients and loss value with the other ranks' (one flat buffer, one collective); each
    parameter's .grad becomes the sum, and the summed value is returned. A rank that ran no part of the batch
    (a batch of fewer rows than parts) adds zeros."""
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            flat[offset: offset + n].zero_()
        else:
            flat[offset: offset + n].copy_(p.grad.reshape(-1))
        offset += n
    flat[offset] = value
    all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = flat[offset: offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset: offset + n].view_as(p))
        offset += n
    return float(flat[offset])


class QueueTracker:
    """Stands in for the run's tracker in rank 0: its logs go to the parent, which owns the real one."""

    def __init__(self, queue):
        self.queue = queue

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.queue.put(("log", metrics, step))


def train_sft_processes(model, mixed: Tables, clean: Tables | None, clean_steps: int, cfg, seed: int,
                        processes: int, tracker=None, progress: bool = True, desc: str = "",
                        groups: int = LENGTH_GROUPS) -> dict:
    """sft_loop in `processes` spawned processes of one torch thread each (torch.distributed, gloo, rendezvous
    in a file of a temporary folder); the trained weights are loaded back into `model` here.

    Why processes and not threads: the step is the tiny model's small matrix products, which two torch threads
    run only 1.25-1.5x faster than one (benchmarks/sft_step.py); two processes each running half of every batch
    on one thread come closer to 2x. The batch's parts are those of one process (at least `processes`, a
    multiple of it), dealt out by share_parts; the summed gradient is the batch's, added in another order.

    A rank that raises, dies or sees a NaN stops them all: torch's process context ends the others and raises
    here (SFTError for a non-finite loss, RuntimeError with the rank's traceback otherwise), and `model` is left
    as it was. The ranks leave if this process dies (they watch their parent).
    """
    import os
    import queue as queue_mod
    import tempfile

    import torch
    import torch.multiprocessing as mp

    groups = -(-max(groups, processes) // processes) * processes
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    outcome: dict = {}

    def drain(final: bool = False):
        """Hand rank 0's messages on; `final` (the ranks have ended): wait for its outcome, still in the pipe."""
        while True:
            try:
                kind, *rest = messages.get(timeout=5.0) if final and not outcome else messages.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "log" and tracker is not None:
                tracker.log(rest[0], step=rest[1])
            elif kind in ("result", "sft_error"):
                outcome[kind] = rest[0]

    with tempfile.TemporaryDirectory(prefix="rlprm-sft-") as work:
        args = (processes, os.path.join(work, "rendezvous"), os.path.join(work, "weights.pt"), model, mixed, clean,
                clean_steps, cfg, seed, groups, messages, os.getpid(), progress, desc)
        context = mp.start_processes(sft_rank, args=args, nprocs=processes, join=False, start_method="spawn")
        try:
            while not context.join(timeout=0.5, grace_period=5.0):  # the grace: a failing rank finishes its report
                drain()
        except mp.ProcessRaisedException as exc:
            rank, trace = first_failure(context.error_files, exc.error_index, str(exc))
            raise RuntimeError(f"SFT rank {rank} of {processes} failed (every rank stopped):\n{trace}") from None
        except mp.ProcessExitedException as exc:
            raise RuntimeError(f"SFT rank {exc.error_index} of {processes} died (exit code {exc.exit_code}; every "
                               "rank stopped): killed, or out of memory?") from None
        drain(final=True)
        if "sft_error" in outcome:
            raise SFTError(outcome["sft_error"])
        if "result" not in outcome:
            raise RuntimeError("the SFT ranks ended without a result")
        state = torch.load(os.path.join(work, "weights.pt"), weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return outcome["result"]


def sft_rank(rank: int, world: int, rendezvous: str, weights: str, model, mixed: Tables, clean: Tables | None,
             clean_steps: int, cfg, seed: int, groups: int, messages, parent: int, progress: bool, desc: str) -> None:
    """One rank of train_sft_processes (a spawned process's entry point)."""
    import copy
    import os
    import threading
    from datetime import timedelta

    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    # the spawned arguments' tensors arrive in memory shared with the parent and the other ranks: a copy of its own
    model = copy.deepcopy(model)

    def orphaned():  # the parent died (SIGKILL, or the demo's SIGTERM to its lane): nobody waits for this rank
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                             timeout=timedelta(minutes=10))
    torch.manual_seed(seed)
    try:
        result = sft_loop(model, mixed, clean, clean_steps, cfg, seed, groups,
                          tracker=QueueTracker(messages) if rank == 0 else None, progress=progress, desc=desc,
                          rank=rank, world=world, all_reduce=tdist.all_reduce)
    except SFTError as exc:  # every rank sees the same summed loss, so all of them stop here, at the same step
        if rank == 0:
            messages.put(("sft_error", str(exc)))
        return
    # the ranks must end with one set of weights (same batches, summed gradients, same kernels); a rank that
    # drifted would mean a bug, not noise
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    low, high = mine.clone(), mine.clone()
    tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    if not (torch.equal(low, mine) and torch.equal(high, mine)):
        raise RuntimeError("the SFT ranks ended with different weights")
    if rank == 0:
        torch.save(model.state_dict(), weights)
        messages.put(("result", result))
    # only here, not on an error: a failing rank keeps its connections until torch has written its traceback
    # (at exit), so that the others' "connection closed" comes after it and first_failure finds the cause
    tdist.destroy_process_group()


def first_failure(error_files: list, index: int, message: str) -> tuple[int, str]:
    """(rank, traceback) of the rank whose error caused the others': one rank's exception closes its connections,
    and the others then fail in their collective; torch reports whichever it saw first. Prefers a traceback that
    does not pass through torch.distributed, in rank order; else torch's own (`index`, `message`)."""
    import pickle

    traces = []
    for rank, path in enumerate(error_files):
        try:
            with open(path, "rb") as fh:
                traces.append((rank, pickle.load(fh)))
        except (OSError, TypeError, EOFError, pickle.UnpicklingError):
            continue
    for rank, trace in traces:
        if "torch/distributed/" not in trace:  # not a collective that failed because a peer had gone
            return rank, trace
    return index, message
