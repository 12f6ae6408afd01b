"""Active learning for PRMs: surface convincing wrong-answer solutions, label them, retrain.

"Let's Verify Step by Step" (section 4.1) showed labellers "convincing
wrong-answer" solutions: those the current best PRM rates highest among
solutions whose final answer is wrong. They fool the PRM, so their labels teach
it the most; retraining on each generation of such labels made process
supervision 2.6x more data-efficient than uniform sampling. The paper mixed
them with other samples (80% convincing wrong-answer, 20% the most convincing
of the rest).

Two entry points:

- `rlprm select RECIPE` (`select`): score the pool (rm.data's training
  samples: N per problem, graded) with the current PRM and write the top K per
  problem as PRM800K phase-2 lines, ready for labelling (`rlprm.reward.label`);
  `rlprm.data.prm800k` reads them back once rated.
- `rlprm active-learning RECIPE` (`run_loop`): the whole comparison on the
  arithmetic task. Every arm starts from the same uniform seed set; at each
  label budget (active.budgets) every arm labels exactly the same number of
  solutions of the same problems (uniform picks, or one active arm per
  convincing share: the paper's phase-2 ablation), through the same files
  (unrated lines -> labeller -> PRM800K loader), and retrains a fresh PRM the
  way `rlprm train-rm` trains the default one (rm.scorer lm, from labels alone)
  for active.train_steps steps with identical seeds. PRM quality on held-out
  test problems (best-of-N process-correct and answer accuracy, step AUROC,
  first-error F1 at a threshold chosen on held-out validation problems) is
  plotted against the number of labels, and the data-efficiency factor
  (labels uniform needs / labels active needs for the same quality,
  rlprm/experiments/efficiency.py) is reported with a bootstrap interval over seeds
  (rlprm/experiments/active_report.py).

The label budget counts labelled SOLUTIONS (the paper's unit: one solution
sent to the labeller is one label, whatever its steps); labelled steps are
reported beside them (a wrong solution is labelled only up to its first
error, so active labels carry fewer steps each). `plan_generation` makes
every budget exact.

The pure pieces (`convincing_slots`, `mix_slots`, `plan_generation`,
`select_indices`, `prm_quality`; the factor in rlprm/experiments/efficiency.py) are plain
functions tested on hand-made inputs.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Sequence

from rlprm.config import Recipe
from rlprm.errors import InputError
from rlprm.experiments.active_report import KINDS, arm_name
from rlprm.files import atomic_write_jsonl

CONVINCING_WRONG, CONVINCING, UNIFORM = "convincing_wrong_answer", "convincing", "uniform"


class ActiveLearningError(InputError, RuntimeError):
    """The job cannot start or go on (the message says why and what to change)."""


# --------------------------------------------------------------------------- selection (pure)


def convincing_slots(num_problems: int, k: int, fraction: float) -> list[int]:
    """How many of each problem's k slots go to convincing wrong-answer solutions.

    Spread so that the total is round(num_problems * k * fraction) and problems differ by at most
    one: with k=2 and fraction 0.8, five problems get 2, 1, 2, 1, 2 (8 of 10 slots).
    """
    return mix_slots([k] * num_problems, fraction)


def mix_slots(quotas: Sequence[int], share: float) -> list[int]:
    """Convincing wrong-answer slots per problem when problem i is labelled `quotas[i]` times.

    The total is round(sum(quotas) * share) (half up), spread in order so that the running total follows
    share * the running quota: quotas [2, 2, 1] at 0.4 give [1, 1, 0] (2 of 5).
    """
    out, done, cum = [], 0, 0
    for q in quotas:
        cum += q
        upto = math.floor(cum * share + 0.5)
        out.append(min(q, upto - done))
        done += out[-1]
    return out


def plan_generation(order: Sequence[int], start: int, sizes: Sequence[int], k: int,
                    need: int) -> tuple[list[int], list[int], int]:
    """(problems, quotas, next start): the next problems of `order` from `start` and how many of each to label,
    so that the quotas add up to exactly `need` labelled solutions (k per problem, fewer where a problem has
    fewer samples, the last one cut). Raises ActiveLearningError when the order runs out first."""
    ids, quotas, got = [], [], 0
    j = start
    while got < need:
        if j >= len(order):
            raise ActiveLearningError(f"the pool runs out of problems after {got} of {need} labels in a generation: "
                                      "raise rm.data.train_problems or lower active.budgets")
        q = min(k, sizes[order[j]], need - got)
        if q > 0:
            ids.append(order[j])
            quotas.append(q)
            got += q
        j += 1
    return ids, quotas, j


def select_indices(scores: Sequence[float], answer_correct: Sequence[bool | None], k: int, n_convincing: int,
                   fill: str, rng: random.Random, available: Sequence[bool] | None = None) -> list[tuple[int, str]]:
    """Pick up to `k` of one problem's samples: (index, why), most convincing first.

    1. `n_convincing` highest-scored samples whose answer is wrong (None counts as wrong: no usable answer);
    2. the rest by `fill`: `convincing` (highest-scored remaining, any answer) or `uniform` (random remaining).
    A problem with fewer wrong-answer samples than `n_convincing` fills the gap the same way.
    Ties in score keep the sample order (stable), so results are reproducible.
    """
    if fill not in (UNIFORM, CONVINCING):
        raise ValueError(f"fill must be `uniform` or `convincing`, got {fill!r}")
    n = len(scores)
    free = [i for i in range(n) if available is None or available[i]]
    by_score = sorted(free, key=lambda i: -scores[i])
    wrong = [i for i in by_score if not answer_correct[i]]
    picked = [(i, CONVINCING_WRONG) for i in wrong[:n_convincing]]
    taken = {i for i, _ in picked}
    rest = [i for i in free if i not in taken]
    need = min(k, len(free)) - len(picked)
    if need > 0:
        if fill == CONVINCING:
            picked += [(i, CONVINCING) for i in sorted(rest, key=lambda i: -scores[i])[:need]]
        else:
            picked += [(i, UNIFORM) for i in rng.sample(rest, need)]
    return picked


def select_uniform(available: Sequence[bool], k: int, rng: random.Random) -> list[tuple[int, str]]:
    """`k` random samples among the available ones (fewer if fewer are left)."""
    free = [i for i, ok in enumerate(available) if ok]
    return [(i, UNIFORM) for i in rng.sample(free, min(k, len(free)))]


# --------------------------------------------------------------------------- data


def group_by_problem(records) -> list[list]:
    """Records -> lists of records of the same problem (`group`), in first-seen order."""
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.group or r.problem, []).append(r)
    return list(groups.values())


def load_pools(recipe: Recipe, progress: bool = True) -> tuple[list, list, dict]:
    """(pool records, held-out records, info): rm.data's training and held-out samples, labelled by the checker.

    A cache in rm.data.cache_dir drawn with exactly these settings (what `rlprm train-rm` wrote) is
    read and never rewritten; otherwise the samples are drawn once and cached in RUN_DIR/pool/.
    """
    from rlprm.data.stepwise import arithmetic_pool

    if recipe.task.name != "arithmetic" or recipe.rm.data.source != "arithmetic":
        raise ActiveLearningError("active learning samples the generator on the embedded task: set task.name: "
                                  "arithmetic and rm.data.source: arithmetic (for other data, write unrated lines "
                                  "with rlprm.reward.label.unlabelled_line and label them with `rlprm label --with PRM_DIR`)")
    gen_path = recipe.model.generator
    if gen_path == "tiny" or (gen_path.startswith("/") and not (Path(gen_path) / "config.json").is_file()):
        from rlprm.prerequisites import generator_hint

        raise ActiveLearningError(f"model.generator: no trained generator at {gen_path}; make one with "
                                  f"{generator_hint()}")
    data = recipe.rm.data
    pool = arithmetic_pool(recipe, Path(recipe.run.output_dir) / "pool", progress,
                           shared_dir=Path(data.cache_dir) if data.cache_dir else None, what="pool")
    out = {split: records for split, (records, _, _, _) in pool.items()}
    info = {f"{split}_source": str(path) for split, (_, _, _, path) in pool.items()}
    return out["train"], out["eval"], info


def solution_kind(record) -> str:
    """`dropped_carry` when some step drops a carry or borrow (the answer-changing habit), else `shortcut` when some
    step writes a result's last digit (the right-answer habit), else `slip` when the checker finds a wrong step
    (or none parses), else `right`. Read from the steps themselves, so pools cached before the checker flagged the
    dropped carry are classified the same way."""
    from rlprm.tasks.arithmetic import is_carry_drop_step, is_shortcut_step, parse_step

    parsed = [x for x in map(parse_step, record.steps) if x is not None]
    if any(is_carry_drop_step(*x) for x in parsed):
        return "dropped_carry"
    if any(is_shortcut_step(*x) for x in parsed):
        return "shortcut"
    return "right" if record.process_correct else "slip"


def kind_counts(kinds) -> dict[str, int]:
    """{kind: count} over KINDS (zeros kept, so rows line up)."""
    kinds = list(kinds)
    return {k: kinds.count(k) for k in KINDS}


def answer_text(problem_text: str) -> str | None:
    """The arithmetic problem's right answer as text (None when the text is not an arithmetic problem)."""
    from rlprm.tasks.arithmetic import Problem

    try:
        return str(Problem.parse(problem_text).answer)
    except ValueError:
        return None


# --------------------------------------------------------------------------- PRM training (fixed budget)


def train_prm(recipe: Recipe, records, steps: int, seed: int, warmup_steps: int = 10, progress: bool = False,
              desc: str = "training PRM"):
    """(rm.scorer head) A fresh PRM (built like `rlprm train-rm` builds one) trained `steps` optimizer steps on
    `records`. The LM-scored default PRM trains through rlprm.reward.fit instead.

    A plain loop rather than `transformers.Trainer`: many short trainings in one process, each with
    the same seed-determined head, new blocks and batch order.
    """
    import torch
    from tqdm.auto import tqdm

    from rlprm.models import load_tokenizer, resolve_device
    from rlprm.reward.model import (Collator, RewardModel, add_identity_layers, build_reward_model, encode_examples,
                                     freeze_body, make_convention, reward_loss)

    rm_cfg = recipe.rm
    backbone = recipe.model.generator if rm_cfg.backbone == "generator" else rm_cfg.backbone
    convention = make_convention("prm", recipe.task.step_separator, rm_cfg.prompt_template)
    # 1. the model: same seed, same fresh head and identity blocks for every strategy
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(backbone, padding_side="right", trust_remote_code=recipe.model.trust_remote_code)
    model = build_reward_model(convention, backbone, tokenizer, dtype=recipe.model.dtype,
                               trust_remote_code=recipe.model.trust_remote_code)
    own_layers = model.config.num_hidden_layers
    add_identity_layers(model, rm_cfg.extra_layers)
    if rm_cfg.freeze_backbone:
        freeze_body(model, own_layers)
    model.to(resolve_device(recipe.run.device))
    device = next(model.parameters()).device
    # 2. examples (labels up to the first error; unlabelled records dropped)
    max_length = rm_cfg.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    examples, _ = encode_examples(tokenizer, records, convention, max_length)
    if not examples:
        raise ActiveLearningError("no labelled training examples to train a PRM on")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rm_cfg.learning_rate, weight_decay=rm_cfg.weight_decay)

    def lr_at(step):  # linear warm-up, then linear decay to 10%
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 1.0 - 0.9 * (step - warmup_steps) / max(1, steps - warmup_steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    collate = Collator(tokenizer.pad_token_id, "prm")
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        # 3. a batch: without replacement within an epoch, reshuffled each epoch (seeded)
        batch_ids = []
        while len(batch_ids) < min(rm_cfg.batch_size, len(examples)):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch_ids.append(order.pop())
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids]).items()}
        # 4. loss only at step ends, clipped update
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = reward_loss("prm", logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, rm_cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return RewardModel(model, tokenizer, convention)


def first_error_gold(record) -> tuple[bool, int | None]:
    """(known, gold first error) of a checker-labelled record: None for an error-free solution; unknown when
    the record does not say (no process verdict, or wrong without a located error)."""
    if record.process_correct is True:
        return True, None
    if record.process_correct is False and record.first_error is not None:
        return True, record.first_error
    return False, None


def prm_quality(val_records, val_probs, test_records, test_probs, eval_n: int, aggregate_how: str,
                grid: Sequence[float]) -> dict:
    """The loop's PRM quality from step probabilities (pure): on the TEST problems, best-of-`eval_n` process-correct
    and answer accuracy (the first eval_n samples of each problem, solutions scored by `aggregate_how`), step
    AUROC (threshold-free) and first-error F1 at the threshold with the best F1 on the VALIDATION problems
    (`grid`); F1 at 0.5 beside it for reference."""
    from rlprm.data.stepwise import INCORRECT
    from rlprm.experiments.efficiency import choose_threshold
    from rlprm.reward.model import aggregate
    from rlprm.reward.metrics import auroc, best_of_n_accuracy, first_error_f1, predict_first_error

    def gold_pairs(records, probs):
        pairs = [(first_error_gold(r), p) for r, p in zip(records, probs)]
        return [g for (known, g), _ in pairs if known], [p for (known, _), p in pairs if known]

    val_gold, val_scored = gold_pairs(val_records, val_probs)
    threshold, val_f1 = choose_threshold(val_scored, val_gold, grid)
    gold, probs = gold_pairs(test_records, test_probs)
    steps = [(p, y != INCORRECT) for r, ps in zip(test_records, test_probs) for p, y in zip(ps, r.labels)
             if y is not None]
    seen: dict = {}
    bon = []
    for r, ps in zip(test_records, test_probs):
        seen[r.group] = seen.get(r.group, 0) + 1
        if seen[r.group] <= eval_n and r.process_correct is not None and r.answer_correct is not None:
            bon.append((r, aggregate(ps, aggregate_how)))
    groups, scores = [r.group for r, _ in bon], [s for _, s in bon]
    return {
        "best_of_n_process_accuracy": best_of_n_accuracy(groups, scores, [bool(r.process_correct) for r, _ in bon]),
        "best_of_n_answer_accuracy": best_of_n_accuracy(groups, scores, [bool(r.answer_correct) for r, _ in bon]),
        "step_auroc": auroc([p for p, _ in steps], [y for _, y in steps]) if steps else None,
        "first_error_f1": first_error_f1(gold, [predict_first_error(p, threshold) for p in probs])["f1"],
        "first_error_f1_at_0.5": first_error_f1(gold, [predict_first_error(p, 0.5) for p in probs])["f1"],
        "threshold": threshold, "validation_f1": val_f1,
    }


def split_validation(eval_records, share: float) -> tuple[list, list]:
    """(validation, test) records: the first ceil(share * problems) held-out problems choose the threshold."""
    groups = group_by_problem(eval_records)
    n_val = math.ceil(share * len(groups))
    if n_val >= len(groups):
        raise ActiveLearningError(f"active.validation_share {share} leaves no held-out problem to test on "
                                  f"({len(groups)} problems): lower it or raise rm.data.eval_problems")
    return [r for g in groups[:n_val] for r in g], [r for g in groups[n_val:] for r in g]


def evaluate_prm(rm, val_records, test_records, cfg, batch_size: int) -> dict:
    """`prm_quality` of a reward model (anything with score_steps) on the held-out validation / test split."""
    n = len(val_records)
    probs = rm.score_steps([r.problem for r in val_records + test_records],
                           [r.steps for r in val_records + test_records], batch_size=batch_size)
    return prm_quality(val_records, probs[:n], test_records, probs[n:], cfg.eval_n, cfg.eval_aggregate,
                       cfg.threshold_grid)


# --------------------------------------------------------------------------- select + label, through the files


def surface(rm, groups: list[list], problem_ids: Sequence[int], k: int, fraction: float, fill: str,
            aggregate_how: str, rng: random.Random, available: dict | None = None, batch_size: int = 64,
            quotas: Sequence[int] | None = None):
    """Score the candidates of the chosen problems and pick k each (or quotas[i] of problem i), round(total *
    fraction) of them convincing wrong-answer ones (`mix_slots`). Returns [(problem, sample, why, score)]."""
    from rlprm.reward.model import aggregate

    cands = [(p, i) for p in problem_ids for i in range(len(groups[p]))
             if available is None or available[p][i]]
    probs = rm.score_steps([groups[p][i].problem for p, i in cands], [groups[p][i].steps for p, i in cands],
                           batch_size=batch_size) if cands else []
    score = {c: aggregate(ps, aggregate_how) for c, ps in zip(cands, probs)}
    quotas = list(quotas) if quotas is not None else [k] * len(problem_ids)
    slots = mix_slots(quotas, fraction)
    out = []
    for p, q, n_conv in zip(problem_ids, quotas, slots):
        n = len(groups[p])
        avail = [available is None or available[p][i] for i in range(n)]
        scores = [score.get((p, i), -math.inf) for i in range(n)]
        for i, why in select_indices(scores, [groups[p][i].answer_correct for i in range(n)], q, n_conv, fill, rng,
                                     avail):
            out.append((p, i, why, scores[i]))
    return out


def unrated_lines(groups, picks, generation: int) -> list[dict]:
    """PRM800K phase-2 lines (unrated) for picked (problem, sample, why, score) tuples."""
    from rlprm.reward.label import unlabelled_line

    lines = []
    for p, i, why, score in picks:
        r = groups[p][i]
        lines.append(unlabelled_line(r.problem, r.steps, verifier_score=None if score is None or math.isinf(score)
                                     else float(score), generation=generation,
                                     ground_truth_answer=answer_text(r.problem), selection=why))
    return lines


def select(recipe: Recipe, progress: bool = True) -> dict:
    """`rlprm select`: the top K solutions per pool problem, as unrated PRM800K lines. Returns counts."""
    from collections import Counter

    from rlprm.models import resolve_device
    from rlprm.reward.adapters import load_for_recipe

    cfg = recipe.active
    prm_path = cfg.prm or recipe.model.reward_model
    if not prm_path:
        raise ActiveLearningError("no PRM to select with: set active.prm (or model.reward_model) to a PRM folder or "
                                  "hub id, e.g. active.prm=runs/arith_prm/reward_model")
    # the one loader of every named reward model: rlprm folders and public PRMs alike
    adapter = cfg.prm_adapter if cfg.prm or cfg.prm_adapter else recipe.reward.adapter
    rm = load_for_recipe(recipe, prm_path, adapter, device=resolve_device(recipe.run.device))
    if rm.kind != "prm":
        raise ActiveLearningError(f"{prm_path} is an ORM; selection ranks by PRM step scores")
    pool, _, info = load_pools(recipe, progress)
    groups = group_by_problem(pool)
    ids = list(range(len(groups) if not cfg.select_problems else min(cfg.select_problems, len(groups))))
    rng = random.Random(recipe.run.seed)
    picks = surface(rm, groups, ids, cfg.top_k, cfg.convincing_fraction, cfg.fill, cfg.aggregate, rng,
                    batch_size=recipe.rm.eval_batch_size)
    out = Path(cfg.output or Path(recipe.run.output_dir) / "to_label.jsonl")
    atomic_write_jsonl(out, unrated_lines(groups, picks, cfg.generation))
    counts = Counter(why for _, _, why, _ in picks)
    truly_wrong = sum(not groups[p][i].answer_correct for p, i, why, _ in picks if why == CONVINCING_WRONG)
    return {"output": str(out), "lines": len(picks), "problems": len(ids), **dict(counts),
            "convincing_wrong_answer_checked_wrong": truly_wrong, "pool": info.get("train_source")}


def label_records(lines: list[dict], labeller, sep: str, threshold: float, path: Path | None = None):
    """Rate unrated lines (`checker`, or a loaded PRM: see `load_loop_labeller`), optionally keep the labelled
    file, and read them back as records."""
    import tempfile

    from rlprm.data.prm800k import load_prm800k
    from rlprm.reward.label import label_lines

    labelled, _ = label_lines(lines, labeller, threshold, sep)
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "labelled.jsonl"
            atomic_write_jsonl(path, labelled)
            records, _ = load_prm800k(path, alternatives=False)
    else:
        atomic_write_jsonl(path, labelled)
        records, _ = load_prm800k(path, alternatives=False)
    return records


# --------------------------------------------------------------------------- the loop


def load_loop_labeller(recipe: Recipe):
    """`checker`, or active.labeller loaded once (family active.labeller_adapter, else detected) for every file.

    Any PRM loads through the one loader of named reward models (`rlprm.reward.adapters.load_for_recipe`), so a
    public PRM can label for small ones as an rlprm folder can."""
    from rlprm.models import resolve_device
    from rlprm.reward.adapters import load_for_recipe
    from rlprm.reward.model import RewardModelError

    cfg = recipe.active
    if cfg.labeller == "checker":
        return "checker"
    try:
        rm = load_for_recipe(recipe, cfg.labeller, cfg.labeller_adapter, device=resolve_device(recipe.run.device))
    except (RewardModelError, OSError) as exc:
        raise ActiveLearningError(f"active.labeller: {cfg.labeller} is neither `checker` nor a PRM that loads "
                                  f"(an rlprm folder, or a public PRM's folder or hub id): {exc}") from None
    if rm.kind != "prm":
        raise ActiveLearningError(f"active.labeller: {cfg.labeller} is an ORM; labelling steps needs a PRM")
    return rm


def label_budgets(cfg) -> list[int]:
    """The cumulative label budgets (labelled solutions): active.budgets, else seed_labels + g * labels_per_generation."""
    if cfg.budgets:
        return list(cfg.budgets)
    return [cfg.seed_labels + g * cfg.labels_per_generation for g in range(cfg.generations + 1)]


def run_loop(recipe: Recipe, progress: bool = True) -> dict:
    """`rlprm active-learning`: uniform selection and one active arm per convincing share, at equal label budgets.

    Label budget unit: labelled SOLUTIONS (a solution sent to the labeller is one label, whatever its number of
    steps; the labelled steps are counted beside it). Every arm of a seed starts from the same uniform seed set
    and, at each later budget, labels exactly the same number of solutions of the same problems. Each seed's start
    and then each of its arms is one job (`seed_start`, `arm_chain`), run active.lanes at a time.
    """
    import torch

    from rlprm.experiments.active_report import write_report
    from rlprm.experiments.lanes import Lanes, PhaseClock
    from rlprm.reward.fit import shared_backbone
    from rlprm.tracking import Tracker

    cfg, rm_cfg = recipe.active, recipe.rm
    run_dir = Path(recipe.run.output_dir)
    if cfg.eval_n > rm_cfg.data.eval_samples_per_problem:
        raise ActiveLearningError(f"active.eval_n ({cfg.eval_n}) exceeds rm.data.eval_samples_per_problem "
                                  f"({rm_cfg.data.eval_samples_per_problem}); lower it or sample more")
    budgets = label_budgets(cfg)
    arms = ["uniform"] + [arm_name(s) for s in cfg.convincing_shares]
    labeller = load_loop_labeller(recipe)  # before the pool is sampled: a bad labeller fails fast
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    clock = PhaseClock()
    clock.phase("samples: the pool and the held-out pool (read from the cache, or sampled once)")
    pool, eval_records, info = load_pools(recipe, progress)
    val_records, test_records = split_validation(eval_records, cfg.validation_share)
    groups = group_by_problem(pool)
    kinds = [[solution_kind(r) for r in g] for g in groups]
    sizes = [len(g) for g in groups]
    cursor = 0  # fail before any training when the pool cannot hold the schedule (each seed only reorders it)
    for need in [budgets[0]] + [b - a for a, b in zip(budgets, budgets[1:])]:
        _, _, cursor = plan_generation(range(len(groups)), cursor, sizes, cfg.top_k, need)
    tracker = Tracker(run_dir, recipe, job="active-learning", tags=["active-learning"])
    ctx = LoopContext(recipe, groups, kinds, sizes, budgets, val_records, test_records, labeller,
                      progress and cfg.lanes <= 1)
    try:
        rows: dict = {}
        clock.phase(f"{len(cfg.seeds)} seed(s) x {len(arms)} arms ({', '.join(arms)}): {len(budgets)} budgets, "
                    f"{len(cfg.seeds) * (1 + (len(budgets) - 1) * len(arms))} PRM trainings of {cfg.train_steps} "
                    f"steps, in {cfg.lanes} lane(s) of {recipe.run.threads or 'all'} thread(s)")
        with Lanes(cfg.lanes, recipe.run.threads) as lanes:
            # 1. per seed, the uniform seed set and its PRM, shared by every arm; 2-4. then each arm on its own
            starts = [lanes.submit(seed_start, ctx, seed) for seed in cfg.seeds]
            chains = []
            for s, (seed, job) in enumerate(zip(cfg.seeds, starts)):
                start = job.result()
                for j, arm in enumerate(arms):
                    rows[(s, 0, j)] = start["row"] | {"strategy": arm}
                chains += [(s, j, lanes.submit(arm_chain, ctx, seed, j, arm, share, start))
                           for j, (arm, share) in enumerate(zip(arms, [None] + list(cfg.convincing_shares)))]
            for s, j, job in chains:
                for gen, row in enumerate(job.result(), 1):
                    rows[(s, gen, j)] = row
        rows = [rows[key] for key in sorted(rows)]  # seed, budget, arm: the order one process runs them in
        for step, row in enumerate(rows, 1):
            tracker.log({f"{row['strategy']}/{k_}": v for k_, v in row.items() if k_ != "strategy"}, step=step)

        # 5. baselines on the same test split, then the report: table, curves with bands, factors, summary.json
        clock.phase("baselines and the report")
        baselines = {}
        if rm_cfg.scorer == "lm":
            baselines["confidence"] = evaluate_prm(shared_backbone(recipe).confidence_model(), val_records,
                                                   test_records, cfg, rm_cfg.eval_batch_size)
        baselines["random"] = random_pick_quality(test_records, cfg.eval_n)
        tracker.table("active_learning", list(rows[0]), [list(r.values()) for r in rows])
        summary = write_report(rows, cfg, budgets, run_dir, baselines, pool_kinds(groups, kinds))
        summary.update({**clock.finish("active-learning"), "lanes": cfg.lanes, "threads": recipe.run.threads,
                        # the jobs' CPU (select, label, train, evaluate), each seed's start counted once
                        "loop_cpu_seconds": round(sum(r["cpu_seconds"] for r in rows
                                                      if r["generation"] or r["strategy"] == arms[0]), 1),
                        "pool_problems": len(groups), "pool_samples": len(pool),
                        "validation_solutions": len(val_records), "test_solutions": len(test_records), **info})
        tracker.summary(summary)
        tracker.image("active_learning/plot", run_dir / "active_learning.png")
        return summary
    finally:
        tracker.finish()


class LoopContext:
    """What every job of the loop reads (the recipe, the pool and its kinds, the held-out split); it travels to a
    lane's child process with each job (pickled)."""

    def __init__(self, recipe, groups, kinds, sizes, budgets, val_records, test_records, labeller, progress):
        self.recipe, self.groups, self.kinds, self.sizes, self.budgets = recipe, groups, kinds, sizes, budgets
        self.val_records, self.test_records, self.progress = val_records, test_records, progress
        self._labeller = labeller

    def __getstate__(self):
        state = dict(self.__dict__)
        if state["_labeller"] != "checker":
            state["_labeller"] = None  # a PRM labeller is loaded again in the child, not pickled
        return state

    @property
    def labeller(self):
        if self._labeller is None:
            self._labeller = load_loop_labeller(self.recipe)
        return self._labeller

    def train_eval(self, records, seed: int, desc: str):
        """(a fresh PRM trained active.train_steps steps on `records`, its quality on the held-out split)."""
        cfg, rm_cfg = self.recipe.active, self.recipe.rm
        if rm_cfg.scorer == "lm":
            from rlprm.reward.fit import fit_lm_reward_model, shared_backbone

            rm = fit_lm_reward_model(self.recipe, shared_backbone(self.recipe), records, "prm", cfg.train_steps, seed,
                                     self.progress)
        else:
            rm = train_prm(self.recipe, records, cfg.train_steps, seed, cfg.warmup_steps, self.progress, desc)
        return rm, evaluate_prm(rm, self.val_records, self.test_records, cfg, rm_cfg.eval_batch_size)

    def row(self, arm, seed, gen, labelled, picks, metrics, seconds, cpu) -> dict:
        """One row of the loop's table (printed as it is made): the labels so far, what was labelled by kind, the
        PRM's quality."""
        kinds, eval_n = self.kinds, self.recipe.active.eval_n
        why = [w for _, _, w, _ in picks]
        row = {"strategy": arm, "seed": seed, "generation": gen, "labels": len(labelled),
               "labelled_steps": sum(y is not None for r in labelled for y in r.labels),
               "new_labels": len(picks), "new_convincing_wrong_answer": why.count(CONVINCING_WRONG),
               **{f"new_{kind}": n for kind, n in kind_counts(kinds[p][i] for p, i, _, _ in picks).items()},
               **{f"new_cw_{kind}": n for kind, n in kind_counts(kinds[p][i] for p, i, w, _ in picks
                                                                 if w == CONVINCING_WRONG).items()},
               **metrics, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
        auroc = metrics["step_auroc"]
        print(f"  seed {seed} labels {row['labels']:5d} {arm:12s} best-of-{eval_n} "
              f"{metrics['best_of_n_process_accuracy'] or 0:.3f}  step AUROC {auroc or 0:.3f}  first-error F1 "
              f"{metrics['first_error_f1'] or 0:.3f}  ({seconds:.0f} s, {cpu:.0f} s CPU)", flush=True)
        return row


def seed_start(ctx: LoopContext, seed: int) -> dict:
    """A seed's start, shared by all its arms (a lane job): the problem order, the uniform seed set (labelled
    through the files) and the PRM trained on it. Returns its state and its row (strategy to be set per arm)."""
    recipe, groups, budgets = ctx.recipe, ctx.groups, ctx.budgets
    t, c = time.monotonic(), time.process_time()
    rng = random.Random(seed)
    order = list(range(len(groups)))
    rng.shuffle(order)
    ids, quotas, cursor = plan_generation(order, 0, ctx.sizes, recipe.active.top_k, budgets[0])
    avail = {p: [True] * len(groups[p]) for p in range(len(groups))}
    picks = [(p, i, why, None) for p, q in zip(ids, quotas) for i, why in select_uniform(avail[p], q, rng)]
    for p, i, _, _ in picks:
        avail[p][i] = False
    records = label_records(unrated_lines(groups, picks, 0), ctx.labeller, recipe.task.step_separator,
                            recipe.rm.threshold, Path(recipe.run.output_dir) / "labels" / f"seed{seed}_gen0.jsonl")
    rm0, m0 = ctx.train_eval(records, seed * 1000, f"seed {seed} gen 0 PRM")
    row = ctx.row("seed set", seed, 0, records, picks, m0, time.monotonic() - t, time.process_time() - c)
    return {"order": order, "cursor": cursor, "avail": avail, "records": records, "rm": rm0, "row": row}


def arm_chain(ctx: LoopContext, seed: int, j: int, arm: str, share: float | None, start: dict) -> list[dict]:
    """One arm of one seed from the seed's start, every later budget (a lane job): select (uniform, or the mix
    ranked by the arm's current PRM), label through the files, retrain a fresh PRM on all its labels. Returns its
    rows, one per budget after the first."""
    recipe, groups, budgets = ctx.recipe, ctx.groups, ctx.budgets
    cfg, rm_cfg = recipe.active, recipe.rm
    rng = random.Random(seed * 7919 + j)
    records, rm, cursor = list(start["records"]), start["rm"], start["cursor"]
    avail = {p: list(v) for p, v in start["avail"].items()}
    rows = []
    for gen, budget in enumerate(budgets[1:], 1):
        t, c = time.monotonic(), time.process_time()
        # the same problems and counts for every arm: only the choice among their samples differs
        ids, quotas, cursor = plan_generation(start["order"], cursor, ctx.sizes, cfg.top_k, budget - budgets[gen - 1])
        # 2. select: uniform picks, or the mix ranked by this arm's current PRM
        if share is None:
            picks = [(p, i, why, None) for p, q in zip(ids, quotas) for i, why in select_uniform(avail[p], q, rng)]
        else:
            picks = surface(rm, groups, ids, cfg.top_k, share, cfg.fill, cfg.aggregate, rng, avail,
                            rm_cfg.eval_batch_size, quotas)
        for p, i, _, _ in picks:
            avail[p][i] = False
        # 3. label: unrated PRM800K lines -> labeller -> PRM800K loader
        records += label_records(unrated_lines(groups, picks, gen), ctx.labeller, recipe.task.step_separator,
                                 rm_cfg.threshold, Path(recipe.run.output_dir) / "labels" / f"seed{seed}_gen{gen}_{arm}.jsonl")
        # 4. retrain a fresh PRM on everything labelled so far (the same seed for every arm)
        rm, metrics = ctx.train_eval(records, seed * 1000 + gen, f"seed {seed} gen {gen} {arm}")
        rows.append(ctx.row(arm, seed, gen, records, picks, metrics, time.monotonic() - t, time.process_time() - c))
    return rows


def pool_kinds(groups, kinds) -> dict:
    """The pool's base rates: kind counts over every solution and over the wrong-answer ones (what uniform picks
    from, and what the convincing wrong-answer slots pick from)."""
    flat = [(r, k) for g, ks in zip(groups, kinds) for r, k in zip(g, ks)]
    return {"all": kind_counts(k for _, k in flat), "wrong_answer": kind_counts(k for r, k in flat if not r.answer_correct)}


def random_pick_quality(test_records, eval_n: int) -> dict:
    """Best-of-N of a random pick (the expected value: the mean over each problem's first eval_n samples)."""
    seen: dict = {}
    subset = []
    for r in test_records:
        seen[r.group] = seen.get(r.group, 0) + 1
        if seen[r.group] <= eval_n and r.process_correct is not None:
            subset.append(r)
    return {"best_of_n_process_accuracy": sum(bool(r.process_correct) for r in subset) / max(1, len(subset)),
            "best_of_n_answer_accuracy": sum(bool(r.answer_correct) for r in subset) / max(1, len(subset))}
