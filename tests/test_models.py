import pytest
import torch

from rlprm.config import TinyModelConfig
from rlprm.models import build_tiny_causal_lm, num_parameters

TEXT = "93 +3 -4 mod 10\n93 + 3 = 96\n# Answer\n\n2\n"


@pytest.mark.parametrize("tok", ["char_tokenizer", "bpe_tokenizer"])
def test_tiny_model_round_trips_through_from_pretrained(tok, request, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = request.getfixturevalue(tok)
    cfg = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
    model = build_tiny_causal_lm(cfg, tokenizer)
    assert num_parameters(model) < 200_000
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tok2(TEXT, return_tensors="pt")
    assert tok2.decode(ids["input_ids"][0], skip_special_tokens=True) == TEXT
    assert ids["input_ids"][0, 0].item() == tok2.bos_token_id
    with torch.no_grad():
        a = model(**tokenizer(TEXT, return_tensors="pt")).logits
        b = model2(**ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    out = model2.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 5


def test_char_tokenizer_is_one_token_per_character(char_tokenizer):
    ids = char_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    assert char_tokenizer.unk_token_id not in ids


def test_sampling_is_seeded_and_batched(char_tokenizer):
    from rlprm.sampling import sample

    cfg = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
    model = build_tiny_causal_lm(cfg, char_tokenizer)
    prompts = ["1 +2\n", "33 -4 mod 10\n", "7 +1\n"]
    a = sample(model, char_tokenizer, prompts, n=3, max_new_tokens=8, seed=1)
    b = sample(model, char_tokenizer, prompts, n=3, max_new_tokens=8, seed=1)
    assert a.texts == b.texts and len(a.texts) == 3 and all(len(t) == 3 for t in a.texts)
    assert all(len(ids) <= 8 for row in a.token_ids for ids in row)


def test_disable_dropout_turns_off_lora_and_attention_dropout_and_keeps_the_config_when_asked(char_tokenizer):
    from peft import LoraConfig, get_peft_model

    from rlprm.models import disable_dropout

    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    model = build_tiny_causal_lm(cfg, char_tokenizer)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = char_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
        disable_dropout(model, config=False)
        assert torch.equal(model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert model.config.attention_dropout == 0.3  # the export keeps the model's own settings
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0


def test_float32_masters_keep_small_adamw_steps_that_bf16_weights_round_away(char_tokenizer):
    """10 AdamW steps at 1e-5 on a tiny model's ~0.02 weights: held in bf16 only some 15% of them move; as
    float32 masters (the bf16 recipe's) every weight moves, as in a float32 run."""
    from rlprm.models import float32_masters

    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    ids = char_tokenizer(TEXT, return_tensors="pt")["input_ids"]

    def moved(prepare) -> float:
        model = build_tiny_causal_lm(cfg, char_tokenizer, seed=0).to(torch.bfloat16)
        start = [p.detach().float().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(prepare(model), lr=1e-5)
        for _ in range(10):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return sum(int((p.float() != s).sum()) for p, s in zip(model.parameters(), start)) / num_parameters(model)

    plain = moved(lambda m: list(m.parameters()))
    masters = moved(float32_masters)
    assert plain < 0.5 and masters > 0.95
