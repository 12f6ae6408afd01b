"""Search-guided RL rollouts (`rl.rollout_search`): a problem's group of completions drawn from a PRM-guided tree.

Plain rollouts sample each of a problem's N completions independently from the policy. Here the group is what a
step-level search (rlprm/evaluation/search.py: beam search or DVTS, the same stepping, stopping and bookkeeping as at
test time) finishes: the completions share prefixes and branch at steps, and the scorer (the run's reward model,
the exact checker, or the policy's own confidence) decides which branches go on. No RL framework we know of draws
its rollouts this way; the search itself follows Snell et al. 2024 and huggingface/search-and-learn (test time only).

What it costs is counted: every token the search generated for a problem (kept, pruned and lookahead branches alike),
so a run can be compared with plain sampling at equal generated tokens (`plain_tokens` counts plain sampling's).

On- vs off-policy. A search-drawn completion is not a sample of the policy: the scorer chose among its branches, so
the group's distribution is the policy tilted towards the scorer's favourites, with no tractable density (a beam's
probability depends on every sibling it beat). Rejection sampling does not need one: it fine-tunes on selected
samples, which is off-policy by design (the selection already tilts the data), and a better-searched pool is just a
better pool to select from. A policy-gradient update (GRPO, PPO) would need importance weights
pi(completion) / q(completion) that the tree does not give. GRPO takes `rl.rollout_search` anyway, stated as what it
is: TRL's `rollout_func` hands it the tree's groups (`TRLRollout`), its ratio's "old" log-probs are the policy's own
(recomputed, so the ratio starts at 1) and its group-relative advantages are computed over the tree's completions
as if they were samples: an off-policy estimate with no correction, biased towards whatever the scorer prefers
(a group of near-identical right solutions also has little spread to learn from). Measured on the embedded task
it made GRPO much worse than plain groups (docs/results.md): a way to measure the caveat, not to train. PPO does
not take it: its critic and GAE assume on-policy returns, and its rollouts are rlprm's own (docs/rl.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlprm.data.problems import TaskProblem


@dataclass
class TreeGroups:
    """The groups a search drew: per problem, `group_size` completions and what the search spent on them."""

    texts: list[list[str]]
    """[P][group_size] completions (the text after the prompt), the scorer's best first."""
    values: list[list[float]]
    """[P][group_size] the scorer's aggregated value of each completion (rl.rollout_search.aggregation)."""
    tokens: list[int]
    """Per problem, every token generated for it: kept and pruned branches, lookahead rollouts, EOS included."""
    scorer_calls: list[int]
    """Per problem, partial solutions the scorer read."""
    short: int
    """Problems whose search finished fewer solutions than the group holds (the group was filled with repeats of its
    best ones, in rank order)."""

    @property
    def generated_tokens(self) -> int:
        return sum(self.tokens)


def settings_for(cfg, group_size: int, max_new_tokens: int, temperature: float, seed: int):
    """The `evaluation.search.SearchSettings` that yield `group_size` finished solutions per problem: beam search
    with `group_size` beams; DVTS with `group_size` subtrees (n = group_size x width candidates per step)."""
    from rlprm.evaluation.search import SearchSettings

    n = group_size if cfg.method == "beam" else group_size * cfg.width
    return SearchSettings(cfg.method, n=n, width=cfg.width, lookahead=cfg.lookahead, aggregation=cfg.aggregation,
                          max_steps=cfg.max_steps, max_step_tokens=cfg.max_step_tokens,
                          max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def make_scorer(cfg, policy, tokenizer, reward_model, sep: str, batch_size: int = 64):
    """The rl.rollout_search.scorer as a `evaluation.search.PrefixScorer`: the run's reward model, the exact
    checker, or the policy's own confidence (read from the policy as it is when it scores)."""
    from rlprm.evaluation.search import CheckerScorer, ConfidenceScorer, RewardModelScorer

    if cfg.scorer == "checker":
        return CheckerScorer(sep)
    if cfg.scorer == "confidence":
        return ConfidenceScorer(policy, tokenizer, sep, batch_size=batch_size)
    if reward_model is None:
        raise ValueError("rl.rollout_search.scorer reward_model needs the run's reward model (model.reward_model)")
    return RewardModelScorer(reward_model, "reward_model", sep, batch_size=batch_size)


def step_generator(policy, tokenizer, sep: str, batch_size: int, sampler=None):
    """Who writes the next steps: the sampler's vLLM engine when rl.rollout is vllm, else HF `generate` on the policy
    (`evaluation.search`'s step generators, stopping at the separator)."""
    from rlprm.evaluation.search import HFStepGenerator, VLLMStepGenerator

    if getattr(sampler, "llm", None) is not None:
        return VLLMStepGenerator(sampler.llm, tokenizer, sep, batch_size=batch_size)
    return HFStepGenerator(policy, tokenizer, sep, batch_size=batch_size)


def build_tree(run, batch_size: int, sampler=None):
    """(step generator, scorer) for a run whose rl.rollout_search is on, else None. The scorer `reward_model` is the
    run's (loaded here when reward.source ranks without one)."""
    cfg = run.recipe.rl.rollout_search
    if cfg.method == "none":
        return None
    sep = run.recipe.task.step_separator
    reward_model = run.reward_model
    if cfg.scorer == "reward_model" and reward_model is None:
        from rlprm.reward.adapters import load_for_recipe

        reward_model = load_for_recipe(run.recipe, device=run.device, dtype=run.recipe.model.dtype)
    return (step_generator(run.policy, run.tokenizer, sep, batch_size, sampler),
            make_scorer(cfg, run.policy, run.tokenizer, reward_model, sep))


def draw_groups(problems: Sequence[TaskProblem], generator, scorer, settings, group_size: int) -> TreeGroups:
    """Search every problem at once (`evaluation.search.search`) and make each problem's finished solutions its
    group of `group_size`: best first by the scorer's value (ties in the search's order); fewer finished (beam
    search drops repeated partial solutions) are filled with repeats, best first, and counted in `short`."""
    from rlprm.evaluation.search import search

    if group_size < 1:
        raise ValueError(f"a group needs at least one completion, got group_size={group_size}")
    result = search(problems, generator, scorer, settings)
    texts, values, short = [], [], 0
    for row in result.finished:
        ranked = sorted(row, key=lambda b: -b.value)  # stable: equal values keep the search's order
        if not ranked:  # cannot happen (every round keeps at least one candidate per group); kept loud if it does
            raise RuntimeError("the search finished no solution for a problem (a bug in evaluation.search)")
        short += len(ranked) < group_size
        picked = [ranked[k % len(ranked)] for k in range(group_size)]
        texts.append([b.text for b in picked])
        values.append([b.value for b in picked])
    return TreeGroups(texts, values, list(result.tokens), list(result.scorer_calls), short)


def policy_logprobs(policy, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float,
                    batch_size: int = 32) -> list[list[float]]:
    """log p(token) of every completion token under `policy` at `temperature` (`rlprm.logprobs`), one
    teacher-forced pass per batch (right-padded: each row is prompt + completion)."""
    import torch

    from rlprm.logprobs import logprobs_from_logits

    device = next(policy.parameters()).device
    out: list[list[float]] = []
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            pairs = list(zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]))
            rows = [p + c for p, c in pairs]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for k, r in enumerate(rows):
                ids[k, :len(r)] = torch.tensor(r, device=device)
                mask[k, :len(r)] = 1
            with torch.no_grad():
                logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]
                lp = logprobs_from_logits(logits, ids[:, 1:], temperature)
            for k, (p, c) in enumerate(pairs):
                out.append(lp[k, len(p) - 1:len(p) - 1 + len(c)].tolist())
    finally:
        policy.train(was_training)
    return out


class TRLRollout:
    """GRPO's groups from the search tree: TRL's `rollout_func` (`GRPOTrainer(rollout_func=...)`, experimental in
    TRL 1.16), called with this rank's slice of a generation batch (each prompt repeated once per completion,
    the copies adjacent) and the trainer.

    Each run of adjacent copies of a prompt is one group, drawn by `draw_groups` with the run's length as the group
    size (one process: always rl.samples_per_problem; several: a group that straddles two ranks is searched by each
    rank for its own part). The completions are re-encoded from their text (exact for a character tokenizer; a BPE
    may pick other ids for the same text, which the policy then scores as they are); one that ends with its answer
    step gets EOS (an answer step ends only at EOS), one cut at rl.max_new_tokens none. The log-probs TRL asks for
    are recomputed under the policy at rl.temperature (`policy_logprobs`): TRL's loss does not read them on HF
    generation, and its vLLM importance correction would see a ratio of 1. No importance weight corrects for the
    scorer's choice among branches (the tree has no tractable density): GRPO then treats the group as on-policy,
    which it is not (see the module docstring). Counts what it generated in `counts` (read by the iteration log).
    """

    def __init__(self, problems: Sequence[TaskProblem], generator, scorer, cfg, policy, tokenizer,
                 max_new_tokens: int, temperature: float, seed: int, counts: dict):
        self.by_prompt = {p.prompt: p for p in problems}
        self.generator, self.scorer, self.cfg = generator, scorer, cfg
        self.policy, self.tokenizer = policy, tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.counts = counts
        self.calls = 0

    def __call__(self, prompts: list, trainer=None) -> dict:
        from rlprm.steps import ANSWER_MARK, split_steps

        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("rl.rollout_search takes text prompts (rlprm's), not chat messages")
        runs: list[list] = []  # [prompt, copies] of adjacent copies
        for p in prompts:
            if runs and runs[-1][0] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        texts: list[list[str]] = [[] for _ in runs]
        # one search per group size (one process: a single size), each seeded by (seed, call)
        for size in sorted({c for _, c in runs}):
            idx = [i for i, (_, c) in enumerate(runs) if c == size]
            groups = draw_groups([self.by_prompt[runs[i][0]] for i in idx], self.generator, self.scorer,
                                 settings_for(self.cfg, size, self.max_new_tokens, self.temperature,
                                              self.seed * 1_000_003 + self.calls), size)
            for i, row in zip(idx, groups.texts):
                texts[i] = row
            self.counts["generated_tokens"] = self.counts.get("generated_tokens", 0) + groups.generated_tokens
            self.counts["search_short_groups"] = self.counts.get("search_short_groups", 0) + groups.short
        self.calls += 1
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        prompt_ids = tok(list(prompts))["input_ids"]
        completion_ids = []
        for row in texts:
            for text in row:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                steps = split_steps(text, self.generator.sep)
                # an answer step ends only at EOS; so did an empty completion (EOS at once)
                if (not ids or steps and steps[-1].lstrip().startswith(ANSWER_MARK)) and eos is not None:
                    ids = ids + [eos]
                completion_ids.append(ids[:self.max_new_tokens])
        logprobs = policy_logprobs(self.policy, prompt_ids, completion_ids, self.temperature)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def plain_tokens(token_ids: list[list[list[int]]], max_new_tokens: int) -> int:
    """Tokens plain sampling generated, counted as the search counts them: each completion's ids plus its EOS (a
    completion shorter than the cap stopped on EOS, which `sampling.Samples` leaves out)."""
    return sum(len(ids) + (len(ids) < max_new_tokens) for row in token_ids for ids in row)


__all__ = ["TRLRollout", "TreeGroups", "build_tree", "draw_groups", "make_scorer", "plain_tokens", "policy_logprobs",
           "settings_for", "step_generator"]
