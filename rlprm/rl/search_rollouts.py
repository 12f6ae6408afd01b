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
pi(completion) / q(completion) that the tree does not give; treating the group as on-policy biases the gradient
towards whatever the scorer prefers. That is why only rejection sampling takes `rl.rollout_search` (docs/rl.md).
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


def plain_tokens(token_ids: list[list[list[int]]], max_new_tokens: int) -> int:
    """Tokens plain sampling generated, counted as the search counts them: each completion's ids plus its EOS (a
    completion shorter than the cap stopped on EOS, which `sampling.Samples` leaves out)."""
    return sum(len(ids) + (len(ids) < max_new_tokens) for row in token_ids for ids in row)


__all__ = ["TreeGroups", "draw_groups", "make_scorer", "plain_tokens", "settings_for", "step_generator"]
