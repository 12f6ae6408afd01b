"""PRM-guided step-level search at test time: beam search and diverse verifier tree search (DVTS).

Best-of-N ranks complete samples; a process reward model can also rank PARTIAL solutions, and so steer
generation step by step (the idea of Snell et al. 2024, "Scaling LLM test-time compute optimally", and of
huggingface/search-and-learn, whose two methods are re-implemented here from their description).

Pieces:
- a step generator (`StepGenerator`: `HFStepGenerator` on a Hugging Face causal LM, `VLLMStepGenerator` on a
  vLLM engine) extends many partial solutions by one step each, in one batch across beams and problems: sampling
  stops at the task's step separator (`SeparatorStop`, on the separator's characters as the new tokens spell
  them, so a separator of several tokens, or one merged into a longer token, stops too). An answer step
  (`# Answer\\n\\n5`, which holds the separator) runs on to EOS. `HFStepGenerator` keeps the keys and values of
  every step it wrote and extends the kept partial solutions from them (rlprm/evaluation/kv_steps.py: no prefix
  recomputed per round, a row leaves the batch when its step ends); with `reuse_cache=False`, or a model whose
  cache cannot be sliced per row, it calls HF `generate` per round, which recomputes every prefix.
- a scorer of partial solutions (`PrefixScorer.score_prefixes(problems, partial_texts)` -> per-step
  probabilities so far): an rlprm PRM or any hub family (`RewardModelScorer`, through their `score_steps`), the
  arithmetic task's exact checker (`CheckerScorer`, the oracle ceiling), or the generator's own confidence
  (`ConfidenceScorer`: per step, the probability of its least likely token; the baseline that could explain a
  gain away).
- `search(...)`: beam search keeps the `n` best partial solutions of a problem, each extended by `width`
  sampled next steps, ranked by the aggregation over their steps so far (`prod`, `min`, `last`, `mean`, as in
  best-of-N); DVTS runs `n / width` independent subtrees, each extended by `width` next steps and continued
  greedily with the best one. `lookahead` k rolls each candidate out k more steps greedily (temperature 0)
  before scoring it (the candidate keeps only its own step). Finished solutions (EOS, a finished answer step,
  the step or token cap) are set aside; the final pick among them uses the best-of-N selectors (`pick`).
  Generated tokens (lookahead included) and scorer calls (partial solutions scored) are counted per problem.

The compute-matched comparison with best-of-N is `compare` (rlprm/evaluation/search_report.py writes it).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from rlprm.data.problems import TaskProblem
from rlprm.reward.model import AGGREGATIONS, aggregate
from rlprm.steps import ANSWER_MARK, DEFAULT_SEPARATOR, split_steps

METHODS = ("beam", "dvts")


class SearchError(ValueError):
    """A search cannot run as asked (the message says why)."""


# --------------------------------------------------------------------------- step generation


@dataclass
class StepDraw:
    """One generated next step."""

    text: str
    """The step as it is appended to the partial solution, its separator included (none after EOS / a cap)."""
    tokens: int
    """Tokens generated for it (EOS included, padding not)."""
    finished: bool
    """The solution ends here: EOS, or an answer step, or the step ran into the token cap without a separator."""


def step_end(text: str, sep: str) -> int | None:
    """Where a step being written ends: just past the first separator that follows some non-space text; None
    while it goes on. An answer step (`# Answer ...`, which holds separators of its own) ends only at EOS, and so
    does a step that may still become one (its text so far is the start of `# Answer`)."""
    start = len(text) - len(text.lstrip())
    if text[start:].startswith(ANSWER_MARK):
        return None
    pos = text.find(sep, start)
    while pos >= 0:
        if text[start:pos].strip() and not ANSWER_MARK.startswith(text[start:pos + len(sep)]):
            return pos + len(sep)
        pos = text.find(sep, pos + 1)
    return None


class TokenPieces:
    """The text of each token id alone (special tokens as ""), decoded the first time the id is seen: the stopping
    criterion spells new tokens with it instead of decoding whole sequences at every generated token (and a
    150k-token vocabulary is not decoded up front)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.known: dict[int, str] = {}

    def __getitem__(self, token_id: int) -> str:
        piece = self.known.get(token_id)
        if piece is None:
            piece = "" if token_id in self.special or token_id < 0 else self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.known[token_id] = piece
        return piece


def token_pieces(tokenizer) -> TokenPieces:
    """One `TokenPieces` per tokenizer object (kept on it), so every search step reuses what was decoded."""
    cached = getattr(tokenizer, "_rlprm_token_pieces", None)
    if isinstance(cached, TokenPieces):
        return cached
    pieces = TokenPieces(tokenizer)
    try:
        tokenizer._rlprm_token_pieces = pieces
    except AttributeError:  # a tokenizer that refuses new attributes: a fresh table each time
        pass
    return pieces


class SeparatorStop:
    """A `transformers.StoppingCriteria`: row r of a `generate` batch stops once the text of its new tokens holds
    the step separator after some non-space text (`step_end`), or on EOS (generate's own criterion).

    Matched on characters, not on one token id, so that a separator written as several tokens (`"\\n\\n"` as two
    `"\\n"`, a multi-token tag) or merged into a longer token (`".\\n"`) stops the row as well. Each call reads
    only the newest token of each row (`token_pieces`), so the cost per generated token is a string append per row
    (and a search of the step's text when the separator's last character comes).
    """

    def __init__(self, tokenizer, sep: str, batch: int, spelled: list[str] | None = None,
                 quorum: float | None = None):
        """spelled: per context, the step's text written by earlier calls (rows of one context are adjacent:
        `generate`'s num_return_sequences order). quorum: once this share of the rows has stopped (step end or
        EOS) and the call has run 1.5 times their median length, every row stops (`cut`): the few rows still
        writing would otherwise hold the whole batch; the caller continues them in a call of their own."""
        self.pieces = token_pieces(tokenizer)
        self.sep, self.eos, self.quorum = sep, tokenizer.eos_token_id, quorum
        per = batch // max(1, len(spelled)) if spelled else 1
        self.texts = [spelled[r // per] for r in range(batch)] if spelled else [""] * batch
        self.done = [False] * batch
        self.stopped_at: list[int] = []
        self.length = 0
        self.cut = False

    def feed(self, token_ids: Sequence[int]) -> list[bool]:
        """One new token per row; returns which rows have finished their step (sticky), or all once `cut`."""
        self.length += 1
        for r, tok in enumerate(token_ids):
            if self.done[r]:
                continue
            if tok == self.eos:
                self.done[r] = True
                self.stopped_at.append(self.length)
                continue
            piece = self.pieces[tok]
            if not piece:
                continue
            self.texts[r] += piece
            # a separator is complete only once its last character has come
            if self.sep[-1] in piece and step_end(self.texts[r], self.sep) is not None:
                self.done[r] = True
                self.stopped_at.append(self.length)
        if self.quorum is not None and not self.cut and len(self.stopped_at) < len(self.done) \
                and len(self.stopped_at) >= self.quorum * len(self.done):
            median = sorted(self.stopped_at)[len(self.stopped_at) // 2]
            self.cut = 2 * self.length >= 3 * median
        return [True] * len(self.done) if self.cut else list(self.done)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor(self.feed(input_ids[:, -1].tolist()), dtype=torch.bool, device=input_ids.device)


class StepGenerator(Protocol):
    """Extends partial solutions by one step."""

    def next_steps(self, contexts: list[str], n: int, temperature: float, max_step_tokens: int,
                   greedy: bool = False) -> list[list[StepDraw]]:
        """`n` next steps for each context (a prompt followed by a partial solution); greedy: temperature 0."""


@dataclass
class _Row:
    """A step being generated: its context's index, the text and tokens so far, whether it is over."""

    context: int
    text: str = ""
    spelled: str = ""
    tokens: int = 0
    draw: StepDraw | None = None


class HFStepGenerator:
    """Next steps from Hugging Face `generate` on `model`: every context x n in batches of `batch_size` rows,
    each row stopping at the step separator (`SeparatorStop`) or EOS.

    By default (`reuse_cache`) it runs `cached_steps`: kv_steps' own decoding loop from the kept keys and values of
    the rows it wrote in its last two calls. Otherwise (and for `VLLMStepGenerator`, which shares the rest):

    A `generate` call runs until its slowest row stops, so one row that writes no separator would hold a whole
    batch to `max_step_tokens`. So a call ends once 90% of its rows have stopped and it has run 1.5 times their
    median length (`SeparatorStop`'s quorum), and calls after the first run at most `chunk` tokens (twice the
    median length of the steps seen so far, at least 8); the rows still writing their step go on in a new call
    of their own, from their text so far (up to `max_step_tokens` in all).

    The prefix (prompt + partial solution) is re-encoded from text and recomputed at every call: HF `generate`
    keeps its KV cache only within a call (a sampler with a prefix cache, such as vLLM, would reuse it).
    Re-encoding is exact for a character tokenizer; a BPE may encode the text of sampled tokens differently from
    the ids sampled, which changes nothing the scorers read (text).
    """

    def __init__(self, model, tokenizer, sep: str = DEFAULT_SEPARATOR, batch_size: int = 256,
                 reuse_cache: bool = True):
        """reuse_cache: extend partial solutions from their kept keys and values (`kv_steps`) instead of `generate`;
        turned off by itself for a model whose cache cannot be sliced per row."""
        if not sep:
            raise SearchError("the step separator must not be empty")
        self.model, self.tokenizer, self.sep, self.batch_size = model, tokenizer, sep, batch_size
        self.reuse_cache = reuse_cache
        self.calls = 0
        self.step_lengths: list[int] = []
        # the rows written by the last two calls, by context + step text: a lookahead call in between still finds
        # the round's candidates
        self.kept: list[dict] = [{}, {}]

    def reset(self) -> None:
        """Forget the kept keys and values (`search` calls it before and after a search: the weights may change
        between searches, as in RL, and the memory is freed)."""
        self.kept = [{}, {}]

    def chunk(self, max_step_tokens: int) -> int:
        """Tokens a call may run: twice the median of the last 512 steps' lengths (at least 8); all of
        `max_step_tokens` before any step was seen."""
        if not self.step_lengths:
            return max_step_tokens
        recent = sorted(self.step_lengths[-512:])
        return min(max_step_tokens, max(8, 2 * recent[len(recent) // 2]))

    def next_steps(self, contexts: list[str], n: int, temperature: float, max_step_tokens: int,
                   greedy: bool = False) -> list[list[StepDraw]]:
        if self.reuse_cache:
            from rlprm.evaluation.kv_steps import CacheUnsupported

            try:
                return self.cached_steps(contexts, n, temperature, max_step_tokens, greedy)
            except CacheUnsupported:
                self.reuse_cache = False
                self.reset()
        rows = [_Row(i) for i in range(len(contexts)) for _ in range(n)]
        budget = self.chunk(max_step_tokens)
        for row, ids in zip(rows, self._generate(contexts, n, temperature, budget, greedy, None)):
            self._advance(row, ids, max_step_tokens)
        while True:
            going = [r for r in rows if r.draw is None]
            if not going:
                break
            # rows still going may have different tokens left (a quorum cut, vLLM's stop tokens): a call per budget
            groups: dict[int, list[_Row]] = {}
            for r in going:
                groups.setdefault(min(self.chunk(max_step_tokens), max_step_tokens - r.tokens), []).append(r)
            for budget, group in groups.items():
                found = self._generate([contexts[r.context] + r.text for r in group], 1, temperature, budget,
                                       greedy, [r.spelled for r in group])
                for row, ids in zip(group, found):
                    self._advance(row, ids, max_step_tokens)
        self.step_lengths.extend(r.draw.tokens for r in rows if not r.draw.finished)
        del self.step_lengths[:-512]
        return [[r.draw for r in rows[i * n:(i + 1) * n]] for i in range(len(contexts))]

    def cached_steps(self, contexts: list[str], n: int, temperature: float, max_step_tokens: int,
                     greedy: bool = False) -> list[list[StepDraw]]:
        """`next_steps` through `kv_steps`: a context that is a row this generator wrote in one of its last two
        calls (context + step) goes on from that row's keys and values, any other is encoded and prefilled; every
        row runs until its step ends (no quorum cut: a row that has ended leaves the batch)."""
        from rlprm.evaluation.kv_steps import decode, prefill

        model, tok = self.model, self.tokenizer
        rows = [_Row(i) for i in range(len(contexts)) for _ in range(n)]
        kept: dict = {}
        per_batch = max(1, self.batch_size // n)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(contexts), per_batch):
                chunk = contexts[start:start + per_batch]
                found = [self.kept[0].get(c) or self.kept[1].get(c) for c in chunk]
                missing = [j for j, f in enumerate(found) if f is None]
                if missing:
                    for j, f in zip(missing, prefill(model, tok, [chunk[j] for j in missing])):
                        found[j] = f
                stop = SeparatorStop(tok, self.sep, len(chunk) * n)
                out = decode(model, found, n, temperature, greedy, max_step_tokens, stop.feed)
                self.calls += 1
                for row, ids, state, stopped in zip(rows[start * n:(start + len(chunk)) * n], out.ids, out.rows,
                                                     stop.done):
                    self._finish(row, ids, stopped, max_step_tokens)
                    # kept only where the step's text is exactly its tokens' (not cut inside a merged token)
                    if not row.draw.finished and self._decode(ids) == row.draw.text:
                        kept[contexts[row.context] + row.draw.text] = state
        finally:
            model.train(was_training)
        self.kept = [kept, self.kept[0]]
        return [[r.draw for r in rows[i * n:(i + 1) * n]] for i in range(len(contexts))]

    def _finish(self, row: _Row, ids: list[int], stopped: bool, max_step_tokens: int) -> None:
        """`_advance` for a row that ran until its stop (its last id ended the step or the solution) or the cap,
        without replaying its ids one by one: `SeparatorStop` has already found where the step ends."""
        eos = self.tokenizer.eos_token_id
        if not stopped:
            row.draw = StepDraw(self._decode(ids), len(ids), True)
            return
        if eos is not None and ids[-1] == eos:
            row.draw = StepDraw(self._decode(ids[:-1]), len(ids), True)
            return
        text = self._decode(ids)
        cut = step_end(text, self.sep)
        if cut is None:  # the decoded text spells the step differently from its tokens' pieces: the replay decides
            self._advance(row, ids, max_step_tokens)
        else:
            row.draw = StepDraw(text[:cut], len(ids), False)

    def _generate(self, contexts: list[str], n: int, temperature: float, max_new_tokens: int, greedy: bool,
                  spelled: list[str] | None) -> list[list[int]]:
        """The new ids of each of n rows per context (prompt-major), padded after a row stopped."""
        import torch
        from transformers import StoppingCriteriaList

        from rlprm.sampling import generation_kwargs, own_generation_config

        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        tok.padding_side = "left"
        eos, pad = tok.eos_token_id, tok.pad_token_id
        out: list[list[int]] = []
        per_batch = max(1, self.batch_size // n)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(contexts), per_batch):
                chunk = contexts[start:start + per_batch]
                enc = tok(chunk, return_tensors="pt", padding=True).to(device)
                stop = SeparatorStop(tok, self.sep, len(chunk) * n,
                                     None if spelled is None else spelled[start:start + per_batch], quorum=0.9)
                kwargs = generation_kwargs(temperature, max_new_tokens, n, pad, eos)
                if greedy:
                    kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None, typical_p=None,
                                  epsilon_cutoff=None, eta_cutoff=None)
                with torch.no_grad(), own_generation_config(model):
                    ids = model.generate(**enc, **kwargs, stopping_criteria=StoppingCriteriaList([stop]))
                self.calls += 1
                out.extend(ids[:, enc["input_ids"].shape[1]:].tolist())
        finally:
            model.train(was_training)
        return out

    def _advance(self, row: _Row, ids: list[int], max_step_tokens: int) -> None:
        """Replays `SeparatorStop` on a row's new ids: the step ends where it stopped the row, at EOS (the
        solution ends; EOS counted) or at `max_step_tokens` (the solution ends, cut); else it goes on. What
        follows a stop is padding."""
        tok = self.tokenizer
        eos, pieces = tok.eos_token_id, token_pieces(tok)
        for k, t in enumerate(ids):
            if eos is not None and t == eos:
                row.draw = StepDraw(row.text + self._decode(ids[:k]), row.tokens + k + 1, True)
                return
            row.spelled += pieces[t]
            cut = step_end(row.spelled, self.sep)
            if cut is not None:
                text = row.text + self._decode(ids[:k + 1])
                decoded_cut = step_end(text, self.sep)
                row.draw = StepDraw(text[:decoded_cut] if decoded_cut is not None else row.spelled[:cut],
                                    row.tokens + k + 1, False)
                return
        row.text += self._decode(ids)
        row.tokens += len(ids)
        if row.tokens >= max_step_tokens:
            row.draw = StepDraw(row.text, row.tokens, True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class VLLMStepGenerator(HFStepGenerator):
    """Next steps from a vLLM engine (rlprm/rollout.py's `build_engine`: it takes token ids and returns ids).

    The engine is built without a tokenizer, so it cannot stop on a string: each request stops on EOS or on any
    token whose text holds the separator's last character (`stop_token_ids`, found once in the vocabulary), and
    a row whose step has not really ended there (an empty step, an answer step, the first half of a separator
    of several characters) goes on in a new request from its text so far. vLLM batches the requests itself and
    reuses the cached prompt states of shared prefixes (its prefix cache), so there is no chunking.
    """

    def __init__(self, llm, tokenizer, sep: str = DEFAULT_SEPARATOR, batch_size: int = 256):
        super().__init__(None, tokenizer, sep, batch_size, reuse_cache=False)  # vLLM keeps its own prefix cache
        self.llm = llm
        pieces = token_pieces(tokenizer)
        vocab = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
        self.stop_ids = sorted({i for i in range(vocab) if sep[-1] in pieces[i]}
                               | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))

    def chunk(self, max_step_tokens: int) -> int:
        return max_step_tokens

    def _generate(self, contexts, n, temperature, max_new_tokens, greedy, spelled):
        import torch

        from rlprm.rollout import sampling_params

        eos = self.tokenizer.eos_token_id
        prompt_ids = [self.tokenizer(c)["input_ids"] for c in contexts]
        seeds = torch.randint(0, 2**31 - 1, (len(contexts),)).tolist()
        params = [sampling_params(n=n, temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0, min_p=0.0,
                                  repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                  max_tokens=max_new_tokens, seed=seed, stop_token_ids=self.stop_ids,
                                  detokenize=False) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        self.calls += 1
        out = []
        for request in outputs:
            for c in request.outputs:
                ids = list(c.token_ids)
                stop = getattr(c, "stop_reason", None)
                if c.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
                    # the stop token left out of token_ids: put it back (EOS: stop_reason None)
                    ids.append(stop if isinstance(stop, int) else eos)
                out.append(ids)
        return out


# --------------------------------------------------------------------------- scorers


class PrefixScorer(Protocol):
    """Scores partial solutions step by step."""

    name: str

    def score_prefixes(self, problems: Sequence[TaskProblem], partial_texts: Sequence[str]) -> list[list[float]]:
        """Per partial solution (the text after the prompt), the probability that each of its steps so far is
        right; [] for a partial solution without steps."""


class RewardModelScorer:
    """An rlprm PRM (or ORM: one number, its final verdict) or a hub PRM family, through `score_steps`."""

    def __init__(self, reward_model, name: str = "prm", sep: str = DEFAULT_SEPARATOR, batch_size: int = 64):
        self.rm, self.name, self.sep, self.batch_size = reward_model, name, sep, batch_size

    def score_prefixes(self, problems, partial_texts):
        steps = [split_steps(t, self.sep) for t in partial_texts]
        rows = [i for i, s in enumerate(steps) if s]
        out: list[list[float]] = [[] for _ in partial_texts]
        if rows:
            scored = self.rm.score_steps([problems[i].text or problems[i].prompt for i in rows],
                                         [steps[i] for i in rows], batch_size=self.batch_size)
            for i, s in zip(rows, scored):
                out[i] = [float(x) for x in s]
        return out


class CheckerScorer:
    """The arithmetic task's exact step checker: 1 for a right step, 0 for a wrong one (the oracle ceiling)."""

    name = "checker"

    def __init__(self, sep: str = DEFAULT_SEPARATOR):
        self.sep = sep

    def score_prefixes(self, problems, partial_texts):
        from rlprm.tasks.arithmetic import check

        out = []
        for problem, text in zip(problems, partial_texts):
            if problem.arith is None:
                raise SearchError(f"the exact checker scores arithmetic problems only; {problem.id} has no "
                                  "arithmetic form (use a reward model as eval.search.scorer)")
            out.append([1.0 if ok else 0.0 for ok in check(problem.arith, text, self.sep).step_correct])
        return out


class ConfidenceScorer:
    """The generator's own confidence: per step, exp(the lowest log-probability of its tokens) under `model`
    (temperature 1), from one teacher-forced pass per partial solution. Steps are tokenized piece by piece
    (`steps.encode_batch`), so every step ends on a token."""

    name = "confidence"

    def __init__(self, model, tokenizer, sep: str = DEFAULT_SEPARATOR, batch_size: int = 64):
        self.model, self.tokenizer, self.sep, self.batch_size = model, tokenizer, sep, batch_size

    def score_prefixes(self, problems, partial_texts):
        from rlprm.evaluation.evaluate import response_logprobs
        from rlprm.steps import encode_batch

        steps = [split_steps(t, self.sep) for t in partial_texts]
        rows = [i for i, s in enumerate(steps) if s]
        out: list[list[float]] = [[] for _ in partial_texts]
        if not rows:
            return out
        encoded = encode_batch(self.tokenizer, [problems[i].prompt for i in rows], [steps[i] for i in rows], self.sep)
        completions = [e.input_ids[e.prompt_len:] for e in encoded]
        logps = response_logprobs(self.model, self.tokenizer, [problems[i].prompt for i in rows], completions,
                                  batch_size=self.batch_size)
        for i, e, lp in zip(rows, encoded, logps):
            probs, begin = [], 0
            for end in e.step_ends:
                window = lp[begin:end - e.prompt_len + 1]
                probs.append(math.exp(float(window.min())) if len(window) else 1.0)
                begin = end - e.prompt_len + 1
            out[i] = probs
        return out


# --------------------------------------------------------------------------- search


@dataclass
class SearchSettings:
    """How one search runs (eval.search in a recipe)."""

    method: str = "beam"
    n: int = 8
    """beam: partial solutions kept per problem; dvts: candidates per step per problem (n / width subtrees)."""
    width: int = 4
    """Next steps sampled per kept partial solution."""
    lookahead: int = 0
    aggregation: str = "prod"
    max_steps: int = 12
    max_step_tokens: int = 48
    max_new_tokens: int = 96
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_settings(self.method, self.n, self.width, self.lookahead, self.aggregation, self.max_steps)

    @property
    def subtrees(self) -> int:
        return self.n // self.width if self.method == "dvts" else 1


def check_settings(method: str, n: int, width: int, lookahead: int, aggregation: str, max_steps: int) -> None:
    """Raise SearchError (a ValueError) for settings no search can run with; the config schema calls it too."""
    if method not in METHODS:
        raise SearchError(f"search method must be one of {', '.join(METHODS)}, got {method!r}")
    if n < 1 or width < 1 or max_steps < 1 or lookahead < 0:
        raise SearchError(f"search needs n, width, max_steps >= 1 and lookahead >= 0; got n={n}, width={width}, "
                          f"max_steps={max_steps}, lookahead={lookahead}")
    if aggregation not in AGGREGATIONS:
        raise SearchError(f"search aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if method == "dvts" and (n % width or n < width):
        raise SearchError(f"dvts splits n={n} candidates per step into n / width subtrees of width {width}: n must "
                          f"be a multiple of width (e.g. n={max(width, n - n % width)})")


@dataclass
class Beam:
    """A partial (or finished) solution in the search."""

    problem: int
    text: str = ""
    tokens: int = 0
    """Tokens generated on this path (its own steps; lookahead and pruned siblings are counted per problem)."""
    steps: int = 0
    subtree: int = 0
    finished: bool = False
    scores: list[float] = field(default_factory=list)
    """Step probabilities of the scorer when the beam was last scored (with lookahead: of the rolled-out text)."""
    value: float = float("-inf")


@dataclass
class SearchResult:
    problems: list[TaskProblem]
    finished: list[list[Beam]]
    """Per problem, the finished solutions that kept a place (beam: at most n, and those cut at max_steps; dvts:
    one per subtree), their steps scored by the search's scorer."""
    tokens: list[int]
    """Per problem, every token generated for it: kept and pruned candidates, lookahead rollouts."""
    scorer_calls: list[int]
    """Per problem, partial (or finished) solutions the scorer read."""
    seconds: float
    generate_seconds: float
    score_seconds: float
    settings: SearchSettings | None = None


def search(problems: Sequence[TaskProblem], generator: StepGenerator, scorer: PrefixScorer,
           settings: SearchSettings) -> SearchResult:
    """Beam search or DVTS (settings.method) for every problem at once; see the module docstring.

    beam: each round extends every kept partial solution by `width` sampled steps; repeated unfinished
    candidates are dropped (`_unique`), and the best `n - finished so far` candidates (by `aggregation` over
    their step scores, ties broken by a seeded random order) keep a place: the finished ones among them are set
    aside, the others extended next round (`_keep`). dvts: `n / width` subtrees per problem; each round a
    subtree's `width` candidates are scored and the subtree goes on from its best one, or ends with it when that
    one has finished (one solution per subtree). Both stop when nothing is left to extend; a solution at
    max_steps steps or max_new_tokens tokens is finished as it is (cut; its last step may run past
    max_new_tokens by up to max_step_tokens, since one call extends many solutions with one step cap).
    """
    s = settings
    t0 = time.monotonic()
    rng = random.Random(s.seed)
    _seed_torch(s.seed)
    P = len(problems)
    tokens, calls = [0] * P, [0] * P
    finished: list[list[Beam]] = [[] for _ in range(P)]
    # beam search: n copies of the empty solution in one group; dvts: one per subtree, each its own group
    active = ([Beam(p) for p in range(P) for _ in range(s.n)] if s.method == "beam"
              else [Beam(p, subtree=k) for p in range(P) for k in range(s.subtrees)])
    t_gen = t_score = 0.0
    reset = getattr(generator, "reset", None)
    if reset is not None:
        reset()
    while active:
        t = time.monotonic()
        draws = generator.next_steps([problems[b.problem].prompt + b.text for b in active], s.width, s.temperature,
                                     s.max_step_tokens)
        candidates = []
        for beam, row in zip(active, draws):
            for d in row:
                tokens[beam.problem] += d.tokens
                total = beam.tokens + d.tokens
                done = d.finished or beam.steps + 1 >= s.max_steps or total >= s.max_new_tokens
                candidates.append(Beam(beam.problem, beam.text + d.text, total, beam.steps + 1, beam.subtree, done))
        if s.method == "beam":
            candidates = _unique(candidates)
        scored_texts = [c.text for c in candidates]
        if s.lookahead:
            scored_texts = _look_ahead(problems, candidates, generator, s, tokens)
        t_gen += time.monotonic() - t
        t = time.monotonic()
        scores = scorer.score_prefixes([problems[c.problem] for c in candidates], scored_texts)
        t_score += time.monotonic() - t
        for c, sc in zip(candidates, scores):
            calls[c.problem] += 1
            c.scores = list(sc)
            c.value = aggregate(c.scores, s.aggregation)
        active = _keep(candidates, finished, s, rng)
    if reset is not None:
        reset()
    t_all = time.monotonic() - t0
    return SearchResult(list(problems), finished, tokens, calls, t_all, t_gen, t_score, s)


def _seed_torch(seed: int) -> None:
    try:
        import torch
    except ImportError:  # a generator without torch (tests' fakes)
        return
    torch.manual_seed(seed)


def _look_ahead(problems, candidates: list[Beam], generator: StepGenerator, s: SearchSettings,
                tokens: list[int]) -> list[str]:
    """The texts to score: each unfinished candidate rolled out `s.lookahead` more steps greedily (finished ones
    as they are); the rollout's tokens are counted for the problem."""
    texts = [c.text for c in candidates]
    going = [i for i, c in enumerate(candidates) if not c.finished]
    used = {i: candidates[i].tokens for i in going}
    steps = {i: candidates[i].steps for i in going}
    for _ in range(s.lookahead):
        if not going:
            break
        draws = generator.next_steps([problems[candidates[i].problem].prompt + texts[i] for i in going], 1, 0.0,
                                     s.max_step_tokens, greedy=True)
        still = []
        for i, row in zip(going, draws):
            d = row[0]
            tokens[candidates[i].problem] += d.tokens
            texts[i] += d.text
            used[i] += d.tokens
            steps[i] += 1
            if not (d.finished or steps[i] >= s.max_steps or used[i] >= s.max_new_tokens):
                still.append(i)
        going = still
    return texts


def _unique(candidates: list[Beam]) -> list[Beam]:
    """Beam search drops an unfinished candidate that repeats another of its problem (its tokens stay counted):
    n copies of one likely step would otherwise fill every place (all n beams start from the same empty
    solution). Finished ones all stay: they are samples, and votes count them."""
    seen: set[tuple[int, str]] = set()
    out = []
    for c in candidates:
        key = (c.problem, c.text)
        if not c.finished:
            if key in seen:
                continue
            seen.add(key)
        out.append(c)
    return out


def _ranked(beams: list[Beam], rng: random.Random) -> list[Beam]:
    """Best first by value; ties in a random (seeded) order."""
    keys = [rng.random() for _ in beams]
    order = sorted(range(len(beams)), key=lambda i: (-beams[i].value, keys[i]))
    return [beams[i] for i in order]


def _keep(candidates: list[Beam], finished: list[list[Beam]], s: SearchSettings, rng: random.Random) -> list[Beam]:
    """The places of a round: a problem's candidates (beam) or a subtree's (dvts) ranked together, finished and
    unfinished alike; the best `room` take them (beam: n less the solutions already finished; dvts: 1). A
    finished one among them is set aside for good, an unfinished one goes on. Candidates below lose their place,
    finished or not: a junk solution that ended early must not take the place of a better one still going."""
    groups: dict[tuple[int, int], list[Beam]] = {}
    for c in candidates:
        groups.setdefault((c.problem, c.subtree), []).append(c)
    keep: list[Beam] = []
    for (p, _), group in groups.items():
        room = max(0, s.n - len(finished[p])) if s.method == "beam" else 1
        for c in _ranked(group, rng)[:room]:
            (finished[p] if c.finished else keep).append(c)
    return keep


# --------------------------------------------------------------------------- the final pick


def answer_key(answer: str | None, correct: bool, k: int) -> str:
    """The vote class of an answer, as best-of-N's votes group them (evaluate's answer classes): every answer the
    grader accepted is one class, wrong ones group by their whitespace-free text, a missing answer is its own."""
    if correct:
        return "\0correct"
    if answer is None:
        return f"\0none{k}"
    return "".join(answer.split())


def pick(values: Sequence[float], keys: Sequence[str], selector: str, rng: random.Random) -> int | None:
    """Index of the solution a selector picks among the finished ones of a problem (None when there are none).

    `score`: the highest value; `majority`: a solution of the answer class with the most votes; `weighted_majority`:
    of the class with the largest sum of values. Ties at random (seeded `rng`), as in best-of-N.
    """
    if not values:
        return None
    if selector == "score":
        best = max(values)
        return rng.choice([i for i, v in enumerate(values) if v == best])
    if selector not in ("majority", "weighted_majority"):
        raise SearchError(f"unknown selector {selector!r}: score, majority or weighted_majority")
    tally: dict[str, float] = {}
    for v, k in zip(values, keys):
        tally[k] = tally.get(k, 0.0) + (1.0 if selector == "majority" else max(v, 0.0))
    top = max(tally.values())
    winner = rng.choice(sorted(k for k, t in tally.items() if t == top))
    return rng.choice([i for i, k in enumerate(keys) if k == winner])


@dataclass
class Outcome:
    """Per problem, what one method's chosen solution got, and what the method spent."""

    correct: list[float]
    process: list[float]
    """Every step right (NaN where steps cannot be checked, or nothing finished)."""
    tokens: list[float]
    seconds: float
    scorer_calls: list[float] = field(default_factory=list)


def search_outcomes(result: SearchResult, sep: str, selectors=("score", "majority", "weighted_majority"),
                    seed: int = 0) -> dict[str, Outcome]:
    """Grade the finished solutions and apply each selector: {selector: Outcome}. A problem with no finished
    solution counts as wrong."""
    from rlprm.data.problems import grade_samples

    grades = grade_samples(result.problems, [[b.text for b in row] for row in result.finished], sep)
    out = {}
    for selector in selectors:
        rng = random.Random(seed)
        correct, process = [], []
        for problem, row, g in zip(result.problems, result.finished, grades):
            keys = [answer_key(x.answer, x.answer_correct, k) for k, x in enumerate(g)]
            i = pick([b.value for b in row], keys, selector, rng)
            correct.append(float(g[i].answer_correct) if i is not None else 0.0)
            # nothing finished: wrong, where steps can be checked at all
            pc = g[i].process_correct if i is not None else (False if problem.arith is not None else None)
            process.append(float("nan") if pc is None else float(pc))
        out[selector] = Outcome(correct, process, [float(t) for t in result.tokens], result.seconds,
                                [float(c) for c in result.scorer_calls])
    return out


__all__ = ["Beam", "CheckerScorer", "ConfidenceScorer", "HFStepGenerator", "METHODS", "Outcome", "PrefixScorer",
           "RewardModelScorer", "SearchError", "SearchResult", "SearchSettings", "SeparatorStop", "StepDraw",
           "StepGenerator", "TokenPieces", "VLLMStepGenerator", "answer_key", "check_settings", "pick", "search",
           "search_outcomes", "step_end", "token_pieces"]
