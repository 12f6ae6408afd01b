"""`rlprm compare`: fake run folders -> report.md and PNGs; seeds averaged; W&B through a fake API."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import types

import pytest
import yaml

from rlprm.evaluation import compare as cmp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, name, seed, records, summary, export=False):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"run": {"name": name, "seed": seed}}))
    if export:
        (folder / "export").mkdir()
        (folder / "export" / "config.json").write_text("{}")
    return folder


def rl_run(folder, name, seed, answer, process, kl=0.5, trace=None, shortcut=None, carry=None):
    """An RL run: per-epoch eval records (epoch 0..len-1) with rl/ records between them."""
    records = []
    for epoch, (a, p) in enumerate(zip(answer, process)):
        if epoch:
            records.append({"step": epoch, "epoch": epoch, "rl/reward": 0.1, "rl/kl": kl})
        records.append({"step": epoch, "epoch": epoch, "eval/answer_accuracy": a, "eval/process_accuracy": p,
                        "bon/random/N=1/right_answer_wrong_process": 0.1,
                        **({"eval/trace_error": trace[epoch], "eval/shortcut_rate": shortcut[epoch]} if trace else {}),
                        **({"eval/carry_drop_rate": carry[epoch]} if carry else {})})
    summary = {**records[-1], "rl/kl": kl}
    return write_run(folder, name, seed, records, summary, export=True)


def bon_run(folder, name, seed, acc):
    """An `rlprm eval` run: flat best-of-N keys for selectors prm_prod and random at N = 1, 2, 4."""
    summary = {"eval/n_max": 4}
    for selector, values in acc.items():
        for n, v in zip([1, 2, 4], values):
            summary[f"bon/{selector}/N={n}/accuracy"] = v
            summary[f"bon/{selector}/N={n}/process_correct"] = v / 2
            summary[f"bon/{selector}/N={n}/right_answer_wrong_process"] = 0.05
    return write_run(folder, name, seed, [{"step": 0, **summary}], summary)


def test_mean_spread_and_format():
    mean, sd, n = cmp.mean_spread([0.5, 0.6, 0.7])
    assert (round(mean, 9), round(sd, 9), n) == (0.6, 0.1, 3)
    assert cmp.mean_spread([0.25, None, float("nan")]) == (0.25, 0.0, 1)
    assert cmp.fmt([0.5, 0.6, 0.7]) == "60.0 ± 10.0 (n=3)"
    assert cmp.fmt([0.4321]) == "43.2"
    assert cmp.fmt([None]) == "-"
    assert cmp.fmt([1.23456], percent=False, digits=3) == "1.235"


def test_report_with_seeds(tmp_path):
    dense = [rl_run(tmp_path / f"dense{s}", "rl-prm-dense", s, [0.4, 0.5 + 0.1 * s], [0.3, 0.4 + 0.1 * s])
             for s in range(2)]
    gt = rl_run(tmp_path / "gt0", "rl-outcome-gt", 0, [0.4, 0.45], [0.3, 0.28], kl=1.25, trace=[0.25, 0.375],
                shortcut=[0.2, 0.3], carry=[0.18, 0.06])
    start = bon_run(tmp_path / "bon_start", "bon-start", 0, {"prm_prod": [0.4, 0.5, 0.6], "random": [0.4, 0.4, 0.4]})
    final = [bon_run(tmp_path / f"bon_dense{s}", "bon-prm-dense", s,
                     {"prm_prod": [0.5, 0.6 + 0.2 * s, 0.7], "random": [0.5, 0.5, 0.5]}) for s in range(2)]
    runs = [cmp.read_run(d) for d in [*dense, gt, start, *final]]
    assert [r.kind for r in runs] == ["rl", "rl", "rl", "bon", "bon", "bon"]
    report = cmp.compare(runs, tmp_path / "out")
    text = report.read_text()

    # RL table: dense is two seeds; end answer accuracy 0.5 and 0.6 -> mean 55.0, s.d. 7.1
    sd = 100 * statistics.stdev([0.5, 0.6])
    assert f"| rl-prm-dense | 2 | 40.0 ± 0.0 (n=2) | 55.0 ± {sd:.1f} (n=2) | 30.0 ± 0.0 (n=2) | 45.0 ± {sd:.1f} (n=2) |" in text
    # trace error and shortcut rate, start and end (issue 24: compare had neither); `-` where a run logged none
    # and the dropped-carry rate beside them (the demo's answer-changing habit)
    assert ("| rl-outcome-gt | 1 | 40.0 | 45.0 | 30.0 | 28.0 | 10.0 | 1.250 | 25.0 | 37.5 | 20.0 | 30.0 | 18.0 | 6.0 |"
            in text)
    assert ("| trace error start | trace error end | shortcut rate start | shortcut rate end | carry-drop rate start "
            "| carry-drop rate end |") in text
    assert "0.500 ± 0.000 (n=2) | - | - | - | - | - | - |" in text  # rl-prm-dense logged none of them
    # best-of-N: one table per selector, dense's N=2 averaged over seeds 0.6 and 0.8
    assert "### prm_prod" in text and "### random" in text
    assert f"| bon-prm-dense | 50.0 ± 0.0 (n=2) | 70.0 ± {100 * statistics.stdev([0.6, 0.8]):.1f} (n=2) |" in text
    assert "| bon-start | 40.0 | 50.0 | 60.0 |" in text
    assert "right answer, wrong step" in text and "| bon-start | prm_prod | 30.0 | 5.0 |" in text
    # the exported generators are listed; plots exist and are real PNGs
    assert str(dense[0] / "export") in text
    for png in ["rl_curves.png", "bon_curves.png"]:
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert f"]({png})" in text
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_other_runs_and_running_run_without_summary(tmp_path):
    prep = write_run(tmp_path / "prep", "arith-prepare", 0, [{"step": 1, "loss": 1.0}],
                     {"process_accuracy": 0.46, "answer_accuracy": 0.55})
    live = rl_run(tmp_path / "live", "rl-live", 0, [0.4, 0.42], [0.3, 0.31])
    (live / "summary.json").unlink()  # a run still going: its last records stand in
    text = cmp.compare([cmp.read_run(prep), cmp.read_run(live)], tmp_path / "out").read_text()
    assert "| arith-prepare | 1 | 0.460 | 0.550 |" in text
    assert "| rl-live | 1 | 40.0 | 42.0 |" in text
    assert not (tmp_path / "out" / "bon_curves.png").exists()


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(cmp.CompareError, match=f"{tmp_path}: not a run folder"):
        cmp.read_run(tmp_path)
    run = rl_run(tmp_path / "torn", "x", 0, [0.1, 0.2], [0.1, 0.2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "eval/ans')
    with pytest.raises(cmp.CompareError, match=r"metrics.jsonl:4: not valid JSON"):
        cmp.read_run(run)


def test_cli(tmp_path):
    run = rl_run(tmp_path / "r", "rl-x", 0, [0.1, 0.2], [0.1, 0.2])
    ok = subprocess.run([sys.executable, "-m", "rlprm.cli", "compare", str(run), "--out", str(tmp_path / "o")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / "report.md").is_file() and "report:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "rlprm.cli", "compare", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


class FakeRun:
    def __init__(self, run_id, name, seed, rows, summary):
        self.id, self.name = run_id, f"{name}-rl"
        self.config = {"run": {"name": name, "seed": seed}}
        self.summary = {**summary, "_runtime": 3}
        self._rows = rows

    def scan_history(self):
        return iter({"_step": i, **row} for i, row in enumerate(self._rows))


def test_wandb_group(tmp_path, monkeypatch):
    calls = []

    class Api:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            rows = lambda a: [{"epoch": 0, "eval/answer_accuracy": 0.4, "eval/process_accuracy": 0.3},  # noqa: E731
                              {"epoch": 1, "rl/reward": 0.2},
                              {"epoch": 1, "eval/answer_accuracy": a, "eval/process_accuracy": 0.35}]
            return [FakeRun("a1", "rl-prm-dense", 0, rows(0.5), {"rl/kl": 0.2}),
                    FakeRun("a2", "rl-prm-dense", 1, rows(0.7), {"rl/kl": 0.4})]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    report = cmp.main([], out=tmp_path / "w", wandb_group="arith-rl", wandb_project="proj", wandb_entity="team")
    assert calls == [("team/proj", {"group": "arith-rl"})]
    text = report.read_text()
    assert "| rl-prm-dense | 2 | 40.0 ± 0.0 (n=2) | 60.0 ± 14.1 (n=2) |" in text
    assert "wandb:team/proj/a1" in text
    assert "| 0.300 ± 0.141 (n=2) |" in text  # KL from the summary; W&B's private `_` keys dropped

    monkeypatch.setattr(Api, "runs", lambda self, path, filters=None: [])
    with pytest.raises(cmp.CompareError, match="no runs in group 'empty'"):
        cmp.main([], out=tmp_path / "w2", wandb_group="empty")


# --------------------------------------------------------------------------- the demo's report and summary.json


def test_seed_interval_and_paired_differences():
    one = cmp.seed_interval([0.42])
    assert one == {"mean": 0.42, "lo": 0.42, "hi": 0.42, "n": 1}
    three = cmp.seed_interval([0.5, 0.6, 0.7])
    half = 4.303 * 0.1 / 3 ** 0.5  # t(0.975, 2) s.d. / sqrt(n)
    assert three["n"] == 3 and abs(three["mean"] - 0.6) < 1e-12
    assert abs(three["lo"] - (0.6 - half)) < 1e-9 and abs(three["hi"] - (0.6 + half)) < 1e-9
    assert cmp.seed_interval([])["n"] == 0
    assert abs(cmp.t975(40) - 2.021) < 2e-3 and cmp.t975(1) == 12.706
    d = cmp.paired_seed_differences({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}, {0: 0.4, 1: 0.4, 2: 0.5})
    assert d["n"] == 3 and abs(d["mean"] - 0.5 / 3) < 1e-12  # seed 3 has no partner


def demo_rl_run(folder, name, seed, start, end):
    """An RL run of 2 epochs: eval records at epochs 0, 1, 2 (the four metrics go start -> end linearly) and two
    PPO updates per epoch with known KL and reward."""
    records = []
    for epoch in range(3):
        if epoch:
            for it in range(2):
                u = 2 * (epoch - 1) + it + 1  # update 1..4
                # each update's own samples: the habits go from start to 2 x (end - start) by update 4
                habits = {f"rl/{m}": start[m] + (end[m] - start[m]) * u / 2 for m in ("carry_drop_rate", "shortcut_rate")}
                records.append({"step": u, "epoch": epoch - 1 + (it + 1) / 2, "rl/reward": 0.1 * u,
                                "rl/kl": 0.01 * u, "rl/kl_per_sample": 0.01 * u, "rl/kl_per_token": 0.001 * u,
                                "rl/answer_accuracy": start["answer_accuracy"], **habits})
        value = {m: start[m] + (end[m] - start[m]) * epoch / 2 for m in start}
        records.append({"step": 2 * epoch, "epoch": epoch, **{f"eval/{m}": v for m, v in value.items()}})
    return write_run(folder, name, seed, records, records[-1], export=True)


def demo_pool(folder, name, seed, problems=4):
    """A best-of-N folder whose pool has 2 samples per problem: sample 0 right (every step right), sample 1 wrong.
    The PRM and `confidence` prefer sample 0, the ORM and `likelihood` sample 1: at N=2 every resample holds
    both samples of every drawn problem, so prm_prod is exactly 100%, orm 0% and prm_prod - orm exactly +100."""
    from rlprm.evaluation.evaluate import Pool, save_pool
    from rlprm.data.problems import SampleGrade, TaskProblem

    good = SampleGrade(["1 + 1 = 2", "# Answer: 2"], "2", True, True, True, None)
    bad = SampleGrade(["1 + 1 = 3", "# Answer: 3"], "3", False, True, False, 0)
    pool = Pool([TaskProblem(f"test-{i}", f"p{i}\n", "2", text=f"p{i}") for i in range(problems)],
                [["right", "wrong"]] * problems, [[good, bad] for _ in range(problems)],
                {"prm": [[[0.9, 0.9], [0.2, 0.3]]] * problems, "orm": [[[0.1], [0.8]]] * problems},
                {"prm": "prm", "orm": "orm"},
                {"confidence": [[-0.1, -3.0]] * problems, "likelihood": [[-9.0, -1.0]] * problems})
    folder.mkdir(parents=True)
    save_pool(pool, folder / "pool.jsonl")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/n_max": 2}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"eval/n_max": 2}))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"run": {"name": name, "seed": seed}}))
    return folder


def demo_layout(root):
    from rlprm.experiments.demo_report import DemoLayout

    metrics = ["answer_accuracy", "process_accuracy", "trace_error", "shortcut_rate", "carry_drop_rate"]
    start = dict(zip(metrics, [0.4, 0.3, 0.2, 0.1, 0.2]))
    layout = DemoLayout(seeds=3)
    # exact_dense: ends 0.5, 0.6, 0.7 in answer accuracy; outcome_gt: 0.4, 0.4, 0.5; prm_dense: one seed
    for arm, ends in [("exact_dense", [0.5, 0.6, 0.7]), ("outcome_gt", [0.4, 0.4, 0.5]), ("prm_dense", [0.55])]:
        layout.arms[arm] = [demo_rl_run(root / f"{arm}{s}", f"rl-{arm}", s, start, {**start, "answer_accuracy": e,
                                        "shortcut_rate": 0.1 - 0.05 * (arm == "exact_dense"),
                                        "carry_drop_rate": 0.2 - 0.1 * (arm == "exact_dense")})
                            for s, e in enumerate(ends)]
    for gen in ["start", "start_t07", "exact_dense"]:
        layout.generators[gen] = [demo_pool(root / f"bon_{gen}{s}", f"bon-{gen}", s) for s in range(3)]
    layout.prm = root / "prm"
    write_run(layout.prm, "arith-prm", 0, [{"step": 1, "loss": 0.5}],
              {"eval/step_auroc": 0.97, "eval/first_error_f1": 0.9,
               "eval_head_only/step_auroc": 0.81, "eval_head_only/first_error_f1": 0.62})
    layout.generator = root / "prepare"
    layout.generator.mkdir()
    (layout.generator / "summary.json").write_text(json.dumps(
        {"num_samples": 200, "well_formed": 1.0, "answer_accuracy": 0.805, "process_accuracy": 0.36,
         "shortcut_rate": 0.46, "trace_error": 0.55, "confidence_auroc_shortcut": 0.668,
         "confidence_auroc_shortcut_eligible": 0.298, "likelihood_auroc_shortcut": 0.587, "train_steps": 1100,
         "carry_drop_rate": 0.12, "carry_drop_answer_wrong": 0.09, "confidence_auroc_carry_drop": 0.512,
         "confidence_auroc_carry_drop_eligible": 0.47, "likelihood_auroc_carry_drop": 0.5}))
    layout.runs = [*layout.arms["exact_dense"], layout.prm, *layout.generators["start"]]
    return layout


def test_demo_summary_json_from_hand_made_runs(tmp_path):
    from rlprm.experiments.demo_report import write_demo_report

    layout = demo_layout(tmp_path)
    report = write_demo_report(layout, tmp_path / "report", {"wall_seconds": 812.5, "peak_rss_mib": 1500.0},
                               resamples=200)
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert (s["wall_seconds"], s["peak_rss_mib"], s["seeds"]) == (812.5, 1500.0, 3)
    # best-of-N: every generator, every selector, the exact values the pool forces at N=2
    assert set(s["bon"]) == {"start", "start_t07", "exact_dense"}
    for gen in s["bon"]:
        sel = s["bon"][gen]
        assert {"prm_prod", "prm_min", "orm", "majority", "confidence", "likelihood", "random", "pass@n"} <= set(sel)
        assert sel["prm_prod"]["2"]["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
        assert sel["prm_prod"]["2"]["process_correct"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
        assert sel["orm"]["2"]["accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
        assert sel["confidence"]["2"]["accuracy"]["mean"] == 1.0 and sel["likelihood"]["2"]["accuracy"]["mean"] == 0
        assert sel["pass@n"]["2"]["accuracy"]["mean"] == 1.0
        r1 = sel["random"]["1"]["accuracy"]  # one draw of 2 per problem, 4 problems x 3 seeds: about 50%, an interval
        assert 0.3 < r1["mean"] < 0.7 and r1["lo"] < r1["mean"] < r1["hi"]
        diff = s["bon_diff"][gen]
        assert diff["prm_prod_minus_orm"]["2"]["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
        assert diff["prm_prod_minus_confidence"]["2"]["accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
        assert {"prm_prod_minus_majority", "prm_prod_minus_likelihood", "prm_min_minus_majority", "prm_min_minus_orm",
                "orm_minus_majority", "weighted_majority_minus_majority"} <= set(diff)
        assert "weighted_majority" in sel and diff["prm_min_minus_orm"]["2"]["accuracy"]["mean"] == 1.0
        # answers and every step right, at every N of the pool
        assert set(diff["prm_prod_minus_majority"]) == {"1", "2"} and "process_correct" in diff["prm_prod_minus_orm"]["2"]
        # the paper's Figure 3 shape needs N >= 8: not measured on a pool of 2
        assert s["bon_shape"][gen] == {"prm": "prm_prod", "from_n": 8, "above_majority": None, "above_orm": None,
                                       "n_max": 2, "majority_gap_grows": None}
    # RL: one seed gives its exact point; three seeds their mean and t-interval
    rl = s["rl"]
    assert set(rl) == {"exact_dense", "outcome_gt", "prm_dense"}
    for arm in rl:
        assert {"answer_accuracy", "process_accuracy", "trace_error", "shortcut_rate", "carry_drop_rate"} <= set(rl[arm])
        assert {"start", "end"} <= set(rl[arm]["answer_accuracy"])
    assert rl["prm_dense"]["answer_accuracy"]["end"] == {"mean": 0.55, "lo": 0.55, "hi": 0.55, "n": 1}
    assert rl["prm_dense"]["answer_accuracy"]["start"] == {"mean": 0.4, "lo": 0.4, "hi": 0.4, "n": 1}
    end = rl["exact_dense"]["answer_accuracy"]["end"]
    half = 4.303 * 0.1 / 3 ** 0.5
    assert end["n"] == 3 and abs(end["mean"] - 0.6) < 1e-9 and abs(end["hi"] - end["mean"] - half) < 1e-9
    assert abs(rl["exact_dense"]["shortcut_rate"]["end"]["mean"] - 0.05) < 1e-9
    assert abs(rl["exact_dense"]["carry_drop_rate"]["end"]["mean"] - 0.1) < 1e-9
    assert abs(rl["outcome_gt"]["carry_drop_rate"]["change"]["mean"]) < 1e-9
    assert rl["exact_dense"]["process_accuracy"]["start"]["mean"] == 0.3
    # the KL of the last update (4) and the largest; the reward of the first and the last update
    assert abs(rl["outcome_gt"]["kl_per_sample"]["end"]["mean"] - 0.04) < 1e-12
    assert abs(rl["outcome_gt"]["kl_per_token"]["max"]["mean"] - 0.004) < 1e-12
    assert abs(rl["outcome_gt"]["reward"]["first"]["mean"] - 0.1) < 1e-12
    # paired by seed: exact_dense - outcome_gt = 0.1, 0.2, 0.2; with prm_dense only seed 0 is shared
    d = s["rl_diff"]["exact_dense_minus_outcome_gt"]["answer_accuracy"]["end"]
    assert d["n"] == 3 and abs(d["mean"] - 0.5 / 3) < 1e-9 and d["lo"] > 0
    assert s["rl_diff"]["exact_dense_minus_prm_dense"]["answer_accuracy"]["end"]["n"] == 1
    assert "prm_dense_minus_confidence_dense" not in s["rl_diff"]  # the control did not run here
    # per update, from each update's own samples: exact_dense's dropped carry 0.15, 0.10, 0.05, 0.00 (halved at
    # update 3, as 0.05 <= 0.075), outcome_gt's stays at 0.2 (never halved)
    ups = s["rl_updates"]
    cd = ups["exact_dense"]["carry_drop_rate"]
    assert [round(p["mean"], 9) for p in cd["per_update"]] == [0.15, 0.1, 0.05, 0.0] and cd["per_update"][0]["n"] == 3
    assert cd["halved_at"]["mean"] == 3 and cd["never_halved"] == 0
    assert abs(cd["over_updates"]["mean"] - 0.075) < 1e-9
    assert ups["outcome_gt"]["carry_drop_rate"]["never_halved"] == 3 and ups["outcome_gt"]["carry_drop_rate"]["halved_at"]["n"] == 0
    assert ups["exact_dense"]["shortcut_rate"]["halved_at"]["mean"] == 3  # 0.075, 0.05, 0.025: 0.025 <= 0.0375
    du = s["rl_updates_diff"]["exact_dense_minus_outcome_gt"]["carry_drop_rate"]
    assert abs(du["over_updates"]["mean"] + 0.125) < 1e-9 and du["over_updates"]["n"] == 3
    assert [round(p["mean"], 9) for p in du["per_update"]] == [-0.05, -0.1, -0.15, -0.2]
    # the PRM's own numbers: the head alone where it stacks confidence
    assert (s["prm"]["step_auroc"], s["prm"]["first_error_f1"]) == (0.81, 0.62)
    # sharpening alone: every sample of the start's pools (one right, one wrong per problem), at T=1 and T=0.7
    assert set(s["sharpening"]) == {"start", "start_t07"}
    assert s["sharpening"]["start_t07"]["answer_accuracy"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 3}
    # the starting generator's held-out check, from prepare's summary.json
    g = s["generator"]
    assert (g["shortcut_rate"], g["confidence_auroc_shortcut"], g["confidence_auroc_shortcut_eligible"]) == \
        (0.46, 0.668, 0.298) and "train_steps" not in g
    assert (g["carry_drop_rate"], g["carry_drop_answer_wrong"], g["confidence_auroc_carry_drop"]) == (0.12, 0.09, 0.512)
    # the report and its figures
    text = report.read_text()
    assert "## The starting generator" in text and "| 100.0 | 80.5 | 36.0 | 46.0 | 12.0 (9.0) | 55.0 |" in text
    assert "dropped-carry chains (`38 + 5 = 33`) vs fully correct ones: lowest token log-prob 0.512" in text
    assert "## Best-of-N on answers: the paper's Figure 3" in text and "](bon_answers.png)" in text
    # within a problem: the pools' wrong samples are no habit's; the right ones get the PRM's higher scores
    habits = s["habit_auroc"]
    assert set(habits) == {"shortcut", "carry_drop"} and habits["carry_drop"]["confidence"]["pairs"] == 0
    assert "| carry_drop | - (0) |" in text
    assert "lowest token log-prob 0.668 on all problems, 0.298 on the problems that admit the shortcut" in text
    assert "### Sharpening alone" in text
    assert "| exact_dense | 40.0 (n=1)" not in text and "| prm_dense | 40.0 (n=1) | 55.0 (n=1)" in text
    assert "exact_dense - outcome_gt" in text and "told apart" in text
    assert "## Best-of-N: start_t07" in text and "prm_prod - orm" in text
    assert "### How fast each reward removes each habit" in text
    assert "| exact_dense | dropped-carry rate | 15.0 [15.0, 15.0] | 0.0 [0.0, 0.0] | 7.5 [7.5, 7.5] | 3.0 [3.0, 3.0] (0) |" in text
    assert "| outcome_gt | dropped-carry rate | 20.0 [20.0, 20.0] | 20.0 [20.0, 20.0] | 20.0 [20.0, 20.0] | - (3) |" in text
    for png in ["bon_by_generator.png", "bon_by_selector.png", "bon_answers.png", "rl_curves.png", "rl_kl.png",
                "rl_updates.png", "all_runs/rl_curves.png"]:
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
        assert png.startswith("all_runs") or f"]({png})" in text
    assert not list((tmp_path / "report").glob("*.tmp*"))


def test_demo_report_one_seed_without_pool_uses_bon_curves(tmp_path):
    from rlprm.experiments.demo_report import bon_statistics

    folder = tmp_path / "bon"
    folder.mkdir()
    point = {"accuracy": {"mean": 0.5, "lo": 0.4, "hi": 0.6}}
    (folder / "bon_curves.json").write_text(json.dumps({"orm": {"1": point}, "differences": {"a_minus_b": {"1": point}}}))
    curves, diffs, how = bon_statistics([folder])
    assert curves == {"orm": {1: point}} and diffs == {"a_minus_b": {1: point}} and "bon_curves.json" in how
    with pytest.raises(FileNotFoundError, match="lack pool.jsonl"):
        bon_statistics([folder, folder])


def test_bon_shape_reads_the_papers_figure_3_off_the_paired_differences():
    from rlprm.experiments.demo_report import bon_shape

    def pts(means, width=0.05):
        return {str(N): {"accuracy": {"mean": m, "lo": m - width, "hi": m + width}} for N, m in zip([1, 8, 16, 64], means)}

    shaped = {"prm_prod_minus_majority": pts([0.0, 0.06, 0.08, 0.12]), "prm_prod_minus_orm": pts([-0.1, 0.1, 0.1, 0.1])}
    assert bon_shape(shaped) == {"prm": "prm_prod", "from_n": 8, "above_majority": True, "above_orm": True,
                                 "n_max": 64, "majority_gap_grows": True}
    # an interval that holds 0 at one N >= 8 is not "above"; N = 1 (below from_n) does not count
    flat = {"prm_prod_minus_majority": pts([-0.3, 0.06, 0.04, 0.06]), "prm_prod_minus_orm": pts([0.1, 0.1, 0.1, 0.1])}
    shape = bon_shape(flat)
    assert shape["above_majority"] is False and shape["above_orm"] is True and shape["majority_gap_grows"] is False
    assert bon_shape({})["above_orm"] is None and bon_shape({})["majority_gap_grows"] is None


def test_within_problem_auroc_counts_pairs_of_one_problem_only():
    from rlprm.data.problems import SampleGrade, TaskProblem
    from rlprm.evaluation.evaluate import Pool
    from rlprm.experiments.demo_report import within_problem_auroc

    right = SampleGrade([], "1", True, True, True, None)
    drop = SampleGrade([], "2", False, True, False, 0, carry_drop=True)
    slip = SampleGrade([], "3", False, True, False, 0)
    # problem 0: the correct sample is surer than the dropped carry; problem 1: the reverse, and by more than
    # problem 0's whole range, so pooled over problems the score would look better than it is within each
    pool = Pool([TaskProblem("a", "a\n", "1"), TaskProblem("b", "b\n", "1")], [["x"] * 3] * 2,
                [[right, drop, slip], [right, drop, drop]], sample_scores={"confidence": [[-1.0, -2.0, -9.0],
                                                                                           [-6.0, -5.0, -5.5]]})
    got = within_problem_auroc([pool], "carry_drop", "confidence")
    assert got == {"auroc": 1 / 3, "pairs": 3, "problems": 2}  # 1 of 3 same-problem pairs ordered right
    assert within_problem_auroc([pool], "shortcut", "confidence") == {"auroc": None, "pairs": 0, "problems": 0}
    assert within_problem_auroc([pool], "carry_drop", "prm_prod")["auroc"] is None  # no such score: nothing
