"""Reward sources: who scores a sampled solution, as one object per `reward.source`.

Every consumer of a run's reward (PPO, GRPO, rejection sampling and the held-out reward of evaluation) asks the
`RewardSource` that `reward_source(recipe, ...)` builds, and none of them branches on `reward.source`: that
factory is the one place that does. A source turns problems and sampled texts (and the policy's token ids) into

- `grade(problems, texts)`: the task's verdict on each sample (`data.problems.SampleGrade`: the outcome, whether it
  answered, the checker's step verdicts where the task has a checker), the same for every source;
- `step_scores(...)`: per sample the probabilities `reward.tokens.token_rewards` places, one per step (a PRM, the
  exact checker's prefix-correctness, the start's confidence, a user function in dense mode) or one number (an
  ORM, a sparse confidence or user function); None for `ground_truth`, which reads the grades alone;
- `rule()`: what its scores are (`reward.tokens.ScoreRule`: per step or one number, and how they become one
  sparse reward), handed to `reward.tokens.token_rewards`, which reads it instead of `reward.source`;
- `rewards(...)`: the `reward.tokens.TokenRewards` a run of the recipe trains on (`training_rewards`);
- `ranking(...)`: rejection sampling's per-solution score, which samples may be kept, and whether
  rl.rejection_min_score applies;
- `solution_reward(pool, ...)`: the mean of each held-out sample's value under the training objective
  (`TokenRewards.objective`): eval/reward, the one held-out figure every algorithm reports.

The sources (reward/tokens.py's docstring has the math of each):
- `prm` / `orm`: a trained reward model (model.reward_model, family reward.adapter), loaded by the run skeleton
  because `uses_reward_model` says so;
- `ground_truth`: the grader's 1/0 on the final answer;
- `exact`: the arithmetic checker as an oracle PRM (`reward.tokens.prefix_correct_probs`);
- `confidence`: the frozen starting generator's token confidence at temperature 1; it reads the reference's
  log-probs, which the caller computes (`reads_start_logprobs`: PPO shares the forward pass with its KL);
- `python`: a user's function, `reward.function: "package.module:function"`, the way TRL takes `reward_funcs`:

      def my_reward(problems: list[str], solutions: list[str], **kwargs) -> list[float] | list[list[float]]

  `problems` are the problem texts, `solutions` the sampled response texts (one per problem entry, in order);
  kwargs hold `completion_ids` (the policy's token ids of each solution, EOS included when generated, or None
  where unknown), `answers` (each problem's reference answer) and `sep` (the step separator); accept **kwargs
  so that new keys do not break it. It returns one entry per solution: with reward.mode sparse a number (or a
  one-element list), with reward.mode dense a list with one number per step (`steps.split_steps(text, sep)`).
  Every number is a probability-like score in [0, 1], as a reward model's (the missing-answer reward and the
  floor of answered returns are set against that scale); anything else raises a `reward.tokens.RewardError` naming the
  function (the run stops on every rank), and a function that cannot be imported a `RewardSourceError` before the
  run starts.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from rlprm.errors import InputError


class RewardSourceError(InputError, ValueError):
    """A reward source that cannot be built from the recipe (a missing or mismatched reward model, a task without a
    step checker, a reward.function that does not import); raised before any sample is scored."""


def _error(message: str):
    """A `reward.tokens.RewardError` (imported late: rlprm.reward.tokens brings torch, and a recipe check needs none)."""
    from rlprm.reward.tokens import RewardError

    return RewardError(message)


def training_rewards(recipe, texts: Sequence[str], token_ids, grades, *, scores=None, tokenizer=None,
                     width: int | None = None, device=None, rule=None):
    """The rewards a run of `recipe` trains on, for graded samples: the one `reward.tokens.token_rewards` call of PPO, GRPO
    and the held-out reward (`RewardSource.solution_reward`), so that they cannot measure different things.

    texts, token_ids: as `token_rewards` takes them (the policy's ids, EOS included when it was generated).
    grades: per sample, its `data.problems.SampleGrade`: the outcome (`answer_correct`) and whether it answered
    (`answered`, the task's own answer reading). scores: the source's `step_scores` (None for ground_truth).
    What the algorithm changes: GRPO's dense events are step values for its rl.process_advantage, the last on EOS
    (`process_form`, `last_event_at_eos`); `TokenRewards.objective` is then the value that form gives a sample,
    the return otherwise. The length cap is rl.max_new_tokens, with the tokenizer's EOS (a response stopped at
    the cap without EOS was cut: missing). rule: what the scores are, the source's `RewardSource.rule` (None: that
    of the recipe's reward.source). Returns `TokenRewards` (B, width).
    """
    import rlprm.reward.tokens  # token_rewards looked up at call time: a probe that wraps it sees every call

    rcfg, rl = recipe.reward, recipe.rl
    grpo = rl.algorithm == "grpo"
    return rlprm.reward.tokens.token_rewards(
        rcfg, texts, token_ids, rule=rule or source_class(recipe).rule(), scores=scores,
        outcomes=[float(g.answer_correct) for g in grades],
        has_answer=[g.answered for g in grades], tokenizer=tokenizer, max_tokens=rl.max_new_tokens,
        eos_token_id=None if tokenizer is None else tokenizer.eos_token_id, width=width, sep=recipe.task.step_separator,
        sparse_aggregate=rcfg.sparse_aggregate, last_event_at_eos=grpo,
        process_form=rl.process_advantage if grpo else None, device=device)


class RewardSource:
    """What every source does; a subclass supplies `step_scores` (and `pool_scores` for the held-out reward)."""

    name = ""
    uses_reward_model = False
    """The run skeleton loads model.reward_model (family reward.adapter) and hands it to the factory."""
    names_dense_form = False
    """`describe` of a dense run names the dense form (else the source's own scale)."""
    reads_start_logprobs = False
    """`step_scores` needs the frozen start's token log-probs at temperature 1 (`start_logprobs`, `mask`)."""
    gives_steps = True
    """Its scores are one probability per step (so they can drive dense rewards)."""
    sparse = "aggregate"
    """How its scores become one sparse reward (`reward.tokens.SPARSE_RULES`)."""

    @classmethod
    def rule(cls):
        """What this source's scores are, as `reward.tokens.token_rewards` places them (a `ScoreRule`): the
        source decides, so that the placing never branches on a source's name."""
        from rlprm.reward.tokens import ScoreRule

        return ScoreRule(cls.name, scores=cls.sparse != "outcome", steps=cls.gives_steps, sparse=cls.sparse)

    def __init__(self, recipe, reward_model=None):
        self.recipe, self.reward_model = recipe, reward_model
        self.sep = recipe.task.step_separator

    @classmethod
    def check(cls, recipe) -> list[tuple[str, str]]:
        """Before any model is loaded: raise RewardSourceError for what this source cannot score with; returns the
        (key, path) pairs of the models it needs (checked for existence by the caller)."""
        return []

    def grade(self, problems: Sequence, texts: Sequence[str]) -> list:
        """The task's verdict on each sample: problems[k] and texts[k] belong together (`data.problems.grade_samples`)."""
        from rlprm.data.problems import grade_samples

        return [row[0] for row in grade_samples(list(problems), [[t] for t in texts], self.sep)]

    def step_scores(self, problems: Sequence, texts: Sequence[str], token_ids=None, grades=None, *,
                    start_logprobs=None, mask=None, tokenizer=None) -> list[list[float]] | None:
        """Per sample, the probabilities `reward.tokens.token_rewards` places (one per step, or one number); None: the
        grades alone decide (ground_truth)."""
        return None

    def rewards(self, texts, token_ids, grades, scores, tokenizer=None, width: int | None = None,
                device=None):
        """The rewards the run trains on, a `reward.tokens.TokenRewards` (`training_rewards`)."""
        return training_rewards(self.recipe, texts, token_ids, grades, scores=scores, tokenizer=tokenizer,
                                width=width, device=device, rule=self.rule())

    def ranking(self, problems: Sequence, texts: Sequence[str], grades) -> tuple[list[float], list[bool], bool]:
        """Rejection sampling's view of each sample: (its score, whether it may be kept, whether
        rl.rejection_min_score applies). The default (a model's or function's score): the sparse score, and a
        solution with no final answer is never worth imitating, however its steps score."""
        flat = [float(x) for x in self.solution_scores(problems, texts)]
        if not all(math.isfinite(s) for s in flat):
            raise _error(f"the {self.who(self.recipe)} gave non-finite scores (NaN/inf)")
        return flat, [g.answer is not None for g in grades], True

    def solution_scores(self, problems: Sequence, texts: Sequence[str]) -> list[float]:
        """One number per solution (reward.sparse_aggregate of its steps); for `ranking`."""
        raise _error(f"reward.source {self.name} has no per-solution score for rejection sampling")

    @classmethod
    def describe(cls, recipe) -> str:
        """What eval/reward measures and on which scale, in words, for the epoch line."""
        r = recipe.reward
        if r.mode == "dense" and cls.names_dense_form:
            form = {"log_prob": "log of the product of the step probabilities, <= 0",
                    "min_form": "lowest step probability, 0..1", "delta": "last step's probability, 0..1",
                    "score": f"{getattr(recipe.rl, 'process_advantage', 'min')} of the step probabilities"}
            what = f"{cls.who(recipe)}, {form[r.dense_form]}"
        else:
            what = cls.scale(recipe)
        return f"{what}; no answer {r.missing_answer_reward:g}"

    @classmethod
    def who(cls, recipe) -> str:
        """Who gives the step scores, in words."""
        return cls.name

    @classmethod
    def scale(cls, recipe) -> str:
        """What one solution's sparse reward is, in words."""
        return cls.name

    def pool_scores(self, pool, texts, ids, tokenizer, start_logprobs):
        """(computable, scores) for the held-out reward on `pool`'s samples, flattened in pool order."""
        return True, None

    def solution_reward(self, pool, tokenizer=None, start_logprobs=None) -> float | None:
        """Mean over the pool's samples of the reward the run trains on (without the KL penalty): each sample's
        `TokenRewards.objective` (PPO's return; GRPO's rl.process_advantage value of its step values; rejection
        sampling: the sparse reward), by `training_rewards` on the pool's texts and token ids, the very call the
        algorithms make on their rollouts. None when it cannot be computed here: no token ids (a pool read back
        from a file), no tokenizer, or scores this source cannot get here (`pool_scores`). start_logprobs: for
        `confidence`, a function (prompts, completion ids) -> each completion's token log-probs under the starting
        generator (`evaluation.evaluate.held_out_reward` passes one; None: not computable here)."""
        grades = [g for row in pool.grades for g in row]
        texts = [t for row in pool.texts for t in row]
        ids = [list(x) for row in pool.response_ids for x in row]
        if not grades or len(ids) != len(grades) or tokenizer is None:
            return None
        ok, scores = self.pool_scores(pool, texts, ids, tokenizer, start_logprobs)
        if not ok:
            return None
        return float(self.rewards(texts, ids, grades, scores, tokenizer=tokenizer).objective.mean())


class GroundTruth(RewardSource):
    """The grader's 1/0 verdict on the final answer."""

    name, gives_steps, sparse = "ground_truth", False, "outcome"

    @classmethod
    def scale(cls, recipe):
        return "answer right 1, wrong 0"

    def ranking(self, problems, texts, grades):
        return [float(g.answer_correct) for g in grades], [bool(g.answer_correct) for g in grades], False


class RewardModelSource(RewardSource):
    """A trained reward model (`prm`: step probabilities; `orm`: one final probability)."""

    uses_reward_model = True

    @classmethod
    def check(cls, recipe):
        if recipe.model.reward_model is None:
            raise RewardSourceError(f"reward.source is {cls.name} but model.reward_model is not set; point it at a "
                                    "folder written by `rlprm train-rm`")
        return [("model.reward_model", recipe.model.reward_model)]

    def __init__(self, recipe, reward_model=None):
        super().__init__(recipe, reward_model)
        if reward_model is not None and getattr(reward_model, "kind", self.name) != self.name:
            raise RewardSourceError(f"reward.source is {self.name} but {recipe.model.reward_model} is a "
                                    f"{reward_model.kind}")

    def _model(self):
        if self.reward_model is None:
            raise _error(f"reward.source {self.name} scores with model.reward_model, but none was loaded")
        return self.reward_model

    def step_scores(self, problems, texts, token_ids=None, grades=None, *, start_logprobs=None, mask=None,
                    tokenizer=None):
        return self._model().score_steps([p.text for p in problems], list(texts), sep=self.sep)

    def solution_scores(self, problems, texts):
        return self._model().score([p.text for p in problems], list(texts),
                                   aggregate=self.recipe.reward.sparse_aggregate, sep=self.sep)

    @classmethod
    def who(cls, recipe):
        return "reward model"

    def ranking(self, problems, texts, grades):
        from rlprm.reward.tokens import RewardError

        try:
            return super().ranking(problems, texts, grades)
        except RewardError as exc:
            raise _error(f"{exc}; check {self.recipe.model.reward_model}") from None

    def pool_scores(self, pool, texts, ids, tokenizer, start_logprobs):
        # the pool's own, scored by this run's reward model under the source's name (`evaluation.evaluate.score_pool`)
        if self.name not in pool.step_scores:
            return False, None
        return True, [s for row in pool.step_scores[self.name] for s in row]


class PRM(RewardModelSource):
    name, names_dense_form = "prm", True

    @classmethod
    def scale(cls, recipe):
        return f"PRM, {recipe.reward.sparse_aggregate} of the step probabilities, 0..1"

    @classmethod
    def who(cls, recipe):
        return "PRM"


class ORM(RewardModelSource):
    name, gives_steps, sparse = "orm", False, "final"

    @classmethod
    def scale(cls, recipe):
        return "ORM probability, 0..1"


class Exact(RewardSource):
    """The arithmetic task's exact step checker as an oracle PRM: 1 up to the first wrong step, then 0."""

    name, sparse = "exact", "all_right"  # sparse: 1 only if every step is right (the min of prefix-correctness)

    @classmethod
    def scale(cls, recipe):
        return "every step right 1, else 0"

    @classmethod
    def check(cls, recipe):
        if recipe.task.name != "arithmetic":  # recipe validation refuses it too
            raise RewardSourceError(f"reward.source exact needs the arithmetic task's step checker; task is "
                              f"{recipe.task.name!r}")
        return []

    def step_scores(self, problems, texts, token_ids=None, grades=None, *, start_logprobs=None, mask=None,
                    tokenizer=None):
        from rlprm.reward.tokens import prefix_correct_probs

        grades = self.grade(problems, texts) if grades is None else grades
        return [prefix_correct_probs(g.step_correct or []) for g in grades]

    def pool_scores(self, pool, texts, ids, tokenizer, start_logprobs):
        return True, self.step_scores(None, texts, grades=[g for row in pool.grades for g in row])


class Confidence(RewardSource):
    """The frozen starting generator's own token confidence at temperature 1 (`reward.tokens.confidence_scores`)."""

    name, sparse = "confidence", "final"  # sparse: one number, the whole response's confidence

    @classmethod
    def scale(cls, recipe):
        return "the start's exp(lowest token log-prob), 0..1"
    reads_start_logprobs = True

    def step_scores(self, problems, texts, token_ids=None, grades=None, *, start_logprobs=None, mask=None,
                    tokenizer=None):
        from rlprm.reward.tokens import confidence_scores

        if start_logprobs is None or mask is None:
            raise _error("reward.source confidence needs the starting generator's token log-probs (and their "
                              "mask): the caller computes them")
        return confidence_scores(texts, token_ids, start_logprobs, mask, tokenizer, self.recipe.reward.mode == "dense",
                                 self.sep)

    def pool_scores(self, pool, texts, ids, tokenizer, start_logprobs):
        if start_logprobs is None:  # no starting generator at hand
            return False, None
        import torch

        prompts = [p.prompt for p, row in zip(pool.problems, pool.texts) for _ in row]
        lps = start_logprobs(prompts, ids)
        width = max(len(x) for x in ids)
        logprobs = torch.zeros(len(ids), width)
        for k, lp in enumerate(lps):
            logprobs[k, : len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
        mask = torch.arange(width).unsqueeze(0) < torch.tensor([len(x) for x in ids]).unsqueeze(1)
        return True, self.step_scores(None, texts, ids, start_logprobs=logprobs, mask=mask, tokenizer=tokenizer)


def load_function(spec: str) -> Callable:
    """The callable `spec` names, "package.module:function" (dots after the colon reach attributes); raises
    RewardSourceError naming what could not be found."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise RewardSourceError(f"reward.function {spec!r} must read \"package.module:function\"")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardSourceError(f"reward.function {spec!r}: cannot import module {module_name!r} ({exc}); is it "
                                "installed or on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardSourceError(f"reward.function {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSourceError(f"reward.function {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


class PythonFunction(RewardSource):
    """A user's function (reward.function; the module docstring gives its signature)."""

    name, names_dense_form = "python", True

    @classmethod
    def scale(cls, recipe):
        return f"reward.function {recipe.reward.function}'s {recipe.reward.sparse_aggregate} score, 0..1"

    @classmethod
    def check(cls, recipe):
        load_function(recipe.reward.function or "")
        return []

    def __init__(self, recipe, reward_model=None):
        super().__init__(recipe, reward_model)
        self.spec = recipe.reward.function
        self.function = load_function(self.spec or "")

    @classmethod
    def who(cls, recipe):
        return f"reward.function {recipe.reward.function}"

    def _call(self, problems, texts, token_ids) -> list[list[float]]:
        dense = self.recipe.reward.mode == "dense"
        out = self.function([p.text for p in problems], list(texts),
                            completion_ids=None if token_ids is None else [list(x) for x in token_ids],
                            answers=[p.gold for p in problems], sep=self.sep)
        who = self.who(self.recipe)
        try:
            out = list(out)
        except TypeError:
            raise _error(f"{who} returned a {type(out).__name__}; it must return a list with one entry per "
                              f"solution ({len(texts)})") from None
        if len(out) != len(texts):
            raise _error(f"{who} returned {len(out)} entries for {len(texts)} solutions; one per solution")
        scores = []
        for i, entry in enumerate(out):
            values = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if not dense and len(values) != 1:
                raise _error(f"{who}: solution {i} got {len(values)} numbers; with reward.mode sparse each "
                                  "solution gets one number")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
                        or not 0.0 <= float(v) <= 1.0:
                    raise _error(f"{who}: solution {i} got {v!r}; every score must be a finite number in "
                                      "[0, 1] (a probability-like score, as a reward model's)")
            scores.append([float(v) for v in values])
        return scores

    def step_scores(self, problems, texts, token_ids=None, grades=None, *, start_logprobs=None, mask=None,
                    tokenizer=None):
        return self._call(problems, texts, token_ids)

    def solution_scores(self, problems, texts):
        from rlprm.reward.model import aggregate

        return [aggregate(s, self.recipe.reward.sparse_aggregate) for s in self._call(problems, texts, None)]

    def pool_scores(self, pool, texts, ids, tokenizer, start_logprobs):
        problems = [p for p, row in zip(pool.problems, pool.texts) for _ in row]
        return True, self._call(problems, texts, ids)


SOURCES: dict[str, type[RewardSource]] = {
    cls.name: cls for cls in (PRM, ORM, GroundTruth, Exact, Confidence, PythonFunction)}
"""reward.source -> its class: the one place the source is looked up (kept equal to the config's Literal by a test)."""


def source_class(recipe) -> type[RewardSource]:
    """The class of the recipe's reward.source (for what is known before any model is loaded)."""
    return SOURCES[recipe.reward.source]


def reward_source(recipe, reward_model=None) -> RewardSource:
    """The recipe's reward source; `reward_model` is the loaded model.reward_model where `uses_reward_model`."""
    return source_class(recipe)(recipe, reward_model)


__all__ = ["SOURCES", "Confidence", "Exact", "GroundTruth", "ORM", "PRM", "PythonFunction", "RewardModelSource",
           "RewardSource", "RewardSourceError", "load_function", "reward_source", "source_class", "training_rewards"]
