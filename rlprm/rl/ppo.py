"""PPO for a language-model policy, with dense (PRM) or sparse (ORM / ground-truth) token rewards.

Our own compact loop (docs/design.md section 7): TRL no longer ships a PPO trainer.
Four models take part:
- the policy (the generator, trained),
- a frozen reference (the initial policy; the KL penalty keeps the policy near it):
  with LoRA (model.lora.enabled) the policy's own base with its adapters off,
  not a second copy of the weights (`rl/reference.py`),
- a value model (critic): a token-classification model with one output, whose
  body starts as the generator's, trained on the GAE returns (all its
  weights, LoRA or not: `rl.value_layers` keeps it small),
- the reward model (a PRM or an ORM; none for `ground_truth`, `exact` and
  `confidence` rewards: `exact` scores steps with the arithmetic checker that
  grades every sample anyway, `confidence` reads the reference model's own
  token log-probs at temperature 1 from the forward pass the KL needs).

Temperature: rollouts are sampled from softmax(logits / rl.temperature), so
every log-prob of the update and of the KL (policy old and new, reference)
and the logged entropy are taken at that temperature too
(`core.token_logprobs`, a chunk of rows at a time: no (B, T, V) float32
logits); raw logits at T != 1 would make every update off-policy. Only the
`confidence` reward uses T = 1: it is the starting model's own confidence,
whatever the sampling temperature.

KL metrics per iteration, measured on the rollout (the policy after the last
update against the reference, with `rl.kl_estimator`): `rl/kl_per_token`, the
mean over response tokens, and `rl/kl_per_sample` (also logged as `rl/kl`),
the mean over samples of the sum over each sample's tokens.

`PPO` is this algorithm's part of the run skeleton (`rl/run.py`, which loads
the policy, the reference and the reward model, evaluates, checkpoints and
exports): the critic and both optimizers (`setup`), and the update of one
epoch (`train_epoch`), each of whose iterations is `rollout() -> Trajectory`
(1. generate, 2. score, 3. rewards, 4. logprobs and values, 5. KL penalty,
6. advantages), `ppo_step(trajectory) -> stats` (7. update) and
`record(stats)` (8. log); the split follows torchtune's PPO recipe
(`generate_trajectory`, `_ppo_step`). The critic's explained variance is
logged beside its loss (`rl/explained_variance`, as cleanrl logs it). The
math lives in `rl/core.py` and `reward/tokens.py`, the scores in the run's reward
source (`reward/sources.py`); this file only wires models and tensors to them.

Sequences are laid out as [left-padded prompt | right-padded response]: the
prompts are padded on the left so that every response starts at the same
column, and the response tensors (B, T) then line up with `reward/tokens.py`'s.

With several processes (or a `deepspeed:` key) the policy and critic train
inside DeepSpeed engines (`rl/distributed.py`): each rank samples its share of
the prompts, gradients are averaged, rank 0 alone evaluates and writes. Under
ZeRO-3 the policy is gathered whole on every rank for generation
(`Dist.whole_weights`), so that ranks stopping at different lengths never wait
for each other's forward passes; every other pass runs on all ranks in step.

Precision and determinism: without DeepSpeed, bf16 (fp16) weights train as
float32 masters (`models.float32_masters`; AdamW's small steps round away on
bf16 weights), and on a GPU every pass over the policy and the critic runs in
bf16 autocast (`PPO._compute`); DeepSpeed's bf16 keeps its own masters. No
dropout anywhere in the policy or the critic (`models.disable_dropout`;
model.lora.dropout > 0 is refused): the old log-probs and values are read in
eval mode, the update runs in train mode, and an update's first ratio is 1.
Log-probs and the entropy never make a (B, T, V) float32 tensor
(`response_features` + `core.token_logprobs`).

Padding: on a CPU every pass over the rollout (step 4's, the critic warm-up's, each update minibatch's) runs
its rows in groups of similar length, each cut to its own columns (`by_length`, `core.length_groups`); the
outputs at real tokens are those of one full-width pass up to float order. One pass per minibatch, cut to its
own longest row, on an accelerator and under DeepSpeed.

Resume works at epoch granularity: a checkpoint holds the policy (its
adapters only, with LoRA), the value model, both optimizers, the KL
coefficient and the optimizer step count (for the warm-up), beside the
skeleton's counters and RNG state. Under DeepSpeed the optimizers are each
rank's ZeRO shard (`rank_state`), restored on a resume with the same number
of ranks and ZeRO stage; with another layout the moments restart, and the
log says so.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

from rlprm.config import Recipe
from rlprm.rl.distributed import shard, trim
from rlprm.rl.run import RLError, RLInputError, Run, check_finite, mean, process_part


@dataclass
class Rollout:
    """One rollout batch; B = prompts * samples_per_problem, P = prompt columns, T = response columns."""

    input_ids: "object"  # (B, P + T) long: [left-padded prompt | response, right-padded]
    attention_mask: "object"  # (B, P + T) long
    response_mask: "object"  # (B, T) bool: response tokens, EOS included
    prompt_width: int
    response_ids: list[list[int]]  # per sample, the generated ids up to and including EOS
    texts: list[str]  # per sample, the decoded response (special tokens skipped)
    sampler_logprobs: "object" = None  # (B, T) float: a vLLM sampler's own log-probs (NaN unknown); the gap's only


# --------------------------------------------------------------------------- pieces


def _generate(sampler, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int) -> Rollout:
    """n samples per prompt from `sampler` (rlprm/rollout.py: our KV-cache loop on the policy, HF `generate` where
    the loop cannot run, or a vLLM engine), keeping EOS and the token ids (rlprm.sampling strips both, which RL
    cannot use)."""
    from rlprm.rollout import sampler_logprob_tensor

    g = sampler.generate(prompts, n, temperature, max_new_tokens)
    ro = build_rollout(tokenizer, g.prompt_ids, g.prompt_mask, g.completions, n)
    if g.logprobs is not None:  # for the logged sampler-vs-trainer gap only, never for the ratio
        ro.sampler_logprobs = sampler_logprob_tensor(g.logprobs, [len(s) for s in ro.response_ids],
                                                     ro.response_mask.shape[1]).to(ro.response_mask.device)
    return ro


def build_rollout(tokenizer, prompt_ids, prompt_mask, generated: list[list[int]], n: int) -> Rollout:
    """Lay out left-padded prompts (one row per prompt) and n generated id lists per prompt as a `Rollout`.

    Each generated list is cut after its first EOS (kept: its logprob teaches the
    policy to stop); what follows is padding.
    """
    import torch

    device = prompt_ids.device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    response_ids, texts = [], []
    for seq in generated:
        seq = list(seq[: seq.index(eos) + 1] if eos in seq else seq)
        response_ids.append(seq)
        texts.append(tokenizer.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    T = max(1, max(len(s) for s in response_ids))
    resp = torch.full((len(response_ids), T), pad, dtype=torch.long)
    for i, s in enumerate(response_ids):
        resp[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in response_ids])
    response_mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return Rollout(
        input_ids=torch.cat([prompt_ids.repeat_interleave(n, dim=0).cpu(), resp], dim=1).to(device),
        attention_mask=torch.cat([prompt_mask.repeat_interleave(n, dim=0).cpu(), response_mask.long()], dim=1).to(device),
        response_mask=response_mask.to(device),
        prompt_width=prompt_ids.shape[1],
        response_ids=response_ids,
        texts=texts,
    )


def _forward(model, input_ids, attention_mask, prompt_width: int, T: int):
    """Logits (or values) at the positions that predict response tokens 0..T-1: shape (B, T, ...).

    Position ids count real tokens only, so that a left-padded prompt sees the
    positions it would see unpadded (as `generate` gives it).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    # the token at column P + t is predicted by the output at column P + t - 1
    return out.logits[:, prompt_width - 1: prompt_width - 1 + T]


GROUP_COST_CPU = 96
"""`core.length_groups`' fixed cost of one more pass on a CPU, in token columns (rows x width): a forward and
backward of the demo's policy and critic at 1 thread cost about this many columns' work beyond their size
(benchmarks/ppo_update.py)."""

MAX_AREA_CPU = {True: 1536, False: 3072}
"""`core.length_groups`' largest pass on a CPU in token columns, with gradients (True) and without: at the demo's
width (128) a pass of 2,560 columns with its backward cost ~15% more per token than two of 1,280 at 1 thread
(its activations outgrow the caches; benchmarks/ppo_update.py)."""


def by_length(fn, input_ids, attention_mask, prompt_width: int, response_mask, group_cost: float | None,
              max_area: int | None = None):
    """`fn(input_ids, attention_mask, prompt_width, T) -> tuple of (n, T, ...) tensors or None`, run on each group
    of rows of `core.length_groups(..., group_cost, max_area)` cut to the group's own columns, its outputs put
    back in row order: a tuple of (B, T, ...) tensors, T = response_mask's width, zero beyond each group's longest
    response.

    The columns cut are padding in every row of the group (leading prompt columns, trailing response columns):
    a masked key changes no output, a trailing column no earlier one (causal), and position ids count real
    tokens (`_forward`), so the outputs at the real tokens are those of one pass over the whole batch, up to
    float summation order. Gradients flow through to every group's pass."""
    import torch

    from rlprm.rl.core import length_groups

    B, T = response_mask.shape
    device = input_ids.device
    prompt_lengths = attention_mask[:, :prompt_width].sum(1).cpu()
    response_lengths = response_mask.sum(1).cpu()
    groups = length_groups(prompt_lengths, response_lengths, group_cost, max_area)
    parts = []
    for rows in groups:
        start = prompt_width - max(1, int(prompt_lengths[rows].max()))
        end = prompt_width + max(1, int(response_lengths[rows].max()))
        rows = rows.to(device)
        parts.append(fn(input_ids[rows, start:end], attention_mask[rows, start:end], prompt_width - start,
                        end - prompt_width))
    order = torch.cat(groups).to(device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=device)

    def whole(k: int):
        if parts[0][k] is None:
            return None
        pieces = [p[k] if p[k].shape[1] == T else torch.cat(
            [p[k], p[k].new_zeros(p[k].shape[0], T - p[k].shape[1], *p[k].shape[2:])], 1) for p in parts]
        return torch.cat(pieces)[inverse]

    return tuple(whole(k) for k in range(len(parts[0])))


def _hf_model(model):
    """The transformers model under a DeepSpeed engine, a peft wrapper and `reference.AdaptersOff`."""
    from rlprm.launch import unwrap
    from rlprm.rl.reference import AdaptersOff

    model = unwrap(model)
    if isinstance(model, AdaptersOff):
        model = model.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_features(model, input_ids, attention_mask, prompt_width: int, T: int):
    """(features, head) for `core.token_logprobs`: the final hidden states (B, T, H) at the positions that predict
    response tokens 0..T-1, and the output layer that turns them into logits.

    The causal LM is asked for the last position's logits only (`logits_to_keep=1`): its full (B, P + T, V)
    logits never exist; the body's output is read by a hook. The head applied to the last hidden state must
    give the model's own last logits (a model that scales or soft-caps its logits after the output layer
    would not): checked on every call, an RLError otherwise. A model without `logits_to_keep` gives its logits
    (model dtype) as the features, and head None; so does, with gradients on, a head that ZeRO-3 partitions
    (the response columns' logits only).
    """
    import inspect

    import torch

    hf = _hf_model(model)
    if "logits_to_keep" not in inspect.signature(hf.forward).parameters:
        return _forward(model, input_ids, attention_mask, prompt_width, T), None
    head = hf.get_output_embeddings()
    if _partitioned(head) and (torch.is_grad_enabled() or type(head) is not torch.nn.Linear):
        # ZeRO-3 partitions the head, and re-running it outside the engine's forward (to recompute a chunk in the
        # backward pass) finds a frozen head's weight released: the model's own logits of the response columns
        # instead (logits_to_keep; model dtype, bf16 under DeepSpeed's bf16), reduced a chunk at a time
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=T + 1)
        return out.logits[:, :T], None
    captured = []
    hook = hf.base_model.register_forward_hook(
        lambda _module, _args, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    try:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[-1]
    with torch.no_grad():
        mine, theirs = head(hidden[:, -1].detach()).float(), out.logits[:, -1].detach().float()
        if not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max().clamp(min=1))):
            raise RLError(f"{type(hf).__name__}: its output layer applied to its last hidden state does not give "
                          "its logits (a final logit scaling or soft-capping?); PPO's log-probs cannot read it")
    return hidden[:, prompt_width - 1: prompt_width - 1 + T], head


def _partitioned(head) -> bool:
    """Whether ZeRO-3 holds only this rank's shard of `head`'s weights."""
    return head is not None and any(hasattr(p, "ds_id") for p in head.parameters())


def features_logprobs(features, head, tokens, temperatures: tuple[float, ...], entropy: bool = False):
    """`core.token_logprobs` of `response_features`' output at each of `temperatures` (no gradients): a list of
    (logprobs, entropy or None), the entropy at the first temperature only.

    A head that ZeRO-3 partitions is gathered once for all the chunks (one collective, which every rank makes
    once, whatever its number of chunks) and applied as a plain linear map, so that no chunk needs the others."""
    import contextlib

    import torch

    from rlprm.rl.core import token_logprobs

    gathered, apply = contextlib.nullcontext(), head
    if _partitioned(head):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)
        apply = lambda x: torch.nn.functional.linear(x, head.weight, head.bias)  # noqa: E731  (the module's hooks
        # would fetch and release its shards around every chunk)
    with gathered:
        return [token_logprobs(features, tokens, apply, t, entropy and i == 0) for i, t in enumerate(temperatures)]


def rollout_logprobs(model, ro: Rollout, temperature: float, entropy: bool = False):
    """(B, T) float32 log-probs of the rollout's response tokens under `model`, at `temperature`, and their
    entropy (B, T) float32 when asked (else None).

    The log-probs are those of the distribution the rollout was sampled from when `model` is the sampling
    policy and `temperature` the sampling temperature. Padding positions hold values for the pad token (mask
    them out). No (B, T, V) float32 tensor is made (`core.token_logprobs`): at a 151,936-token vocabulary
    one would be 20 GB for 32 responses of 1024 tokens.
    """
    import torch

    from rlprm.rl.core import token_logprobs

    T = ro.response_mask.shape[1]
    features, head = response_features(model, ro.input_ids, ro.attention_mask, ro.prompt_width, T)
    tokens = ro.input_ids[:, ro.prompt_width:]
    if torch.is_grad_enabled():
        return token_logprobs(features, tokens, head, temperature, entropy)
    return features_logprobs(features, head, tokens, (temperature,), entropy)[0]


def _load_value_model(path: str, dtype: str, device: str, trust_remote_code: bool, layers: int = 0):
    from transformers import AutoModelForTokenClassification

    from rlprm.models import disable_dropout, torch_dtype
    from rlprm.reward.model import quiet_transformers

    # the head is new (1 output, randomly initialised from the global RNG): transformers' load report is expected noise
    with quiet_transformers(report=True):
        model = AutoModelForTokenClassification.from_pretrained(str(path), num_labels=1, dtype=torch_dtype(dtype),
                                                                trust_remote_code=trust_remote_code)
    if layers:
        truncate_layers(model, layers)
    # its values are read in eval() (old values, GAE) and trained in train(): no dropout anywhere
    return disable_dropout(model).to(device)


def truncate_layers(model, keep: int) -> None:
    """Keep the first `keep` decoder layers of a transformers model in place (config included, so that a saved
    checkpoint reloads with the same shape); a no-op when it has no more. Raises RLInputError for a model
    whose body keeps its layers under another name than `layers`."""
    body = model.base_model
    blocks = getattr(body, "layers", None)
    if blocks is None:
        raise RLInputError(f"rl.value_layers: {type(model).__name__} keeps no `layers` list in its body; "
                            "set rl.value_layers: 0 for this critic")
    if keep >= len(blocks):
        return
    body.layers = blocks[:keep]
    model.config.num_hidden_layers = keep
    if isinstance(getattr(model.config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Llama 4)
        model.config.layer_types = model.config.layer_types[:keep]




# --------------------------------------------------------------------------- the algorithm


class PPO:
    """PPO's part of the run skeleton: the critic, the optimizers, the KL controller and one epoch's update."""

    name = "ppo"
    needs_reference = True

    def check(self, recipe: Recipe) -> None:
        # the models' presence is the skeleton's check (`run.check_run`); LoRA is supported: adapters train, the
        # reference is the base with them off
        lora = recipe.model.lora
        if lora.enabled and lora.dropout > 0:
            raise RLInputError(f"model.lora.dropout is {lora.dropout}: PPO reads its old log-probs in eval mode and "
                               "trains in train mode, so dropout on the adapters makes every update's ratio start "
                               "away from 1; set model.lora.dropout: 0 (the default)")

    def distributed(self, recipe: Recipe):
        # several processes (or a `deepspeed:` key): DeepSpeed engines, each rank with its share of the prompts and
        # rl.minibatch_size / world samples per step, so that an optimizer step sees as many samples as on one process
        from rlprm.rl.distributed import launched_world_size, setup

        rl = recipe.rl
        world = launched_world_size()
        if rl.prompts_per_iteration < world:
            raise RLInputError(f"rl.prompts_per_iteration ({rl.prompts_per_iteration}) is below the number of "
                               f"processes ({world}): every rank needs at least one prompt per iteration")
        return setup(recipe, micro_batch=max(1, rl.minibatch_size // world))

    def setup(self, run: Run) -> None:
        from contextlib import nullcontext

        import torch

        from rlprm.errors import loading
        from rlprm.models import disable_dropout, float32_masters
        from rlprm.rl.core import AdaptiveKLController, FixedKLController

        recipe, rl = run.recipe, run.recipe.rl
        m = recipe.model
        ckpt = run.ckpt
        value_src = ckpt / "extra" / "value" if ckpt else (m.generator if rl.value_model == "policy" else rl.value_model)
        # a checkpoint's critic in the dtype it was saved in (its float32 masters come back unrounded); a critic
        # folder of the user's that does not load is bad input naming rl.value_model (exit 2)
        with nullcontext() if ckpt or rl.value_model == "policy" else loading("rl.value_model", rl.value_model):
            self.value_model = _load_value_model(value_src, "auto" if ckpt else m.dtype, run.device,
                                                 m.trust_remote_code, rl.value_layers)
        # the old log-probs are read in eval(), the update runs in train(): the policy without dropout either
        disable_dropout(run.policy, config=False)
        # the trainable weights only: all of them, or LoRA's adapters (the frozen base needs no Adam moments).
        # Without DeepSpeed (whose bf16 keeps float32 masters itself) bf16 weights train as float32 copies: AdamW's
        # small steps round away on bf16 weights; on a GPU the passes then run in bf16 autocast (`_compute`)
        low = {p.dtype for p in run.policy.parameters()} & {torch.bfloat16, torch.float16}
        self.autocast = None
        if not run.dist.deepspeed:
            float32_masters(run.policy)
            float32_masters(self.value_model)
            if low and str(run.device).startswith("cuda"):
                self.autocast = low.pop()
        self.policy_opt = torch.optim.AdamW([p for p in run.policy.parameters() if p.requires_grad],
                                            lr=rl.learning_rate)
        self.value_opt = torch.optim.AdamW(self.value_model.parameters(), lr=rl.value_learning_rate)
        # the engines train (forward, backward, gradient averaging, clipping, step); `run.policy` and
        # `self.value_model` stay the HF models inside them, used for sampling, no-grad passes, evaluation and saving
        self.policy_engine = run.dist.wrap(run.policy, self.policy_opt)
        self.value_engine = run.dist.wrap(self.value_model, self.value_opt)
        # who samples (rl.rollout): HF generate on the policy, or a colocated vLLM engine refreshed after each update
        from rlprm.rollout import sampler_for

        self.sampler = run.sampler = sampler_for(recipe, run.policy, run.tokenizer)
        kl = rl.kl_coef
        self.kl_ctl = FixedKLController(kl) if rl.target_kl is None else AdaptiveKLController(kl, rl.target_kl,
                                                                                              rl.kl_horizon)
        self.opt_step = 0  # policy optimizer steps (for the warm-up)
        self.deepspeed, self.is_main, self.dist = run.dist.deepspeed, run.dist.is_main, run.dist
        # rows of similar length pass together on a CPU (`by_length`); one pass of the minibatch's own width on an
        # accelerator (small passes leave it idle) and under DeepSpeed (ZeRO-3 gathers weights in every forward: the
        # ranks must make the same passes)
        self.group_cost = GROUP_COST_CPU if str(run.device) == "cpu" and not run.dist.deepspeed else None

    def _grouping(self, grad: bool) -> tuple:
        """`by_length`'s (group_cost, max_area) for a pass with gradients (`grad`) or without."""
        return (None, None) if self.group_cost is None else (self.group_cost, MAX_AREA_CPU[grad])

    def _compute(self):
        """The precision of every pass over the policy and the critic: bf16 (fp16) autocast over their float32
        masters on a GPU when the recipe's weights were bf16 (fp16); as they are otherwise. Sampling, the old
        log-probs and the update all run under it, so that the first ratio of an update is 1."""
        import contextlib

        import torch

        return (contextlib.nullcontext() if getattr(self, "autocast", None) is None else
                torch.autocast("cuda", dtype=self.autocast))

    def load_state_dict(self, state: dict) -> None:
        if not self.deepspeed and state.get("policy_optimizer") is not None:
            self.policy_opt.load_state_dict(state["policy_optimizer"])
            self.value_opt.load_state_dict(state["value_optimizer"])
        elif self.deepspeed:
            self._load_rank_state(state.get("rank_state"), state.get("ranks_written", 0))
        elif self.is_main:
            print("resume: the checkpoint holds no optimizer state (written under DeepSpeed); the moments restart")
        self.kl_ctl.value = state["kl_coef"]
        self.opt_step = state.get("opt_step", 0)

    def state_dict(self) -> dict:
        # under DeepSpeed no rank holds the optimizers whole: each rank's shard goes through `rank_state`
        optimizers = ({"policy_optimizer": None, "value_optimizer": None} if self.deepspeed else
                      {"policy_optimizer": self.policy_opt.state_dict(), "value_optimizer": self.value_opt.state_dict()})
        return {**optimizers, "kl_coef": self.kl_ctl.value, "opt_step": self.opt_step}

    def rank_state(self) -> dict | None:
        """Under DeepSpeed, this rank's shard of both engines' optimizers (moments and fp32 masters), which the
        skeleton writes into the checkpoint beside the others' (checkpoint.py); None without DeepSpeed."""
        if not self.deepspeed:
            return None
        from rlprm.rl.distributed import engine_optimizer_state

        return {"world": self.dist.world, "zero_stage": self.dist.zero_stage,
                "policy": engine_optimizer_state(self.policy_engine),
                "value": engine_optimizer_state(self.value_engine)}

    def _load_rank_state(self, part: dict | None, ranks_written: int) -> None:
        from rlprm.rl.distributed import load_engine_optimizer_state

        dist = self.dist
        fits = part is not None and part["world"] == dist.world and part["zero_stage"] == dist.zero_stage
        # every rank must agree: a rank that loads while another restarts would train different weights
        if dist.any_rank(not fits):
            if self.is_main:
                why = ("the checkpoint holds no DeepSpeed optimizer shards" if not ranks_written else
                       f"the checkpoint's optimizer shards were written by {ranks_written} rank(s) under another "
                       f"ZeRO layout than this run's {dist.world} rank(s), ZeRO-{dist.zero_stage}")
                print(f"resume: {why}; the optimizer moments restart (the weights, KL coefficient and counters "
                      "are restored)")
            return
        load_engine_optimizer_state(self.policy_engine, part["policy"], dist.rank, dist.world)
        load_engine_optimizer_state(self.value_engine, part["value"], dist.rank, dist.world)

    def extra_models(self) -> dict:
        return {"value": self.value_model}

    def warm_critic(self, rl, ro: Rollout, shaped, mask, dist) -> None:
        """rl.critic_warmup_passes passes of value-only updates towards the reward-to-go of `shaped` (B, T).

        Plain squared error without the PPO value clip: the clip bounds a step away from a critic's own earlier
        predictions, and a new head's predictions are not worth staying near."""
        import torch

        from rlprm.rl.core import gae, masked_mean

        targets, _ = gae(shaped, torch.zeros_like(shaped), mask, rl.gamma, 1.0)  # V = 0, lam = 1: reward-to-go
        B = mask.shape[0]
        minibatch = max(1, rl.minibatch_size // dist.world)
        self.value_model.train()
        for _ in range(rl.critic_warmup_passes):
            order = torch.randperm(B)
            for start in range(0, B, minibatch):
                idx = order[start:start + minibatch].to(mask.device)
                with self._compute():
                    values, = by_length(self._values_pass(self.value_engine), ro.input_ids[idx],
                                        ro.attention_mask[idx], ro.prompt_width, ro.response_mask[idx],
                                        *self._grouping(True))
                loss = 0.5 * masked_mean((values - targets[idx]) ** 2, mask[idx])
                if dist.deepspeed:
                    self.value_engine.backward(loss)
                    self.value_engine.step()
                else:
                    self.value_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), rl.max_grad_norm)
                    self.value_opt.step()

    def train_epoch(self, run: Run, epoch: int, problems: list) -> None:
        """Every iteration: `rollout` (sample, score, rewards, advantages), `ppo_step` (the update), `record`."""
        rl, dist = run.recipe.rl, run.dist
        iterations = math.ceil(rl.problems_per_epoch / rl.prompts_per_iteration)
        for it in range(iterations):
            # this rank's share; a batch is trimmed to a multiple of the world size so that every rank runs the same
            # number of steps (identity on one process)
            batch = shard(trim(problems[it * rl.prompts_per_iteration:(it + 1) * rl.prompts_per_iteration], dist),
                          dist)
            if not batch:
                break
            trajectory = self.rollout(run, batch, f"epoch {epoch + 1}, iteration {it + 1}")
            stats = self.ppo_step(run, trajectory)
            # from the scores to the new weights: rewards, old log-probs and values, advantages and the update
            trajectory.times["update"] = time.monotonic() - trajectory.scored_at
            run.step += 1
            self.record(run, trajectory, stats, epoch + (it + 1) / iterations, f"epoch {epoch + 1}/{rl.epochs} it "
                        f"{it + 1}/{iterations}")

    def rollout(self, run: Run, batch: list, where: str) -> "Trajectory":
        """One iteration's samples of this rank's `batch` of problems, scored, rewarded, with the old policy's and the
        critic's view of them and the advantages: everything `ppo_step` reads. `where` names the iteration in errors."""
        import torch

        from rlprm.reward.tokens import RewardError
        from rlprm.rl.core import add_kl_penalty, gae, masked_mean
        from rlprm.rollout import logprob_gap

        rl, dist, source, reference = run.recipe.rl, run.dist, run.reward_source, run.reference
        n, t0 = rl.samples_per_problem, time.monotonic()

        # 1. generate: n samples per prompt, EOS and token ids kept (rl.rollout: HF generate or vLLM; ZeRO-3: the
        # policy gathered whole on every rank, so that ranks stopping at different lengths never wait)
        with dist.whole_weights(run.policy), self._compute():
            ro = _generate(self.sampler, run.tokenizer, [p.prompt for p in batch], n, rl.temperature,
                           rl.max_new_tokens)
        T = ro.response_mask.shape[1]
        sample_problems = [p for p in batch for _ in range(n)]
        t_gen = time.monotonic() - t0

        # 2. score: the task's grading always (for the log and ground-truth rewards); the reward source's scores
        grades = source.grade(sample_problems, ro.texts)
        ref_logprobs, start_logprobs = None, None
        if source.reads_start_logprobs:
            # the frozen start's own log-probs at T = 1; the same forward pass gives the KL's log-probs
            with torch.no_grad(), self._compute():
                features, head = response_features(reference, ro.input_ids, ro.attention_mask, ro.prompt_width, T)
                both = features_logprobs(features, head, ro.input_ids[:, ro.prompt_width:],
                                         (rl.temperature,) if rl.temperature == 1.0 else (rl.temperature, 1.0))
                ref_logprobs, start_logprobs = both[0][0], both[-1][0]
                del features

        # 3. rewards on the policy's response tokens (dense at step ends, or sparse at the last token)
        reason = None
        try:
            scores = source.step_scores(sample_problems, ro.texts, ro.response_ids, grades,
                                        start_logprobs=start_logprobs, mask=ro.response_mask, tokenizer=run.tokenizer)
            scored_at = time.monotonic()
            t_score = scored_at - t0 - t_gen
            # eos_token_id: a response stopped at max_new_tokens without EOS is cut, not judged as written
            tr = source.rewards(ro.texts, ro.response_ids, grades, scores, tokenizer=run.tokenizer, width=T,
                                device=run.device)
        except RewardError as exc:
            reason = f"{where}: {exc}"
        dist.stop_if_any(reason, RLError)  # every rank stops if one cannot go on
        check_finite("the rewards", tr.rewards, run.run_dir, dist)
        mask = tr.mask & ro.response_mask

        # 4. logprobs and values of the rollout, before any update (the "old" policy and critic), at the sampling
        # temperature: the distribution the rollout came from
        with torch.no_grad(), self._compute():
            old_logprobs, entropy, ref_new, old_values = self._old_passes(run, ro, ref_logprobs is None)
            ref_logprobs = ref_new if ref_logprobs is None else ref_logprobs
            # the ratio's old log-probs are the policy's own (above); a vLLM sampler's only measure the mismatch
            gap = None if ro.sampler_logprobs is None else logprob_gap(ro.sampler_logprobs, old_logprobs,
                                                                       ro.response_mask)

            # 5. KL penalty: every token pays for drifting from the reference
            shaped, kl = add_kl_penalty(tr.rewards, old_logprobs, ref_logprobs, mask, self.kl_ctl.value,
                                        rl.kl_estimator)

        if run.step == 0 and rl.critic_warmup_passes:  # a fresh run's first rollout: fit the new critic first
            self.warm_critic(rl, ro, shaped, mask, dist)
            with torch.no_grad(), self._compute():
                self.value_model.eval()
                old_values, = by_length(self._values_pass(self.value_model), ro.input_ids, ro.attention_mask,
                                        ro.prompt_width, ro.response_mask, *self._grouping(False))

        with torch.no_grad():
            # 6. advantages: GAE over the shaped rewards, then whitened over the batch
            advantages, returns = gae(shaped, old_values, mask, rl.gamma, rl.lam)
            if rl.whiten_advantages:
                advantages = dist.masked_whiten(advantages, mask)  # all ranks' statistics
        check_finite("the advantages", advantages, run.run_dir, dist)
        return Trajectory(ro, grades, tr, mask, old_logprobs, old_values, shaped, kl, advantages, returns,
                          float(masked_mean(entropy, mask)), gap, {"generate": t_gen, "score": t_score}, scored_at)

    def _old_passes(self, run: Run, ro: Rollout, reference: bool):
        """4. (under no_grad) the policy's log-probs and entropy, the reference's log-probs (when `reference`, else
        None) and the critic's values of the rollout's response tokens, (B, T) float32 each (0 past a row's
        group's longest response: padding), at rl.temperature; rows of similar length pass together (`by_length`)."""
        temperature = run.recipe.rl.temperature
        run.policy.eval()
        self.value_model.eval()
        values = self._values_pass(self.value_model)

        def passes(ids, att, P, T):
            tokens = ids[:, P:]
            features, head = response_features(run.policy, ids, att, P, T)
            (logp, entropy), = features_logprobs(features, head, tokens, (temperature,), entropy=True)
            del features
            ref = None
            if reference:
                features, head = response_features(run.reference, ids, att, P, T)
                (ref, _), = features_logprobs(features, head, tokens, (temperature,))
            return logp, entropy, ref, values(ids, att, P, T)[0]

        return by_length(passes, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.response_mask,
                         *self._grouping(False))

    @staticmethod
    def _values_pass(model):
        """`by_length`'s pass of a critic: its values (n, T) float32."""
        return lambda ids, att, P, T: (_forward(model, ids, att, P, T).squeeze(-1).float(),)

    def _update_pass(self, temperature: float):
        """`by_length`'s pass of one update minibatch, with gradients: the policy's log-probs at `temperature` (the
        output layer a chunk of rows at a time, recomputed in the backward pass) and the critic's values."""
        from rlprm.rl.core import token_logprobs

        def passes(ids, att, P, T):
            features, head = response_features(self.policy_engine, ids, att, P, T)
            logp = token_logprobs(features, ids[:, P:], head, temperature)[0]
            return logp, _forward(self.value_engine, ids, att, P, T).squeeze(-1).float()

        return passes

    def ppo_step(self, run: Run, tr: "Trajectory") -> dict[str, list[float]]:
        """7. update: rl.ppo_epochs passes over shuffled minibatches of the trajectory, clipped policy and value
        losses; then the sampler takes the new weights and the KL coefficient adapts. Returns each minibatch's
        losses and statistics."""
        import torch

        from rlprm.rl.core import masked_mean, policy_loss, value_loss

        rl, dist, ro = run.recipe.rl, run.dist, tr.rollout
        B = tr.mask.shape[0]
        passes = self._update_pass(rl.temperature)
        minibatch = max(1, rl.minibatch_size // dist.world)
        run.policy.train()
        self.value_model.train()
        stats: dict[str, list[float]] = defaultdict(list)
        for _ in range(rl.ppo_epochs):
            order = torch.randperm(B)
            for start in range(0, B, minibatch):
                idx = order[start:start + minibatch].to(run.device)
                m = tr.mask[idx]
                with self._compute():  # rows of similar length pass together (`by_length`): the same minibatch
                    new_logprobs, values = by_length(passes, ro.input_ids[idx], ro.attention_mask[idx],
                                                     ro.prompt_width, ro.response_mask[idx], *self._grouping(True))
                pl, pstats = policy_loss(new_logprobs, tr.old_logprobs[idx], tr.advantages[idx], m, rl.clip_range)
                vl, vstats = value_loss(values, tr.old_values[idx], tr.returns[idx], m, rl.clip_range_value)
                self._optimizer_step(run, pl, vl)
                stats["policy_loss"].append(pl.item())
                stats["value_loss"].append(vl.item())
                for k, v in {**pstats, **vstats}.items():
                    stats[k].append(float(v))
        self.sampler.refresh()  # a vLLM engine samples the next rollout with the updated weights
        # every rank adapts the coefficient from the same (all-rank) KL, so it stays identical everywhere
        self.kl_ctl.update(dist.mean(float(masked_mean(tr.kl, tr.mask))), B * dist.world)
        return stats

    def _optimizer_step(self, run: Run, pl, vl) -> None:
        """One optimizer step of the policy and the critic on the loss pl + rl.vf_coef * vl."""
        import torch

        rl, dist = run.recipe.rl, run.dist
        loss = pl + rl.vf_coef * vl
        check_finite("the PPO loss", loss.detach(), run.run_dir, dist)
        self.opt_step += 1
        if rl.warmup_steps:  # linear warm-up; the engines step this same optimizer's groups
            for g in self.policy_opt.param_groups:
                g["lr"] = rl.learning_rate * min(1.0, self.opt_step / rl.warmup_steps)
        if dist.deepspeed:
            # each engine averages its gradients over the ranks, clips (gradient_clipping) and steps; the models
            # share no parameters, so the two backwards equal one of `loss`
            self.policy_engine.backward(pl)
            self.value_engine.backward(rl.vf_coef * vl)
            self.policy_engine.step()
            self.value_engine.step()
        else:
            self.policy_opt.zero_grad(set_to_none=True)
            self.value_opt.zero_grad(set_to_none=True)
            loss.backward()  # the two models share no parameters: one backward fills both
            torch.nn.utils.clip_grad_norm_(run.policy.parameters(), rl.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), rl.max_grad_norm)
            self.policy_opt.step()
            self.value_opt.step()

    def record(self, run: Run, tr: "Trajectory", stats: dict[str, list[float]], epoch: float, where: str) -> None:
        """8. log: one record of the iteration (all-rank means), and a progress line."""
        from rlprm.rl.core import explained_variance, masked_mean

        grades, times = tr.grades, tr.times
        mean_kl = float(tr.kl.sum(1).mean())  # per sample, summed over its tokens (kl is 0 at padding)
        ev = explained_variance(tr.old_values, tr.returns, tr.mask)  # the critic's, on the values GAE used
        record = {
            "epoch": epoch,
            "rl/reward": float(tr.rewards.returns.mean()),
            "rl/shaped_return": float(tr.shaped.sum(1).mean()),
            "rl/kl": mean_kl,
            "rl/kl_per_sample": mean_kl,  # the explicit name of rl/kl (kept for older readers)
            "rl/kl_per_token": float(masked_mean(tr.kl, tr.mask)),
            "rl/kl_coef": self.kl_ctl.value,
            "rl/learning_rate": self.policy_opt.param_groups[0]["lr"],
            "rl/entropy": tr.entropy,
            "rl/value_mean": float(masked_mean(tr.old_values, tr.mask)),
            "rl/response_length": float(tr.mask.sum(1).float().mean()),
            "rl/steps_per_solution": mean(len(g.steps) for g in grades),
            "rl/answer_accuracy": mean(float(g.answer_correct) for g in grades),
            "rl/process_accuracy": mean(g.process_correct for g in grades),
            "rl/well_formed": mean(g.well_formed for g in grades),
            # the habits in this update's own samples (arithmetic task; None elsewhere): how fast each
            # reward removes them, update by update, between the held-out evaluations
            "rl/shortcut_rate": mean(g.shortcut for g in grades),
            "rl/carry_drop_rate": mean(g.carry_drop for g in grades),
            **{f"rl/{k}": mean(v) for k, v in stats.items()},
            # beside rl/value_loss: 1 - Var(returns - values) / Var(returns); None where the returns do not vary
            "rl/explained_variance": None if math.isnan(ev) else ev,
            **{f"reward/{k}": v for k, v in tr.rewards.stats.items()},
            **{f"time/{k}": round(v, 3) for k, v in times.items()},
            # vLLM sampler only (None: no token with a known sampler log-prob); the HF sampler IS the policy
            **({} if tr.rollout.sampler_logprobs is None else {"rollout/logprob_gap": tr.gap}),
        }
        record = run.dist.mean_metrics(record)  # all-rank means (same number of samples on each)
        run.log(record)
        if run.progress and run.dist.is_main:
            print(f"{where}  reward {record['rl/reward']:+.3f}  answer {record['rl/answer_accuracy']:.1%}"
                  f"{process_part(record)}  kl {mean_kl:.4f}  gen {times['generate']:.1f}s score "
                  f"{times['score']:.1f}s update {times['update']:.1f}s", flush=True)


@dataclass
class Trajectory:
    """One PPO iteration's rollout with everything the update and the log read; (B, T) tensors on the run's device."""

    rollout: Rollout
    grades: list  # per sample, its `data.problems.SampleGrade`
    rewards: "object"  # `reward.tokens.TokenRewards`: the reward tensor, its stats and per-sample decisions
    mask: "object"  # (B, T) bool: response tokens kept by the rewards (the length cap) and the rollout
    old_logprobs: "object"  # (B, T) float32: the policy's log-probs before the update, at rl.temperature
    old_values: "object"  # (B, T) float32: the critic's values before the update
    shaped: "object"  # (B, T): the rewards minus the KL penalty
    kl: "object"  # (B, T): the per-token KL estimate against the reference (0 at padding)
    advantages: "object"  # (B, T): GAE, whitened when rl.whiten_advantages
    returns: "object"  # (B, T): GAE's returns, the critic's targets
    entropy: float  # the policy's mean token entropy on the rollout
    gap: float | None  # a vLLM sampler's log-prob gap to the policy (None: the HF sampler, or none known)
    times: dict  # seconds spent: generate, score (and update, set after `ppo_step`)
    scored_at: float  # time.monotonic() when the scores were in


__all__ = ["PPO", "Rollout", "Trajectory", "build_rollout", "response_features", "rollout_logprobs", "truncate_layers"]
