"""A decoding loop over a model's own KV cache: plain temperature sampling (`sample_continuations`), and the cache
pieces step-level search builds on (rlprm/evaluation/kv_steps.py).

HF `generate` concatenates every layer's cache anew at each token (`DynamicLayer.update`: torch.cat) and runs
every row of its batch until the last one has stopped. This loop instead:

- prefills each prompt once and repeats its keys and values for its `n` samples (`generate` runs the prompt `n`
  times);
- appends each token into spare room allocated for the whole call (`growing_layer_class`);
- lets rows that drew EOS leave the batch once a quarter of it has ended (`compact_at`; copying the cache at every
  row's end would cost more than carrying a few ended rows), dropping the columns that are padding for all rows
  left.

It samples exactly as rlprm's `generate` calls do (`sampling.generation_kwargs`): the next token is drawn from
softmax(logits / T) by `torch.multinomial` on the float32 logits of the last position (argmax when greedy), with
the global torch RNG, nothing else applied. Greedy tokens are `generate`'s (tests/test_decoding.py); sampled ones
come from the same distribution with other random numbers (rows leave the batch at other times, so fewer draws).

Only plain growing caches are handled (`transformers.DynamicCache` of `DynamicLayer`s: every decoder-only model
without a sliding or linear-attention layer); otherwise `CacheUnsupported` is raised after the prefill and the
caller falls back to `generate`.
"""

from __future__ import annotations


class CacheUnsupported(RuntimeError):
    """The model's cache is not one this loop can slice and stack (the caller uses `generate` instead)."""


def cache_of(output):
    """The cache a forward pass returned (`cache` since transformers 5.x renamed it, `past_key_values` before)."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def hf_model(model):
    """The transformers model inside `model` (a peft wrapper's base model; `model` itself otherwise)."""
    hf = model
    while hasattr(hf, "get_base_model") and hf.get_base_model() is not hf:
        hf = hf.get_base_model()
    return hf


def cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by (`cache`, or `past_key_values` in earlier transformers)."""
    import inspect

    # peft's forward takes **kwargs: ask the transformers model it wraps
    return "cache" if "cache" in inspect.signature(type(hf_model(model)).forward).parameters else "past_key_values"


def last_logits_kwargs(model) -> dict:
    """`logits_to_keep=1` where the model's forward takes it: a prefill needs only the last position's logits (all
    of them would be prompt x vocabulary floats per row)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(hf_model(model)).forward).parameters \
        else {}


def plain_layers(cache) -> list:
    """(keys, values) per layer of a `DynamicCache` whose layers all simply grow; CacheUnsupported otherwise."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache) or not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise CacheUnsupported(f"a {type(cache).__name__} cannot be sliced and stacked per row")
    return [(layer.keys, layer.values) for layer in cache.layers]


def growing_layer_class():
    """A `DynamicLayer` that appends into spare room (doubling it when full) instead of concatenating the whole
    cache at every token, as the plain one does."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, keys, values, room: int = 0):
            super().__init__()
            self.reset_to(keys, values, room)

        def reset_to(self, keys, values, room: int = 0):
            """Hold exactly `keys` and `values`, with room for `room` positions in all (0: twice as many as now)."""
            self.is_initialized, self.device = True, keys.device
            self.used = keys.shape[-2]
            room = max(room, self.used + 1) if room else max(16, 2 * self.used)
            # uninitialised: a position is written before `keys` / `values` reach it
            self.key_room = keys.new_empty(*keys.shape[:-2], room, keys.shape[-1])
            self.value_room = values.new_empty(*values.shape[:-2], room, values.shape[-1])
            self.key_room[..., :self.used, :] = keys
            self.value_room[..., :self.used, :] = values
            self.keys, self.values = self.key_room[..., :self.used, :], self.value_room[..., :self.used, :]

        def update(self, key_states, value_states, *args, **kwargs):
            need = self.used + key_states.shape[-2]
            if need > self.key_room.shape[-2]:
                self.reset_to(self.keys, self.values)
            self.key_room[..., self.used:need, :] = key_states
            self.value_room[..., self.used:need, :] = value_states
            self.used = need
            self.keys, self.values = self.key_room[..., :need, :], self.value_room[..., :need, :]
            return self.keys, self.values

    return GrowingLayer


def next_tokens(logits, temperature: float, greedy: bool):
    """One token per row: argmax (greedy), else a draw from softmax(logits / T) (`generate`'s sampling step)."""
    import torch

    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1).squeeze(1)


def sample_continuations(model, input_ids, attention_mask, n: int, temperature: float, max_new_tokens: int,
                         eos_token_id: int | None, greedy: bool = False, compact_at: float = 0.25,
                         logprobs: list | None = None) -> list[list[int]]:
    """`n` continuations of each left-padded prompt (prompt-major), up to `max_new_tokens` tokens each; a row ends
    at EOS, which is kept as its last token. CacheUnsupported (after the prefill, having drawn nothing) where the
    model's cache is not a plain growing one.

    logprobs: a list that, when given, receives one list per continuation of log p(token) under the raw logits
    (temperature 1, whatever `temperature` drew it), one value per token returned: the model's own belief,
    what a teacher-forced pass over the same tokens gives (evaluate.response_logprobs), read off the logits the
    loop computes anyway (tests/test_decoding.py compares the two)."""
    import torch
    from transformers.cache_utils import DynamicCache

    total = input_ids.shape[0] * n
    ids: list[list[int]] = [[] for _ in range(total)]
    # handed to the caller only once the loop can serve the model: after CacheUnsupported `logprobs` stays empty
    lps: list[list[float]] | None = [[] for _ in range(total)] if logprobs is not None else None
    if max_new_tokens <= 0 or total == 0:
        if lps is not None:
            logprobs.extend(lps)
        return ids
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    **last_logits_kwargs(model))
    layers = plain_layers(cache_of(out))
    if lps is not None:
        logprobs.extend(lps)
    logits = out.logits[:, -1, :].float()
    del out
    room = input_ids.shape[1] + max_new_tokens
    grow = growing_layer_class()
    cache = DynamicCache()
    cache.layers = [grow(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0), room) for k, v in layers]
    del layers
    logits = logits.repeat_interleave(n, dim=0)
    mask = attention_mask.long().repeat_interleave(n, dim=0)
    lengths = mask.sum(-1)  # each row's real tokens: the position id of the next one
    state = _Batch(list(range(total)), mask, lengths)
    key = cache_kwarg(model)
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, temperature, greedy)
        taken = None
        if lps is not None:
            taken = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(1).tolist()
        state.take(tokens.tolist(), ids, eos_token_id, taken, lps)
        if step == max_new_tokens - 1 or not state.rows_live():
            break
        tokens = state.compact(cache, tokens, room, compact_at)
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(state.rows), 1)], dim=1)
        with torch.no_grad():
            out = model(input_ids=tokens[:, None], attention_mask=state.mask, position_ids=state.lengths[:, None],
                        use_cache=True, **{key: cache})
        logits = out.logits[:, -1, :].float()
        state.lengths = state.lengths + 1
    return ids


class _Batch:
    """The rows still in the decoding batch: which sample each is (`rows`), whether it has ended (`ended`; an ended
    row stays until the batch is compacted), their attention mask and real lengths."""

    def __init__(self, rows: list[int], mask, lengths):
        self.rows, self.mask, self.lengths = rows, mask, lengths
        self.ended = [False] * len(rows)

    def take(self, tokens: list[int], ids: list[list[int]], eos: int | None, values: list[float] | None = None,
             per_sample: list[list[float]] | None = None) -> None:
        """Append each live row's token to its sample (and its value to `per_sample`, where given); EOS ends the
        row."""
        for i, (a, t) in enumerate(zip(self.rows, tokens)):
            if not self.ended[i]:
                ids[a].append(t)
                if per_sample is not None:
                    per_sample[a].append(values[i])
                self.ended[i] = t == eos

    def rows_live(self) -> int:
        return self.ended.count(False)

    def compact(self, cache, tokens, room: int, compact_at: float):
        """Drop the ended rows once more than `compact_at` of the batch has ended (with the columns that are then
        padding for every row left); the tokens to feed next, for the rows that stay."""
        import torch

        done = self.ended.count(True)
        if not done or done <= compact_at * len(self.rows):
            return tokens
        staying = [i for i, e in enumerate(self.ended) if not e]
        keep = torch.tensor(staying, device=tokens.device)
        self.rows = [self.rows[i] for i in staying]
        self.ended = [False] * len(staying)
        self.mask, self.lengths = self.mask[keep], self.lengths[keep]
        trim = int((self.mask.shape[1] - self.lengths).min())
        self.mask = self.mask[:, trim:]
        for layer in cache.layers:
            layer.reset_to(layer.keys[keep, :, trim:], layer.values[keep, :, trim:], room - trim)
        return tokens[keep]


__all__ = ["CacheUnsupported", "cache_kwarg", "cache_of", "growing_layer_class", "hf_model", "last_logits_kwargs",
           "next_tokens", "plain_layers", "sample_continuations"]
