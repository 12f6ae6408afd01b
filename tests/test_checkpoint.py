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


def test_cuda_rng_states_are_saved_and_restored_when_cuda_is_there(tmp_path, char_tokenizer, monkeypatch):
    """A GPU run samples from the device generators: they must travel with the checkpoint (CPU stand-ins here)."""
    import rlprm.checkpoint as ckpt_mod

    devices = {0: torch.ByteTensor([1, 2, 3]), 1: torch.ByteTensor([4, 5, 6])}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [devices[i].clone() for i in sorted(devices)])

    def set_all(states):
        for i, s in enumerate(states):
            devices[i] = s.clone()

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    assert [s.tolist() for s in ckpt_mod.rng_state()["cuda"]] == [[1, 2, 3], [4, 5, 6]]
    save_checkpoint(tmp_path, 1, build_tiny_causal_lm(TINY, char_tokenizer), char_tokenizer, {})
    devices.update({0: torch.ByteTensor([0]), 1: torch.ByteTensor([0])})  # the devices drew on
    load_state(latest_checkpoint(tmp_path))
    assert devices[0].tolist() == [1, 2, 3] and devices[1].tolist() == [4, 5, 6]
    # a resume on a CPU-only machine skips the device states instead of failing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices.update({0: torch.ByteTensor([0]), 1: torch.ByteTensor([0])})
    load_state(latest_checkpoint(tmp_path))
    assert devices[0].tolist() == [0]


def test_every_rank_restores_its_own_stream(tmp_path, char_tokenizer):
    """Rank 0 writes the checkpoint, but rank 1 samples from a stream of its own: it must get that one back."""
    from rlprm.checkpoint import rng_state

    streams = []
    for seed in (10, 11):  # what two ranks' generators stand at when the checkpoint is taken
        torch.manual_seed(seed)
        random.seed(seed)
        streams.append(rng_state())
    expected = []
    for s in streams:
        torch.set_rng_state(s["torch"])
        random.setstate(s["python"])
        expected.append((random.random(), torch.rand(3).tolist()))
    save_checkpoint(tmp_path, 1, build_tiny_causal_lm(TINY, char_tokenizer), char_tokenizer, {}, rank_rng=streams)
    for rank in (1, 0):
        torch.manual_seed(99)
        random.seed(99)
        load_state(latest_checkpoint(tmp_path), rank=rank)
        assert (random.random(), torch.rand(3).tolist()) == expected[rank]
    assert expected[0] != expected[1]
    # a rank the checkpoint has no stream for (more ranks on resume) keeps its own, and says so
    torch.manual_seed(5)
    own = torch.rand(3).tolist()
    torch.manual_seed(5)
    load_state(latest_checkpoint(tmp_path), rank=2)
    assert torch.rand(3).tolist() == own


def test_each_rank_gets_back_its_own_shard_and_a_shard_lost_midway_keeps_the_previous_checkpoint(tmp_path,
                                                                                                  char_tokenizer):
    """ZeRO partitions the optimizer states: each rank's shard is written in the checkpoint's temporary folder and
    renamed in with the weights, or not at all; each rank reads back its own."""
    model = build_tiny_causal_lm(TINY, char_tokenizer)
    shards = [{"exp_avg": torch.full((3,), float(r))} for r in range(2)]
    save_checkpoint(tmp_path, 1, model, char_tokenizer, {"step": 1}, rank_states=iter(shards))
    for rank in (0, 1):
        state = load_state(latest_checkpoint(tmp_path), restore_rng=False, rank=rank)
        assert torch.equal(state["rank_state"]["exp_avg"], shards[rank]["exp_avg"]) and state["ranks_written"] == 2
    assert load_state(latest_checkpoint(tmp_path), restore_rng=False, rank=2)["rank_state"] is None

    def second_rank_dies():  # rank 1's shard never arrives (it died, the link broke)
        yield shards[0]
        raise ConnectionError("rank 1 is gone")

    with pytest.raises(ConnectionError):
        save_checkpoint(tmp_path, 2, model, char_tokenizer, {"step": 2}, rank_states=second_rank_dies())
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    assert not (tmp_path / "checkpoints" / "epoch-0002").exists()
    # a checkpoint written without shards (one process, no DeepSpeed) has none to give
    save_checkpoint(tmp_path, 3, model, char_tokenizer, {"step": 3})
    state = load_state(latest_checkpoint(tmp_path), restore_rng=False)
    assert state["rank_state"] is None and state["ranks_written"] == 0
