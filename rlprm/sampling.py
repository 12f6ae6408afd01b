"""Batched sampling from a causal LM: left padding, the KV cache, N per prompt.

Used by `prepare` (the generator check), best-of-N pools and RL rollouts, so
every stage samples the same way: pure temperature sampling (top-k and top-p
off, unlike the transformers defaults) from a seeded generator.

The tokens come from rlprm/decoding.py's KV-cache loop (`sample_continuations`: each prompt prefilled once, the
cache appended in place, rows leaving the batch at EOS): 1.4-1.5x fewer CPU seconds than HF `generate` at the
demo's shapes, 256 sequences per batch (benchmarks/sampling_speed.py, docs/results.md). `generate` itself
(`via_generate`) serves models whose cache the loop cannot slice (`CacheUnsupported`). Both draw the next token from softmax(logits / T) with torch's global RNG, seeded per
batch; they differ only in which random numbers a seed gives.

Nothing comes from the checkpoint's own `generation_config` (`generation_kwargs`,
`own_generation_config`): a repetition penalty, min_p, top_k or banned tokens
saved with a model would draw the samples from another distribution than
softmax(logits / T), the one PPO's ratio and KL recompute.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Samples:
    texts: list[list[str]]
    """texts[i][j]: the j-th completion of prompt i, special tokens removed."""
    token_ids: list[list[list[int]]]
    """The generated ids of each completion, padding and EOS removed."""
    token_logprobs: list[list[list[float]]] | None = None
    """With `sample(logprobs=True)` through the KV loop: log p of each generated token under the raw logits
    (temperature 1), the EOS token's last where it was drawn (so one more value than token_ids then). None where
    HF `generate` sampled a batch (it gives no such values) or when not asked."""


def generation_kwargs(temperature: float, max_new_tokens: int, n: int, pad_token_id, eos_token_id) -> dict:
    """Every argument of rlprm's `generate` calls: pure temperature sampling, all else neutral.

    transformers fills each generation setting a call leaves unset from the model's `generation_config` (its
    generation_config.json); the ones that have a neutral value are given it here, and those whose only
    neutral value is "unset" (min_p, banned and suppressed tokens, sequence bias, stop strings, ...) are left
    out of the model's config for the call by `own_generation_config`.
    """
    return dict(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, min_length=0, renormalize_logits=False, remove_invalid_values=False,
        num_beams=1, length_penalty=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )


@contextmanager
def own_generation_config(model):
    """For the block, `model` (a peft wrapper's base model) generates with an empty `generation_config`, so that
    only `generation_kwargs` and transformers' neutral defaults decide how it samples; its own comes back after."""
    from transformers import GenerationConfig

    hf = model
    while hasattr(hf, "get_base_model"):  # peft: the transformers model whose `generate` runs
        inner = hf.get_base_model()
        if inner is hf:
            break
        hf = inner
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def generate_ids(model, enc, n: int, temperature: float, max_new_tokens: int, pad_token_id, eos_token_id,
                 via_generate: bool = False, logprobs: list | None = None) -> list[list[int]]:
    """`n` sampled continuations of each prompt of the left-padded batch `enc` (prompt-major), EOS kept where drawn;
    after it a row may hold padding (`generate`'s rows are padded to the batch's longest). The model must be in
    eval mode. Through the KV loop, or HF `generate` when `via_generate` or when the loop cannot serve the model.
    logprobs: a list that receives the loop's per-token log-probs at T=1 (decoding.sample_continuations); left
    empty when `generate` sampled."""
    import torch

    from rlprm.decoding import CacheUnsupported, sample_continuations

    if not via_generate:
        try:
            return sample_continuations(model, enc["input_ids"], enc["attention_mask"], n, temperature,
                                        max_new_tokens, eos_token_id, logprobs=logprobs)
        except CacheUnsupported:
            pass
    with torch.no_grad(), own_generation_config(model):
        out = model.generate(**enc, **generation_kwargs(temperature, max_new_tokens, n, pad_token_id, eos_token_id))
    return out[:, enc["input_ids"].shape[1]:].tolist()


def sample(
    model,
    tokenizer,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    desc: str = "sampling",
    via_generate: bool = False,
    logprobs: bool = False,
) -> Samples:
    """`n` completions for each prompt, generated `batch_size` sequences at a time (`via_generate`: through HF
    `generate` rather than the KV loop, e.g. to compare the two). `logprobs`: also return each token's log-prob
    at T=1 where the KV loop sampled every batch (Samples.token_logprobs)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    per_batch = max(1, batch_size // n)
    texts: list[list[str]] = []
    ids_out: list[list[list[int]]] = []
    lps_out: list[list[list[float]]] | None = [] if logprobs else None
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bar = tqdm(total=len(prompts) * n, desc=desc, disable=not progress, unit="sample")
    try:
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start:start + per_batch]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            # each batch gets its own seed from one stream: results do not depend on batch boundaries' RNG use
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            lps: list | None = [] if lps_out is not None else None
            new = generate_ids(model, enc, n, temperature, max_new_tokens, pad, eos, via_generate, logprobs=lps)
            if lps is not None and not lps:
                lps_out = None  # `generate` sampled this batch: no log-probs for the call
            for i in range(len(chunk)):
                row_ids, row_texts, row_lps = [], [], []
                for k, seq in enumerate(new[i * n:(i + 1) * n]):
                    cut = seq.index(eos) if eos in seq else len(seq)
                    kept = [j for j in range(cut) if seq[j] != pad]
                    if lps_out is not None:  # the EOS token's log-prob stays, last
                        values = lps[i * n + k]
                        row_lps.append([values[j] for j in kept] + values[cut:cut + 1])
                    seq = [seq[j] for j in kept]
                    row_ids.append(seq)
                    row_texts.append(tokenizer.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False))
                ids_out.append(row_ids)
                texts.append(row_texts)
                if lps_out is not None:
                    lps_out.append(row_lps)
            bar.update(len(chunk) * n)
    finally:
        bar.close()
        model.train(was_training)
    return Samples(texts, ids_out, lps_out)
