"""Models and tokenizers: tiny ones built on the spot, real ones loaded by id or path.

Nothing here downloads anything for the tiny path: the tokenizer is built with
the `tokenizers` library and the model from a transformers config, then both
are saved with `save_pretrained`, so every later stage (and any user) loads
them with the ordinary `AutoTokenizer` / `AutoModelForCausalLM` calls.
"""

from __future__ import annotations

from pathlib import Path

from rlprm.config import LoraConfig, TinyModelConfig

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def _wrap(tok, model_max_length: int):
    """A `tokenizers.Tokenizer` -> a transformers fast tokenizer with our special tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    # BOS in front of every encoding, the way Llama tokenizers do it
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos_token']} $A", special_tokens=[(SPECIAL_TOKENS["bos_token"], bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)


def build_char_tokenizer(chars, model_max_length: int = 256):
    """One token per character of `chars` (plus <pad> <bos> <eos> <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS.values())}
    for ch in sorted(set(chars)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # every character, newline included, is its own pre-token
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok, model_max_length)


def build_bpe_tokenizer(corpus: list[str], vocab_size: int = 256, model_max_length: int = 256):
    """A byte-level BPE trained on `corpus` (GPT-2 style pre-tokenisation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok, model_max_length)


def build_tiny_causal_lm(cfg: TinyModelConfig, tokenizer, seed: int = 0):
    """A small Llama-style causal LM sized for `tokenizer`, randomly initialised."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    # the model and its generation settings must agree with the tokenizer on the special tokens
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.update(**special)
    return model


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is `cuda` but no CUDA device is visible; set run.device: cpu or auto")
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[name]


def load_tokenizer(name_or_path: str | Path, padding_side: str = "left", trust_remote_code: bool = False):
    """Any HF tokenizer by id or path, with a pad token and the given padding side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Any HF causal LM by id or path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    return model.to(device)


def apply_lora(model, cfg: LoraConfig, task_type: str = "CAUSAL_LM", head: str | None = None):
    """Wrap `model` with LoRA adapters when `cfg.enabled`; otherwise return it unchanged.

    `head`: a module trained in full and saved whole, with no adapter on it (a reward model's `score`: peft's
    `all-linear` would otherwise put an adapter there and then fail to train the head in full)."""
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    whole = {} if head is None else {"exclude_modules": [head], "modules_to_save": [head]}
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type=task_type,
        **whole,
    )
    return get_peft_model(model, peft_cfg)


def load_policy(recipe, ckpt: Path | None, device: str):
    """The trained model: the generator (LoRA adapters added when model.lora.enabled), or a checkpoint's."""
    gen, dtype, trc = recipe.model.generator, recipe.model.dtype, recipe.model.trust_remote_code
    if ckpt is not None and (ckpt / "model" / "adapter_config.json").is_file():
        # a LoRA run checkpoints its adapters only: the base is the generator, the adapters come back trainable
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(gen, dtype, device, trc), str(ckpt / "model"),
                                         is_trainable=True).to(device)
    if ckpt is not None:
        # in the dtype it was written in: GRPO's float32 master weights of a bf16 recipe come back unrounded
        return load_causal_lm(ckpt / "model", "auto", device, trc)
    return apply_lora(load_causal_lm(gen, dtype, device, trc), recipe.model.lora)


def load_generator(recipe, ckpt: Path | None, device: str, frozen_copy: bool = False) -> tuple:
    """(tokenizer, policy, frozen copy or None): the generator's tokenizer, padded on the left; the policy
    (`load_policy`); with `frozen_copy` a second copy of the generator, frozen (eval mode, no gradients: the
    reference of a run without LoRA). In this order: LoRA's adapters draw from the seeded RNG."""
    m = recipe.model
    tokenizer = load_tokenizer(m.generator, padding_side="left", trust_remote_code=m.trust_remote_code)
    policy = load_policy(recipe, ckpt, device)
    return tokenizer, policy, load_frozen_generator(recipe, device) if frozen_copy else None


def load_frozen_generator(recipe, device: str):
    """A copy of model.generator in eval mode with no gradients: the frozen start of a run without LoRA."""
    m = recipe.model
    return load_causal_lm(m.generator, m.dtype, device, m.trust_remote_code).eval().requires_grad_(False)


def float32_masters(model) -> list:
    """`model`'s trainable parameters, those held in bf16 or fp16 turned float32 in place; returned for the
    optimizer.

    Plain AdamW over bf16 weights loses most small updates: a step of ~1e-5 on a weight of ~0.02 is below
    half of bf16's spacing there (8 significant bits: 1.2e-4 between 2^-6 and 2^-5) and rounds away; after 10
    steps at 1e-5 only 15% of a bf16 model's weights had moved, against all of them in float32 (measured).
    Kept in float32, the weights are their own master copy (as DeepSpeed's bf16 keeps one, and GRPO's setup
    does); frozen weights (a LoRA base, the reference) stay as loaded. The forward then runs in float32 unless
    the caller autocasts.
    """
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return [p for p in model.parameters() if p.requires_grad]


def disable_dropout(model, config: bool = True):
    """Every dropout of `model` off, in place, so that train() and eval() compute the same function; returns it.

    PPO reads its old log-probs and values in eval() and trains in train(): a dropout anywhere (transformers 5
    gives Llama's and Qwen2's token-classification heads a Dropout(0.1); configs may set attention or hidden
    dropout; peft puts one on each LoRA path) makes the model updated another function than the one whose
    outputs the losses compare against. Covers dropout modules (p = 0), float `*dropout*` attributes that
    attention layers read in train mode, and with `config` the config's float `*dropout*` fields (so that a
    saved copy reloads without them; a policy keeps its own for its export). The same idea as TRL's
    `disable_dropout_in_model`.
    """
    import torch

    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                               torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        cfg = getattr(module, "config", None) if config else None
        if cfg is not None and hasattr(cfg, "to_dict"):
            for name, value in cfg.to_dict().items():
                if "dropout" in name and isinstance(value, float) and hasattr(cfg, name):
                    setattr(cfg, name, 0.0)
    return model


def save_model(model, tokenizer, path: Path) -> None:
    """save_pretrained for both, LoRA merged first, so the folder is a plain HF checkpoint."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def quiet_transformers(report: bool = True):
    """Hides transformers' per-file progress bars and (with `report`) the load report that lists the fresh
    head and the unused LM head, which is expected when a classifier is built on a causal LM."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        old, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        if report:
            hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(old)
            if bars:
                hf_logging.enable_progress_bar()

    return quiet()
