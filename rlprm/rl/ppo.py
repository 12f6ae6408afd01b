"""PPO for a language-model policy, with dense (PRM) or sparse (ORM / ground-truth) token rewards.

Our own compact loop (DESIGN.md section 6): TRL no longer ships a PPO trainer.
Four models take part:
- the policy (the generator, trained),
- a frozen reference (the initial policy; the KL penalty keeps the policy near it),
- a value model (critic): a token-classification model with one output, whose
  body starts as the generator's, trained on the GAE returns,
- the reward model (a PRM or an ORM; none for `ground_truth`, `exact` and
  `confidence` rewards: `exact` scores steps with the arithmetic checker that
  grades every sample anyway, `confidence` reads the reference model's own
  token log-probs at temperature 1 from the forward pass the KL needs).

Temperature: rollouts are sampled from softmax(logits / rl.temperature), so
every log-prob of the update and of the KL (policy old and new, reference)
and the logged entropy are taken at that temperature too
(`core.logprobs_from_logits`); raw logits at T != 1 would make every update
off-policy. Only the `confidence` reward uses T = 1: it is the starting
model's own confidence, whatever the sampling temperature.

KL metrics per iteration, measured on the rollout (the policy after the last
update against the reference, with `rl.kl_estimator`): `rl/kl_per_token`, the
mean over response tokens, and `rl/kl_per_sample` (also logged as `rl/kl`),
the mean over samples of the sum over each sample's tokens.

Every iteration reads top to bottom in `train_ppo`: 1. generate, 2. score,
3. rewards, 4. logprobs and values, 5. KL penalty, 6. advantages, 7. update,
8. log; every epoch ends with 9. best-of-N and 10. a checkpoint; the run ends
with 11. export. The math lives in `rl/core.py` and `rewards.py`; this file
only wires models and tensors to it.

Sequences are laid out as [left-padded prompt | right-padded response]: the
prompts are padded on the left so that every response starts at the same
column, and the response tensors (B, T) then line up with `rewards.py`'s.

With several processes (or a `deepspeed:` key) the policy and critic train
inside DeepSpeed engines (`rl/distributed.py`): each rank samples its share of
the prompts, gradients are averaged, rank 0 alone evaluates and writes.

Resume works at epoch granularity: a checkpoint holds the policy, the value
model, both optimizers, the KL coefficient, the counters and the RNG state, and
the problems of epoch e depend only on (seed, e). On CPU with the same seed, a
resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rlprm.config import Recipe


class PPOError(RuntimeError):
    """A PPO run cannot go on (missing inputs, non-finite rewards or losses); the message says what to do."""


class PPOInputError(PPOError):
    """The run cannot start: a missing generator or reward model, or a run folder that needs --resume."""


@dataclass
class Rollout:
    """One rollout batch; B = prompts * samples_per_problem, P = prompt columns, T = response columns."""

    input_ids: "object"  # (B, P + T) long: [left-padded prompt | response, right-padded]
    attention_mask: "object"  # (B, P + T) long
    response_mask: "object"  # (B, T) bool: response tokens, EOS included
    prompt_width: int
    response_ids: list[list[int]]  # per sample, the generated ids up to and including EOS
    texts: list[str]  # per sample, the decoded response (special tokens skipped)


# --------------------------------------------------------------------------- pieces


def _problems_for_epoch(recipe: Recipe, epoch: int, exclude: set[str]):
    """The training prompts of one epoch: a function of (seed, epoch) only, so that resume replays them."""
    from rlprm.problems import from_arithmetic, load_jsonl_problems

    rl = recipe.rl
    if recipe.task.name == "arithmetic":
        from rlprm.tasks.arithmetic import make_problems

        # a seed stream apart from prepare's (seed * 1_000_003 + 17 / + 29), and held-out problems excluded
        seed = recipe.run.seed * 1_000_003 + 1000 + epoch
        return from_arithmetic(make_problems(recipe.task.arithmetic, rl.problems_per_epoch, seed=seed, exclude=exclude),
                               prefix=f"rl{epoch}")
    if recipe.task.train_path is None:
        raise PPOInputError(f"task `{recipe.task.name}` needs task.train_path (a JSONL of training problems) for RL")
    import random

    pool = load_jsonl_problems(recipe.task.train_path, template=recipe.task.prompt_template)
    rng = random.Random(recipe.run.seed * 7919 + epoch)
    return [pool[rng.randrange(len(pool))] for _ in range(rl.problems_per_epoch)]


def _generate(policy, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int) -> Rollout:
    """n samples per prompt, keeping EOS and the token ids (rlprm.sampling strips both, which RL cannot use)."""
    import torch

    device = next(policy.parameters()).device
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            # pure temperature sampling, as everywhere in rlprm; the global torch RNG drives it (restored on resume)
            out = policy.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, num_return_sequences=n,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        policy.train(was_training)
    return build_rollout(tokenizer, enc["input_ids"], enc["attention_mask"], out[:, enc["input_ids"].shape[1]:].tolist(), n)


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


def rollout_logprobs(model, ro: Rollout, temperature: float):
    """(B, T) float32 log-probs of the rollout's response tokens under `model`, at `temperature`, plus the logits.

    Returns (logprobs, logits (B, T, V)); logprobs are those of the
    distribution the rollout was sampled from when `model` is the sampling
    policy and `temperature` the sampling temperature. Padding positions hold
    values for the pad token (mask them out).
    """
    from rlprm.rl.core import logprobs_from_logits

    T = ro.response_mask.shape[1]
    logits = _forward(model, ro.input_ids, ro.attention_mask, ro.prompt_width, T)
    return logprobs_from_logits(logits, ro.input_ids[:, ro.prompt_width:], temperature), logits


def _check_finite(name: str, value, run_dir: Path, dist=None) -> None:
    """Raise PPOError if `value` holds NaN/inf; with several ranks, on EVERY rank if any rank has one (none hangs)."""
    import torch

    bad = ~torch.isfinite(value) if hasattr(value, "shape") else not math.isfinite(float(value))
    bad = bool(bad.any() if hasattr(bad, "any") else bad)
    if dist is not None and dist.active:
        here = bad
        bad = dist.any_rank(bad)
        if bad and not here:
            name = f"{name} (on another rank)"
    if bad:
        from rlprm.checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise PPOError(f"{name} is not finite (NaN/inf); stopping before it reaches the weights. {kept}. "
                       "Lower rl.learning_rate or reward.kl_coef, check the reward model's scores, then run again "
                       "(with --resume to continue from the checkpoint)")


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _load_value_model(path: str, dtype: str, device: str, trust_remote_code: bool, layers: int = 0):
    from transformers import AutoModelForTokenClassification

    from rlprm.models import torch_dtype
    from rlprm.reward_models import _quiet_transformers

    # the head is new (1 output, randomly initialised from the global RNG): transformers' load report is expected noise
    with _quiet_transformers(report=True):
        model = AutoModelForTokenClassification.from_pretrained(str(path), num_labels=1, dtype=torch_dtype(dtype),
                                                                trust_remote_code=trust_remote_code)
    if layers:
        truncate_layers(model, layers)
    return model.to(device)


def truncate_layers(model, keep: int) -> None:
    """Keep the first `keep` decoder layers of a transformers model in place (config included, so that a saved
    checkpoint reloads with the same shape); a no-op when it has no more. Raises PPOInputError for a model
    whose body keeps its layers under another name than `layers`."""
    body = model.base_model
    blocks = getattr(body, "layers", None)
    if blocks is None:
        raise PPOInputError(f"rl.value_layers: {type(model).__name__} keeps no `layers` list in its body; "
                            "set rl.value_layers: 0 for this critic")
    if keep >= len(blocks):
        return
    body.layers = blocks[:keep]
    model.config.num_hidden_layers = keep
    if isinstance(getattr(model.config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Llama 4)
        model.config.layer_types = model.config.layer_types[:keep]


def check_prerequisites(recipe: Recipe) -> None:
    """Raise PPOError naming the command that builds a missing generator or reward model."""
    builders = {"generator": "rlprm prepare recipes/arith_prepare.yaml",
                "arith_prm": "rlprm train-rm recipes/prm_train.yaml",
                "arith_orm": "rlprm train-rm recipes/orm_train.yaml"}
    needed = [("model.generator", recipe.model.generator)]
    # only a trained reward model needs model.reward_model; exact and confidence score without one
    if recipe.reward.source in ("prm", "orm"):
        if recipe.model.reward_model is None:
            raise PPOInputError(f"reward.source is {recipe.reward.source} but model.reward_model is not set; "
                           "point it at a folder written by `rlprm train-rm`")
        needed.append(("model.reward_model", recipe.model.reward_model))
    if recipe.reward.source == "exact" and recipe.task.name != "arithmetic":  # recipe validation refuses it too
        raise PPOInputError(f"reward.source exact needs the arithmetic task's step checker; task is "
                            f"{recipe.task.name!r}")
    for key, ref in needed:
        if ref.startswith("/") and not Path(ref).exists():
            hint = next((cmd for part, cmd in builders.items() if part in Path(ref).parts), None)
            how = f"; build it first with `{hint}`" if hint else ""
            raise PPOInputError(f"{key} {ref} does not exist{how}")
    if recipe.model.generator == "tiny":
        raise PPOInputError("model.generator is `tiny` (an untrained model); point it at a trained generator, e.g. "
                       "../runs/arith/generator built by `rlprm prepare recipes/arith_prepare.yaml`")
    if recipe.rl.algorithm != "ppo":
        raise PPOInputError(f"rl.algorithm is {recipe.rl.algorithm!r}; only ppo is implemented by train_ppo")
    if recipe.model.lora.enabled:
        # refused rather than ignored: a run that silently trains all weights is not the run that was asked for
        raise PPOInputError("model.lora.enabled: PPO trains all weights for now (LoRA is not supported by it yet); "
                            "set model.lora.enabled: false, or use rl.algorithm: rejection_sampling with LoRA")


# --------------------------------------------------------------------------- the loop


def train_ppo(recipe: Recipe, resume: bool = False, progress: bool = True) -> dict:
    """Run PPO as the recipe says; returns the final metrics (also in summary.json)."""
    import torch

    from rlprm.checkpoint import export, load_state, rng_state, save_checkpoint, start_or_resume
    from rlprm.evaluate import between_epochs
    from rlprm.models import load_causal_lm, load_tokenizer, resolve_device
    from rlprm.problems import eval_problems, grade_samples, held_out_arithmetic
    from rlprm.prm_adapters import load_for_recipe
    from rlprm.rewards import RewardError, add_kl_penalty, confidence_scores, prefix_correct_probs, token_rewards
    from rlprm.rl.core import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae,
                               logprobs_from_logits, masked_mean, policy_loss, value_loss)
    from rlprm.rl.distributed import (NullTracker, device_for, launched_world_size, setup, shard, trim,
                                      weights_digest)
    from rlprm.tracking import Tracker, truncate_metrics

    check_prerequisites(recipe)
    rl, rcfg, sep = recipe.rl, recipe.reward, recipe.task.step_separator
    run_dir = Path(recipe.run.output_dir)
    # several processes (or a `deepspeed:` key): DeepSpeed engines, each rank with its share of the prompts and
    # rl.minibatch_size / world samples per step, so that an optimizer step sees as many samples as on one process
    world = launched_world_size()
    if rl.prompts_per_iteration < world:
        raise PPOInputError(f"rl.prompts_per_iteration ({rl.prompts_per_iteration}) is below the number of "
                            f"processes ({world}): every rank needs at least one prompt per iteration")
    dist = setup(recipe, micro_batch=max(1, rl.minibatch_size // world))
    minibatch = max(1, rl.minibatch_size // dist.world)
    device = device_for(dist, resolve_device(recipe.run.device))
    ckpt = start_or_resume(run_dir, resume, PPOInputError, writes=dist.is_main)
    dist.seed_everything(recipe.run.seed)  # the same on every rank: the value head starts identical everywhere

    # models: policy and reference from the generator; critic from `rl.value_model`; optional reward model
    gen, dtype, trc = recipe.model.generator, recipe.model.dtype, recipe.model.trust_remote_code
    tokenizer = load_tokenizer(gen, padding_side="left", trust_remote_code=trc)
    reference = load_causal_lm(gen, dtype, device, trc).eval().requires_grad_(False)
    src = ckpt / "model" if ckpt else gen
    policy = load_causal_lm(src, dtype, device, trc)
    value_src = ckpt / "extra" / "value" if ckpt else (gen if rl.value_model == "policy" else rl.value_model)
    value_model = _load_value_model(value_src, dtype, device, trc, rl.value_layers)
    reward_model = None
    if rcfg.source in ("prm", "orm"):
        reward_model = load_for_recipe(recipe, device=device, dtype=dtype)
        if reward_model.kind != rcfg.source:
            raise PPOInputError(f"reward.source is {rcfg.source} but {recipe.model.reward_model} is a {reward_model.kind}")
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=rl.learning_rate)
    value_opt = torch.optim.AdamW(value_model.parameters(), lr=rl.value_learning_rate)
    # the engines train (forward, backward, gradient averaging, clipping, step); `policy` and `value_model` stay
    # the HF models inside them, used for sampling, no-grad passes, evaluation and saving
    policy_engine, value_engine = dist.wrap(policy, policy_opt), dist.wrap(value_model, value_opt)
    dist.split_streams(recipe.run.seed)  # from here each rank draws its own sampling noise (rank 0: unchanged)
    kl_ctl = (FixedKLController(rcfg.kl_coef) if rl.target_kl is None
              else AdaptiveKLController(rcfg.kl_coef, rl.target_kl, rl.kl_horizon))
    start_epoch, step, opt_step = 0, 0, 0  # epochs, iterations, policy optimizer steps (for the warm-up)
    if ckpt is not None:
        state = load_state(ckpt, rank=dist.rank)  # also restores this rank's RNG: the next epoch replays
        if state.get("policy_optimizer") is not None and not dist.deepspeed:
            policy_opt.load_state_dict(state["policy_optimizer"])
            value_opt.load_state_dict(state["value_optimizer"])
        elif dist.is_main:
            # ZeRO shards optimizer states across ranks, and plain torch states do not fit its flat partitions
            print("resume: optimizer moments are not restored under DeepSpeed (or were not saved); they restart")
        kl_ctl.value = state["kl_coef"]
        start_epoch, step = state["epoch"], state["step"]
        opt_step = state.get("opt_step", 0)
        print(f"resuming from {ckpt} (epoch {start_epoch}, iteration {step})")
        if dist.is_main:  # what a killed run logged after this checkpoint is recomputed now
            truncate_metrics(run_dir / "metrics.jsonl", step)

    exclude = set()
    if recipe.task.name == "arithmetic":
        exclude = {p.text for p in held_out_arithmetic(recipe, max(recipe.prepare_eval.num_problems, rl.eval_problems))}
    eval_set = eval_problems(recipe, rl.eval_problems) if rl.eval_n else []
    iterations = math.ceil(rl.problems_per_epoch / rl.prompts_per_iteration)
    n = rl.samples_per_problem
    final: dict = {}

    # only rank 0 writes (metrics.jsonl, W&B, summary); the others' numbers reach it through dist.mean_metrics
    tracker = (Tracker(run_dir, recipe, job="rl", tags=["rl", "ppo", rcfg.mode, rcfg.source]) if dist.is_main
               else NullTracker())
    threads_before = torch.get_num_threads()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)  # restored at the end: callers (tests) keep their setting
    try:
        def evaluate(epoch: int) -> dict:
            # 9. best-of-N on held-out problems, scored by the run's own reward model if it has one;
            # on rank 0 only (the weights are the same everywhere), while the other ranks wait at the barrier
            if not rl.eval_n:
                return {}
            if not dist.is_main:
                dist.barrier()
                return {}
            metrics = between_epochs(recipe, policy, tokenizer, eval_set, reward_model, epoch, reference=reference)
            tracker.log(metrics, step=step)
            dist.barrier()
            return metrics

        if ckpt is None:
            final.update(evaluate(0))  # the starting point, for before/after comparisons

        for epoch in range(start_epoch, rl.epochs):
            problems = _problems_for_epoch(recipe, epoch, exclude)
            for it in range(iterations):
                # this rank's share; a batch is trimmed to a multiple of the world size so that every rank
                # runs the same number of steps (identity on one process)
                batch = shard(trim(problems[it * rl.prompts_per_iteration:(it + 1) * rl.prompts_per_iteration],
                                   dist), dist)
                if not batch:
                    break
                t0 = time.monotonic()

                # 1. generate: n samples per prompt, EOS and token ids kept
                ro = _generate(policy, tokenizer, [p.prompt for p in batch], n, rl.temperature, rl.max_new_tokens)
                B, T = ro.response_mask.shape
                sample_problems = [p for p in batch for _ in range(n)]
                t_gen = time.monotonic() - t0

                # 2. score: exact grading always (for the log and ground-truth rewards); the reward model if used
                grades = [g for row in grade_samples(batch, [ro.texts[i * n:(i + 1) * n] for i in range(len(batch))],
                                                     sep) for g in row]
                outcomes = [float(g.answer_correct) for g in grades]
                scores, ref_logprobs, confidence_logprobs = None, None, None
                if reward_model is not None:
                    scores = reward_model.score_steps([p.text for p in sample_problems], ro.texts, sep=sep)
                elif rcfg.source == "exact":  # the checker as an oracle PRM: 1 up to the first wrong step, then 0
                    scores = [prefix_correct_probs(g.step_correct or []) for g in grades]
                elif rcfg.source == "confidence":
                    # the frozen start's own confidence, at T = 1; the same forward pass gives the KL's log-probs
                    with torch.no_grad():
                        ref_logprobs, ref_logits = rollout_logprobs(reference, ro, rl.temperature)
                        confidence_logprobs = (ref_logprobs if rl.temperature == 1.0 else
                                               logprobs_from_logits(ref_logits, ro.input_ids[:, ro.prompt_width:], 1.0))
                        del ref_logits
                t_score = time.monotonic() - t0 - t_gen

                # 3. rewards on the policy's response tokens (dense at step ends, or sparse at the last token)
                reason = None
                try:
                    if confidence_logprobs is not None:  # per step (dense) or over the response (sparse)
                        scores = confidence_scores(ro.texts, ro.response_ids, confidence_logprobs, ro.response_mask,
                                                   tokenizer, rcfg.mode == "dense", sep)
                    # eos_token_id: a response stopped at max_new_tokens without EOS is cut, not judged as written
                    tr = token_rewards(rcfg, ro.texts, ro.response_ids, scores=scores, outcomes=outcomes,
                                       tokenizer=tokenizer, max_tokens=rl.max_new_tokens,
                                       eos_token_id=tokenizer.eos_token_id, width=T, sep=sep,
                                       sparse_aggregate=rcfg.sparse_aggregate, device=device)
                except RewardError as exc:
                    reason = f"epoch {epoch + 1}, iteration {it + 1}: {exc}"
                dist.stop_if_any(reason, PPOError)  # every rank stops if one cannot go on
                _check_finite("the rewards", tr.rewards, run_dir, dist)
                mask = tr.mask & ro.response_mask

                # 4. logprobs and values of the rollout, before any update (the "old" policy and critic), at the
                # sampling temperature: the distribution the rollout came from
                with torch.no_grad():
                    policy.eval()
                    old_logprobs, logits = rollout_logprobs(policy, ro, rl.temperature)
                    entropy = masked_mean(entropy_from_logits(logits.float() / rl.temperature, mask), mask)
                    del logits
                    if ref_logprobs is None:
                        ref_logprobs, _ = rollout_logprobs(reference, ro, rl.temperature)
                    value_model.eval()
                    old_values = _forward(value_model, ro.input_ids, ro.attention_mask, ro.prompt_width, T)
                    old_values = old_values.squeeze(-1).float()

                    # 5. KL penalty: every token pays for drifting from the reference
                    shaped, kl = add_kl_penalty(tr.rewards, old_logprobs, ref_logprobs, mask, kl_ctl.value,
                                                rl.kl_estimator)

                    # 6. advantages: GAE over the shaped rewards, then whitened over the batch
                    advantages, returns = gae(shaped, old_values, mask, rl.gamma, rl.lam)
                    if rl.whiten_advantages:
                        advantages = dist.masked_whiten(advantages, mask)  # all ranks' statistics
                _check_finite("the advantages", advantages, run_dir, dist)

                # 7. update: ppo_epochs passes over shuffled minibatches, clipped policy and value losses
                policy.train()
                value_model.train()
                stats: dict[str, list[float]] = defaultdict(list)
                for _ in range(rl.ppo_epochs):
                    order = torch.randperm(B)
                    for start in range(0, B, minibatch):
                        idx = order[start:start + minibatch].to(device)
                        ids, att, m = ro.input_ids[idx], ro.attention_mask[idx], mask[idx]
                        new_logprobs = logprobs_from_logits(_forward(policy_engine, ids, att, ro.prompt_width, T),
                                                            ids[:, ro.prompt_width:], rl.temperature)
                        values = _forward(value_engine, ids, att, ro.prompt_width, T).squeeze(-1).float()
                        pl, pstats = policy_loss(new_logprobs, old_logprobs[idx], advantages[idx], m, rl.clip_range)
                        vl, vstats = value_loss(values, old_values[idx], returns[idx], m, rl.clip_range_value)
                        loss = pl + rl.vf_coef * vl
                        _check_finite("the PPO loss", loss.detach(), run_dir, dist)
                        opt_step += 1
                        if rl.warmup_steps:  # linear warm-up; the engines step this same optimizer's groups
                            for g in policy_opt.param_groups:
                                g["lr"] = rl.learning_rate * min(1.0, opt_step / rl.warmup_steps)
                        if dist.deepspeed:
                            # each engine averages its gradients over the ranks, clips (gradient_clipping) and
                            # steps; the models share no parameters, so the two backwards equal one of `loss`
                            policy_engine.backward(pl)
                            value_engine.backward(rl.vf_coef * vl)
                            policy_engine.step()
                            value_engine.step()
                        else:
                            policy_opt.zero_grad(set_to_none=True)
                            value_opt.zero_grad(set_to_none=True)
                            loss.backward()  # the two models share no parameters: one backward fills both
                            torch.nn.utils.clip_grad_norm_(policy.parameters(), rl.max_grad_norm)
                            torch.nn.utils.clip_grad_norm_(value_model.parameters(), rl.max_grad_norm)
                            policy_opt.step()
                            value_opt.step()
                        stats["policy_loss"].append(pl.item())
                        stats["value_loss"].append(vl.item())
                        for k, v in {**pstats, **vstats}.items():
                            stats[k].append(float(v))
                t_update = time.monotonic() - t0 - t_gen - t_score
                step += 1
                mean_kl = float(kl.sum(1).mean())  # per sample, summed over its tokens (kl is 0 at padding)
                # every rank adapts the coefficient from the same (all-rank) KL, so it stays identical everywhere
                kl_ctl.update(dist.mean(float(masked_mean(kl, mask))), B * dist.world)

                # 8. log
                process = [g.process_correct for g in grades]
                record = {
                    "epoch": epoch + (it + 1) / iterations,
                    "rl/reward": float(tr.returns.mean()),
                    "rl/shaped_return": float(shaped.sum(1).mean()),
                    "rl/kl": mean_kl,
                    "rl/kl_per_sample": mean_kl,  # the explicit name of rl/kl (kept for older readers)
                    "rl/kl_per_token": float(masked_mean(kl, mask)),
                    "rl/kl_coef": kl_ctl.value,
                    "rl/learning_rate": policy_opt.param_groups[0]["lr"],
                    "rl/entropy": float(entropy),
                    "rl/value_mean": float(masked_mean(old_values, mask)),
                    "rl/response_length": float(mask.sum(1).float().mean()),
                    "rl/steps_per_solution": _mean(len(g.steps) for g in grades),
                    "rl/answer_accuracy": _mean(outcomes),
                    "rl/process_accuracy": _mean(process) if any(p is not None for p in process) else None,
                    "rl/well_formed": _mean(g.well_formed for g in grades),
                    **{f"rl/{k}": _mean(v) for k, v in stats.items()},
                    **{f"reward/{k}": v for k, v in tr.stats.items()},
                    "time/generate": round(t_gen, 3),
                    "time/score": round(t_score, 3),
                    "time/update": round(t_update, 3),
                }
                record = dist.mean_metrics(record)  # all-rank means (same number of samples on each)
                tracker.log(record, step=step)
                final.update(record)
                if progress and dist.is_main:
                    print(f"epoch {epoch + 1}/{rl.epochs} it {it + 1}/{iterations}  reward {record['rl/reward']:+.3f}  "
                          f"answer {record['rl/answer_accuracy']:.1%}  kl {mean_kl:.4f}  "
                          f"gen {t_gen:.1f}s score {t_score:.1f}s update {t_update:.1f}s", flush=True)

            final.update(evaluate(epoch + 1))

            # 10. checkpoint: weights, optimizers, KL coefficient, counters (and the RNG, added by save_checkpoint);
            # rank 0 writes it (the weights are identical on every rank), the others wait for it
            rank_rng = dist.gather(rng_state()) if dist.active else None  # every rank's own sampling stream
            if dist.is_main:
                optimizers = ({"policy_optimizer": None, "value_optimizer": None} if dist.deepspeed else
                              {"policy_optimizer": policy_opt.state_dict(), "value_optimizer": value_opt.state_dict()})
                save_checkpoint(run_dir, epoch + 1, policy, tokenizer,
                                {**optimizers, "kl_coef": kl_ctl.value, "step": step, "opt_step": opt_step},
                                extra_models={"value": value_model}, rank_rng=rank_rng)
            dist.barrier()

        # 11. export the final policy as a plain HF folder (summary first: export copies it)
        trained, sync = bool(final), {}
        if dist.deepspeed:
            # every rank's own digest of its weights: data parallelism must leave them identical
            sync = {"dist/world_size": dist.world,
                    "dist/zero_stage": dist.ds_config.get("zero_optimization", {}).get("stage", 0),
                    "dist/policy_sha256": dist.gather(weights_digest(policy)),
                    "dist/value_sha256": dist.gather(weights_digest(value_model))}
            final.update(sync)
        if trained:  # a resume of a finished run trains nothing: keep its summary
            tracker.summary({**{k: v for k, v in final.items() if isinstance(v, (int, float)) or v is None}, **sync})
        elif dist.is_main:
            print(f"{run_dir} already finished its {rl.epochs} epochs; raise rl.epochs to train on")
        if sync and any(len(set(sync[k])) > 1 for k in ("dist/policy_sha256", "dist/value_sha256")):
            raise PPOError(f"the {dist.world} ranks ended with different weights ({sync}); this is a bug in the "
                           "data-parallel setup, please report it with the recipe")
        out = export(run_dir) if dist.is_main else run_dir / "export"
        dist.barrier()
        final["export_dir"] = str(out)
        return final
    except BaseException as exc:
        dist.announce_failure(exc)  # the ranks waiting at a barrier stop now, naming this rank
        raise
    finally:
        torch.set_num_threads(threads_before)
        tracker.finish()


__all__ = ["PPOError", "PPOInputError", "Rollout", "build_rollout", "check_prerequisites", "rollout_logprobs",
           "train_ppo"]
