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
warm-up then cosine decay. Each batch is padded to its own longest sequence.
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


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based): linear warm-up, then cosine to `min_ratio` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # max(1, ...): the scheduler also asks for the step after the last one, where warm-up may fill the budget
    done = (step - warmup_steps + 1) / max(1, total_steps - warmup_steps)
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


def batch_loss(model, ids, labels, lengths, rows, groups: int):
    """Mean cross-entropy over the labelled tokens of batch `rows`, backpropagated; returns its value.

    The batch (random, as drawn) is sorted by length and cut into `groups` parts, each padded only to its
    own longest sequence: the examples run 42-98 tokens, and padding a whole batch to its longest computes
    about 35% more positions than there are tokens (4 parts: 9%). The loss is summed over all parts and
    divided by the batch's token count, so the gradient is the whole batch's, only summed in another order.
    """
    import torch.nn.functional as F

    rows = rows[lengths[rows].argsort(stable=True)]  # stable: ties keep their drawn order on any machine
    n_tokens = int((labels[rows, 1:] != IGNORE).sum())
    total = 0.0
    for part in rows.chunk(groups):
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


def train_sft(model, encoded: Encoded, cfg, pad_id: int, seed: int, device: str = "cpu", tracker=None,
              progress: bool = True, desc: str = "training generator", groups: int = LENGTH_GROUPS,
              clean: Encoded | None = None) -> dict:
    """Fine-tune `model` in place for `cfg.steps` optimizer steps (`cfg` is the recipe's SFTConfig).

    With `clean` (the reference solutions of the same problems) and `cfg.clean_steps`, the first clean_steps
    batches come from `clean`, the rest from `encoded`, under one optimizer and one schedule: the arithmetic is
    learned from consistent examples first, the habits (shortcut, slips) after.

    Returns steps, mean training loss, the last logging window's loss, and the wall seconds it took (reported,
    never used to stop). Every `cfg.logging_steps` steps, `sft/loss`, `sft/learning_rate`, `sft/grad_norm`,
    `sft/epoch` and `sft/steps_per_second` go to the tracker.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    ids, labels, lengths = padded_table(encoded, pad_id)
    ids, labels = ids.to(device), labels.to(device)
    clean_steps = min(getattr(cfg, "clean_steps", 0), cfg.steps) if clean is not None else 0
    if clean_steps:
        c_ids, c_labels, c_lengths = padded_table(clean, pad_id)
        c_ids, c_labels = c_ids.to(device), c_labels.to(device)
        clean_batches = batch_order(len(c_ids), cfg.batch_size, clean_steps, seed + 1)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))

    bar = tqdm(total=cfg.steps, desc=desc, unit="step", disable=not progress)
    total_loss, window_loss, window_steps, window_t0 = 0.0, 0.0, 0, time.monotonic()
    last_window = float("nan")
    t0 = time.monotonic()
    mixed_batches = batch_order(len(ids), cfg.batch_size, cfg.steps - clean_steps, seed)
    for step in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        if step < clean_steps:
            value = batch_loss(model, c_ids, c_labels, c_lengths, next(clean_batches), groups)
        else:
            value = batch_loss(model, ids, labels, lengths, next(mixed_batches), groups)
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
            if tracker is not None:
                tracker.log({"sft/loss": last_window, "sft/learning_rate": lr,
                             "sft/grad_norm": grad_norm, "sft/epoch": (step + 1) * cfg.batch_size / len(ids),
                             "sft/steps_per_second": window_steps / max(now - window_t0, 1e-9)}, step=step + 1)
            window_loss, window_steps, window_t0 = 0.0, 0, now
    bar.close()
    model.eval()
    seconds = time.monotonic() - t0
    return {"steps": cfg.steps, "train_loss": total_loss / cfg.steps, "final_loss": last_window,
            "seconds": seconds, "steps_per_second": cfg.steps / seconds}
