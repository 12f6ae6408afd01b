"""Rejection sampling (expert iteration): sample N per problem, keep the best, fine-tune on them; repeat.

`RejectionSampling` is this algorithm's part of the run skeleton (`rl/run.py`:
problems, best-of-N, checkpoints, export); its epoch update reads top to
bottom in `train_epoch`: 1. generate N samples per problem, 2. score them (the
exact grader always; the PRM or ORM when the recipe has one), 3. select the
samples to keep, 4. one SFT pass over them with TRL's `SFTTrainer` (loss on
the completion only; `lean_sft.py`), 5. log.

Selection (`select_samples`, a pure function): with a reward model, the
`rl.rejection_top_k` best distinct samples of each problem that reach a final
answer (optionally only those scoring at least `rl.rejection_min_score`); with
ground-truth rewards, up to `rl.rejection_top_k` distinct samples the grader
accepts. Identical texts are kept once: a solution sampled many times (the
usual case for a right one) would otherwise be trained on many times.

Search-guided rollouts (`rl.rollout_search`, rl/search_rollouts.py): the N
samples of a problem are the finished solutions of a PRM-guided beam search or
DVTS over steps (shared prefixes, branching at steps) instead of N independent
samples. They are not samples of the policy, which costs nothing here: SFT on
selected samples is off-policy by design (the selection already tilts the
data away from the policy), so no importance weight is needed; the only
change is a pool the scorer has steered. Every epoch logs `rs/generated_tokens`
(plain sampling's too), so that both can be compared at equal generated tokens.

Several processes (`deepspeed --num_gpus N rlprm/train_rl.py RECIPE`, or
`torchrun` / `accelerate launch --multi_gpu`): each rank samples and scores
every N-th problem of the epoch, the ranks' samples, scores and selections are
gathered back into the problems' order (`gather_rows`), so every rank holds
the same kept set, the one a single process would keep from those samples;
the SFT pass then runs data parallel (TRL's trainer over the launcher's
process group: DDP shards the kept set and averages the gradients;
`rl.sft_batch_size` is a total over the ranks). The ranks end with the same
weights; rank 0 alone evaluates and writes.

The policy's optimizer lives across epochs (each epoch builds a new trainer
around the same model and optimizer), and the checkpoint holds it, so a resumed
run continues where it stopped. The problems and the sampling seed of epoch e
depend only on (seed, e): on CPU a resumed run ends with the same metrics as
an uninterrupted one.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

from rlprm.config import Recipe
from rlprm.rl.run import RLError, RLInputError, Run, last_good, mean, process_part


# --------------------------------------------------------------------------- pure pieces


def select_samples(scores: list[list[float]], eligible: list[list[bool]], texts: list[list[str]], top_k: int,
                   min_score: float | None = None) -> list[list[int]]:
    """The samples to keep, per problem.

    scores, eligible, texts: [P][N] (problem i, sample j). Returns [P] lists of at
    most `top_k` sample indices, best score first: eligible samples only, at
    least `min_score` if given, each text once (its first occurrence), ties
    broken by sample order (stable).
    """
    keep: list[list[int]] = []
    for row_scores, row_ok, row_texts in zip(scores, eligible, texts):
        order = sorted(range(len(row_scores)), key=lambda j: -row_scores[j])  # sorted() is stable: ties keep order
        chosen, seen = [], set()
        for j in order:
            if len(chosen) == top_k:
                break
            if not row_ok[j] or row_texts[j] in seen or (min_score is not None and row_scores[j] < min_score):
                continue
            seen.add(row_texts[j])
            chosen.append(j)
        keep.append(chosen)
    return keep


def gather_rows(parts: list[list[tuple[int, object]]]) -> list:
    """Every rank's (problem index, row) pairs back in the problems' order: [rank][k] -> [problem].

    Rank r holds the rows of problems r, r + N, r + 2N, ... (`distributed.shard`); the result is what one
    process would have built over all the problems.
    """
    rows = sorted((index, row) for part in parts for index, row in part)
    if [index for index, _ in rows] != list(range(len(rows))):
        raise RLError(f"the ranks returned problems {[index for index, _ in rows]}; expected each of "
                      f"0..{len(rows) - 1} once (a bug in the sharding)")
    return [row for _, row in rows]


def check_world(recipe: Recipe, world: int) -> None:
    """Raise RLInputError when the sizes do not split over `world` processes (the key named)."""
    rl = recipe.rl
    if rl.sft_batch_size % world:
        raise RLInputError(f"rl.sft_batch_size ({rl.sft_batch_size}) is a total over the {world} processes and must "
                           f"be a multiple of {world} (each rank takes sft_batch_size / {world} samples per SFT "
                           "step); set it to a multiple, or launch a number of processes that divides it")
    if rl.problems_per_epoch < world:
        raise RLInputError(f"rl.problems_per_epoch ({rl.problems_per_epoch}) is below the number of processes "
                           f"({world}): every rank needs at least one problem to sample")


def check_inputs(recipe: Recipe) -> None:
    """What rejection sampling can refuse before a model is loaded (the models' presence is the skeleton's
    `run.check_run`); raises RLInputError."""
    from rlprm.rl.distributed import launched_world_size

    check_world(recipe, launched_world_size())
    if recipe.reward.mode == "dense":
        raise RLInputError("reward.mode is dense, but rejection sampling ranks whole solutions: set "
                           "reward.mode: sparse (a PRM's step scores are aggregated by reward.sparse_aggregate)")
    if recipe.deepspeed is not None:
        raise RLInputError("rl.algorithm rejection_sampling does not run under DeepSpeed yet (its SFT step "
                           "keeps one optimizer across epochs); remove the `deepspeed` key (LoRA, "
                           "model.lora.enabled, keeps the memory small)")


# --------------------------------------------------------------------------- the algorithm


class RejectionSampling:
    """Rejection sampling's part of the run skeleton: one optimizer for the whole run, and per epoch sample, score,
    select and one SFT pass (a fresh TRL trainer around the same model and optimizer)."""

    name = "rejection_sampling"
    needs_reference = False

    def check(self, recipe: Recipe) -> None:
        check_inputs(recipe)

    def distributed(self, recipe: Recipe):
        # one process: Dist.single(); several: a process group that the SFT trainer's accelerate state adopts (DDP)
        from rlprm.rl.distributed import setup_process_group

        return setup_process_group(recipe)

    def setup(self, run: Run) -> None:
        import datasets
        import torch

        datasets.disable_progress_bars()
        from rlprm.models import float32_masters

        # one optimizer for the whole run (constant rate): its moments carry over from epoch to epoch. Its weights
        # in float32 even for a bf16 recipe: AdamW's small steps round away on bf16 weights (the SFT trainer
        # computes in bf16 autocast on a GPU)
        self.optimizer = torch.optim.AdamW(float32_masters(run.policy), lr=run.recipe.rl.learning_rate)
        # who samples (rl.rollout): HF generate on the policy, or a colocated vLLM engine refreshed after each SFT pass
        from rlprm.rollout import sampler_for

        self.sampler = run.sampler = sampler_for(run.recipe, run.policy, run.tokenizer)
        # rl.rollout_search: the N per problem come from a PRM-guided tree (rl/search_rollouts.py); None: plain sampling
        from rlprm.rl.search_rollouts import build_tree

        self.tree = build_tree(run, run.recipe.rl.sample_batch_size, self.sampler)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def extra_models(self) -> dict:
        return {}

    def train_epoch(self, run: Run, epoch: int, problems: list) -> None:
        """One epoch: `select` (sample, score, keep the best), `sft` on what was kept, `record`."""
        chosen = self.select(run, epoch, problems)
        steps_before, t0 = run.step, time.monotonic()
        sft_state = self.sft(run, epoch, problems, chosen)
        chosen.times["sft"] = time.monotonic() - t0
        self.record(run, epoch, chosen, sft_state, run.step - steps_before)

    def select(self, run: Run, epoch: int, problems: list) -> "Selection":
        """1. generate, 2. score, 3. select: rl.samples_per_problem samples of each of this rank's problems, ranked
        by the reward source; the best distinct ones kept, every rank's rows gathered in the problems' order."""
        from rlprm.reward.tokens import RewardError
        from rlprm.rl.distributed import rank_seed, shard

        recipe, rl, dist, source = run.recipe, run.recipe.rl, run.dist, run.reward_source
        n = rl.samples_per_problem
        t0 = time.monotonic()
        # this rank's problems: every world-th one (all of them on one process)
        indices = shard(list(range(len(problems))), dist)
        mine = [problems[i] for i in indices]

        # 1. generate: N per problem, seeded by (seed, epoch) so that a resumed run samples the same (and by the
        #    rank: each rank its own noise; rank 0's seed is the one-process seed); from the search tree with
        #    rl.rollout_search. Either way the generated tokens are counted, for comparisons at equal compute
        seed = rank_seed(recipe.run.seed * 1_000_003 + 2000 + epoch, dist.rank)
        counts: dict = {}
        if self.tree is not None:
            from rlprm.rl.search_rollouts import draw_groups, settings_for

            generator, scorer = self.tree
            groups = draw_groups(mine, generator, scorer,
                                 settings_for(rl.rollout_search, n, rl.max_new_tokens, rl.temperature, seed), n)
            texts = groups.texts
            counts = {"generated_tokens": groups.generated_tokens, "search_short_groups": groups.short,
                      "search_scorer_calls": sum(groups.scorer_calls)}
        else:
            from rlprm.rl.search_rollouts import plain_tokens

            out = self.sampler.sample([p.prompt for p in mine], n=n, temperature=rl.temperature,
                                      max_new_tokens=rl.max_new_tokens, batch_size=rl.sample_batch_size, seed=seed,
                                      progress=run.progress and dist.is_main,
                                      desc=f"epoch {epoch + 1}/{rl.epochs}: sampling {n} per problem")
            texts = out.texts
            counts = {"generated_tokens": plain_tokens(out.token_ids, rl.max_new_tokens)}
        t_gen = time.monotonic() - t0

        # 2. score: the grader always (for the log, and ground-truth selection); the reward source ranks the samples
        flat_problems = [p for p in mine for _ in range(n)]
        flat_texts = [t for row in texts for t in row]
        sample_grades = source.grade(flat_problems, flat_texts)
        grades = [sample_grades[i * n:(i + 1) * n] for i in range(len(mine))]
        reason, min_score, thresholded = None, None, False
        try:
            # (score, may it be kept, does rl.rejection_min_score apply): a model's score keeps answered samples
            # only; the grader's keeps the right ones
            flat, ok, thresholded = source.ranking(flat_problems, flat_texts, sample_grades)
            scores = [flat[i * n:(i + 1) * n] for i in range(len(mine))]
            eligible = [ok[i * n:(i + 1) * n] for i in range(len(mine))]
            min_score = rl.rejection_min_score if thresholded else None
        except RewardError as exc:
            reason = f"epoch {epoch + 1}: {exc}"
        dist.stop_if_any(reason, RLError)  # every rank stops (the others would wait in the gather below)
        t_score = time.monotonic() - t0 - t_gen

        # 3. select: the best distinct samples of each problem; every rank's rows gathered in the problems'
        #    order, so that every rank holds the same kept set (the one a single process would keep)
        keep = select_samples(scores, eligible, texts, rl.rejection_top_k, min_score)
        if dist.active:
            rows = gather_rows(dist.gather(list(zip(indices, zip(texts, grades, scores, keep)))))
            texts, grades, scores, keep = ([row[k] for row in rows] for k in range(4))
            every = dist.gather(counts)  # the counts are sums over the ranks' problems
            counts = {k: sum(c[k] for c in every) for k in counts}
        kept = [(i, j) for i, row in enumerate(keep) for j in row]
        return Selection(texts, grades, scores, keep, kept, thresholded, {"generate": t_gen, "score": t_score},
                         counts)

    def sft(self, run: Run, epoch: int, problems: list, chosen: "Selection") -> dict:
        """4. SFT: one pass (rl.sft_epochs) over the kept samples, completion-only loss, the run's optimizer; returns
        what the step log saw (the last loss; `bad`: a non-finite one)."""
        import torch
        from datasets import Dataset
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig

        import rlprm.rl.lean_sft as lean_sft

        recipe, rl, dist = run.recipe, run.recipe.rl, run.dist
        policy, run_dir, device = run.policy, run.run_dir, run.device
        texts, kept = chosen.texts, chosen.kept
        sft_state: dict = {}
        if kept:
            data = Dataset.from_dict({"prompt": [problems[i].prompt for i, _ in kept],
                                      "completion": [texts[i][j] for i, j in kept]})
            args = SFTConfig(
                output_dir=str(run_dir / "sft_work"), num_train_epochs=rl.sft_epochs,
                per_device_train_batch_size=rl.sft_batch_size // dist.world, learning_rate=rl.learning_rate,
                max_grad_norm=rl.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=device == "cpu", seed=recipe.run.seed + epoch, data_seed=recipe.run.seed + epoch,
                completion_only_loss=True, max_length=None, dataset_num_proc=None, disable_tqdm=not run.progress,
                dataloader_num_workers=0,
                # TRL's SFTConfig defaults both to True; on a CPU, bf16 autocast and recomputed activations
                # only slow small models down, so they are on for GPUs only
                bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(),
                activation_checkpointing=not device.startswith("cpu"),
                ddp_find_unused_parameters=False,  # several ranks: every trainable weight gets a gradient
            )
            # the run's optimizer at a constant rate: a fresh trainer per epoch, the same moments throughout
            scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
            trainer = lean_sft.LeanSFTTrainer(model=policy, args=args, train_dataset=data,
                                              processing_class=run.tokenizer, optimizers=(self.optimizer, scheduler),
                                              callbacks=[lean_sft.SFTStepLog(run.tracker, run.step, sft_state)])
            trainer.remove_callback(PrinterCallback)  # logs go to metrics.jsonl, not raw dicts on stdout
            if trainer.accelerator.num_processes != dist.world:
                raise RLError(f"the SFT trainer sees {trainer.accelerator.num_processes} processes but the run has "
                              f"{dist.world}: it did not join the launcher's process group")
            trainer.train()
            run.step += trainer.state.global_step
            dist.barrier()  # every rank is done with the folder before rank 0 removes it
            if dist.is_main:
                shutil.rmtree(run_dir / "sft_work", ignore_errors=True)
            if "bad" in sft_state:
                raise RLError(f"epoch {epoch + 1}: {sft_state['bad']} is not finite (NaN/inf); stopped before it "
                              f"reached a checkpoint. {last_good(run_dir)}. Lower rl.learning_rate, then run again "
                              "(with --resume to continue from the checkpoint)")
            policy.to(device)
            self.sampler.refresh()  # a vLLM engine samples the next epoch (and the best-of-N) with the new weights
        elif dist.is_main:
            print(f"epoch {epoch + 1}: no sample was kept (none "
                  f"{'reached an answer' if chosen.thresholded else 'was accepted by the grader'}); skipping SFT "
                  "this epoch")
        return sft_state

    def record(self, run: Run, epoch: int, chosen: "Selection", sft_state: dict, sft_steps: int) -> None:
        """5. log what was sampled and what was kept, and a progress line."""
        rl, dist, times = run.recipe.rl, run.dist, chosen.times
        grades, scores, keep, kept = chosen.grades, chosen.scores, chosen.keep, chosen.kept
        flat_grades = [g for row in grades for g in row]
        kept_grades = [grades[i][j] for i, j in kept]
        record = {
            "epoch": epoch + 1,
            "rl/answer_accuracy": mean(g.answer_correct for g in flat_grades),
            "rl/process_accuracy": mean(g.process_correct for g in flat_grades),
            "rl/well_formed": mean(g.well_formed for g in flat_grades),
            "rl/shortcut_rate": mean(g.shortcut for g in flat_grades),  # the habits, sampled and kept
            "rl/carry_drop_rate": mean(g.carry_drop for g in flat_grades),
            "rs/kept_shortcut_rate": mean(g.shortcut for g in kept_grades),
            "rs/kept_carry_drop_rate": mean(g.carry_drop for g in kept_grades),
            "rl/score_mean": mean(s for row in scores for s in row),
            "rs/kept": len(kept),
            "rs/problems_with_kept": sum(bool(row) for row in keep) / max(1, len(keep)),
            "rs/kept_answer_accuracy": mean(g.answer_correct for g in kept_grades),
            "rs/kept_process_accuracy": mean(g.process_correct for g in kept_grades),
            "rs/kept_score_mean": mean(scores[i][j] for i, j in kept),
            "rs/sft_steps": sft_steps,
            "rs/sft_loss": sft_state.get("last_loss"),
            **{f"rs/{k}": v for k, v in chosen.counts.items()},
            **{f"time/{k}": round(v, 3) for k, v in times.items()},
        }
        run.log(record)
        if run.progress and dist.is_main:
            ka = record["rs/kept_answer_accuracy"]
            print(f"epoch {epoch + 1}/{rl.epochs}: sampled answer {record['rl/answer_accuracy']:.1%}"
                  f"{process_part(record)}, kept "
                  f"{len(kept)} ({'-' if ka is None else f'{ka:.1%}'} right), {sft_steps} SFT steps  "
                  f"gen {times['generate']:.1f}s score {times['score']:.1f}s sft {times['sft']:.1f}s", flush=True)


@dataclass
class Selection:
    """One epoch's samples in the problems' order ([problem][sample]) and what was kept of them."""

    texts: list  # [P][N] the sampled responses
    grades: list  # [P][N] their `data.problems.SampleGrade`
    scores: list  # [P][N] the reward source's ranking score
    keep: list  # [P] the kept sample indices, best first
    kept: list  # (problem, sample) of every kept sample, in order
    thresholded: bool  # the source's scores are a model's or function's (rl.rejection_min_score applies)
    times: dict  # seconds spent: generate, score (and sft, set after `sft`)
    counts: dict = field(default_factory=dict)  # generated_tokens (and with rl.rollout_search: search_short_groups,
    # search_scorer_calls), summed over the ranks


__all__ = ["RejectionSampling", "Selection", "check_inputs", "check_world", "gather_rows", "select_samples"]
