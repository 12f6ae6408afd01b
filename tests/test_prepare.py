"""`rlprm prepare` end to end on a tiny budget (the full run is the slow test), and its SFT loop."""

import json
import math
import os
from pathlib import Path

import pytest

from rlprm.config import load_recipe
from rlprm.experiments.prepare import PrepareError, PrepareInputError, prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "sft.num_examples=400", "sft.batch_size=16", "sft.warmup_steps=2", "prepare_eval.num_problems=12",
    "prepare_eval.max_new_tokens=40", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1", "model.tiny.num_heads=2", "tracking.wandb=disabled",
    "sft.processes=1",  # the recipe's 2 spawns processes (10-60 s of imports); the slow tests below run them
]


def test_prepare_saves_a_loadable_generator(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml",
                         TINY + [f"run.output_dir={tmp_path}", "sft.steps=6", "prepare_eval.enforce_targets=false"])
    rates = prepare(recipe, progress=False)
    assert set(rates) >= {"well_formed", "answer_accuracy", "process_accuracy", "right_answer_wrong_process",
                          "trace_error", "shortcut_rate", "confidence_auroc_shortcut", "likelihood_auroc_shortcut"}
    assert rates["train_steps"] == 6 and rates["train_seconds"] > 0
    # what the float sums depended on (docs/reproducibility.md), for comparing a run with another machine's
    assert rates["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512") and rates["torch_threads"] >= 1
    assert rates["mkl_cbwr"] == os.environ.get("MKL_CBWR", "AUTO")
    gen = tmp_path / "generator"
    tok = AutoTokenizer.from_pretrained(gen)
    model = AutoModelForCausalLM.from_pretrained(gen)
    out = model.generate(**tok("5 +3\n", return_tensors="pt"), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= 1
    assert (tmp_path / "recipe.yaml").exists() and json.loads((tmp_path / "summary.json").read_text())["train_steps"] == 6
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("prepare/process_accuracy" in r for r in logged)
    assert [r["step"] for r in logged if "sft/loss" in r] == [6]  # logging_steps 25: only the last step
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "sft_work").exists()


def test_prepare_refuses_a_generator_that_misses_targets(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml",
                         TINY + [f"run.output_dir={tmp_path}", "sft.steps=2"])
    with pytest.raises(PrepareError, match="missed its targets: .*process accuracy"):
        prepare(recipe, progress=False)
    assert not (tmp_path / "generator").exists()
    assert (tmp_path / "generator.rejected" / "config.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["targets_met"] is False


def test_prepare_only_builds_the_tiny_arithmetic_generator(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml", [f"run.output_dir={tmp_path}", "model.generator=org/model"])
    # bad input (exit 2), not a missed target (exit 3): nothing was trained
    with pytest.raises(PrepareInputError, match="model.generator is org/model, .*model.generator: tiny"):
        prepare(recipe, progress=False)


@pytest.mark.slow
def test_full_prepare_meets_its_targets(tmp_path):
    """The real recipe (700 steps): about 5 minutes on 2 cores."""
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml", [f"run.output_dir={tmp_path}", "tracking.wandb=disabled"])
    rates = prepare(recipe, progress=False)
    assert rates["well_formed"] >= 0.95
    assert 0.30 <= rates["process_accuracy"] <= 0.80
    assert (tmp_path / "generator" / "config.json").exists()


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "generator" / "model.safetensors"))


def test_same_seed_same_generator_other_seed_another(tmp_path):
    """Steps, not a clock: two prepares with one seed give the same weights exactly, another seed others."""
    import torch

    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml",
                             TINY + [f"run.output_dir={tmp_path / name}", f"run.seed={seed}", "sft.steps=4",
                                     "sft.logging_steps=2", "prepare_eval.num_problems=4",
                                     "prepare_eval.enforce_targets=false"])
        rates = prepare(recipe, progress=False)
        runs[name] = (_weights(tmp_path / name), rates["train_loss"])
    (a, loss_a), (b, loss_b), (c, _) = runs["a"], runs["b"], runs["c"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and loss_a == loss_b
    assert any(not torch.equal(a[k], c[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "sft/loss" in r] == [2, 4]


def test_schedule_warms_up_then_decays_to_min_ratio_at_the_last_step():
    from rlprm.experiments.sft import lr_factor

    factors = [lr_factor(s, 30, 700, 0.1) for s in range(700)]
    assert factors[0] == pytest.approx(1 / 30) and factors[29] == 1.0
    assert factors[30] == pytest.approx(1.0, abs=1e-4) and factors[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(factors[29:], factors[30:]))  # monotone after the warm-up
    assert lr_factor(1, 5, 3, 0.1) == pytest.approx(2 / 5)             # fewer steps than warm-up: warm-up only


def test_schedule_holds_the_peak_until_decay_start_then_decays_over_the_rest():
    from rlprm.experiments.sft import lr_factor

    # warm-up 2, peak through step 5, then cosine over steps 6..9 (4 steps): 0.1 + 0.9 * (1 + cos(pi * k / 4)) / 2
    got = [lr_factor(s, 2, 10, 0.1, decay_start=6) for s in range(10)]
    want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55,
            0.1 + 0.45 * (1 - math.cos(math.pi / 4)), 0.1]
    assert got == pytest.approx(want)
    # a decay_start inside the warm-up is the plain schedule
    assert [lr_factor(s, 3, 20, 0.1, 2) for s in range(20)] == [lr_factor(s, 3, 20, 0.1) for s in range(20)]


def test_decay_start_at_or_past_the_last_step_is_refused_with_the_fix():
    from pydantic import ValidationError

    from rlprm.config import SFTConfig

    with pytest.raises(ValidationError, match="decay_start .1600. must be below steps .1600.*set it to 0 for plain cosine"):
        SFTConfig(steps=1600, decay_start=1600)


def test_labels_cover_the_completion_and_end_token_only(char_tokenizer):
    from rlprm.experiments.sft import IGNORE, encode_completions, padded_table

    enc = encode_completions(char_tokenizer, ["5 +3\n", "12 -1 mod 10\n"], ["5 + 3 = 8\n# Answer: 8", "x"])
    ids, labels, lengths = padded_table(enc, char_tokenizer.pad_token_id)
    first = char_tokenizer("5 +3\n")["input_ids"]
    assert enc.ids[0][: len(first)] == first and enc.prompt_lengths[0] == len(first)
    assert enc.ids[0][-1] == char_tokenizer.eos_token_id
    assert (labels[0, : len(first)] == IGNORE).all() and labels[0, len(first)] == ids[0, len(first)]
    assert labels[0, lengths[0] - 1] == char_tokenizer.eos_token_id
    assert (labels[1, lengths[1]:] == IGNORE).all() and (ids[1, lengths[1]:] == char_tokenizer.pad_token_id).all()


def test_batches_pad_to_their_own_longest_and_match_the_one_pass_loss(char_tokenizer):
    """Length groups change how a batch is cut, not its loss or gradient; no pass pads beyond its longest."""
    import torch

    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.experiments.sft import batch_loss, encode_completions, padded_table

    prompts = [f"{i} +{i % 7 + 1}\n" for i in range(12)]
    completions = ["1 + 2 = 3\n" * (1 + i % 4) + "# Answer: 3" for i in range(12)]
    enc = encode_completions(char_tokenizer, prompts, completions)
    ids, labels, lengths = padded_table(enc, char_tokenizer.pad_token_id)
    model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
                                 char_tokenizer, seed=0)
    widths = []
    model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    rows = torch.tensor([3, 0, 7, 11, 5, 2])
    grads = []
    for groups in (1, 3):
        model.zero_grad()
        value = batch_loss(model, ids, labels, lengths, rows, groups)
        grads.append([p.grad.clone() for p in model.parameters()])
        longest = int(lengths[rows].max())
        with torch.no_grad():
            reference = model(input_ids=ids[rows, :longest], labels=labels[rows, :longest]).loss
        assert value == pytest.approx(reference.item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    three = widths[2:5]  # the 3-group passes (after the 1-group pass and its reference)
    assert [w[0] for w in three] == [2, 2, 2]
    by_length = lengths[rows].sort().values
    assert [w[1] for w in three] == [int(by_length[1]), int(by_length[3]), int(by_length[5])]
    assert max(w[1] for w in widths) == int(lengths[rows].max())  # never the table width (the longest of all)


def test_batch_order_is_seeded_and_sees_every_example_equally():
    from collections import Counter

    from rlprm.experiments.sft import batch_order

    a = [r.tolist() for r in batch_order(10, 4, 5, seed=3)]
    assert a == [r.tolist() for r in batch_order(10, 4, 5, seed=3)] != [r.tolist() for r in batch_order(10, 4, 5, 4)]
    assert all(len(r) == 4 for r in a) and set(Counter(i for r in a for i in r).values()) == {2}


def test_clean_steps_train_on_the_clean_table_first(char_tokenizer):
    """sft.clean_steps = steps trains on the clean solutions alone, exactly as training on them would; with
    clean_steps = 0 the clean table is never read."""
    import torch

    from rlprm.config import SFTConfig, TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.experiments.sft import encode_completions, train_sft

    prompts = [f"{i} +{i % 7 + 1}\n" for i in range(16)]
    mixed = encode_completions(char_tokenizer, prompts, [f"{i} + 9 = 1\n# Answer: 1" for i in range(16)])
    clean = encode_completions(char_tokenizer, prompts, [f"{i} + {i % 7 + 1} = {i + i % 7 + 1}\n# Answer: 0"
                                                         for i in range(16)])

    def trained(encoded, seed, clean_table=None, clean_steps=0):
        model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1,
                                                     num_heads=2), char_tokenizer, seed=0)
        cfg = SFTConfig(steps=4, clean_steps=clean_steps, batch_size=4, warmup_steps=1)
        train_sft(model, encoded, cfg, char_tokenizer.pad_token_id, seed, progress=False, clean=clean_table)
        return [p.detach().clone() for p in model.parameters()]

    all_clean = trained(mixed, 0, clean, clean_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(all_clean, trained(clean, 1)))  # clean batches use seed + 1
    no_clean = trained(mixed, 0, clean, clean_steps=0)
    assert all(torch.equal(a, b) for a, b in zip(no_clean, trained(mixed, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(no_clean, all_clean))


def test_eligible_confidence_auroc_reads_the_recipes_shortcut_finals(char_tokenizer):
    """The eligible AUROC is taken on the problems of `finals` only: with the shortcut trained on mod 10 alone,
    a correct last-digit chain is not an eligible one (here that leaves mod 10 with one class: None)."""
    from types import SimpleNamespace

    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.experiments.prepare import shortcut_confidence_auroc
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import Problem, check, reference_solution, shortcut_solution

    mod10 = [Problem(93, (("+", 3), ("-", 4)), "mod10"), Problem(57, (("+", 8), ("-", 1)), "mod10")]
    last = [Problem(84, (("+", 5), ("-", 2)), "last_digit"), Problem(66, (("-", 3), ("+", 9)), "last_digit")]
    problems = mod10 + last
    texts = [render_steps(shortcut_solution(p), "\n") for p in mod10] + [render_steps(reference_solution(p), "\n")
                                                                         for p in last]
    results = [check(p, t) for p, t in zip(problems, texts)]
    assert [r.shortcut for r in results] == [True, True, False, False]
    assert [r.process_correct for r in results] == [False, False, True, True]
    samples = SimpleNamespace(token_ids=[[char_tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts])
    model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
                                 char_tokenizer, seed=0)

    both = shortcut_confidence_auroc(model, char_tokenizer, problems, samples, results, 200)
    only_mod10 = shortcut_confidence_auroc(model, char_tokenizer, problems, samples, results, 200, finals=("mod10",))
    assert both["confidence_auroc_shortcut_eligible"] is not None
    assert only_mod10["confidence_auroc_shortcut_eligible"] is None
    assert only_mod10["confidence_auroc_shortcut"] == both["confidence_auroc_shortcut"] is not None


def test_a_generator_saved_despite_missed_targets_says_which_on_the_terminal(tmp_path, capsys):
    """Issue 24 row 13: with prepare_eval.enforce_targets false the terminal said "generator saved" and nothing else;
    the misses were only in summary.json as targets_met: false."""
    from rlprm.cli import main

    rc = main(["prepare", str(ROOT / "recipes" / "arith_prepare.yaml"), *TINY, f"run.output_dir={tmp_path}",
               "sft.steps=2", "prepare_eval.enforce_targets=false", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and "generator saved" in out.out
    assert "targets missed" in out.err and "process accuracy" in out.err  # 2 steps: far below the targets
    assert (tmp_path / "generator" / "config.json").exists()


def test_carry_drop_confidence_auroc_ranks_the_habit_against_correct_chains(char_tokenizer):
    """The dropped carry gets the shortcut's AUROC: its samples against fully correct ones, by the lowest token
    log-prob; the shortcut's own AUROC leaves dropped-carry samples out, and the eligible AUROC reads `finals`."""
    from types import SimpleNamespace

    from rlprm.config import TinyModelConfig
    from rlprm.evaluation.evaluate import response_logprobs
    from rlprm.experiments.prepare import habit_confidence_auroc, shortcut_confidence_auroc
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward.metrics import auroc
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import Problem, carry_drop_solution, check, reference_solution

    problems = [Problem(38, (("+", 5), ("+", 1)), "none"), Problem(52, (("-", 7), ("+", 2)), "none"),
                Problem(47, (("+", 6), ("-", 1)), "none"), Problem(61, (("-", 4), ("+", 3)), "none")]
    texts = [render_steps(carry_drop_solution(p) if i % 2 else reference_solution(p), "\n")
             for i, p in enumerate(problems)]
    results = [check(p, t) for p, t in zip(problems, texts)]
    assert [r.carry_drop for r in results] == [False, True, False, True]
    ids = [char_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    samples = SimpleNamespace(token_ids=[[x] for x in ids])
    model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
                                 char_tokenizer, seed=0)

    got = habit_confidence_auroc(model, char_tokenizer, problems, samples, results, 200, "carry_drop", ("none",))
    eos = char_tokenizer.eos_token_id
    lps = response_logprobs(model, char_tokenizer, [p.prompt for p in problems], [x + [eos] for x in ids])
    want = auroc([float(lp.min()) for lp in lps], [r.process_correct for r in results])
    assert got["confidence_auroc_carry_drop"] == pytest.approx(want) and want is not None
    assert got["confidence_auroc_carry_drop_eligible"] == pytest.approx(want)
    assert habit_confidence_auroc(model, char_tokenizer, problems, samples, results, 200, "carry_drop",
                                  ("max",))["confidence_auroc_carry_drop_eligible"] is None
    # no shortcut among them: the shortcut's AUROC has one class only
    assert shortcut_confidence_auroc(model, char_tokenizer, problems, samples, results, 200)[
        "confidence_auroc_shortcut"] is None


# --------------------------------------------------------------------------- sft.processes: data-parallel SFT

def _tiny_sft_setup(char_tokenizer, n=24):
    from rlprm.experiments.sft import encode_completions

    prompts = [f"{i} +{i % 7 + 1}\n" for i in range(n)]
    completions = [f"{i} + {i % 7 + 1} = {i + i % 7 + 1}\n" * (1 + i % 3) + "# Answer: 1" for i in range(n)]
    return encode_completions(char_tokenizer, prompts, completions)


def _tiny_model(char_tokenizer):
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm

    return build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
                                char_tokenizer, seed=0)


def test_share_parts_deal_every_part_to_exactly_one_rank():
    from rlprm.experiments.sft import share_parts

    assert [share_parts(4, 2, r) for r in (0, 1)] == [[0, 3], [1, 2]]  # snake: short and long parts on each rank
    for groups, world in ((4, 1), (6, 3), (3, 4), (8, 2)):
        dealt = sorted(i for r in range(world) for i in share_parts(groups, world, r))
        assert dealt == list(range(groups))


def test_two_ranks_shares_sum_to_the_one_process_gradient(char_tokenizer):
    """The ranks' shares of a batch (each over the WHOLE batch's token count), summed as the all-reduce sums
    them, give the one-process gradient and loss: allclose, not bitwise, because the parts' gradients are added
    in another order ((g0 + g3) + (g1 + g2) against ((g0 + g1) + g2) + g3), which changes the last bits."""
    import torch

    from rlprm.experiments.sft import batch_loss, padded_table, sum_over_ranks

    enc = _tiny_sft_setup(char_tokenizer)
    ids, labels, lengths = padded_table(enc, char_tokenizer.pad_token_id)
    rows = torch.tensor([5, 0, 17, 9, 3, 22, 11, 14])
    model = _tiny_model(char_tokenizer)
    params = list(model.parameters())
    value = batch_loss(model, ids, labels, lengths, rows, 4)
    whole = [p.grad.clone() for p in params]

    shares, values = [], []
    for rank in (0, 1):
        model.zero_grad(set_to_none=True)
        values.append(batch_loss(model, ids, labels, lengths, rows, 4, rank=rank, world=2))
        shares.append(torch.cat([p.grad.reshape(-1) for p in params] + [torch.tensor([values[-1]])]))
    assert 0 < values[0] < value and 0 < values[1] < value  # each rank ran a real share, not all or nothing
    flat = torch.zeros_like(shares[0])
    summed = sum_over_ranks(params, values[1], flat, lambda buf: buf.copy_(shares[0] + shares[1]))
    assert summed == pytest.approx(value, rel=1e-6)
    for p, ref in zip(params, whole):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_process_sft_is_reproducible_and_close_to_one_process(char_tokenizer):
    """sft.processes=2: two runs give bitwise the same weights (same batches, same sums on every run), the
    tracker hears rank 0 alone, and the weights stay close to one process's (a few steps: the summation order
    has not yet grown into another model)."""
    import torch

    from rlprm.config import SFTConfig
    from rlprm.experiments.sft import train_sft

    enc = _tiny_sft_setup(char_tokenizer)

    class Logs:
        def __init__(self):
            self.steps = []

        def log(self, metrics, step=None):
            assert set(metrics) >= {"sft/loss", "sft/grad_norm"}
            self.steps.append(step)

    def trained(processes):
        model, logs = _tiny_model(char_tokenizer), Logs()
        cfg = SFTConfig(steps=4, batch_size=8, warmup_steps=1, processes=processes, logging_steps=2)
        result = train_sft(model, enc, cfg, char_tokenizer.pad_token_id, 0, progress=False, tracker=logs)
        assert result["processes"] == processes and logs.steps == [2, 4]
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    one, two, again = trained(1), trained(2), trained(2)
    assert torch.equal(two, again)
    start = torch.cat([p.detach().reshape(-1) for p in _tiny_model(char_tokenizer).parameters()])
    assert (two - start).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raises", "nan"])
def test_a_failing_sft_rank_stops_every_rank_and_says_why(char_tokenizer, how):
    """An error in one rank (or a NaN loss, which every rank sees in the summed value) surfaces here with its
    message, and the model is left untouched: no rank hangs in the all-reduce waiting for the other."""
    import time

    import torch

    from rlprm.config import SFTConfig
    from rlprm.experiments.sft import SFTError, train_sft

    enc = _tiny_sft_setup(char_tokenizer)
    model = _tiny_model(char_tokenizer)
    cfg = SFTConfig(steps=5, batch_size=8, processes=2)
    if how == "raises":
        model.register_forward_pre_hook(_planted_failure)  # rank 1 raises at its third forward pass
        expected = (RuntimeError, "(?s)rank 1 of 2 failed.*planted failure in rank 1")
    else:
        with torch.no_grad():
            model.get_output_embeddings().weight[0, 0] = float("nan")
        expected = (SFTError, "not finite.*at step 1")
    before = [p.detach().clone() for p in model.parameters()]
    t0 = time.monotonic()
    with pytest.raises(expected[0], match=expected[1]):
        train_sft(model, enc, cfg, char_tokenizer.pad_token_id, 0, progress=False)
    assert time.monotonic() - t0 < 120  # not the process group's 10-minute timeout
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()) if not a.isnan().any())


@pytest.mark.slow
def test_prepare_with_two_processes_from_a_demo_lane(tmp_path):
    """`rlprm prepare` with sft.processes=2 run where the demo runs it with lanes: in a spawned process pool's
    worker, which must be allowed to start children; the summary says how it trained, rank 0 alone logged."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    args = ["prepare", str(ROOT / "recipes" / "arith_prepare.yaml"), *TINY, "sft.processes=2", "sft.steps=4",
            "sft.logging_steps=2", "prepare_eval.enforce_targets=false", f"run.output_dir={tmp_path}", "--no-progress"]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        assert pool.submit(_cli_main, args).result(timeout=600) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sft_processes"] == 2 and summary["train_steps"] == 4
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "sft/loss" in r] == [2, 4]
    assert (tmp_path / "generator" / "config.json").is_file()


def _cli_main(args):
    from rlprm.cli import main

    return main(args)


def _planted_failure(module, args):
    """A forward pre-hook (picklable: it travels to the spawned ranks with the model): rank 1 raises on its
    third forward pass, while rank 0 goes on to the all-reduce."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_rank() == 1:
        module.planted_calls = getattr(module, "planted_calls", 0) + 1
        if module.planted_calls == 3:
            raise ValueError("planted failure in rank 1")
