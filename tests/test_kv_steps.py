"""Search's step generation from kept KV caches (rlprm/evaluation/kv_steps.py, `HFStepGenerator.cached_steps`): the
same steps as HF `generate` where both are deterministic, ended rows leaving the batch change nothing, the sampler
draws from the model's distribution, and the incremental stop check agrees with decoding whole rows."""

from __future__ import annotations

import pytest

from rlprm.evaluation.search import SeparatorStop, step_end


@pytest.fixture(scope="module")
def fitted(char_tokenizer):
    """A tiny generator fitted 40 steps on 8 problems (about a second): step-shaped lines of uneven length,
    some answer steps, so rows of one batch end their steps at different tokens."""
    from rlprm.config import ArithmeticConfig
    from rlprm.data.problems import from_arithmetic
    from rlprm.tasks.arithmetic import make_problems
    from rlprm.testing.tiny import fit_generator

    problems = from_arithmetic(make_problems(ArithmeticConfig(), 8, seed=99))
    return fit_generator(char_tokenizer, [p.arith for p in problems], 40), problems


def _decoded_stop(tokenizer, sep: str, rows: list[list[int]]) -> list[int | None]:
    """The reference: at each token, decode the whole row so far and look for the step's end."""
    eos = tokenizer.eos_token_id
    first: list[int | None] = []
    for ids in rows:
        hit = None
        for t in range(len(ids)):
            if ids[t] == eos or step_end(tokenizer.decode(ids[:t + 1], skip_special_tokens=True), sep) is not None:
                hit = t
                break
        first.append(hit)
    return first


def _incremental_stop(tokenizer, sep: str, rows: list[list[int]]) -> list[int | None]:
    stop = SeparatorStop(tokenizer, sep, len(rows))
    first: list[int | None] = [None] * len(rows)
    for t in range(max(len(r) for r in rows)):
        done = stop.feed([r[t] if t < len(r) else -1 for r in rows])
        for i, d in enumerate(done):
            if d and first[i] is None:
                first[i] = t
    return first


@pytest.mark.parametrize("sep", ["\n", "\n\n", " mod\n"])
def test_incremental_stop_agrees_with_decoding_whole_rows(char_tokenizer, bpe_tokenizer, sep):
    """Hand-made rows: the separator at the first token, split across tokens, merged into a longer BPE token,
    inside an answer step, after EOS, never; both checks stop each row at the same token (or neither does)."""
    texts = [sep + "3 + 4 = 7" + sep + "x", "3 + 4 = 7" + sep + "8", "# Answer" + sep + "7" + sep, "12 + 30 = 42",
             "5" + sep, sep * 3 + "1" + sep]
    for tok in (char_tokenizer, bpe_tokenizer):
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows.append(tok("1 + 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 5, 6])
        expected = _decoded_stop(tok, sep, rows)
        assert _incremental_stop(tok, sep, rows) == expected
        assert expected[-1] == len(rows[-1]) - 3 and expected[3] is None and expected[2] is None


def test_kept_cache_gives_generates_greedy_steps_round_after_round(fitted, char_tokenizer):
    """Greedy steps from the kept keys and values (every round after the first finds its contexts kept) are the
    steps HF `generate` writes from the re-encoded text, for 6 rounds of 8 problems."""
    from rlprm.evaluation.search import HFStepGenerator

    model, problems = fitted
    plain = HFStepGenerator(model, char_tokenizer, "\n", reuse_cache=False)
    cached = HFStepGenerator(model, char_tokenizer, "\n")
    contexts = [p.prompt for p in problems]
    kept_rounds = 0
    for _ in range(6):
        kept_rounds += all(c in cached.kept[0] for c in contexts)
        a = plain.next_steps(contexts, 1, 1.0, 40, greedy=True)
        b = cached.next_steps(contexts, 1, 1.0, 40, greedy=True)
        assert a == b
        contexts = [c + row[0].text for c, row in zip(contexts, b) if not row[0].finished]
        if not contexts:
            break
    assert kept_rounds >= 3 and cached.reuse_cache
    assert len({d[0].tokens for d in a}) > 1 or kept_rounds >= 3  # steps of uneven length somewhere


def test_when_ended_rows_leave_the_batch_changes_nothing(fitted, char_tokenizer):
    """Sampled steps (16 per context) with ended rows leaving at once, at a quarter of the batch, or only when all
    have ended: the same tokens for every row, and the same greedy next step from each kept row."""
    import torch

    from rlprm.evaluation.kv_steps import decode, prefill

    model, problems = fitted
    contexts = [p.prompt for p in problems[:4]]
    outs = []
    for compact_at in (0.0, 0.25, 1.0):
        torch.manual_seed(7)
        rows = prefill(model, char_tokenizer, contexts)
        stop = SeparatorStop(char_tokenizer, "\n", len(contexts) * 16)
        out = decode(model, rows, 16, 1.0, False, 30, stop.feed, compact_at=compact_at)
        stop2 = SeparatorStop(char_tokenizer, "\n", len(out.rows))
        again = decode(model, out.rows, 1, 1.0, True, 12, stop2.feed, compact_at=compact_at)
        outs.append((out.ids, again.ids))
    assert outs[0] == outs[1] == outs[2]
    lengths = {len(ids) for ids in outs[0][0]}
    assert len(lengths) > 3  # rows ended at many different tokens: rows did leave at different times


def test_exponential_race_draws_from_the_softmax():
    """argmax(p / E), E ~ Exp(1): each token's frequency over 20,000 draws is its probability (within 0.015)."""
    import torch

    from rlprm.evaluation.kv_steps import sample_tokens

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    draws = sample_tokens(logits, 0.7, False, torch.empty_like(logits).exponential_())
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.7, dim=-1), atol=0.015)
    assert sample_tokens(logits[:2], 0.7, True, None).tolist() == [0, 0]


def test_search_with_kept_caches_finishes_every_problem(fitted, char_tokenizer):
    """A whole beam search through the kept caches: n finished solutions per problem, tokens counted, and the
    generator's memory emptied after it (the weights may change before the next search, as in RL)."""
    from rlprm.evaluation.search import CheckerScorer, HFStepGenerator, SearchSettings, search

    model, problems = fitted
    gen = HFStepGenerator(model, char_tokenizer, "\n")
    res = search(problems[:4], gen, CheckerScorer("\n"), SearchSettings("beam", n=2, width=2, max_steps=6,
                                                                      max_step_tokens=30, max_new_tokens=80))
    assert [len(f) for f in res.finished] == [2] * 4 and all(t > 0 for t in res.tokens)
    assert gen.reuse_cache and gen.kept == [{}, {}]


def test_a_cache_that_cannot_be_sliced_falls_back_to_generate(char_tokenizer):
    from rlprm.evaluation.kv_steps import CacheUnsupported, plain_layers

    with pytest.raises(CacheUnsupported):
        plain_layers(object())


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_go_on_from_kept_rows_as_generate_does(char_tokenizer, arch):
    """Hub generators are rarely Llama: a tiny random Qwen2 (grouped KV heads) and GPT-2 (learned absolute
    positions). Contexts of different lengths (left padding) write 3-5 greedy tokens, leave the batch at different
    tokens, then go on 6 more from their kept rows: the same tokens as `generate` writes greedily from each context
    alone."""
    import torch
    import transformers

    from rlprm.evaluation.kv_steps import decode, prefill

    tok = char_tokenizer
    special = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **special))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                                                     **special))
    model.eval()
    contexts = ["12 + 3\n", "4 - 1\n1 + 1 = 2\n", "max(3, 4)\n", "7 mod 2 = 1\n"]
    counts = [0] * len(contexts)

    def stopped(fed):
        for i, t in enumerate(fed):
            counts[i] += t != -1
        return [c >= 3 + i % 3 for i, c in enumerate(counts)]

    first = decode(model, prefill(model, tok, contexts), 1, 1.0, True, 10, stopped)
    assert [len(ids) for ids in first.ids] == [3, 4, 5, 3]
    then = decode(model, first.rows, 1, 1.0, True, 6, lambda fed: [False] * len(fed))
    went_on = 0
    for context, a, b in zip(contexts, first.ids, then.ids):
        enc = tok(context, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, do_sample=False, max_new_tokens=len(a) + 6, pad_token_id=tok.pad_token_id)
        ref = ref[0, enc["input_ids"].shape[1]:].tolist()  # up to EOS, where `generate` stops a lone row
        assert (a + b)[:len(ref)] == ref
        went_on += len(ref) > len(a)
    assert went_on >= 2  # most rows compared past their kept point
