"""Plain sampling through the KV-cache loop (rlprm/decoding.py, `sampling.sample`, `HFSampler`): greedy tokens are
HF `generate`'s on three architectures, sampled tokens follow softmax(logits / T), EOS ends a row (kept for RL,
stripped for pools), padding is never handed out, `max_new_tokens` caps every row, seeded runs repeat, and a model
the loop cannot serve goes through `generate` with the same seed stream."""

from __future__ import annotations

import pytest

PROMPTS = ["12 + 3\n", "4 - 1\n1 + 1 = 2\n", "max(3, 4)\n", "7 mod 2 = 1\n", "3 * 4\n"]


@pytest.fixture(scope="module")
def fitted(char_tokenizer):
    """A tiny Llama fitted 60 steps on 8 problems: peaked next-token distributions and EOS at uneven lengths."""
    from rlprm.config import ArithmeticConfig
    from rlprm.data.problems import from_arithmetic
    from rlprm.tasks.arithmetic import make_problems
    from rlprm.testing.tiny import fit_generator

    problems = from_arithmetic(make_problems(ArithmeticConfig(), 8, seed=99))
    return fit_generator(char_tokenizer, [p.arith for p in problems], 60), problems


def _model(arch: str, tok, fitted):
    import torch
    import transformers

    special = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if arch == "llama":
        return fitted[0]
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **special)).eval()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                                                **special)).eval()


def _until_eos(seq: list[int], eos: int) -> list[int]:
    return seq[: seq.index(eos) + 1] if eos in seq else seq


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_tokens_are_generates(arch, char_tokenizer, fitted):
    """Left-padded prompts of different lengths, 2 rows each, rows leaving the batch at EOS (at once, or once most
    have ended): the tokens `generate` writes greedily for the same batch, up to and including EOS."""
    import torch

    from rlprm.decoding import sample_continuations

    tok = char_tokenizer
    model = _model(arch, tok, fitted)
    prompts = [p.prompt for p in fitted[1][:4]] + PROMPTS if arch == "llama" else PROMPTS
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    ref = [_until_eos(row, tok.eos_token_id) for row in ref[:, enc["input_ids"].shape[1]:].tolist() for _ in "ab"]
    for compact_at in (0.0, 0.25, 1.0):
        got = sample_continuations(model, enc["input_ids"], enc["attention_mask"], 2, 1.0, 40, tok.eos_token_id,
                                   greedy=True, compact_at=compact_at)
        assert got == ref
    if arch == "llama":  # the fitted model ends rows at EOS at several lengths: rows did leave the batch early
        ended = {len(r) for r in ref if r[-1] == tok.eos_token_id}
        assert len(ended) >= 2 and max(ended) < 40


def test_sampled_tokens_follow_the_tempered_softmax(char_tokenizer, fitted):
    """4,000 samples of 2 tokens of one prompt at T = 0.7: the first token's frequencies are softmax(logits / 0.7)
    of the prompt, and the second's, after the commonest first token, those of the prompt and that token (the
    step through the cache), within 0.03; T = 1 would be told apart."""
    import torch

    from rlprm.decoding import sample_continuations

    tok = char_tokenizer
    model = fitted[0]
    prompt = fitted[1][0].prompt
    enc = tok([prompt], return_tensors="pt")
    torch.manual_seed(0)
    got = sample_continuations(model, enc["input_ids"], enc["attention_mask"], 4000, 0.7, 2, None)
    first = torch.tensor([g[0] for g in got])
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].float()
    p1 = torch.softmax(logits / 0.7, -1)
    freq1 = torch.bincount(first, minlength=len(p1)).float() / len(first)
    assert torch.allclose(freq1, p1, atol=0.03)
    assert (torch.softmax(logits, -1) - p1).abs().max() > 0.1  # the temperature matters here
    top = int(torch.bincount(first).argmax())
    second = torch.tensor([g[1] for g in got if g[0] == top])
    assert len(second) > 1000
    ids = torch.cat([enc["input_ids"], torch.tensor([[top]])], dim=1)
    with torch.no_grad():
        p2 = torch.softmax(model(input_ids=ids).logits[0, -1].float() / 0.7, -1)
    freq2 = torch.bincount(second, minlength=len(p2)).float() / len(second)
    assert torch.allclose(freq2, p2, atol=0.03)


def test_eos_ends_a_row_max_new_tokens_caps_it_and_padding_is_never_handed_out(char_tokenizer, fitted):
    """RL's ids keep the EOS as the last token; pools' ids have no EOS and no padding, even from a model that
    likes to write the padding token; a row without EOS has exactly `max_new_tokens` tokens."""
    import torch

    from rlprm.rollout import HFSampler
    from rlprm.sampling import sample

    tok = char_tokenizer
    model = fitted[0]
    prompts = [p.prompt for p in fitted[1]]
    torch.manual_seed(1)
    g = HFSampler(model, tok).generate(prompts, 4, 1.0, 30)
    assert g.prompt_ids.shape == g.prompt_mask.shape and g.prompt_ids.shape[0] == len(prompts)
    assert bool((g.prompt_mask[:, -1] == 1).all())  # left padded
    ends = [c[-1] == tok.eos_token_id for c in g.completions]
    assert len(g.completions) == 4 * len(prompts) and any(ends) and not all(ends)
    for c, ended in zip(g.completions, ends):
        assert tok.eos_token_id not in c[:-1] and (ended or len(c) == 30)

    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, out: out + 3.0 * torch.nn.functional.one_hot(
        torch.tensor(tok.pad_token_id), out.shape[-1]).to(out.dtype))
    try:
        torch.manual_seed(2)
        raw = HFSampler(model, tok).generate(prompts, 2, 1.0, 30).completions
        pools = sample(model, tok, prompts, n=2, max_new_tokens=30, seed=0).token_ids
    finally:
        hook.remove()
    assert any(tok.pad_token_id in c for c in raw)  # the model did write padding tokens
    flat = [c for row in pools for c in row]
    assert all(tok.pad_token_id not in c and tok.eos_token_id not in c and len(c) <= 30 for c in flat)


def test_seeded_sampling_repeats_bitwise_and_seeds_differ(char_tokenizer, fitted):
    from rlprm.sampling import sample

    model, problems = fitted
    prompts = [p.prompt for p in problems]
    a = sample(model, char_tokenizer, prompts, n=3, max_new_tokens=30, batch_size=6, seed=5)
    b = sample(model, char_tokenizer, prompts, n=3, max_new_tokens=30, batch_size=6, seed=5)
    c = sample(model, char_tokenizer, prompts, n=3, max_new_tokens=30, batch_size=6, seed=6)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids != c.token_ids
    # each batch (2 prompts here) draws from its own seed of the stream: the first batches' samples do not depend
    # on what the later ones hold
    head = sample(model, char_tokenizer, prompts[:4], n=3, max_new_tokens=30, batch_size=6, seed=5)
    assert head.token_ids == a.token_ids[:4]


def test_a_model_the_loop_cannot_serve_samples_through_generate(char_tokenizer, fitted, monkeypatch):
    """Where the cache cannot be sliced (`CacheUnsupported`, found before any draw), `sample` and `HFSampler` use
    `generate`, with the same seed stream: the samples `via_generate` gives."""
    import torch

    import rlprm.decoding
    from rlprm.rollout import HFSampler
    from rlprm.sampling import sample

    model, problems = fitted
    prompts = [p.prompt for p in problems[:4]]
    kw = dict(n=3, max_new_tokens=20, batch_size=6, seed=2)
    direct = sample(model, char_tokenizer, prompts, **kw, via_generate=True)
    loop = sample(model, char_tokenizer, prompts, **kw)
    assert loop.token_ids != direct.token_ids  # the loop draws other random numbers

    def unsupported(cache):
        raise rlprm.decoding.CacheUnsupported("test")

    monkeypatch.setattr(rlprm.decoding, "plain_layers", unsupported)
    assert sample(model, char_tokenizer, prompts, **kw).token_ids == direct.token_ids
    fell = sample(model, char_tokenizer, prompts, **kw, logprobs=True)  # asked for, but `generate` gives none
    assert fell.token_ids == direct.token_ids and fell.token_logprobs is None
    torch.manual_seed(3)
    fell_back = HFSampler(model, char_tokenizer).generate(prompts, 2, 1.0, 20).completions
    torch.manual_seed(3)
    assert fell_back == HFSampler(model, char_tokenizer, via_generate=True).generate(prompts, 2, 1.0, 20).completions


def test_a_peft_policy_samples_through_the_loop_as_generate_does(char_tokenizer, fitted):
    """A LoRA policy (its adapters non-zero): greedy tokens through the loop are the wrapped model's `generate`'s."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from rlprm.decoding import sample_continuations

    tok = char_tokenizer
    model = get_peft_model(copy.deepcopy(fitted[0]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.eval()
    tok.padding_side = "left"
    enc = tok([p.prompt for p in fitted[1][:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=30, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    ref = [_until_eos(r, tok.eos_token_id) for r in ref[:, enc["input_ids"].shape[1]:].tolist()]
    got = sample_continuations(model, enc["input_ids"], enc["attention_mask"], 1, 1.0, 30, tok.eos_token_id,
                               greedy=True)
    assert got == ref


def test_the_loops_logprobs_are_a_teacher_forced_passes_and_pools_use_them(char_tokenizer, fitted, monkeypatch):
    """At T = 0.7, 4 per prompt, rows leaving at EOS: the log-probs at T = 1 the loop reads off its own logits equal
    `response_logprobs`' teacher-forced pass over the same tokens (EOS included, float rounding apart); a pool's
    confidence and likelihood come from them without that pass, and equal the pass's; through `generate`
    (no log-probs) the pool falls back to the pass."""
    import numpy as np

    import rlprm.evaluation.evaluate as evaluate
    from rlprm.sampling import sample

    model, problems = fitted
    tok = char_tokenizer
    prompts = [p.prompt for p in problems]
    got = sample(model, tok, prompts, n=4, temperature=0.7, max_new_tokens=30, batch_size=12, seed=4, logprobs=True)
    assert got.token_ids == sample(model, tok, prompts, n=4, temperature=0.7, max_new_tokens=30, batch_size=12,
                                   seed=4).token_ids  # asking for log-probs draws nothing more
    eos = tok.eos_token_id
    ids = [c + ([eos] if len(c) < 30 else []) for row in got.token_ids for c in row]
    assert any(len(c) < 30 for row in got.token_ids for c in row)
    teacher = evaluate.response_logprobs(model, tok, [p for p in prompts for _ in range(4)], ids)
    read = [np.asarray(lp) for row in got.token_logprobs for lp in row]
    assert [len(x) for x in read] == [len(x) for x in teacher]
    assert max(float(np.abs(a - b).max()) for a, b in zip(read, teacher) if len(a)) < 1e-4
    assert min(float(a.min()) for a in read if len(a)) < -0.5  # not all near 0: the check can fail

    real, passes = evaluate.response_logprobs, []
    monkeypatch.setattr(evaluate, "response_logprobs", lambda *a, **k: passes.append(1) or real(*a, **k))
    pool = evaluate.sample_pool(model, tok, problems, 4, temperature=0.7, max_new_tokens=30, seed=4, progress=False)
    assert not passes  # the loop's values: no teacher-forced pass
    flat = real(model, tok, [p for p in prompts for _ in range(4)], [c for row in pool.response_ids for c in row])
    for key, of in (("confidence", np.min), ("likelihood", np.sum)):
        want = [[float(of(x)) for x in flat[i * 4:(i + 1) * 4]] for i in range(len(prompts))]
        assert np.allclose(pool.sample_scores[key], want, atol=1e-4), key
    from rlprm.rollout import HFSampler

    evaluate.sample_pool(model, tok, problems, 4, temperature=0.7, max_new_tokens=30, seed=4, progress=False,
                         sampler=HFSampler(model, tok, via_generate=True))
    assert passes  # `generate` gives no log-probs: the teacher-forced pass ran
