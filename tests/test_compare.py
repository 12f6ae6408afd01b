"""`rlprm compare`: fake run folders -> report.md and PNGs; seeds averaged; W&B through a fake API."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import types

import pytest
import yaml

from rlprm import compare as cmp

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


def rl_run(folder, name, seed, answer, process, kl=0.5):
    """An RL run: per-epoch eval records (epoch 0..len-1) with rl/ records between them."""
    records = []
    for epoch, (a, p) in enumerate(zip(answer, process)):
        if epoch:
            records.append({"step": epoch, "epoch": epoch, "rl/reward": 0.1, "rl/kl": kl})
        records.append({"step": epoch, "epoch": epoch, "eval/answer_accuracy": a, "eval/process_accuracy": p,
                        "bon/random/N=1/right_answer_wrong_process": 0.1})
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
    gt = rl_run(tmp_path / "gt0", "rl-outcome-gt", 0, [0.4, 0.45], [0.3, 0.28], kl=1.25)
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
    assert "| rl-outcome-gt | 1 | 40.0 | 45.0 | 30.0 | 28.0 | 10.0 | 1.250 |" in text
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
