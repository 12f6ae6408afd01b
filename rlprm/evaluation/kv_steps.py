"""Next steps of a step-level search from a decoding loop that keeps each partial solution's KV cache between rounds.

HF `generate` recomputes the whole prefix (prompt + partial solution) of every row at each search round, and runs
every row of its batch until the slowest one stops. This loop, used by `search.HFStepGenerator`, instead:

- keeps, for every step it wrote, the keys and values of its row (`CachedRow`): the next round extends that
  partial solution from them, feeding only the step's last token (prefix reuse across rounds, the idea of vLLM's
  automatic prefix caching and SGLang's RadixAttention, here keyed by the partial solution's text);
- lets a row leave the batch once its step has ended (separator, EOS; with the others that ended, once a quarter
  of the batch has), so the rows still writing do not carry finished ones to the cap, and no second call is
  needed for the stragglers (no quorum cut); the cache appends into spare room instead of being concatenated
  anew at every token;
- samples with the exponential race (argmax of p / E, E ~ Exp(1) i.i.d.; the same distribution as drawing from
  p), drawing the noise for every row of the call at each position, so which rows are still in the batch does
  not change any row's draw.

Greedy steps are `generate`'s (tests/test_kv_steps.py); sampled ones are drawn from the same distribution with
other random numbers, so a seeded search picks other beams than through `generate`. A kept row goes on from the
ids it sampled, not from its text re-encoded: the same for a character tokenizer; for a BPE, the ids the model
wrote (a step cut inside a merged token is not kept, and is encoded again from its text).

Memory: the kept rows of the generator's last two calls, plus the batch's cache with room to grow to twice its
length, plus the noise (rows x vocabulary floats per token: 0.3 GB for 512 rows of a 150k vocabulary, freed at
once).

The cache pieces (the growing layer, `plain_layers`, `CacheUnsupported`) are rlprm/decoding.py's, shared with plain
sampling. Only plain growing caches are handled (`transformers.DynamicCache` of `DynamicLayer`s: every decoder-only model
without a sliding or linear-attention layer); `prefill` raises `CacheUnsupported` otherwise and the caller falls
back to `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlprm.decoding import CacheUnsupported, cache_kwarg, cache_of, growing_layer_class, plain_layers


@dataclass
class KVBlock:
    """Keys and values of some rows, each layer's as a (keys, values) pair of [rows, heads, width, dim] tensors; a
    row's `length` valid positions end at its `CachedRow.end` (left padding before)."""

    layers: list
    width: int


@dataclass
class CachedRow:
    """A context ready to be extended: its keys and values (row `index` of `block`), how many tokens they hold, and
    its last token, not yet fed (its logits give the first new token)."""

    block: KVBlock
    index: int
    length: int
    pending: int
    end: int | None = None
    """Where its valid positions end in the block (None: at the block's width); whatever follows is not its own."""


def prefill(model, tokenizer, contexts: Sequence[str]) -> list[CachedRow]:
    """Encode `contexts` (left padded, as `generate` would) and run all but the last token of each."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    enc = tokenizer(list(contexts), return_tensors="pt", padding=True).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = ids.shape[1] - 1
    lengths = mask[:, :-1].sum(-1).tolist()
    pending = ids[:, -1].tolist()
    if width == 0:
        return [CachedRow(KVBlock([], 0), j, 0, p) for j, p in enumerate(pending)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                    use_cache=True)
    block = KVBlock(plain_layers(cache_of(out)), width)
    return [CachedRow(block, j, n, p) for j, (n, p) in enumerate(zip(lengths, pending))]


def stack(rows: Sequence[CachedRow], repeat: int, device):
    """One batch from rows of any blocks, each repeated `repeat` times in a row: (per-layer (keys, values), attention
    mask [rows, width], lengths, pending tokens). Rows are right-aligned at the longest length; the columns before a
    row's own are zeroed (whatever a padded prefill left there must not reach a softmax weight of 0 as NaN)."""
    import torch

    width = max(r.length for r in rows)
    groups: dict[tuple[int, int], tuple[KVBlock, int, list[int], list[int]]] = {}
    for dst, r in enumerate(rows):
        end = r.block.width if r.end is None else r.end
        group = groups.setdefault((id(r.block), end), (r.block, end, [], []))
        group[2].append(dst)
        group[3].append(r.index)
    lengths = torch.tensor([r.length for r in rows], device=device)
    mask = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]
    ref = next((r.block for r in rows if r.block.width), None) if width else None
    layers = []
    for li in range(len(ref.layers) if ref is not None else 0):
        pair = []
        for part in range(2):
            sample = ref.layers[li][part]
            out = sample.new_zeros(len(rows), sample.shape[1], width, sample.shape[3])
            for block, end, dst, src in groups.values():
                first = max(0, end - width)
                if end > first:
                    data = block.layers[li][part][torch.tensor(src, device=device), :, first:end]
                    out[torch.tensor(dst, device=device), :, width - (end - first):] = data
            out = out.masked_fill(~mask[:, None, :, None], 0)
            pair.append(out.repeat_interleave(repeat, dim=0) if repeat > 1 else out)
        layers.append(tuple(pair))
    pending = torch.tensor([r.pending for r in rows], device=device)
    if repeat > 1:
        mask, lengths, pending = (x.repeat_interleave(repeat, dim=0) for x in (mask, lengths, pending))
    return layers, mask.long(), lengths, pending


@dataclass
class Decoded:
    """What `decode` wrote: per row its new token ids (the one that ended its step included), and the row as a
    `CachedRow` ready to be extended (every token but the last in its keys and values)."""

    ids: list[list[int]]
    rows: list[CachedRow]


def sample_tokens(logits, temperature: float, greedy: bool, noise):
    """The next token of each row: argmax (greedy), else the exponential race argmax(softmax(logits / T) / noise) with
    `noise` ~ Exp(1) per row and token, which draws from softmax(logits / T)."""
    import torch

    if greedy:
        return logits.argmax(-1)
    return (torch.softmax(logits / temperature, dim=-1) / noise).argmax(-1)


def decode(model, rows: Sequence[CachedRow], n: int, temperature: float, greedy: bool, max_new_tokens: int,
           stopped, compact_at: float = 0.25) -> Decoded:
    """`n` continuations of each row, one token per forward pass, up to `max_new_tokens`: `stopped(tokens)` (one new
    token per row of the call, in order; -1 for rows already out) returns which rows have ended their step. A row
    that has ended is kept (its keys and values as they were then) and leaves the batch once `compact_at` of the
    batch has ended (0: at once), or all have: copying the batch's cache at every row's end would cost more than
    carrying a few ended rows. When they leave changes nothing a row draws."""
    import torch
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    layers, mask, lengths, pending = stack(rows, n, device)
    total = len(rows) * n
    if not layers:
        raise CacheUnsupported("no context has a token before its last one to keep")
    cache = DynamicCache()
    grow = growing_layer_class()
    cache.layers = [grow(k, v) for k, v in layers]
    key = cache_kwarg(model)
    batch = torch.arange(total, device=device)  # the call's row of each batch row
    ids: list[list[int]] = [[] for _ in range(total)]
    out_rows: list[CachedRow | None] = [None] * total
    ended: list[tuple[int, int, int]] = []  # (batch row, cache width then, its last token): not yet out of the batch
    live = [True] * total
    for step in range(max_new_tokens):
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        with torch.no_grad():
            out = model(input_ids=pending[:, None], attention_mask=mask, position_ids=lengths[:, None],
                        use_cache=True, **{key: cache})
        logits = out.logits[:, -1, :].float()
        lengths = lengths + 1
        # every row of the call draws its noise, in the batch or not: a row's draw does not depend on who is left
        noise = None if greedy else torch.empty(total, logits.shape[-1], device=device).exponential_()[batch]
        pending = sample_tokens(logits, temperature, greedy, noise)
        fed = [-1] * total
        for i, (a, t) in enumerate(zip(batch.tolist(), pending.tolist())):
            if live[a]:
                fed[a] = t
                ids[a].append(t)
        done = stopped(fed)
        last = step == max_new_tokens - 1
        for i, a in enumerate(batch.tolist()):
            if live[a] and (last or done[a]):
                live[a] = False
                ended.append((i, mask.shape[1], fed[a]))
        if ended and (len(ended) > compact_at * len(batch) or len(ended) == len(batch) or last):
            batch, mask, lengths, pending = _compact(cache, ended, batch, mask, lengths, pending, out_rows)
            ended = []
            if len(batch) == 0:
                break
    return Decoded(ids, out_rows)


def _compact(cache, ended, batch, mask, lengths, pending, out_rows):
    """Ended rows leave the batch as `CachedRow`s (one block for them all); the others stay, without the columns that
    are padding for all of them."""
    import torch

    device = batch.device
    idx = torch.tensor([i for i, _, _ in ended], device=device)
    block = KVBlock([(layer.keys[idx], layer.values[idx]) for layer in cache.layers], mask.shape[1])
    ends = set()
    for j, (i, end, token) in enumerate(ended):
        ends.add(i)
        out_rows[int(batch[i])] = CachedRow(block, j, int(lengths[i]) - (mask.shape[1] - end), token, end)
    staying = [i for i in range(len(batch)) if i not in ends]
    if not staying:
        return batch[:0], mask[:0], lengths[:0], pending[:0]
    keep = torch.tensor(staying, device=device)
    mask, lengths, pending, batch = mask[keep], lengths[keep], pending[keep], batch[keep]
    trim = int((mask.shape[1] - lengths).min())
    for layer in cache.layers:
        layer.reset_to(layer.keys[keep, :, trim:], layer.values[keep, :, trim:])
    return batch, mask[:, trim:], lengths, pending


__all__ = ["CacheUnsupported", "CachedRow", "Decoded", "KVBlock", "decode", "growing_layer_class", "plain_layers",
           "prefill", "sample_tokens", "stack"]
