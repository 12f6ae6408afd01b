"""Reward models that score with their own language model (`rm.scorer: lm`).

Why this exists. A classification head at a step's last token has to learn,
from one bit per step, to compare what was written with what should have been
written. On the arithmetic task a 4-layer model fine-tuned that way stalls at
step AUROC 0.76-0.80 within CPU budgets (docs/design.md section 8), whatever the
body. Yet the same body, trained as a language model, writes the arithmetic
right 99% of the time when decoding greedily. So here the reward model stays
a causal LM and is trained on the LABELS to be one that writes only correct
steps; a step's score reads that LM's token log-probabilities:

    P(step k correct) = sigmoid(w_min * min_t log p(x_t) + w_mean * mean_t log p(x_t) + b)

over the tokens t of step k (its separator included: a step that stops early
puts an unlikely separator where a digit belonged). An ORM reads one span,
the whole solution, and answers "is the final answer right".

Training uses both halves of the labels (`lm_loss`):
- the language-model loss on the tokens of positively labelled spans (PRM:
  steps labelled correct; ORM: solutions whose answer is right), so the LM
  becomes the distribution of correct steps (resp. of right-answer solutions);
- binary cross-entropy of the step (solution) logit above against the label,
  back-propagated through the LM, so the tokens of wrong steps are pushed down
  too and the three head weights are fitted.

This is not the generator's confidence in disguise: the generator writes the
task's last-digit shortcut (`93 + 3 = 6`) as a habit, with the confidence of
any habit, so its own token probabilities do not flag it; an LM trained on
process labels gives it almost no probability, while one trained on outcome
labels (the ORM) learns it as a way to the right answer. The PRM and the ORM
differ only in their labels. The generator's own confidence is a separate,
named baseline (`confidence` / `likelihood` selectors, `reward.source:
confidence`), never an input.

Scoring is one forward pass per solution: a causal LM's log-probability at a
token sees only the prefix, so the step scores equal scoring every prefix on
its own (tested).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rlprm.steps import EncodedSolution

DEFAULT_HEAD = (1.0, 0.0, 2.0)
"""Initial (w_min, w_mean, b): P = sigmoid(min log-prob + 2), so a step whose every token has p >= 0.9 starts near 0.87."""


# --------------------------------------------------------------------------- pure functions


def target_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Log-probability of each token given its prefix.

    logits: (B, T, V) of a causal LM over input_ids (B, T). Returns (B, T) where [:, t] is
    log p(input_ids[:, t] | input_ids[:, :t]) and [:, 0] is 0 (the first token has no prediction).
    """
    from rlprm.logprobs import token_logprobs

    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:])[0]  # float32 a chunk of rows at a time
    return F.pad(lp, (1, 0))


def scored_spans(enc: EncodedSolution, kind: str) -> list[tuple[int, int]]:
    """Token spans [start, end] (inclusive) that get one score each.

    PRM: one per step, from the token after the previous step's end (the prompt's end for the first)
    to the step's last token (its separator). ORM: one span, the whole response.
    """
    if not enc.step_ends:
        return []
    if kind == "orm":
        return [(enc.prompt_len, enc.step_ends[-1])]
    spans, start = [], enc.prompt_len
    for end in enc.step_ends:
        spans.append((start, end))
        start = end + 1
    return spans


def span_features(token_lp: Tensor, spans: Sequence[Sequence[tuple[int, int]]]) -> list[Tensor]:
    """Per solution, a (K, 2) tensor of [min, mean] token log-probability over each of its K spans.

    token_lp: (B, T) from `target_logprobs`; spans[i]: solution i's inclusive (start, end) spans.
    Differentiable (min passes its gradient to the least likely token).
    """
    out = []
    for i, row in enumerate(spans):
        if not row:
            out.append(token_lp.new_zeros((0, 2)))
            continue
        feats = [torch.stack([token_lp[i, s:e + 1].min(), token_lp[i, s:e + 1].mean()]) for s, e in row]
        out.append(torch.stack(feats))
    return out


def head_logits(features: Tensor, head: Tensor) -> Tensor:
    """features (K, 2) [min, mean], head (3,) [w_min, w_mean, b] -> (K,) logits."""
    return features @ head[:2] + head[2]


def lm_loss(token_lp: Tensor, spans: Sequence[Sequence[tuple[int, int]]], labels: Sequence[Sequence[int | None]],
            head: Tensor, lm_coef: float) -> tuple[Tensor, dict]:
    """The training loss of an LM-scored reward model on one batch.

    token_lp: (B, T); spans[i] and labels[i] align (a label per span: 1 correct, 0 wrong, None
    unlabelled). Loss = BCE(head logits of labelled spans, labels) + lm_coef * mean negative
    log-likelihood of the tokens of spans labelled 1. Returns (loss, {"bce", "lm_nll"}).
    """
    feats = span_features(token_lp, spans)
    logits, targets, positive = [], [], []
    for i, (f, row_spans, row_labels) in enumerate(zip(feats, spans, labels)):
        for k, ((s, e), y) in enumerate(zip(row_spans, row_labels)):
            if y is None:
                continue
            logits.append(head_logits(f[k:k + 1], head)[0])
            targets.append(float(y))
            if y == 1:
                positive.append(token_lp[i, s:e + 1])
    if not logits:
        zero = token_lp.sum() * 0.0
        return zero, {"bce": 0.0, "lm_nll": 0.0}
    bce = F.binary_cross_entropy_with_logits(torch.stack(logits), torch.tensor(targets, device=token_lp.device))
    nll = -torch.cat(positive).mean() if positive else token_lp.sum() * 0.0
    return bce + lm_coef * nll, {"bce": float(bce.detach()), "lm_nll": float(nll.detach())}


# --------------------------------------------------------------------------- batching


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, attention_mask), each (B, T_max)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


LENGTH_GROUPS = 4
"""A training batch's forward pass runs in this many slices of similar length, each padded only to its own longest
(`batch_token_logprobs`; the idea of rlprm/experiments/sft.py's LENGTH_GROUPS). A random batch of the generator's
arithmetic samples is about 30% padding when padded as one; in four length-sorted slices a step took 0.76-0.82 of
the CPU seconds of one pass (batch 64, 1 thread, alternating A/B in one process: benchmarks/rm_step.py). The loss
is the same function of the same tokens: only the order in which the gradient's terms are added changes."""


def batch_token_logprobs(model, sequences: Sequence[Sequence[int]], pad_token_id: int, device=None,
                         groups: int = LENGTH_GROUPS) -> Tensor:
    """(B, T_max) `target_logprobs` of right-padded sequences, in their order, computed in `groups` forward passes
    over length-sorted slices (positions past a sequence's end read padding: no span reaches them). Right padding never reaches a real token
    through a causal LM, so each real token's log-probability is the one a single padded pass gives."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    width = max(len(s) for s in sequences)
    parts = [order[j * len(order) // groups:(j + 1) * len(order) // groups] for j in range(groups)]
    rows = []
    for part in (p for p in parts if p):
        ids, mask = pad_batch([sequences[i] for i in part], pad_token_id, device)
        lp = target_logprobs(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)
        rows.append(F.pad(lp, (0, width - lp.shape[1])))
    where = torch.empty(len(order), dtype=torch.long)
    where[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(rows)[where.to(rows[0].device)]


def score_encoded(model, head: Sequence[float], encoded: Sequence[EncodedSolution], kind: str,
                  pad_token_id: int) -> list[list[float]]:
    """Probabilities per span of each encoded solution, in one forward pass over the batch."""
    device = next(model.parameters()).device
    ids, mask = pad_batch([e.input_ids for e in encoded], pad_token_id, device)
    with torch.inference_mode():
        lp = target_logprobs(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)
    head_t = torch.tensor(list(head), dtype=torch.float32, device=device)
    feats = span_features(lp, [scored_spans(e, kind) for e in encoded])
    return [torch.sigmoid(head_logits(f, head_t)).tolist() if len(f) else [] for f in feats]


# --------------------------------------------------------------------------- training


def span_labels(enc: EncodedSolution, labels: Sequence[int | None], kind: str, answer_correct: bool | None,
                correct_classes: Sequence[int] = (1,)):
    """The 1/0/None labels aligned with `scored_spans(enc, kind)`: a step is 1 when its class is one of
    `correct_classes` (the convention's: PRM800K's neutral counts as not wrong in a 3-class PRM), or
    [answer_correct] for an ORM."""
    if kind == "orm":
        return [None if answer_correct is None else int(bool(answer_correct))]
    return [None if y is None else int(y in correct_classes) for y in labels]


def train_lm_scorer(model, tokenizer, records, convention, *, steps: int, batch_size: int, learning_rate: float,
                    head_learning_rate: float, lm_coef: float, weight_decay: float, warmup_ratio: float,
                    max_grad_norm: float, max_length: int, seed: int, log=None, logging_steps: int = 10,
                    progress: bool = True) -> dict:
    """Train `model` (a causal LM) in place on labelled solutions for exactly `steps` optimizer steps.

    Batches are drawn with a seeded generator (same recipe + seed = same batches on any machine; the same model
    needs the pinned CPU kernels and run.threads too: docs/reproducibility.md).
    Records longer than max_length are dropped (counted). Returns {"head": [w_min, w_mean, b],
    "steps", "examples", "dropped_too_long", "train_loss", "train_seconds"}; the head goes into
    the convention (`convention.lm_head`) by the caller.
    """
    from tqdm.auto import tqdm

    from rlprm.steps import encode_batch

    kind = convention.kind
    encoded = encode_batch(tokenizer, [convention.prompt(r.problem) for r in records], [r.steps for r in records],
                           convention.step_separator)
    examples = []
    dropped = 0
    for r, e in zip(records, encoded):
        if not e.step_ends:
            continue
        if len(e.input_ids) > max_length:
            dropped += 1
            continue
        labels = span_labels(e, r.labels, kind, r.answer_correct, convention.correct_classes)
        if all(y is None for y in labels):
            continue
        examples.append((e, labels))
    if not examples:
        raise ValueError("no labelled training examples for the LM scorer")
    device = next(model.parameters()).device
    head = torch.nn.Parameter(torch.tensor(DEFAULT_HEAD, dtype=torch.float32, device=device))
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": learning_rate,
         "weight_decay": weight_decay},
        {"params": [head], "lr": head_learning_rate, "weight_decay": 0.0},
    ])
    base = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, int(round(warmup_ratio * steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.monotonic()
    losses = []
    bar = tqdm(total=steps, desc=f"training {kind.upper()} (LM scorer)", unit="step", disable=not progress)
    for step in range(1, steps + 1):
        factor = step / warmup if step <= warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * factor
        pick = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        batch = [examples[i] for i in pick]
        token_lp = batch_token_logprobs(model, [e.input_ids for e, _ in batch], tokenizer.pad_token_id, device)
        loss, parts = lm_loss(token_lp, [scored_spans(e, kind) for e, _ in batch], [y for _, y in batch], head,
                              lm_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % logging_steps == 0 or step == steps:
            bar.set_postfix(loss=f"{loss.item():.3f}", bce=f"{parts['bce']:.3f}", refresh=False)
            if log is not None:
                # the head is a trained parameter: read it detached (float() on it warned at every log step)
                w_min, w_mean, b = (float(x) for x in head.detach())
                log({"train/loss": float(loss.detach()), "train/bce": parts["bce"], "train/lm_nll": parts["lm_nll"],
                     "train/learning_rate": optimizer.param_groups[0]["lr"],
                     "train/head_w_min": w_min, "train/head_w_mean": w_mean, "train/head_b": b}, step)
    bar.close()
    model.eval()
    return {"head": [float(x) for x in head.detach().cpu()], "steps": steps, "examples": len(examples),
            "dropped_too_long": dropped, "train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "train_seconds": round(time.monotonic() - t0, 1)}
