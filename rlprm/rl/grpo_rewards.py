"""GRPO's rewards and process advantages: TRL's reward function computing rlprm rewards, and the per-token
advantages of process supervision (`rl/grpo.py` has the algorithm, `rl/grpo_trainer.py` the TRL trainer; both
import this module, neither imports the other back)."""

from __future__ import annotations

import time
from pathlib import Path

from rlprm.config import Recipe
from rlprm.rl.run import RLError, check_finite

# the keys (and, for advantages, the leading dimension) that `_generate_and_score_completions` of TRL 1.16
# returns and that the override and the loss rely on; tests/test_grpo.py fails loudly if TRL changes them
TRL_OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")


class RewardFunction:
    """A TRL reward function computing rlprm rewards; keeps what it computed for the trainer and the log.

    TRL calls it with the prompts, the decoded completions, the completion ids
    and the dataset's other columns (here `problem_index`, an index into
    `problems`). It returns one scalar per completion: the return of
    `reward.tokens.token_rewards`, each completion's value under the training objective
    (`TokenRewards.objective`: for sparse rewards the reward itself; for dense
    rewards rl.process_advantage's min, mean or sum of the step values plus the
    outcome, used by TRL only for its log). The
    full `TokenRewards`, the grades and the scoring time stay in `self.last`
    for the process advantages and the metrics.
    """

    __name__ = "rlprm_reward"  # TRL names the reward column after it

    def __init__(self, recipe: Recipe, problems: list, tokenizer, reward_model=None, run_dir: Path | None = None,
                 dist=None, source=None):
        from rlprm.reward.sources import reward_source
        from rlprm.rl.distributed import Dist

        self.recipe, self.problems, self.tokenizer = recipe, problems, tokenizer
        # who scores (rlprm/reward/sources.py): the run's, or one built around `reward_model`
        self.source = source if source is not None else reward_source(recipe, reward_model)
        # several ranks: a reason to stop on one stops them all (the others would wait in TRL's gather for ever)
        self.dist = dist or Dist.single()
        self.run_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir)
        self.last: dict = {}
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, problem_index, **_):
        from rlprm.reward.tokens import RewardError

        t0 = time.monotonic()
        eos = self.tokenizer.eos_token_id
        ids = [list(c) for c in completion_ids]
        # decode ourselves: step ends are found through character offsets of exactly this decoding (reward/tokens.py)
        texts = [self.tokenizer.decode([t for t in c if t != eos], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False) for c in ids]
        problems = [self.problems[int(i)] for i in problem_index]
        grades = self.source.grade(problems, texts)
        outcomes = [float(g.answer_correct) for g in grades]
        reason, scores = None, None
        try:
            scores = self.source.step_scores(problems, texts, ids, grades, tokenizer=self.tokenizer)
            # TRL hands over each completion up to and including its EOS: one without EOS at the cap was cut
            tr = self.source.rewards(texts, ids, grades, scores, tokenizer=self.tokenizer)
        except RewardError as exc:
            reason = f"iteration {self.calls + 1}: {exc}"
        self.dist.stop_if_any(reason, RLError)
        check_finite("the rewards", tr.rewards, self.run_dir, self.dist)
        self.calls += 1
        self.last = {"texts": texts, "ids": ids, "rewards": tr, "scores": scores, "grades": grades, "outcomes": outcomes,
                     "lengths": [int(n) for n in tr.mask.sum(1).tolist()], "time_score": time.monotonic() - t0}
        return [float(r) for r in tr.objective]


def grpo_advantages(recipe: Recipe, last: dict, group_size: int, width: int):
    """(B, width) per-token process advantages of one generation batch: the one call the trainer makes.

    last: what `RewardFunction` kept for the batch; its `TokenRewards` holds every sample's reward events (the
    step rewards of reward.dense_form, the last one on EOS; a missing answer's penalty) and outcome term, placed
    by `reward.tokens.token_rewards`, the one placement. Here they are only normalised over each group of
    `group_size` samples and spread over the tokens as rl.process_advantage says
    (`core.process_token_advantages`).
    """
    values, positions, outcome = last["rewards"].event_tensors()
    return rank_process_advantages(recipe, [(values, positions, outcome, width)], 0, group_size)


def rank_process_advantages(recipe: Recipe, parts: list, rank: int, group_size: int):
    """(B_r, T_r) process advantages of rank `rank`'s completions, each group normalised whole, wherever its members are.

    parts: every rank's (event values (B_q, S_q), event positions (B_q, S_q), outcome (B_q,), width T_q), in rank
    order: `TokenRewards.event_tensors()` of that rank's completions and their padded width. TRL gives rank q
    the q-th contiguous slice of a generation batch made of consecutive groups of `group_size`, so the rows
    stacked in rank order are the whole batch in TRL's order (as TRL's own `gather` of the scalar rewards), and
    a group may straddle two ranks. The advantages of the whole batch (`core.process_token_advantages`, width
    max T_q) are cut to this rank's rows and its width T_r; nothing is lost: a sample's events, and so its
    non-zero advantages, lie within its own completion. One process: parts = [its own], rank 0.
    """
    import torch

    from rlprm.rl.core import process_token_advantages

    S = max(v.shape[1] for v, _, _, _ in parts)
    values = torch.cat([torch.nn.functional.pad(v, (0, S - v.shape[1]), value=0.0) for v, _, _, _ in parts])
    positions = torch.cat([torch.nn.functional.pad(p, (0, S - p.shape[1]), value=-1) for _, p, _, _ in parts])
    outcome = torch.cat([o.reshape(-1) for _, _, o, _ in parts])
    width = max(int(w) for _, _, _, w in parts)
    whole = process_token_advantages(values, positions, group_size, width, form=recipe.rl.process_advantage,
                                     outcome=outcome)
    start = sum(v.shape[0] for v, _, _, _ in parts[:rank])
    rows, own_width = parts[rank][0].shape[0], int(parts[rank][3])
    return whole[start:start + rows, :own_width]


__all__ = ["TRL_OUTPUT_KEYS", "RewardFunction", "grpo_advantages", "rank_process_advantages"]
