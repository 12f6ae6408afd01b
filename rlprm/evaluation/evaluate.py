"""Best-of-N evaluation, the paper's main experiment (Lightman et al. 2023, section 3).

For every test problem, sample N_max solutions ONCE (batched, KV cache,
seeded) and keep them as a pool: grades, per-step scores from every reward
model, and the generator's own per-sample confidence and likelihood, stored as
JSONL so that every selector and every later reward model reuses the same
samples. A selector then picks one solution among N.

Statistics (docs/design.md section 9): a paired bootstrap over PROBLEMS. Each of
`eval.resamples` resamples draws the P problems with replacement and, within
each drawn problem, N of its n samples without replacement; every selector is
scored on the same resampled problems and draws, so differences between
selectors get intervals of their own (`bon_bootstrap`). Mean and 95% interval
(2.5/97.5 percentiles) are over resamples. Resampling only the samples of a
fixed set of problems would leave problem-level variance out and collapse to a
point at N = n_max.

Selectors: each reward model (a PRM under each aggregation, an ORM), the
generator's own `confidence` (lowest token log-probability) and `likelihood`
(total log-probability), majority vote over final answers, reward-weighted
majority vote, random choice (= accuracy at N=1), and the oracle "any of the N
is right" (pass@N). On the arithmetic task the process-correct rate of the
chosen solutions shows how often a right answer was picked with wrong steps
under it.

`best_of_n(...)` is the API RL loops call between epochs; `rlprm eval` is
`evaluation.job.run_eval`, which builds on this module.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlprm.files import atomic_write_jsonl, save_figure
from rlprm.data.problems import SampleGrade, TaskProblem

MAJORITY, WEIGHTED, RANDOM, ORACLE = "majority", "weighted_majority", "random", "pass@n"
CONFIDENCE, LIKELIHOOD = "confidence", "likelihood"
BASELINES = (CONFIDENCE, LIKELIHOOD)
"""Per-sample scores from the generator itself (`Pool.sample_scores`), selectors beside the reward models."""
DIFFERENCES_KEY = "differences"
"""The top-level key of bon_curves.json that holds the paired differences (beside one key per selector)."""


@dataclass
class Pool:
    """N samples per problem, graded, with per-step scores by reward-model name."""

    problems: list[TaskProblem]
    texts: list[list[str]]
    grades: list[list[SampleGrade]]
    step_scores: dict[str, list[list[list[float]]]] = field(default_factory=dict)
    """name -> [problem][sample] -> per-step probabilities (an ORM: one number)."""
    kinds: dict[str, str] = field(default_factory=dict)
    """name -> `prm` | `orm`."""
    sample_scores: dict[str, list[list[float]]] = field(default_factory=dict)
    """name -> [problem][sample] -> one number per sample that needs no reward model (`confidence`, `likelihood`)."""
    response_ids: list[list[list[int]]] = field(default_factory=list)
    """[problem][sample] -> the policy's token ids of the sample, EOS appended when it was generated (a sample of
    max_new_tokens ids without EOS was cut by the cap), as RL's rewards read them; [] when unknown (a saved pool)."""

    @property
    def n(self) -> int:
        return min((len(row) for row in self.texts), default=0)

    def correct(self) -> np.ndarray:
        return np.array([[g.answer_correct for g in row[: self.n]] for row in self.grades], dtype=bool)

    def process(self) -> np.ndarray:
        """(P, n) float: 1/0 per sample, NaN where steps cannot be checked."""
        return np.array([[np.nan if g.process_correct is None else float(g.process_correct) for g in row[: self.n]]
                         for row in self.grades], dtype=float)


# --------------------------------------------------------------------------- pool


def response_logprobs(model, tokenizer, prompts: list[str], completions: list[list[int]], batch_size: int = 64,
                      max_logits: int = 2**26) -> list[np.ndarray]:
    """log p(token | prompt, earlier tokens) of every completion token, in ONE teacher-forced pass per batch.

    prompts[k] is encoded as `sample` encodes it for `generate` (the tokenizer's special tokens included);
    completions[k] are the ids that followed it (the EOS token appended by the caller when it was generated).
    Log-probabilities come from the raw logits (temperature 1), whatever temperature the pool was sampled at:
    the model's own belief, not the sampling distribution. Returns one float array (len(completions[k]),) each.

    Left padding puts every completion at the end of its row, so only the last max-completion-length logits
    are needed (`logits_to_keep`); rows per batch are capped so that batch x length x vocab <= `max_logits`.
    """
    import inspect

    import torch

    from rlprm.logprobs import token_logprobs

    if not completions:
        return []
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompts)["input_ids"]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("a prompt encodes to no tokens: its first completion token has no prediction to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    longest = max(len(c) for c in completions)
    per_batch = max(1, min(batch_size, max_logits // max(1, (longest + 1) * vocab)))
    # similar lengths in one batch: less padding
    order = sorted(range(len(completions)), key=lambda k: len(prompt_ids[k]) + len(completions[k]))
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float64)] * len(completions)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), per_batch):
            rows = order[start:start + per_batch]
            seqs = [prompt_ids[k] + list(completions[k]) for k in rows]
            width = max(len(q) for q in seqs)
            tail = max(len(completions[k]) for k in rows)
            if tail == 0:
                continue
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, q in enumerate(seqs):
                ids[r, width - len(q):] = torch.tensor(q, dtype=torch.long)
                mask[r, width - len(q):] = 1
            # positions count real tokens only, as if each row were alone (left padding shifts nothing)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
            with torch.no_grad():
                kwargs = {"logits_to_keep": tail + 1} if keep_arg else {}
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits
                logits = logits[:, -(tail + 1):-1]  # (B, tail, V): the predictions of the last `tail` tokens
                logp = token_logprobs(logits, ids[:, width - tail:])[0].cpu().double()  # float32 a chunk at a time
            for r, k in enumerate(rows):
                c = len(completions[k])
                out[k] = logp[r, tail - c:].numpy().copy()
    finally:
        model.train(was_training)
    return out


def sample_pool(model, tokenizer, problems: list[TaskProblem], n: int, temperature: float = 1.0,
                max_new_tokens: int = 96, batch_size: int = 256, seed: int = 0, sep: str = "\n",
                progress: bool = True, baselines: bool = True, sampler=None) -> Pool:
    """Sample `n` solutions per problem in pooled batches and grade them.

    sampler: who samples (rlprm/rollout.py; None: HF `generate` on `model`); `model` reads the baselines.

    With `baselines`, it also stores per sample `confidence` (its lowest token log-probability) and `likelihood`
    (the sum of its token log-probabilities) over the response tokens, the EOS token included when it was
    generated, under the raw logits (temperature 1, whatever `temperature` sampled the pool). Where `model`
    itself sampled through the KV loop, those log-probs are the ones the loop read off its own logits while
    sampling (up to float rounding, a teacher-forced pass's: tests/test_decoding.py); otherwise (vLLM, HF
    `generate`) one batched teacher-forced pass of `model` computes them (response_logprobs), which cost about
    as much as the sampling. A completion shorter than `max_new_tokens` ended on EOS (the sampler strips it); an
    empty response without EOS scores 0 on both.
    """
    from rlprm.data.problems import grade_samples
    from rlprm.rollout import HFSampler

    sampler = sampler or HFSampler(model, tokenizer)
    own = baselines and isinstance(sampler, HFSampler) and sampler.policy is model
    out = sampler.sample([p.prompt for p in problems], n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, seed=seed, progress=progress, desc=f"sampling {n} per problem",
                         **({"logprobs": True} if own else {}))
    eos = tokenizer.eos_token_id
    # the sampler strips EOS: a completion shorter than max_new_tokens ended on it
    response_ids = [[list(ids) + ([eos] if eos is not None and len(ids) < max_new_tokens else []) for ids in row]
                    for row in out.token_ids]
    pool = Pool(problems, out.texts, grade_samples(problems, out.texts, sep), response_ids=response_ids)
    if baselines:
        read = getattr(out, "token_logprobs", None)
        if read is not None and all(len(lp) == len(ids) for lps, row in zip(read, response_ids)
                                    for lp, ids in zip(lps, row)):
            rows = [[np.asarray(lp, dtype=np.float64) for lp in lps] for lps in read]
        else:
            prompts = [problem.prompt for problem, row in zip(problems, response_ids) for _ in row]
            completions = [ids for row in response_ids for ids in row]
            logps = iter(response_logprobs(model, tokenizer, prompts, completions, batch_size=batch_size))
            rows = [[next(logps) for _ in row] for row in out.token_ids]
        pool.sample_scores[CONFIDENCE] = [[float(lp.min()) if lp.size else 0.0 for lp in row] for row in rows]
        pool.sample_scores[LIKELIHOOD] = [[float(lp.sum()) for lp in row] for row in rows]
    return pool


def score_pool(pool: Pool, name: str, reward_model, sep: str = "\n", batch_size: int = 64) -> None:
    """Add `reward_model`'s per-step scores of every sample under `name` (one forward pass per sample)."""
    flat_problems, flat_steps, shape = [], [], []
    for problem, row in zip(pool.problems, pool.grades):
        shape.append(len(row))
        for g in row:
            flat_problems.append(problem.text)
            flat_steps.append(g.steps)
    scores = reward_model.score_steps(flat_problems, flat_steps, sep=sep, batch_size=batch_size)
    it = iter(scores)
    pool.step_scores[name] = [[next(it) for _ in range(k)] for k in shape]
    pool.kinds[name] = reward_model.kind


def save_pool(pool: Pool, path: Path) -> None:
    """JSONL, one problem a line, written to a temporary file and renamed.

    Line 1: {"kinds": {rm: prm|orm}, "sample_scores": [names]}; then one line per problem whose samples hold
    their grade (`shortcut` and `carry_drop` included), `scores` {rm: per-step scores} and `sample_scores` {name: number}.
    """
    header = {"kinds": pool.kinds, "sample_scores": list(pool.sample_scores)}
    atomic_write_jsonl(path, itertools.chain([header], (_pool_line(pool, i) for i in range(len(pool.problems)))))


def _pool_line(pool: Pool, i: int) -> dict:
    """Problem i of the pool and its graded, scored samples, as save_pool writes it."""
    problem = pool.problems[i]
    samples = [{
        "text": text, "steps": g.steps, "answer": g.answer, "answer_correct": g.answer_correct,
        "well_formed": g.well_formed, "process_correct": g.process_correct, "first_error": g.first_error,
        "shortcut": g.shortcut, "carry_drop": g.carry_drop,
        "scores": {name: s[i][j] for name, s in pool.step_scores.items()},
        "sample_scores": {name: s[i][j] for name, s in pool.sample_scores.items()},
    } for j, (text, g) in enumerate(zip(pool.texts[i], pool.grades[i]))]
    return {"id": problem.id, "prompt": problem.prompt, "text": problem.text, "gold": problem.gold, "samples": samples}


def load_pool(path: Path) -> Pool:
    """Read a pool written by `save_pool` (arithmetic step checks are not re-run: the verdicts are stored).

    Files written before `shortcut`, `carry_drop` and `sample_scores` existed load with those None and no sample
    scores.
    """
    with open(path) as f:
        header = json.loads(f.readline())
        names = header.get("sample_scores", [])
        problems, texts, grades, scores, per_sample = [], [], [], {}, {}
        for i, line in enumerate(f):
            row = json.loads(line)
            problems.append(TaskProblem(row["id"], row["prompt"], row["gold"], text=row.get("text")))
            texts.append([s["text"] for s in row["samples"]])
            grades.append([SampleGrade(s["steps"], s["answer"], s["answer_correct"], s["well_formed"],
                                       s["process_correct"], s["first_error"], shortcut=s.get("shortcut"),
                                       carry_drop=s.get("carry_drop"))
                           for s in row["samples"]])
            for name in header["kinds"]:
                scores.setdefault(name, []).append([s["scores"][name] for s in row["samples"]])
            for name in names:
                per_sample.setdefault(name, []).append([s["sample_scores"][name] for s in row["samples"]])
    return Pool(problems, texts, grades, scores, header["kinds"], per_sample)


# --------------------------------------------------------------------------- selection


def selector_scores(pool: Pool, aggregations=("prod", "min", "last", "mean")) -> dict[str, np.ndarray]:
    """Solution scores (P, n) for every score selector: `NAME_AGG` for a PRM, `NAME` for an ORM, then the
    generator's own `confidence` and `likelihood` where the pool has them (higher is picked)."""
    from rlprm.reward.model import aggregate

    out = {}
    n = pool.n
    for name, per_problem in pool.step_scores.items():
        aggs = aggregations if pool.kinds.get(name) == "prm" else ("last",)
        for how in aggs:
            key = f"{name}_{how}" if pool.kinds.get(name) == "prm" else name
            out[key] = np.array([[aggregate(s, how) for s in row[:n]] for row in per_problem], dtype=float)
    for name, per_problem in pool.sample_scores.items():
        out[name] = np.array([row[:n] for row in per_problem], dtype=float)
    return out


def _answer_ids(pool: Pool) -> tuple[np.ndarray, np.ndarray]:
    """(P, n) answer-class ids and (P, 2n) correctness per class.

    Every answer the grader accepted is one class (they all equal the gold);
    wrong answers group by their whitespace-free text; a missing answer is a
    class of its own per sample, so that blanks never win a vote together.
    """
    n = pool.n
    ids = np.zeros((len(pool.problems), n), dtype=np.int64)
    class_correct = np.zeros((len(pool.problems), 2 * n + 1), dtype=bool)
    for i, row in enumerate(pool.grades):
        classes: dict[str, int] = {}
        for j, g in enumerate(row[:n]):
            if g.answer_correct:
                key = "\0correct"
            elif not g.answered:
                key = f"\0none{j}"
            else:
                key = "".join(g.answer.split())
            ids[i, j] = classes.setdefault(key, len(classes))
            class_correct[i, ids[i, j]] = g.answer_correct
    return ids, class_correct


def _interval(values: np.ndarray) -> dict:
    """{mean, lo, hi} over resamples: the mean and the 2.5 / 97.5 percentiles (NaN resamples left out)."""
    values = np.asarray(values)
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return {"mean": float(values.mean()), "lo": float(np.percentile(values, 2.5)),
            "hi": float(np.percentile(values, 97.5))}


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without its warning: NaN where a slice has no number."""
    ok = ~np.isnan(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def default_weighted_by(scores: dict[str, np.ndarray]) -> str | None:
    """The selector whose scores weight the weighted vote when none is named: the first PRM `_prod`, else the
    first reward-model selector; never a log-probability baseline (negative weights make no vote)."""
    rm = [k for k in scores if k not in BASELINES]
    return next((k for k in rm if k.endswith("_prod")), next(iter(rm), None))


def default_pairs(selectors: list[str], kinds: dict[str, str]) -> list[tuple[str, str]]:
    """The first PRM's `_prod` selector minus the first ORM, majority, confidence, likelihood and random
    (those in `selectors`); none without a PRM."""
    prm = next((s for s in selectors if s.endswith("_prod") and kinds.get(s[: -len("_prod")]) == "prm"), None)
    if prm is None:
        return []
    orm = next((s for s in selectors if kinds.get(s) == "orm"), None)
    return [(prm, b) for b in (orm, MAJORITY, CONFIDENCE, LIKELIHOOD, RANDOM) if b is not None and b in selectors]


def parse_difference(entry: str, selectors: list[str]) -> tuple[str, str]:
    """`A-B` -> (A, B), split at the one `-` that leaves a known selector on both sides (names may hold `-`)."""
    known = set(selectors)
    pairs = [(entry[:i], entry[i + 1:]) for i, ch in enumerate(entry) if ch == "-"]
    pairs = [(a, b) for a, b in pairs if a in known and b in known]
    if len(pairs) != 1:
        raise ValueError(f"difference {entry!r} is not `A-B` of two of this pool's selectors: {', '.join(selectors)}")
    return pairs[0]


def _chunk(P: int, n: int, resamples: int, budget: int = 1 << 20) -> int:
    """Resamples per chunk: each (chunk, P, n) array of a seed stays near `budget` elements (~8 MB of float64)."""
    return max(1, min(resamples, budget // max(1, P * n)))


def _select_metrics(pos: np.ndarray, right: np.ndarray, proc: np.ndarray | None) -> dict[str, np.ndarray]:
    """pos (R, P): the chosen position in each draw; right, proc (R, P, N): the drawn samples' verdicts (proc
    None where steps are not checked) -> {metric: (R,)}, one value per resample (the mean over problems)."""
    right = np.take_along_axis(right, pos[..., None], -1)[..., 0]
    out = {"accuracy": right.mean(axis=1)}
    if proc is not None:
        proc = np.take_along_axis(proc, pos[..., None], -1)[..., 0]
        out["process_correct"] = _nanmean(proc, axis=1)
        out["right_answer_wrong_process"] = (right & (proc == 0)).mean(axis=1)
    return out


def _bootstrap_inputs(pools, scores, ns, pairs, weighted_by) -> tuple:
    """`bon_bootstrap` step 1: its inputs checked and completed: (pools, scores, P, score selectors, every
    selector, pairs, weighted_by)."""
    pools = [pools] if isinstance(pools, Pool) else list(pools)
    scores = [scores] if isinstance(scores, dict) else list(scores)
    if not pools or len(pools) != len(scores):
        raise ValueError(f"{len(pools)} pools and {len(scores)} score sets: give one score set per pool")
    P = len(pools[0].problems)
    ids0 = [p.id for p in pools[0].problems]
    for pool in pools[1:]:
        if [p.id for p in pool.problems] != ids0:
            raise ValueError("pools of different problems: seeds can only be combined over the same problems, in order")
    n_min = min(pool.n for pool in pools)
    if P == 0 or n_min == 0:
        raise ValueError("an empty pool: no problems or no samples")
    if any(N < 1 or N > n_min for N in ns):
        raise ValueError(f"every N must be in 1..{n_min} (the samples per problem), got {list(ns)}")
    names = [k for k in scores[0] if all(k in sc for sc in scores[1:])]
    if weighted_by is None:
        weighted_by = default_weighted_by({k: scores[0][k] for k in names})
    elif weighted_by not in names:
        raise ValueError(f"weighted vote by {weighted_by!r}: not a selector of this pool "
                         f"({', '.join(names) or 'none'})")
    selectors = names + [RANDOM, ORACLE, MAJORITY] + ([WEIGHTED] if weighted_by else [])
    if pairs:
        pairs = [parse_difference(p, selectors) if isinstance(p, str) else tuple(p) for p in pairs]
        missing = sorted({x for pair in pairs for x in pair} - set(selectors))
        if missing:
            raise ValueError(f"differences name unknown selectors {missing}; this pool has {', '.join(selectors)}")
    else:
        pairs = default_pairs(selectors, pools[0].kinds)

    for pool, sc in zip(pools, scores):
        bad = [k for k in names if sc[k].shape != (P, pool.n)]
        if bad:
            raise ValueError(f"scores {bad} are not (problems, samples) = {(P, pool.n)}: use selector_scores(pool)")
    return pools, scores, P, names, selectors, pairs, weighted_by


def _seed_resample(rng, probs, pool, sc, right_all, proc_all, ids, class_correct, names, selectors, weighted_by,
                   ns) -> dict:
    """`bon_bootstrap` step 2 for one seed's pool and one chunk of resamples (`probs`, (Rc, P)): {selector: {N:
    {metric: (Rc,)}}}. `proc_all` None: the steps are not checkable."""
    Rc, P = probs.shape
    n, K = pool.n, class_correct.shape[1]
    # a random order of each drawn problem's samples; its first N is the draw at N. Everything is gathered
    # once in that order (flat indices into the (P, n) arrays), and each N takes a prefix view of it.
    order = np.argsort(rng.random((Rc, P, n)), axis=-1)
    flat = probs[..., None] * n + order  # (Rc, P, n)
    tie = rng.random((Rc, P, K))  # vote tie-breaking keys, one per answer class
    right_o = right_all.ravel()[flat]
    proc_o = None if proc_all is None else proc_all.ravel()[flat]
    scores_o = {name: sc[name].ravel()[flat] for name in names}
    # running (weighted) votes per answer class: cell (r, p, class) of a flat (Rc * P * K) array
    cell = ((np.arange(Rc)[:, None, None] * P + np.arange(P)[None, :, None]) * K + ids.ravel()[flat])
    votes = {MAJORITY: np.zeros(Rc * P * K)}
    if WEIGHTED in selectors:
        votes[WEIGHTED] = np.zeros(Rc * P * K)
    seed_vals: dict[str, dict[int, dict]] = {s: {} for s in selectors}
    done = 0
    for N in ns:
        right = right_o[..., :N]  # (Rc, P, N)
        proc = None if proc_o is None else proc_o[..., :N]
        for name in names:
            # argmax takes the first best in a random order: ties are broken at random
            seed_vals[name][N] = _select_metrics(np.argmax(scores_o[name][..., :N], axis=-1), right, proc)
        seed_vals[RANDOM][N] = _select_metrics(np.zeros((Rc, P), dtype=np.int64), right, proc)
        seed_vals[ORACLE][N] = {"accuracy": right.any(-1).mean(axis=1)}
        new = cell[..., done:N].ravel()
        votes[MAJORITY] += np.bincount(new, minlength=Rc * P * K)
        if WEIGHTED in votes:
            votes[WEIGHTED] += np.bincount(new, weights=scores_o[weighted_by][..., done:N].ravel(),
                                           minlength=Rc * P * K)
        done = N
        counts = votes[MAJORITY].reshape(Rc, P, K)
        for name, v in votes.items():
            # only classes that got votes can win (an empty class would win a tie of zero weights)
            v = np.where(counts > 0, v.reshape(Rc, P, K), -np.inf)
            top = v == v.max(axis=-1, keepdims=True)
            winner = np.argmax(np.where(top, tie, -1.0), axis=-1)  # (Rc, P): a random one of the top classes
            seed_vals[name][N] = {"accuracy": class_correct[probs, winner].mean(axis=1)}
    return seed_vals


def _bootstrap_summary(values, pairs, ns) -> tuple[dict, dict]:
    """`bon_bootstrap` step 3: (curves, differences) from the per-resample values."""
    joined = {s: {N: {m: np.concatenate(v) for m, v in c.items()} for N, c in per_n.items()}
              for s, per_n in values.items()}
    curves = {s: {N: {m: _interval(v) for m, v in c.items()} for N, c in per_n.items()} for s, per_n in joined.items()}
    differences = {}
    for a, b in pairs:
        differences[f"{a}_minus_{b}"] = {
            N: {m: _interval(joined[a][N][m] - joined[b][N][m])
                for m in ("accuracy", "process_correct") if m in joined[a][N] and m in joined[b][N]}
            for N in ns}
    return curves, differences


def bon_bootstrap(pools: Pool | list[Pool], scores: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                  ns: list[int], pairs: list[str | tuple[str, str]] | None = None, resamples: int = 1000,
                  seed: int = 0, weighted_by: str | None = None, resample_seeds: bool = False) -> tuple[dict, dict]:
    """Paired bootstrap over problems of every selector at every N, and of differences between selectors.

    pools: one pool, or S pools of the SAME problems (e.g. one per training seed), each with its own
    scores[s] {selector: (P, n_s)} (`selector_scores`). Every resample r draws P problem indices with
    replacement, shared by all seeds; within each drawn problem each seed's pool draws N of its samples
    without replacement (one random order per (r, problem, seed), whose first N is the draw at N, so N's
    draws nest). Every selector is scored on those same problems and draws; a seed's value is the mean over
    the drawn problems, and the resample's value the mean over seeds. Mean and 2.5/97.5 percentiles over
    resamples follow. Seeds enter through their samples only: the S seeds are averaged, not resampled, unless
    `resample_seeds`: then every resample also draws S seed indices with replacement (shared by every selector
    and N, so differences stay paired; from a generator of its own, so the problem and sample draws are the
    same either way) and averages those, so the intervals cover seed-to-seed variance too (e.g. small models
    trained with different seeds).

    Ties in a score selector go to a random one of the tied samples (argmax takes the first best in a random
    order); a (weighted) vote goes to the answer class with the most (weight of) votes among classes that got
    votes, ties at random. Vote weights should be non-negative (probabilities).

    pairs: differences to report, (A, B) or "A-B" (A minus B, per resample, then summarised); None or empty:
    `default_pairs`. Returns (curves, differences):
      curves      {selector: {N: {"accuracy": {mean, lo, hi}, "process_correct": ...,
                                  "right_answer_wrong_process": ...}}}
                  (process metrics only for selectors that pick one sample, where every pool's steps are checked;
                  majority, weighted_majority and pass@n report accuracy only)
      differences {"A_minus_B": {N: {"accuracy": {mean, lo, hi}, "process_correct": {mean, lo, hi}}}}
                  (process_correct where both A and B have it)
    """
    # 1. the inputs: one score set per pool, the same problems, N within the samples, selectors and pairs
    pools, scores, P, names, selectors, pairs, weighted_by = _bootstrap_inputs(pools, scores, ns, pairs, weighted_by)
    ns = sorted(set(ns))  # ascending: the draws nest, so votes at N add the samples past the previous N
    correct = [pool.correct() for pool in pools]
    process = [pool.process() for pool in pools]
    checkable = all(not np.isnan(pr).all() for pr in process)
    answers = []
    for pool in pools:
        ids, class_correct = _answer_ids(pool)
        answers.append((ids, class_correct[:, : int(ids.max()) + 1]))  # only classes that exist: K <= n
    # 2. resample, chunk by chunk: problems shared by every seed, each seed's own sample draws
    rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1]) if resample_seeds else None
    # values[selector][N][metric]: per-resample values, chunk by chunk
    values: dict[str, dict[int, dict[str, list[np.ndarray]]]] = {s: {N: {} for N in ns} for s in selectors}
    R = _chunk(P, max(pool.n for pool in pools), resamples)
    for r0 in range(0, resamples, R):
        Rc = min(R, resamples - r0)
        probs = rng.integers(0, P, size=(Rc, P))  # (Rc, P): the resampled problems, shared by every seed
        per_seed = []  # for each seed: {selector: {N: {metric: (Rc,)}}}
        for pool, sc, right_all, proc_all, (ids, class_correct) in zip(pools, scores, correct, process, answers):
            seed_vals = _seed_resample(rng, probs, pool, sc, right_all, proc_all if checkable else None, ids,
                                       class_correct, names, selectors, weighted_by, ns)
            per_seed.append(seed_vals)
        S = len(per_seed)
        # (S, Rc): which seeds each resample averages (all of them, or S drawn with replacement)
        drawn = (seed_rng.integers(0, S, size=(S, Rc)) if seed_rng is not None
                 else np.broadcast_to(np.arange(S)[:, None], (S, Rc)))
        for name in selectors:
            for N in ns:
                for metric in per_seed[0][name][N]:
                    stacked = np.stack([sv[name][N][metric] for sv in per_seed])  # (S, Rc)
                    picked = np.take_along_axis(stacked, drawn, axis=0)
                    values[name][N].setdefault(metric, []).append(_nanmean(picked, axis=0))
    # 3. intervals of every selector and of every pair's difference
    return _bootstrap_summary(values, pairs, ns)


def bon_curves(pool: Pool, scores: dict[str, np.ndarray], ns: list[int], resamples: int = 1000, seed: int = 0,
               weighted_by: str | None = None) -> dict:
    """Accuracy (and process-correct rate) of every selector at every N: `bon_bootstrap`'s curves for one pool.

    Returns {selector: {N: {"accuracy": {mean, lo, hi}, "process_correct": ..., "right_answer_wrong_process": ...}}}.
    """
    return bon_bootstrap(pool, scores, ns, None, resamples, seed, weighted_by)[0]


def bon_differences(pool: Pool, scores: dict[str, np.ndarray], ns: list[int],
                    pairs: list[str | tuple[str, str]] | None = None, resamples: int = 1000, seed: int = 0,
                    weighted_by: str | None = None) -> dict:
    """Paired differences between selectors: `bon_bootstrap`'s differences for one pool (with the same seed,
    the same draws as `bon_curves`).

    Returns {"A_minus_B": {N: {"accuracy": {mean, lo, hi}, "process_correct": ...}}}.
    """
    return bon_bootstrap(pool, scores, ns, pairs, resamples, seed, weighted_by)[1]


def bon_curves_seeds(pools: list[Pool], scores: list[dict[str, np.ndarray]], ns: list[int], resamples: int = 1000,
                     seed: int = 0, weighted_by: str | None = None) -> dict:
    """Curves of S pools of the same problems (seeds), averaged over seeds within each problem resample, so the
    intervals cover problem and sampling variance of every seed; `bon_bootstrap(pools, ...)` gives differences too."""
    return bon_bootstrap(pools, scores, ns, None, resamples, seed, weighted_by)[0]


def powers_of_two(n_max: int) -> list[int]:
    ns, k = [], 1
    while k < n_max:
        ns.append(k)
        k *= 2
    return ns + [n_max]


# --------------------------------------------------------------------------- reporting


def _fmt(point: dict | None, signed: bool = False) -> str:
    if not point or math.isnan(point["mean"]):
        return "-"
    f = "+.1f" if signed else ".1f"
    return f"{100 * point['mean']:{f}} [{100 * point['lo']:{f}}, {100 * point['hi']:{f}}]"


def selector_curves(curves: dict) -> dict[str, dict[int, dict]]:
    """Curves with int N keys and without the differences entry (as read back from bon_curves.json too)."""
    return {name: {int(N): point for N, point in c.items()} for name, c in curves.items() if name != DIFFERENCES_KEY}


def markdown_table(curves: dict, title: str = "Best-of-N accuracy (%), mean [95% interval]",
                   differences: dict | None = None) -> str:
    """The curves as markdown tables; with `differences` (`bon_bootstrap`'s), a table of the paired differences
    in percentage points, mean [95% interval], accuracy at every N and process-correct rate where there is one."""
    curves = selector_curves(curves)
    ns = sorted({N for c in curves.values() for N in c})
    lines = [f"### {title}", "", "| selector | " + " | ".join(f"N={N}" for N in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for name, c in curves.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(c.get(N, {}).get("accuracy")) for N in ns) + " |")
    n_top = ns[-1]
    proc_rows = [(name, c[n_top]) for name, c in curves.items() if "process_correct" in c.get(n_top, {})
                 and not math.isnan(c[n_top]["process_correct"]["mean"])]
    if proc_rows:
        lines += ["", f"### Chosen solutions at N={n_top} (%): every step right / right answer with a wrong step", "",
                  "| selector | process correct | right answer, wrong step |", "|---|---|---|"]
        for name, point in proc_rows:
            lines.append(f"| {name} | {_fmt(point['process_correct'])} | {_fmt(point['right_answer_wrong_process'])} |")
    diffs = selector_curves(differences or {})
    for metric, what in [("accuracy", "accuracy"), ("process_correct", "process-correct rate of the chosen solutions")]:
        rows = {name: c for name, c in diffs.items() if any(metric in point for point in c.values())}
        if not rows:
            continue
        dns = sorted({N for c in rows.values() for N in c})
        lines += ["", f"### Paired differences in {what} (points), mean [95% interval]", "",
                  "| A minus B | " + " | ".join(f"N={N}" for N in dns) + " |", "|---|" + "---|" * len(dns)]
        for name, c in rows.items():
            lines.append(f"| {name.replace('_minus_', ' - ')} | "
                         + " | ".join(_fmt(c.get(N, {}).get(metric), signed=True) for N in dns) + " |")
    return "\n".join(lines) + "\n"


def selector_styles(names: list[str]) -> dict[str, dict]:
    """A distinct look per selector, the same for a name wherever it is drawn: colour, line style and marker.

    10 colours (tab10), 20 beyond ten selectors (tab20); the line style changes each time the palette comes round,
    so no two selectors share colour and style. The oracle and random are dashed, as reference lines."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    cycles, markers = ["-", "-.", ":"], "os^Dv<>ph*"
    styles = {}
    for i, name in enumerate(names):
        style = "--" if name in (ORACLE, RANDOM) else cycles[(i // len(palette)) % len(cycles)]
        styles[name] = {"color": palette[i % len(palette)], "linestyle": style, "marker": markers[i % len(markers)]}
    return styles


def _draw_curve(ax, name: str, c: dict, style: dict | None = None, metric: str = "accuracy"):
    ns = [N for N in sorted(c) if metric in c[N]]
    if not ns:
        return None
    mean = [100 * c[N][metric]["mean"] for N in ns]
    lo = [100 * c[N][metric]["lo"] for N in ns]
    hi = [100 * c[N][metric]["hi"] for N in ns]
    style = style or {"linestyle": "--" if name in (ORACLE, RANDOM) else "-", "marker": "o"}
    line, = ax.plot(ns, mean, markersize=3, label=name, **style)
    ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.12)
    return line


def plot_curves(curves: dict, path: Path, title: str = "Best-of-N") -> None:
    """Best-of-N curves, one per selector (each its own colour, style and marker), the legend beside the axes:
    with 15 selectors a legend inside covered the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_selector = selector_curves(curves)
    styles = selector_styles(list(by_selector))
    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=110)
    for name, c in by_selector.items():
        _draw_curve(ax, name, c, styles[name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N = solutions per problem (log scale)")
    ax.set_ylabel("% problems solved (best-of-N)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    save_figure(fig, path)


def plot_by_generator(curves_by_generator: dict[str, dict], path: Path, selectors: list[str] | None = None,
                      title: str = "Best-of-N by generator", metric: str = "accuracy", columns: int = 4) -> None:
    """The paper's figure: one panel per generator (e.g. `start`, `ppo_dense_prm`), a line per selector with its
    95% band, log2 N axis, one y scale for all panels, `columns` panels a row. selectors: which, in this order
    (None: every one found); a selector keeps its colour across panels. metric: `accuracy` (answer right, the
    paper's) or `process_correct` (every step of the chosen solution right; selectors without it are left out).
    Curves may come straight from bon_curves.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {gen: selector_curves(c) for gen, c in curves_by_generator.items()}
    if not panels:
        raise ValueError("plot_by_generator: no generators to plot")
    if selectors is None:
        selectors = list(dict.fromkeys(name for c in panels.values() for name in c))
    styles = selector_styles(selectors)
    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols)
    width = 4.2 * cols + 1.5
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.8 * rows), dpi=110, sharey=True, squeeze=False)
    handles = {}
    for ax, (gen, curves) in zip(axes.flat, panels.items()):
        for name in selectors:
            if name in curves:
                line = _draw_curve(ax, name, curves[name], styles[name], metric)
                if line is not None:
                    handles[name] = line
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (log scale)")
        ax.set_title(gen)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("% problems solved (best-of-N)" if metric == "accuracy"
                          else "% chosen solutions with every step right")
    fig.suptitle(title)
    fig.legend([handles[k] for k in selectors if k in handles], [k for k in selectors if k in handles],
               fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / width, 1))
    save_figure(fig, path)


def flat_metrics(curves: dict, prefix: str = "bon") -> dict:
    """{prefix/selector/N=k/accuracy: mean, ...} for metrics.jsonl and W&B (differences too, under another prefix)."""
    out = {}
    for name, c in selector_curves(curves).items():
        for N, point in c.items():
            for metric, value in point.items():
                out[f"{prefix}/{name}/N={N}/{metric}"] = value["mean"]
    return out


# --------------------------------------------------------------------------- API and job


def best_of_n(model, tokenizer, problems: list[TaskProblem], reward_models: dict | None = None, n_max: int = 8,
              temperature: float = 1.0, max_new_tokens: int = 96, batch_size: int = 256, resamples: int = 100,
              seed: int = 0, sep: str = "\n", aggregations=("prod",), progress: bool = False,
              sampler=None) -> tuple[dict, Pool]:
    """Sample (with `sampler`, default HF `generate` on `model`), score and select; returns (flat metrics, the
    pool). For RL loops between epochs."""
    pool = sample_pool(model, tokenizer, problems, n_max, temperature, max_new_tokens, batch_size, seed, sep, progress,
                       sampler=sampler)
    for name, rm in (reward_models or {}).items():
        score_pool(pool, name, rm, sep=sep)
    curves, differences = bon_bootstrap(pool, selector_scores(pool, aggregations), powers_of_two(n_max), None,
                                        resamples, seed)
    return {**flat_metrics(curves), **flat_metrics(differences, prefix="bon_diff")}, pool


def between_epochs(recipe, model, tokenizer, problems: list[TaskProblem], reward_model=None, epoch: int = 0,
                   reference=None, sampler=None) -> dict:
    """The RL loops' evaluation between epochs: best-of-`rl.eval_n_max` on held-out `problems`, scored by the run's own
    reward model if it has one, plus `sample_rates` over all samples (answer and process accuracy, trace error,
    shortcut rate); `{}` when rl.eval_n_max is 0. sampler: the run's (rl.rollout); None: HF `generate` on `model`.

    Sampling reseeds the global torch RNG (the same evaluation samples' seed every epoch, so epochs compare);
    the caller's stream is restored afterwards, or every epoch's rollouts would reuse one stream.
    """
    import torch

    rl = recipe.rl
    if not rl.eval_n_max:
        return {}
    t0 = time.monotonic()
    rms = {recipe.reward.source: reward_model} if reward_model is not None else {}
    rng = torch.get_rng_state()
    try:
        metrics, pool = best_of_n(model, tokenizer, problems, rms, n_max=rl.eval_n_max,
                                  temperature=recipe.eval.temperature, max_new_tokens=rl.max_new_tokens,
                                  batch_size=recipe.eval.batch_size, resamples=min(recipe.eval.resamples, 100),
                                  seed=recipe.run.seed, sep=recipe.task.step_separator, progress=False,
                                  sampler=sampler)
    finally:
        torch.set_rng_state(rng)
    metrics.update({"epoch": epoch, **sample_rates(pool)})
    metrics["eval/reward"] = held_out_reward(recipe, pool, tokenizer, reference)
    metrics["time/eval"] = round(time.monotonic() - t0, 2)
    return metrics


def held_out_reward(recipe, pool: Pool, tokenizer=None, reference=None) -> float | None:
    """Mean over the pool's samples of the reward the run trains on (without the KL penalty), so a reader can see
    whether each RL arm improved ITS OWN objective on held-out problems: the recipe's reward source's
    `solution_reward` (rlprm/reward/sources.py), computed by the very call PPO and GRPO make on their rollouts.
    Scores: the pool's own (`score_pool` under reward.source), the checker's (exact), the starting generator's
    (`confidence`, which needs `reference`) or reward.function's. None when it cannot be computed here: no token
    ids (a pool read back from a file), no tokenizer, or no scores of the run's reward model.
    """
    from rlprm.reward.sources import reward_source

    # the starting generator's token log-probs (`confidence`), one teacher-forced pass per batch
    start = None if reference is None else (lambda prompts, ids: response_logprobs(reference, tokenizer, prompts, ids))
    return reward_source(recipe).solution_reward(pool, tokenizer, start)


def sample_rates(pool: Pool) -> dict:
    """Rates over every sample of the pool: eval/answer_accuracy, eval/process_accuracy, eval/trace_error (of the
    right-answer samples, the share with a wrong step; 0 without right answers), eval/shortcut_rate (samples
    that write the last-digit shortcut) and eval/carry_drop_rate (samples that drop a carry or borrow); the
    step-level ones None where steps cannot be checked."""
    from rlprm.tasks.arithmetic import trace_error

    grades = [g for row in pool.grades for g in row]
    checked = bool(grades) and all(g.process_correct is not None for g in grades)
    shortcuts = [g.shortcut for g in grades]
    drops = [g.carry_drop for g in grades]
    process = pool.process()
    return {
        "eval/answer_accuracy": float(pool.correct().mean()),
        "eval/process_accuracy": None if np.isnan(process).all() else float(np.nanmean(process)),
        "eval/trace_error": float(trace_error(grades)) if checked else None,
        "eval/shortcut_rate": (float(np.mean(shortcuts)) if shortcuts and None not in shortcuts else None),
        "eval/carry_drop_rate": float(np.mean(drops)) if drops and None not in drops else None,
    }
