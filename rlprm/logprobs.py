"""Token log-probabilities and entropies of a causal LM, a chunk of rows at a time.

PPO, GRPO's reference, the reward models' confidence features and best-of-N's likelihood selector all ask the same
question of a language model: log p(token) (and sometimes the entropy) at each position. This module answers it
without ever holding a float32 (B, T, V) tensor; it sits below everything that asks (it imports only torch), and
`rlprm.rl.core` re-exports it beside the RL math.
"""

from __future__ import annotations

import torch
from torch import Tensor


LOGIT_CHUNK_ELEMENTS = 1 << 24
"""Logits (rows x vocabulary) made at once by `token_logprobs`: 64 MB in float32, some 110 rows at V = 151,936."""


def _chunk_logprobs(features: Tensor, tokens: Tensor, head, temperature: float, entropy: bool):
    """(n,) log p(token) and (n,) entropy (or None) of one chunk: features (n, H) or (n, V); tokens (n,) long."""
    z = (features if head is None else head(features)).float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp, None
    # a -inf logit (a banned token) would give 0 * -inf = NaN; the most negative float gives 0
    z = z.clamp(min=torch.finfo(torch.float32).min)
    return logp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)


def token_logprobs(features: Tensor, tokens: Tensor, head=None, temperature: float = 1.0, entropy: bool = False,
                   chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor | None]:
    """log p(token) under softmax(head(features) / temperature), and optionally the entropy, a few rows at a time.

    features: (..., F), the logits themselves (head None, F = V) or the last hidden states (F = H) of the
    positions that predict `tokens` (...) long; head: a callable (n, H) -> (n, V), e.g. the model's output
    layer. Returns (logprobs, entropy or None), both (...) float32.

    At a 151,936-token vocabulary one float32 (B, T, V) copy of 32 x 1024 positions is 20 GB, and softmax,
    log_softmax and the entropy each make one: here the rows are taken `chunk_elements // V` at a time and
    each chunk's logits are reduced at once to its token's logit minus the logsumexp (and the entropy,
    logsumexp - sum p z), so that only one chunk's float32 logits exist. With gradients on, each chunk runs
    under activation checkpointing: its logits are recomputed in the backward pass instead of being kept, and
    the gradients equal those of the one-piece computation. (The idea of fusing the output layer with the
    loss row block by row block is that of "fused linear cross-entropy" kernels, e.g. Liger-Kernel and
    Wijmans et al. 2024, "Cut your losses in large-vocabulary language models".)

    Rollouts are sampled from softmax(logits / T), so the log-probs of the PPO ratio and of the KL must divide
    by the same T: with raw logits at any T != 1 the "old" log-probs are not those of the policy that sampled,
    and every update is silently off-policy. temperature = 1 gives the model's own (raw) distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = tokens.shape
    flat = features.reshape(-1, features.shape[-1])
    targets = tokens.reshape(-1).long().to(flat.device)
    if flat.shape[0] != targets.shape[0]:
        raise ValueError(f"{flat.shape[0]} feature rows for {targets.shape[0]} tokens")
    vocab = flat.shape[-1] if head is None else _out_features(head, flat)
    step = max(1, chunk_elements // max(1, vocab))
    grad = torch.is_grad_enabled() and (flat.requires_grad or _has_trainable(head))
    logps, ents = [], []
    for a in range(0, flat.shape[0], step):
        piece, tok = flat[a:a + step], targets[a:a + step]
        if grad:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(_chunk_logprobs, piece, tok, head, temperature, entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(piece, tok, head, temperature, entropy)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = flat.new_zeros(0, dtype=torch.float32).reshape(shape)
        return empty, (empty.clone() if entropy else None)
    logp = torch.cat(logps).reshape(shape)
    return logp, (torch.cat(ents).reshape(shape) if entropy else None)


def _out_features(head, flat: Tensor) -> int:
    """The vocabulary size a head produces (its `out_features`, else one row through it)."""
    size = getattr(head, "out_features", None)
    if size is None:
        with torch.no_grad():
            size = head(flat[:1]).shape[-1]
    return int(size)


def _has_trainable(head) -> bool:
    params = getattr(head, "parameters", None)
    return params is not None and any(p.requires_grad for p in params())


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(token) under softmax(logits / temperature), in float32: `token_logprobs` on the logits themselves.

    logits: (B, T, V); tokens: (B, T) long -> (B, T). Only a chunk of rows is ever converted to float32.
    """
    return token_logprobs(logits, tokens, temperature=temperature)[0]


def entropy_from_logits(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token entropy of the softmax over the vocabulary (`token_logprobs`, chunked, float32).

    logits: (B, T, V); mask: (B, T) or None. Returns (B, T) float32, 0 where
    the mask is unset; `masked_mean(entropy, mask)` gives the batch figure.
    H = logsumexp(z) - sum(softmax(z) * z).
    """
    ent = token_logprobs(logits, torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device),
                         entropy=True)[1]
    if mask is not None:
        ent = torch.where(mask.bool(), ent, torch.zeros_like(ent))
    return ent


__all__ = ["LOGIT_CHUNK_ELEMENTS", "entropy_from_logits", "logprobs_from_logits", "token_logprobs"]
