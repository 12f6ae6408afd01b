"""Rollouts (rlprm/rollout.py): the vLLM choice refused without vLLM, no vLLM import unless chosen, the weight
refresh's names and values (LoRA merged into copies), the log-prob gap, and PPO / GRPO wired to a stand-in engine.

The real engine runs only where vLLM and a GPU are (`test_real_vllm_engine_*`, skipped here with the reason)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlprm.config import LoraConfig, RecipeError, TinyModelConfig, validate_recipe
from rlprm.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


@pytest.fixture
def vllm_allowed(monkeypatch):
    """Recipe validation as on a machine with vLLM installed (the engine itself is a stand-in in these tests)."""
    import rlprm.config

    monkeypatch.setattr(rlprm.config, "require_vllm", lambda key: None)


class Recorder:
    """Stands in for the model inside a vLLM engine: records what `load_weights` is handed."""

    def __init__(self):
        self.calls: list[list[tuple[str, torch.Tensor]]] = []

    def load_weights(self, weights):
        self.calls.append([(name, t.detach().clone()) for name, t in weights])


class FakeLLM:
    """A `vllm.LLM` stand-in: every completion is `completion` (ids, EOS included; or a function of the prompt's
    ids giving them) with log-prob `logprob` per token;
    the engine model is a `Recorder` at the attribute path vLLM's colocated engine has."""

    def __init__(self, completion, logprob: float = -1.0):
        self.model = Recorder()
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.model))))
        self.completion, self.logprob = completion, logprob
        self.requests: list[tuple[list[int], object]] = []
        self.cache_resets = 0

    def generate(self, prompts, sampling_params, use_tqdm=False):
        out = []
        for prompt, params in zip(prompts, sampling_params):
            self.requests.append((prompt["prompt_token_ids"], params))
            full = self.completion(prompt["prompt_token_ids"]) if callable(self.completion) else self.completion
            ids = full[:params.max_tokens]
            lps = [{t: SimpleNamespace(logprob=self.logprob)} for t in ids]
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(ids), logprobs=lps, finish_reason="stop",
                                                                stop_reason=None) for _ in range(params.n)]))
        return out

    def reset_prefix_cache(self):
        self.cache_resets += 1


# --------------------------------------------------------------------------- the choice


@pytest.mark.parametrize("section", ["rl", "eval"])
def test_choosing_vllm_without_it_fails_at_validation_naming_the_extra(section, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RecipeError, match=r'pip install -e "\.\[vllm\]"') as err:
        validate_recipe({section: {"rollout": "vllm"}}, ROOT)
    assert f"{section}.rollout" in str(err.value)
    assert validate_recipe({section: {"rollout": "hf"}}, ROOT)  # the default choice validates anywhere


def test_importing_the_algorithms_does_not_import_vllm():
    code = ("import sys\n"
            "import rlprm.rl.ppo, rlprm.rl.grpo, rlprm.rl.rejection, rlprm.rl.run, rlprm.evaluation.evaluate, rlprm.rollout\n"
            "from pathlib import Path\n"
            "from rlprm.config import validate_recipe\n"
            "from rlprm.rl.grpo import grpo_args\n"
            "recipe = validate_recipe({'rl': {'algorithm': 'grpo'}}, Path('.'))\n"
            "grpo_args(recipe, Path('/tmp/unused'), seed=0)\n"
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_grpo_args_use_trls_colocated_vllm_only_when_chosen(vllm_allowed, tmp_path):
    from rlprm.rl.grpo import grpo_args

    rl = {"algorithm": "grpo", "samples_per_problem": 2, "prompts_per_iteration": 2, "minibatch_size": 2}
    hf = grpo_args(validate_recipe({"rl": rl}, tmp_path), tmp_path, seed=0)
    vllm = grpo_args(validate_recipe({"rl": {**rl, "rollout": "vllm", "vllm_gpu_memory_utilization": 0.25}}, tmp_path),
                     tmp_path, seed=0)
    assert hf.use_vllm is False
    assert (vllm.use_vllm, vllm.vllm_mode, vllm.vllm_gpu_memory_utilization) == (True, "colocate", 0.25)


# --------------------------------------------------------------------------- pure pieces


def test_logprob_gap_on_hand_computed_tensors():
    from rlprm.rollout import logprob_gap, sampler_logprob_tensor

    nan = float("nan")
    sampler = sampler_logprob_tensor([[-1.0, -2.0, nan], [-0.5]], [3, 1], 3)
    assert torch.isnan(sampler[1, 1:]).all()  # padding is unknown, never 0
    trainer = torch.tensor([[-1.5, -2.0, -3.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # known and masked: (0,0) 0.5, (0,1) 0, (1,0) 0; (0,2) is unknown to the sampler
    assert logprob_gap(sampler, trainer, mask) == pytest.approx(0.5 / 3)
    assert logprob_gap(sampler, trainer, torch.zeros_like(mask)) is None


def test_completion_of_keeps_eos_and_reads_the_sampled_tokens_logprob():
    from rlprm.rollout import completion_of

    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    out = SimpleNamespace(token_ids=[5, 6, 2], logprobs=[{5: lp(-0.1), 9: lp(-3.0)}, {6: lp(-0.2)}, {2: lp(-0.3)}],
                          finish_reason="stop", stop_reason=None)
    assert completion_of(out, eos_token_id=2) == ([5, 6, 2], [-0.1, -0.2, -0.3])
    # an engine that leaves EOS out of the ids: it is put back (the policy must learn to stop), log-prob unknown
    ids, lps = completion_of(SimpleNamespace(token_ids=[5], logprobs=[{5: lp(-0.1)}], finish_reason="stop",
                                             stop_reason=None), eos_token_id=2)
    assert ids == [5, 2] and lps[0] == -0.1 and math.isnan(lps[1])
    # cut at max_tokens: no EOS was written, none is added
    assert completion_of(SimpleNamespace(token_ids=[5], logprobs=None, finish_reason="length", stop_reason=None),
                         eos_token_id=2)[0] == [5]


def _plain_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def test_refresh_hands_the_policys_weights_under_checkpoint_names(char_tokenizer):
    from rlprm.models import build_tiny_causal_lm
    from rlprm.rollout import VLLMSampler

    policy = build_tiny_causal_lm(TINY, char_tokenizer, seed=0)
    llm = FakeLLM([char_tokenizer.eos_token_id])
    VLLMSampler(llm, char_tokenizer, policy).refresh()
    (handed,) = llm.model.calls
    names = [n for n, _ in handed]
    # what a Hugging Face checkpoint of this model holds (vLLM's loader maps those, e.g. q/k/v into qkv_proj)
    assert names == _plain_names(policy)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.embed_tokens.weight" in names
    assert all(torch.equal(t, dict(policy.named_parameters())[n]) for n, t in handed)
    assert llm.cache_resets == 1  # prompt states cached under the old weights are dropped


def test_refresh_of_a_lora_policy_merges_into_copies(char_tokenizer):
    import copy

    from rlprm.models import apply_lora, build_tiny_causal_lm
    from rlprm.rollout import VLLMSampler

    base = build_tiny_causal_lm(TINY, char_tokenizer, seed=0)
    names = _plain_names(base)
    policy = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at 0 (a no-op adapter): give it something to merge
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    live = {n: p.detach().clone() for n, p in policy.named_parameters()}
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    llm = FakeLLM([char_tokenizer.eos_token_id])
    VLLMSampler(llm, char_tokenizer, policy).refresh()
    (handed,) = llm.model.calls
    assert [n for n, _ in handed] == names  # no lora_A/lora_B, no base_layer: the plain model's names
    q = "model.layers.0.self_attn.q_proj.weight"
    merged = dict(handed)
    assert not torch.equal(merged[q], live[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    for n, t in handed:
        assert torch.allclose(t, expected[n], atol=1e-6), n
    # the trained weights are untouched and the adapters not merged into them
    assert all(torch.equal(p, live[n]) for n, p in policy.named_parameters())
    assert not any(getattr(m, "merged", False) for m in policy.modules())


# --------------------------------------------------------------------------- the loops, on a stand-in engine


def _answered(tokenizer) -> list[int]:
    from rlprm.steps import answer_step, render_steps
    from rlprm.tasks.arithmetic import render_step

    text = render_steps([render_step("+", 1, 2, 3), render_step("+", 3, 4, 7), answer_step("7")])
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_ppo_samples_with_the_engine_refreshes_it_and_logs_the_gap(vllm_allowed, generator_dir, char_tokenizer,
                                                                   tmp_path, monkeypatch):
    """rl.rollout vllm: every rollout and the between-epoch best-of-N come from the engine, the engine gets the
    weights after every update (and once at the start), the ratio's log-probs are the policy's own and the gap to
    the engine's is logged."""
    import rlprm.rollout as rollout
    from rlprm.rl import train

    from .test_ppo import make_recipe

    llm = FakeLLM(_answered(char_tokenizer), logprob=-1.0)
    monkeypatch.setattr(rollout, "build_engine", lambda *a, **k: llm)
    monkeypatch.setattr(rollout, "sampling_params", lambda **kw: SimpleNamespace(**kw))
    hf_calls = []
    monkeypatch.setattr(rollout.HFSampler, "generate", lambda *a, **k: hf_calls.append(a))
    recipe = make_recipe(tmp_path, generator_dir, "ppo_vllm", epochs=1, problems_per_epoch=4)
    recipe.rl.rollout = "vllm"
    recipe.rl.max_new_tokens = 64
    final = train(recipe, progress=False)

    its = [r for r in read_metrics(tmp_path / "ppo_vllm" / "metrics.jsonl") if "rl/policy_loss" in r]
    assert len(its) == 2 and not hf_calls
    for r in its:
        # the engine says -1 for every token; the policy's own log-probs differ (a random tiny model)
        assert r["rollout/logprob_gap"] > 0 and math.isfinite(r["rollout/logprob_gap"])
    assert final["rl/steps_per_solution"] == 3  # the engine's (3-step) completions were what PPO trained on
    # one refresh when built, one after each of the 2 updates; each with every weight of the policy
    assert len(llm.model.calls) == 3
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(final["export_dir"])
    assert [n for n, _ in llm.model.calls[-1]] == _plain_names(exported)
    assert all(torch.allclose(t, dict(exported.named_parameters())[n]) for n, t in llm.model.calls[-1])
    # rollouts: 2 iterations x 2 prompts, n = 2; best-of-N before and after the epoch: 2 problems, n = eval_n_max
    ns = [params.n for _, params in llm.requests]
    assert ns.count(recipe.rl.samples_per_problem) >= 4 and len(ns) == 4 + 2 * recipe.rl.eval_num_problems
    assert all(params.temperature == recipe.rl.temperature and params.logprobs == 0 for _, params in llm.requests)


def test_rejection_sampling_samples_with_the_engine_and_refreshes_it_after_sft(vllm_allowed, generator_dir,
                                                                              char_tokenizer, tmp_path, monkeypatch):
    import rlprm.rollout as rollout
    from rlprm.rl import train

    from .test_ppo import _solve
    from .test_rejection import make_recipe

    def solve(prompt_ids):  # the engine writes each problem's reference solution: the grader accepts them
        text = _solve(char_tokenizer.decode(prompt_ids, skip_special_tokens=True))
        return char_tokenizer(text, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]

    llm = FakeLLM(solve)
    monkeypatch.setattr(rollout, "build_engine", lambda *a, **k: llm)
    monkeypatch.setattr(rollout, "sampling_params", lambda **kw: SimpleNamespace(**kw))
    recipe = make_recipe(tmp_path, generator_dir, "rs_vllm", epochs=1)
    recipe.rl.rollout = "vllm"
    recipe.rl.max_new_tokens = 96
    final = train(recipe, progress=False)
    assert final["rl/answer_accuracy"] == 1.0 and final["rs/kept"] == recipe.rl.problems_per_epoch  # one text each
    assert final["eval/answer_accuracy"] == 1.0  # the best-of-N pools came from the engine too
    assert len(llm.model.calls) == 2  # when built, and after the SFT pass
    from transformers import AutoModelForCausalLM

    exported = dict(AutoModelForCausalLM.from_pretrained(final["export_dir"]).named_parameters())
    assert all(torch.allclose(t, exported[n]) for n, t in llm.model.calls[-1])


def test_grpo_builds_one_engine_for_all_epochs(vllm_allowed, generator_dir, char_tokenizer, tmp_path, monkeypatch):
    """GRPO builds a TRL trainer per epoch and TRL a colocated engine per trainer; rlprm hands later trainers the
    first engine (a second would take another share of the GPU), and TRL syncs it from the policy each time."""
    import trl.trainer.grpo_trainer as trl_grpo

    from rlprm.rl import train

    from .test_grpo import make_recipe

    completion = _answered(char_tokenizer)
    built = []

    class Engine:
        def __init__(self, **kwargs):
            built.append((kwargs, self))
            self.syncs = 0

        def sync_weights(self):
            self.syncs += 1

        def generate(self, prompts, images, num_generations, profiler=None):
            return prompts, [list(completion) for _ in prompts], [[[-1.0]] * len(completion) for _ in prompts], None

    monkeypatch.setattr(trl_grpo, "VLLMGeneration", Engine)
    recipe = make_recipe(tmp_path, generator_dir, "grpo_vllm", epochs=2, eval_n_max=0, max_new_tokens=64,
                         rollout="vllm")
    final = train(recipe, progress=False)
    (kwargs, engine), = built
    assert kwargs["mode"] == "colocate" and kwargs["gpu_memory_utilization"] == recipe.rl.vllm_gpu_memory_utilization
    assert engine.syncs >= 2  # each epoch's trainer syncs it from the policy before its first generation
    assert final["rl/steps_per_solution"] == 3  # TRL trained on the engine's (3-step) completions
    assert trl_grpo.VLLMGeneration is Engine  # the constructor swap is undone


# --------------------------------------------------------------------------- the real engine (GPU + vLLM only)


def test_real_vllm_engine_samples_and_takes_refreshed_weights(tmp_path, char_tokenizer):
    pytest.importorskip("vllm", reason='vLLM is not installed (pip install -e ".[vllm]" on a GPU machine); the '
                                       "real engine path runs only there")
    if not torch.cuda.is_available():
        pytest.skip("vLLM is installed but no CUDA device is visible; the colocated engine needs a GPU")
    from rlprm.models import build_tiny_causal_lm
    from rlprm.rl.grpo import grpo_args
    from rlprm.rl.ppo import build_rollout, rollout_logprobs
    from rlprm.rollout import logprob_gap, sampler_for, sampler_logprob_tensor

    path = tmp_path / "gen"
    shape = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
    build_tiny_causal_lm(shape, char_tokenizer, seed=0).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    recipe = validate_recipe({"model": {"generator": str(path)}, "run": {"device": "cuda"},
                              "rl": {"rollout": "vllm", "vllm_gpu_memory_utilization": 0.2}}, tmp_path)
    policy = build_tiny_causal_lm(shape, char_tokenizer, seed=1).cuda()  # other weights than the folder's
    sampler = sampler_for(recipe, policy, char_tokenizer)  # refreshed from `policy` when built

    def gap() -> float:
        g = sampler.generate(["Start with 3. Add 4.\n"] * 4, 2, 1.0, 24)
        ro = build_rollout(char_tokenizer, g.prompt_ids, g.prompt_mask, g.completions, 2)
        lps = sampler_logprob_tensor(g.logprobs, [len(s) for s in ro.response_ids], ro.response_mask.shape[1])
        with torch.no_grad():
            trainer, _ = rollout_logprobs(policy, ro, 1.0)
        return logprob_gap(lps, trainer, ro.response_mask)

    assert gap() < 0.05  # the engine samples from the policy's weights, not the folder's
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler.refresh()
    assert gap() < 0.05  # and from the updated ones after a refresh
    pools = sampler.sample(["Start with 3. Add 4.\n"] * 3, n=2, max_new_tokens=24, seed=5)
    assert len(pools.texts) == 3 and all(len(row) == 2 for row in pools.texts)
    args = grpo_args(validate_recipe({"rl": {"algorithm": "grpo", "rollout": "vllm"}}, tmp_path), tmp_path, seed=0)
    assert args.use_vllm and args.vllm_mode == "colocate"


def test_rlprm_eval_samples_its_pool_with_an_engine_from_the_generator_folder(vllm_allowed, generator_dir,
                                                                              char_tokenizer, tmp_path, monkeypatch):
    import rlprm.rollout as rollout
    from rlprm.evaluation.job import run_eval

    from .test_ppo import _solve

    def solve(prompt_ids):
        text = _solve(char_tokenizer.decode(prompt_ids, skip_special_tokens=True))
        return char_tokenizer(text, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]

    llm, built = FakeLLM(solve), []
    monkeypatch.setattr(rollout, "build_engine", lambda *a, **k: built.append(a) or llm)
    monkeypatch.setattr(rollout, "sampling_params", lambda **kw: SimpleNamespace(**kw))
    recipe = validate_recipe({"run": {"output_dir": str(tmp_path / "out"), "device": "cpu"},
                              "model": {"generator": str(generator_dir)}, "tracking": {"wandb": "disabled"},
                              "eval": {"n_max": 2, "num_problems": 3, "resamples": 5, "max_new_tokens": 96,
                                       "rollout": "vllm", "vllm_gpu_memory_utilization": 0.4}}, tmp_path)
    curves = run_eval(recipe, progress=False)
    assert built == [(str(generator_dir), "float32", 0.4, 0, False)]  # the generator's folder, the eval share
    assert not llm.model.calls  # nothing to refresh: the engine's weights are the folder's
    assert len(llm.requests) == 3 and all(params.n == 2 for _, params in llm.requests)
    assert curves["pass@n"][2]["accuracy"]["mean"] == 1.0  # every pooled sample is the engine's (right) solution


def test_vllm_rollouts_under_zero3_are_refused_before_any_model_loads(vllm_allowed, generator_dir, tmp_path,
                                                                       monkeypatch):
    import rlprm.rollout as rollout
    from rlprm.rl import train
    from rlprm.rl.run import RLInputError

    from .test_ppo import make_recipe

    monkeypatch.setattr(rollout, "build_engine", lambda *a, **k: pytest.fail("no engine may be built"))
    recipe = make_recipe(tmp_path, generator_dir, "zero3", epochs=1)
    recipe.deepspeed = ROOT / "deepspeed_configs" / "zero3.json"
    recipe.rl.rollout = "vllm"
    with pytest.raises(RLInputError, match="rl.rollout vllm with ZeRO-3"):
        train(recipe, progress=False)
    assert not (tmp_path / "zero3" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- the checkpoint's generation_config (issue 23, finding 6)


@pytest.mark.parametrize("setting", [{"repetition_penalty": 5.0}, {"do_sample": True, "min_p": 0.3, "top_k": 3},
                                     {"no_repeat_ngram_size": 1}, {"suppress_tokens": [5, 6, 7, 8, 9, 10]}])
@pytest.mark.parametrize("via_generate", [False, True])
def test_sampling_ignores_the_checkpoints_generation_config(setting, via_generate, char_tokenizer, tmp_path):
    """PPO recomputes log-probs as softmax(logits / T): a rollout drawn through a checkpoint's own
    generation_config (repetition penalty, min_p, top_k, banned tokens, ...) comes from another distribution.
    The same seed must give the same samples whatever generation_config.json says, through the KV loop and
    through `generate` (the fallback for caches the loop cannot slice)."""
    from transformers import AutoModelForCausalLM

    from rlprm.models import build_tiny_causal_lm
    from rlprm.rollout import HFSampler
    from rlprm.sampling import sample

    model = build_tiny_causal_lm(TINY, char_tokenizer, seed=4)
    model.save_pretrained(tmp_path / "plain")
    model.generation_config.update(**setting)
    model.save_pretrained(tmp_path / "tuned")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    assert all(getattr(tuned.generation_config, k) == v for k, v in setting.items())
    prompts = ["93 +3 -4 mod 10\n", "5 +1 last digit\n"]

    def pools(m):
        torch.manual_seed(11)
        rollout = HFSampler(m, char_tokenizer, via_generate).generate(prompts, 3, 1.0, 24).completions
        return rollout, sample(m, char_tokenizer, prompts, n=3, temperature=1.0, max_new_tokens=24, seed=5,
                               via_generate=via_generate).texts

    assert pools(tuned) == pools(plain)
    assert tuned.generation_config.to_dict() == AutoModelForCausalLM.from_pretrained(
        tmp_path / "tuned").generation_config.to_dict()  # the model's own setting is left as it was
