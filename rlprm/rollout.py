"""Who samples the completions: the policy itself (rlprm's KV-cache loop), or a colocated vLLM engine.

`rl.rollout` (PPO's rollouts, rejection sampling's N per problem, the
between-epoch best-of-N) and `eval.rollout` (the `rlprm eval` pool) choose:

- `HFSampler` (`hf`, the default): the policy itself samples, through
  `sampling.generate_ids` (rlprm/decoding.py's KV-cache loop; HF `generate`
  where the loop cannot slice the model's cache) (PPO: the global torch RNG;
  pools: `sampling.sample`'s seeded batches). Nothing to refresh: it IS the policy.
  Nothing comes from the checkpoint's generation_config: the loop applies
  only the temperature, and `generate` is handed every setting
  (`sampling.generation_kwargs`, `sampling.own_generation_config`);
  the vLLM engine is built with `generation_config="vllm"` for the same reason.
- `VLLMSampler` (`vllm`): a `vllm.LLM` engine on the same GPU (TRL's colocate
  mode, `distributed_executor_backend="external_launcher"`: the engine runs in
  this process), built from the generator's folder and refreshed from the
  policy after every update (`refresh`: the policy's weights under the names
  of a Hugging Face checkpoint, handed to the engine model's `load_weights`;
  a peft/LoRA policy's adapters are merged into copies first, the live
  weights stay untouched, `vllm_weights`). It returns the log-probability it
  sampled each token with (temperature applied: `logprobs_mode
  processed_logprobs`).

PPO never trusts those log-probs for its ratio: `ppo.rollout_logprobs`
recomputes them with the training model, and `logprob_gap` (mean absolute
difference over the completion tokens, logged as `rollout/logprob_gap`)
makes a sampler/trainer mismatch visible (different kernels, bf16, stale
weights). GRPO samples through TRL's own `use_vllm` (`grpo.grpo_args`).

Nothing of vLLM is imported unless `vllm` is chosen; recipe validation
refuses it where vLLM is not installed (`config.require_vllm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generated:
    """One batch of completions; P prompts, n samples each (prompt-major), L prompt columns."""

    prompt_ids: "object"  # (P, L) long, left-padded
    prompt_mask: "object"  # (P, L) long
    completions: list[list[int]]
    """Per sample, the generated ids up to and including EOS (HF `generate`: padded to the batch's width after it)."""
    logprobs: list[list[float]] | None = None
    """Per sample, the sampler's log-prob of each token of `completions` (NaN where unknown); None for HF."""


# --------------------------------------------------------------------------- pure pieces


def sampler_logprob_tensor(logprobs: list[list[float]], lengths: list[int], width: int):
    """(B, width) float32: each sample's first `lengths[i]` sampler log-probs, NaN elsewhere (padding, unknown)."""
    import torch

    out = torch.full((len(logprobs), width), float("nan"), dtype=torch.float32)
    for i, (row, k) in enumerate(zip(logprobs, lengths)):
        k = min(k, len(row), width)
        if k:
            out[i, :k] = torch.tensor(row[:k], dtype=torch.float32)
    return out


def logprob_gap(sampler_logprobs, trainer_logprobs, mask) -> float | None:
    """Mean |sampler - trainer| log-prob over the masked completion tokens whose sampler value is known.

    sampler_logprobs, trainer_logprobs: (B, T) float; mask: (B, T) bool. None when no token counts.
    """
    import torch

    known = mask.bool() & torch.isfinite(sampler_logprobs.to(trainer_logprobs.device))
    if not bool(known.any()):
        return None
    diff = (sampler_logprobs.to(trainer_logprobs.device).float() - trainer_logprobs.float()).abs()
    return float(diff[known].mean())


def completion_of(output, eos_token_id: int | None) -> tuple[list[int], list[float]]:
    """(ids, log-probs) of one vLLM `CompletionOutput` (`token_ids`, `logprobs`, `finish_reason`).

    The log-prob of each token is the sampled token's entry of `logprobs` (NaN when absent). A completion that
    stopped on EOS keeps it (it teaches the policy to stop); should the engine leave it out of `token_ids`, it is
    put back with an unknown (NaN) log-prob.
    """
    ids = list(output.token_ids)
    per_token = output.logprobs or [{}] * len(ids)
    lps = []
    for tok, entry in zip(ids, per_token):
        item = entry.get(tok) if entry else None
        lps.append(float(item.logprob) if item is not None else float("nan"))
    if (eos_token_id is not None and output.finish_reason == "stop" and getattr(output, "stop_reason", None) is None
            and (not ids or ids[-1] != eos_token_id)):
        ids.append(eos_token_id)
        lps.append(float("nan"))
    return ids, lps


def vllm_weights(model):
    """(name, tensor) pairs of `model`'s weights under a Hugging Face checkpoint's names, for vLLM's `load_weights`.

    A plain model: its parameters as they are. A peft model: the base weights with every active LoRA adapter's
    delta added into a COPY (`base_layer` names shortened to the plain module's; the adapters' own tensors and
    peft's `original_module` copies left out; `modules_to_save` under the plain name), so the refresh never
    merges into (and unmerges from) the trained weights, which in bf16 would not round-trip.
    """
    from rlprm.launch import unwrap

    model = unwrap(model)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise NotImplementedError("rl.rollout vllm under ZeRO-3 (partitioned parameters) is not supported yet; use "
                                  "ZeRO-2 or rl.rollout: hf")
    if not hasattr(model, "peft_config"):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    from peft.tuners.lora import LoraLayer

    lora = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, param in model.named_parameters():
        if ".lora_" in name or "original_module" in name:
            continue
        tensor = param.detach()
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        module = lora.get(owner)
        if module is not None and name.endswith(".base_layer.weight") and not module.merged \
                and not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield plain.replace(".modules_to_save.default.", "."), tensor


def engine_model(llm):
    """The torch model inside a colocated vLLM engine (external_launcher: the worker lives in this process)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


def sampling_params(**kwargs):
    """`vllm.SamplingParams(**kwargs)` (imported only here and in `build_engine`)."""
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def build_engine(path: str | Path, dtype: str, gpu_memory_utilization: float, seed: int,
                 trust_remote_code: bool = False):
    """A `vllm.LLM` on this process's GPU, colocated with training, loaded from the model folder `path`.

    The engine never tokenizes (`skip_tokenizer_init`): prompts go in as the policy tokenizer's ids and
    completions come out as ids, so both samplers see exactly the same tokens.
    """
    from rlprm.launch import launcher_rank, single_process_env

    single_process_env()  # external_launcher reads RANK / WORLD_SIZE / MASTER_* (set here under plain python)
    from vllm import LLM

    return LLM(model=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
               seed=seed + launcher_rank(), skip_tokenizer_init=True,
               distributed_executor_backend="external_launcher",
               # the processed (temperature-scaled) log-probs: those of the distribution actually sampled
               logprobs_mode="processed_logprobs",
               # vLLM's memory profiler misjudges its default (32k tokens) when colocated with training (TRL's value)
               max_num_batched_tokens=4096, trust_remote_code=trust_remote_code,
               # vLLM's own neutral defaults, not the checkpoint's generation_config.json (a repetition penalty
               # or min_p there would sample from another distribution than the policy's)
               generation_config="vllm")


# --------------------------------------------------------------------------- samplers


class HFSampler:
    """Sampling on the policy itself, in this process: rlprm.sampling's KV-cache loop (HF `generate` where the loop
    cannot serve the model, or with `via_generate`)."""

    name = "hf"

    def __init__(self, policy, tokenizer, via_generate: bool = False):
        self.policy, self.tokenizer, self.via_generate = policy, tokenizer, via_generate

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int) -> Generated:
        """n samples per prompt in one call of `sampling.generate_ids` (the KV loop, or `generate` where the loop
        cannot serve the model), driven by the global torch RNG (restored on resume)."""
        from rlprm.sampling import generate_ids

        policy, tokenizer = self.policy, self.tokenizer
        device = next(policy.parameters()).device
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        was_training = policy.training
        policy.eval()
        try:
            # pure temperature sampling, as everywhere in rlprm: nothing from the checkpoint's generation_config
            completions = generate_ids(policy, enc, n, temperature, max_new_tokens, tokenizer.pad_token_id,
                                       tokenizer.eos_token_id, self.via_generate)
        finally:
            policy.train(was_training)
        return Generated(enc["input_ids"], enc["attention_mask"], completions)

    def sample(self, prompts: list[str], n: int = 1, temperature: float = 1.0, max_new_tokens: int = 96,
               batch_size: int = 256, seed: int = 0, progress: bool = False, desc: str = "sampling",
               logprobs: bool = False):
        """`sampling.sample` on the policy (looked up when called, so a test's stand-in takes its place);
        `logprobs`: with each token's log-prob at T=1 where the KV loop sampled (Samples.token_logprobs)."""
        import rlprm.sampling as sampling

        kwargs = {"logprobs": True} if logprobs else {}
        return sampling.sample(self.policy, self.tokenizer, prompts, n=n, temperature=temperature,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
                               desc=desc, via_generate=self.via_generate, **kwargs)

    def refresh(self) -> None:
        """Nothing to do: the sampler is the policy."""


class VLLMSampler:
    """A colocated vLLM engine (`llm`) that samples for `policy` and takes its weights back after each update.

    policy: the trained model whose weights `refresh` hands over (None: the engine's own weights, as loaded
    from disk, e.g. for `rlprm eval`). The prompts are tokenized by `tokenizer`, as for `generate`.
    """

    name = "vllm"

    def __init__(self, llm, tokenizer, policy=None):
        self.llm, self.tokenizer, self.policy = llm, tokenizer, policy
        self.refreshes = 0

    def _run(self, prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
             seeds: list[int]) -> list[tuple[list[int], list[float]]]:
        """n (ids, log-probs) per prompt, prompt-major; each prompt's request has its own seed."""
        eos = self.tokenizer.eos_token_id
        # pure temperature sampling: every setting that could reshape the distribution is given its neutral value
        params = [sampling_params(n=n, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                  presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens,
                                  seed=seed, logprobs=0, stop_token_ids=[eos] if eos is not None else None,
                                  detokenize=False)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        return [completion_of(c, eos) for request in outputs for c in request.outputs]

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int) -> Generated:
        """n samples per prompt; the request seeds come from the global torch RNG (as HF `generate`'s noise)."""
        import torch

        tokenizer = self.tokenizer
        device = next(self.policy.parameters()).device if self.policy is not None else "cpu"
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        done = self._run(ids, n, temperature, max_new_tokens, seeds)
        return Generated(enc["input_ids"].to(device), enc["attention_mask"].to(device), [c for c, _ in done],
                         [lp for _, lp in done])

    def sample(self, prompts: list[str], n: int = 1, temperature: float = 1.0, max_new_tokens: int = 96,
               batch_size: int = 256, seed: int = 0, progress: bool = False, desc: str = "sampling"):
        """As `sampling.sample`: texts and ids with EOS and padding removed, seeded by `seed` (the engine batches
        by itself: `batch_size` only bounds how many prompts go in one call)."""
        import torch

        from rlprm.sampling import Samples

        tokenizer = self.tokenizer
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        gen = torch.Generator(device="cpu").manual_seed(seed)
        texts, ids_out = [], []
        per_call = max(1, batch_size // n)
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            prompt_ids = [tokenizer(p)["input_ids"] for p in chunk]
            seeds = torch.randint(0, 2**31 - 1, (len(chunk),), generator=gen).tolist()
            done = self._run(prompt_ids, n, temperature, max_new_tokens, seeds)
            for i in range(len(chunk)):
                row = [[t for t in (c[: c.index(eos)] if eos in c else c) if t != pad] for c, _ in done[i * n:(i + 1) * n]]
                ids_out.append(row)
                texts.append([tokenizer.decode(c, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                              for c in row])
            if progress:
                print(f"{desc}: {min(start + per_call, len(prompts))}/{len(prompts)} prompts", flush=True)
        return Samples(texts, ids_out)

    def refresh(self) -> None:
        """Hand the policy's current weights to the engine (LoRA merged into copies) and drop its prefix cache."""
        if self.policy is None:
            return
        import torch

        with torch.no_grad():
            engine_model(self.llm).load_weights(vllm_weights(self.policy))
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.refreshes += 1


def sampler_for(recipe, policy, tokenizer, section: str = "rl"):
    """The sampler `recipe.<section>.rollout` names: `HFSampler(policy)`, or a vLLM engine built from
    model.generator and at once refreshed from `policy` (a resumed run's policy is the checkpoint's)."""
    cfg = getattr(recipe, section)
    if cfg.rollout == "hf":
        return HFSampler(policy, tokenizer)
    m = recipe.model
    llm = build_engine(m.generator, m.dtype, cfg.vllm_gpu_memory_utilization, recipe.run.seed, m.trust_remote_code)
    sampler = VLLMSampler(llm, tokenizer, policy)
    sampler.refresh()
    return sampler


__all__ = ["Generated", "HFSampler", "VLLMSampler", "build_engine", "completion_of", "engine_model", "logprob_gap",
           "sampler_for", "sampler_logprob_tensor", "vllm_weights"]
