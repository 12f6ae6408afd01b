"""The real tokenizers of tests/real_tokenizers.py agree with the packaged tokenizers and with published facts.

Each HF folder must encode real text exactly as the tokenizer file it was built from does (tiktoken over the
Qwen / Llama 3 ranks, sentencepiece over Mistral's model), and carry the ids the public checkpoints' files and
cards state. Skips with a reason when a package of the `dev` extra or ../shared/data is absent.
"""

from __future__ import annotations

import json

import pytest

from tests import real_tokenizers as rt

from .conftest import shared_file

EDGE_TEXTS = [
    "  leading spaces", "trailing spaces  ", "tab\there", "\n\n\nthree newlines", " \n \n mixed",
    "e\u0301te\u0301 (decomposed) and \u00e9t\u00e9", "∞ ≤ ≥ ° × ÷ √ π", "日本語のテキスト", "emoji 🙂🙂 done",
    "$\\frac{1}{2} \\cdot \\sqrt{3}$", "12345678901234567890", "Step 1: x ки\nStep 2: y ки",
]


def _texts(n_items: int = 400) -> list[str]:
    """Problems, whole solutions ("\\n\\n"-joined) and single steps from ProcessBench (MATH and GSM8K)."""
    texts = list(EDGE_TEXTS)
    for name in ("processbench/math.json", "processbench/gsm8k.json"):
        items = json.loads(shared_file(name).read_text())[:n_items]
        for item in items:
            texts += [item["problem"], "\n\n".join(item["steps"])] + item["steps"][:2]
    return texts


@pytest.fixture(scope="module")
def texts():
    return _texts()


def _load(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family,build", [("qwen", rt.qwen2_tokenizer_dir), ("llama3", rt.llama3_tokenizer_dir)])
def test_byte_level_tokenizers_equal_tiktoken_on_real_text(family, build, texts):
    tok, ref = _load(build()), rt.reference_encoder(family)
    bad = [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != ref(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first: {bad[0][:120]!r}"


def test_mistral_tokenizer_equals_sentencepiece_except_runs_of_spaces(texts):
    """transformers' conversion of a sentencepiece model (what AutoTokenizer gives for Math-Shepherd's folder)
    encodes like sentencepiece itself, except where two or more '▁' meet (two spaces, or a leading space after
    the '▁' prefix): there the HF BPE merges '▁▁' first where sentencepiece keeps '▁' + '▁Word'. That divergence is transformers' and is what the card's code gets;
    it is pinned here so that a change in either shows up."""
    tok, ref = _load(rt.mistral_tokenizer_dir()), rt.reference_encoder("mistral")
    same = [t for t in texts if "  " not in " " + t]
    bad = [t for t in same if tok(t, add_special_tokens=False)["input_ids"] != ref(t)]
    assert len(same) > 500 and not bad, bad[:1]
    assert tok.convert_ids_to_tokens(tok("a.  Each", add_special_tokens=False)["input_ids"]) == ["▁a", ".", "▁▁", "Each"]
    assert ref("a.  Each") != tok("a.  Each", add_special_tokens=False)["input_ids"]


def test_qwen_ids_and_settings():
    tok = _load(rt.qwen2_tokenizer_dir())
    assert type(tok).__name__ == "Qwen2Tokenizer"  # the public tokenizer_config's class, as AutoTokenizer loads it
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in rt.QWEN25_ADDED}
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_start|>"] == 151644 and ids["<|im_end|>"] == 151645
    assert ids["<|file_sep|>"] == 151664 and len(tok) == 151665 <= rt.QWEN_MODEL_VOCAB
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.encode("Hello world") == [9707, 1879]  # no BOS added
    # the original template: a default system prompt, and turns closed by <|im_end|>\n
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "<extra_0>" not in tok.get_vocab()  # only the Math-PRM tokenizer has it


def test_qwen_math_prm_has_extra_0_at_its_id():
    tok = _load(rt.qwen_math_prm_tokenizer_dir())
    assert tok.encode("<extra_0>") == [rt.QWEN_PRM_STEP_ID] == [151651]  # the card: tokenizer.encode("<extra_0>")[0]
    assert tok.encode("a<extra_0>b") == [64, 151651, 65]  # one token, never split, even glued to text
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_mistral_ids_match_math_shepherd_card():
    """peiyi9979/math-shepherd-mistral-7b-prm card: `tokenizer.encode("+ -")[1:]` is [648, 387] and
    `tokenizer.encode("ки")[-1]` is 12902; the tokenizer adds BOS <s> = 1."""
    tok = _load(rt.mistral_tokenizer_dir())
    assert tok.encode("+ -") == [1, 648, 387]
    assert tok.encode("ки")[-1] == 12902 and tok.encode("ки") == [1, 12902]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 32000)
    # sentencepiece's leading '▁' on every encoding: a "\n"-started piece encoded alone gets one (finding 7)
    assert tok.convert_ids_to_tokens(tok("\nStep", add_special_tokens=False)["input_ids"])[:2] == ["▁", "<0x0A>"]


def test_llama3_ids_and_template():
    tok = _load(rt.llama3_tokenizer_dir())
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                     "<|eot_id|>", "<|finetune_right_pad_id|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                   "<|eot_id|>": 128009, "<|finetune_right_pad_id|>": 128004}
    assert len(tok) == 128256 and tok.encode("Hello world") == [128000, 9906, 1917]
    assert tok.encode("+")[-1] == 10 and tok.encode("-")[-1] == 12  # RLHFlow: tokenizer.encode('+')[-1]
    text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "+"}],
                                   tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n+<|eot_id|>")


def test_cached_folder_is_reused():
    first = rt.qwen2_tokenizer_dir()
    assert rt.qwen2_tokenizer_dir() == first and (first / "tokenizer.json").is_file()
