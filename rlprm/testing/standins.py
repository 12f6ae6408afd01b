"""Tiny stand-ins of every public PRM family, built in code and saved as the real checkpoints are laid out.

Nothing can be downloaded, so tests, benchmarks and `rlprm bench-prm` smoke runs use these: random weights,
a small byte-level BPE tokenizer with the family's special tokens and chat template, the family's head shape,
label order and weight names. `save_standin(family, folder)` writes one; `load_reward_model(folder, family)`
then loads it exactly as it would load the published checkpoint.

- qwen_prm: Qwen2 config, `QwenProcessRewardModel` (body `model.*`, head `score.0/score.2`), `<extra_0>`,
  Qwen's `<|im_start|>`/`<|im_end|>` template;
- pure_prm: transformers' `Qwen2ForTokenClassification` (2 labels, head `score`), the Qwen tokenizer (no BOS);
- value_head: a Qwen2 causal LM plus `v_head.summary.weight/bias` in its safetensors file;
- implicit: two Qwen2 causal LMs (the PRM and `reference/` beside it);
- math_shepherd: a Llama causal LM whose tokenizer adds BOS and has ` ки`, ` +`, ` -` as single tokens;
- rlhflow: a Llama causal LM with Llama 3.1's header tokens and a template shaped like Llama 3.1's.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2's and Llama 3's pre-tokenisation split (digits one at a time, as Qwen2 does): the reloaded tokenizer
# of a `qwen2` folder is Qwen2Tokenizer, which imposes this split, so the stand-in is trained with it too
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")

QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# shaped like Llama 3.1's: BOS, a system header with dates, contents trimmed, turns closed by <|eot_id|>
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CORPUS = [
    "Start with 12. Add 5 to get 17. Then 17 * 3 = 51, so the answer is 51.",
    "Step 1: Janet has 16 eggs per day. ки\nStep 2: She eats 3, so 16 - 3 = 13. ки",
    "Let x be the number. Then 2x + 3 = 11, so x = 4. The answer is \\boxed{4}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "# Answer\n\n7 + 8 = 15\n15 - 4 = 11\n11 mod 10 = 1",
    "We compute the area: $\\frac{1}{2} \\cdot 6 \\cdot 4 = 12$. +  -  + ки ки ки",
]
FAMILY_SPECIALS = {
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"],
    "mistral": ["<unk>", "<s>", "</s>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|finetune_right_pad_id|>"],
}


def build_tokenizer(kind: str, vocab_size: int = 420, model_max_length: int = 8192):
    """A byte-level BPE with `kind`'s special tokens (qwen | mistral | llama3) and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = FAMILY_SPECIALS[kind]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    if kind == "qwen":  # Qwen2.5: no BOS, pad <|endoftext|>, eos <|im_end|>
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, pad_token="<|endoftext|>",
                                     eos_token="<|im_end|>", additional_special_tokens=specials[1:])
        hf.chat_template = QWEN_TEMPLATE
    elif kind == "mistral":  # Mistral: BOS <s> in front of every encoding (so in front of `question + " " + ...`)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    else:  # Llama 3.1: BOS added to plain encodings too; the template writes its own
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                     bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                     pad_token="<|finetune_right_pad_id|>", additional_special_tokens=specials[2:5])
        hf.chat_template = LLAMA3_TEMPLATE
    return hf


def _qwen_config(tokenizer, **shape):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=shape.get("vocab") or len(tokenizer), hidden_size=shape.get("hidden", 32),
                       intermediate_size=shape.get("hidden", 32) * 2, num_hidden_layers=shape.get("layers", 2),
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)


def _llama_causal_lm(tokenizer, seed: int, **shape):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=shape.get("vocab") or len(tokenizer), hidden_size=shape.get("hidden", 32),
                         intermediate_size=shape.get("hidden", 32) * 2, num_hidden_layers=shape.get("layers", 2),
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _spread(model, std: float = 0.5) -> None:
    """Random heads score everything near 0.5; widen the output layer so that differences show in tests."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        if head is not None and head.weight.shape[0] > 2:
            head.weight.normal_(0, std)


def save_standin(family: str, folder: str | Path, seed: int = 0, tokenizer=None, vocab_size: int | None = None,
                 **shape) -> Path:
    """Write a tiny random checkpoint of `family` to `folder`, laid out like the published one.

    `tokenizer`: a tokenizer (or its folder) to use instead of the small built one, e.g. a real tokenizer built
    from packaged files (tests/real_tokenizers.py); the model's vocabulary is then `vocab_size` (default: the
    tokenizer's length), as a published checkpoint pads its embedding beyond the tokenizer (Qwen2.5: 151,936).
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    given = _given_tokenizer(tokenizer)
    if given is not None and vocab_size is None:
        vocab_size = len(given)
    if vocab_size is not None:
        shape = {**shape, "vocab": vocab_size}

    def tokenizer_for(kind: str):
        return given if given is not None else build_tokenizer(kind)
    if family == "qwen_prm":
        from rlprm.reward.adapters.qwen_arch import QwenProcessRewardModel

        tok = tokenizer_for("qwen")
        config = _qwen_config(tok, **shape)
        config.architectures = ["Qwen2ForProcessRewardModel"]  # the published config's name
        torch.manual_seed(seed)
        model = QwenProcessRewardModel(config)
        with torch.no_grad():
            model.score[2].weight.normal_(0, 1.0)
        model.save_pretrained(folder)
        _set_architectures(folder, ["Qwen2ForProcessRewardModel"])
    elif family == "pure_prm":
        from transformers import Qwen2ForTokenClassification

        tok = tokenizer_for("qwen")
        config = _qwen_config(tok, **shape)
        config.num_labels = 2
        torch.manual_seed(seed)
        model = Qwen2ForTokenClassification(config)
        with torch.no_grad():
            model.score.weight.normal_(0, 1.0)
        model.save_pretrained(folder)
    elif family in ("value_head", "implicit"):
        tok = tokenizer_for("qwen")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_qwen_config(tok, **shape))
        _spread(model)
        model.save_pretrained(folder)
        if family == "value_head":
            _add_value_head(folder, model.config.hidden_size, seed)
        else:
            torch.manual_seed(seed + 1)
            ref = AutoModelForCausalLM.from_config(_qwen_config(tok, **shape))
            _spread(ref)
            ref.save_pretrained(folder / "reference")
            tok.save_pretrained(folder / "reference")
    elif family in ("math_shepherd", "rlhflow"):
        tok = tokenizer_for("mistral" if family == "math_shepherd" else "llama3")
        model = _llama_causal_lm(tok, seed, **shape)
        _spread(model)
        model.save_pretrained(folder)
    else:
        raise ValueError(f"no stand-in for family {family!r}")
    tok.save_pretrained(folder)
    return folder


def _given_tokenizer(tokenizer):
    """None, a tokenizer, or a tokenizer folder -> None or a tokenizer."""
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


def _set_architectures(folder: Path, names: list[str]) -> None:
    import json

    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["architectures"] = names
    path.write_text(json.dumps(data, indent=2) + "\n")


def _add_value_head(folder: Path, hidden: int, seed: int) -> None:
    """Skywork's layout: the causal LM's tensors plus v_head.summary.weight (1 x hidden) and .bias (1)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed + 7)
    tensors["v_head.summary.weight"] = torch.randn(1, hidden, generator=gen) * 0.5
    tensors["v_head.summary.bias"] = torch.randn(1, generator=gen) * 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
