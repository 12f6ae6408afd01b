import random

import pytest
import torch

from rlprm.checkpoint import export, latest_checkpoint, load_state, save_checkpoint
from rlprm.config import TinyModelConfig
from rlprm.models import build_tiny_causal_lm

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


def test_save_resume_and_export(tmp_path, char_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_causal_lm(TINY, char_tokenizer)
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, model, char_tokenizer, {"step": 10}, extra_models={"value": model})
    save_checkpoint(tmp_path, 2, model, char_tokenizer, {"step": 20})
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "epoch-0002" and (tmp_path / "checkpoints" / "epoch-0001" / "extra" / "value").exists()
    state = load_state(ckpt)
    assert state["step"] == 20 and state["epoch"] == 2
    (tmp_path / "summary.json").write_text('{"answer_accuracy": 0.5}')
    out = export(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("5 +3\n", return_tensors="pt")
    assert loaded.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] >= 1
    assert (out / "summary.json").exists() and not (tmp_path / "export.tmp").exists()


def test_rng_state_round_trip(tmp_path, char_tokenizer):
    model = build_tiny_causal_lm(TINY, char_tokenizer)
    torch.manual_seed(1)
    random.seed(1)
    save_checkpoint(tmp_path, 1, model, char_tokenizer, {})
    after_save = (random.random(), torch.rand(3).tolist())
    random.seed(99)
    torch.manual_seed(99)
    load_state(latest_checkpoint(tmp_path))
    assert (random.random(), torch.rand(3).tolist()) == after_save


def test_half_written_checkpoint_is_ignored(tmp_path, char_tokenizer):
    model = build_tiny_causal_lm(TINY, char_tokenizer)
    save_checkpoint(tmp_path, 1, model, char_tokenizer, {"step": 1})
    # a crash while writing epoch 2 leaves only its .tmp folder: latest still names epoch 1
    (tmp_path / "checkpoints" / "epoch-0002.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    # a pointer to a folder without state.pt is not trusted
    (tmp_path / "checkpoints" / "latest").write_text("epoch-0002.tmp\n")
    assert latest_checkpoint(tmp_path) is None


def test_export_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export(tmp_path)


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_and_export(tmp_path, char_tokenizer):
    model = build_tiny_causal_lm(TINY, char_tokenizer)
    save_checkpoint(tmp_path, 1, model, char_tokenizer, {"step": 1})
    export(tmp_path)

    class Broken:  # the value model's save dies halfway (disk full, a kill): nothing of epoch 2 may count
        def save_pretrained(self, path):
            path.mkdir(parents=True)
            (path / "config.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, char_tokenizer, {"step": 2}, extra_models={"value": Broken()})
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path).name == "epoch-0001" and load_state(latest_checkpoint(tmp_path))["step"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "latest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "export"]
