"""The demo driver: skip-if-complete markers, --force, crash recovery (stub stages); the real pipeline is slow."""

from __future__ import annotations

import json

import pytest
import yaml

from rlprm import demo


class Recorder:
    """Stub stages that write one output file each and count their runs."""

    def __init__(self, root):
        self.root, self.ran, self.fail = root, [], set()

    def stage(self, name, deps=(), key="k", write=True):
        out = self.root / name

        def run():
            self.ran.append(name)
            if name in self.fail:
                (out / "partial.txt").write_text("half")
                raise RuntimeError("boom")
            if write:
                (out / "out.txt").write_text(name)

        return demo.Stage(name, out, run, key, list(deps), ["out.txt"])

    def pipeline(self, keys=None):
        keys = keys or {}
        return [self.stage("a", key=keys.get("a", "k")), self.stage("b", ["a"], keys.get("b", "k")),
                self.stage("c", ["b"], keys.get("c", "k")), self.stage("d", ["a"], keys.get("d", "k"))]


def run(rec, **kw):
    rec.ran.clear()
    records = demo.run_stages(rec.pipeline(kw.pop("keys", None)), rec.root, log=lambda _: None, **kw)
    return rec.ran[:], [r["status"] for r in records]


def test_skip_when_complete(tmp_path):
    rec = Recorder(tmp_path)
    assert run(rec) == (["a", "b", "c", "d"], ["ran"] * 4)
    marker = json.loads((tmp_path / "b" / demo.MARKER).read_text())
    assert marker["stage"] == "b" and marker["seconds"] >= 0 and len(marker["run_id"]) == 32
    assert run(rec) == ([], ["skipped"] * 4)


def test_changed_settings_rerun_the_stage_and_its_dependants(tmp_path):
    rec = Recorder(tmp_path)
    run(rec)
    assert run(rec, keys={"b": "other"})[0] == ["b", "c"]
    assert run(rec, keys={"b": "other"})[0] == []


def test_force(tmp_path):
    rec = Recorder(tmp_path)
    run(rec)
    assert run(rec, force=True)[0] == ["a", "b", "c", "d"]
    assert run(rec, force=["b"])[0] == ["b", "c"]          # c reads b: redone with it
    assert run(rec, force=["d"])[0] == ["d"]
    (tmp_path / "a" / "stale.txt").write_text("x")
    assert run(rec, force=["a"])[0] == ["a", "b", "c", "d"]
    assert not (tmp_path / "a" / "stale.txt").exists()     # a redone stage starts from an empty folder


def test_force_prefix_names_a_group():
    assert demo._forced("rl-prm-dense-s0", ["rl"]) and demo._forced("bon-start-s1", ["bon"])
    assert not demo._forced("rm-prm", ["rl"]) and not demo._forced("rl-prm-dense-s0", ["rl-orm"])
    assert demo._forced("x", True) and not demo._forced("x", None)


def test_crash_then_rerun_goes_on_from_the_failed_stage(tmp_path):
    rec = Recorder(tmp_path)
    rec.fail = {"b"}
    with pytest.raises(demo.DemoError, match=r"stage b failed after \d+ s: RuntimeError: boom"):
        run(rec)
    assert (tmp_path / "a" / demo.MARKER).exists() and not (tmp_path / "b" / demo.MARKER).exists()
    rec.fail = set()
    assert run(rec) == (["b", "c", "d"], ["skipped", "ran", "ran", "ran"])
    assert not (tmp_path / "b" / "partial.txt").exists()


def test_incomplete_output_is_redone_and_missing_output_is_an_error(tmp_path):
    rec = Recorder(tmp_path)
    run(rec)
    (tmp_path / "c" / "out.txt").unlink()  # marker there, output gone: not complete
    assert run(rec)[0] == ["c"]
    (tmp_path / "a" / demo.MARKER).write_text("{torn")  # unreadable marker: not complete
    assert run(rec)[0] == ["a", "b", "c", "d"]
    lazy = [rec.stage("lazy", write=False)]
    with pytest.raises(demo.DemoError, match="stage lazy finished but .* lacks out.txt"):
        demo.run_stages(lazy, tmp_path, log=lambda _: None)
    assert not (tmp_path / "lazy" / demo.MARKER).exists()


def test_refuses_to_write_outside_the_demo_folder(tmp_path):
    outside = demo.Stage("x", tmp_path.parent / "elsewhere", lambda: None, "k")
    with pytest.raises(demo.DemoError, match="outside the demo folder"):
        demo.run_stages([outside], tmp_path, log=lambda _: None)


def test_parse_sets():
    assert demo.parse_sets(["rl:rl.epochs=1", "rl:rl.eval_n=2", "prepare:sft.steps=9"]) == {
        "rl": ["rl.epochs=1", "rl.eval_n=2"], "prepare": ["sft.steps=9"]}
    for bad in ["rl.epochs=1", "nope:rl.epochs=1", "rl:rl.epochs"]:
        with pytest.raises(demo.DemoError, match="expected GROUP:key=value"):
            demo.parse_sets([bad])


def test_build_stages_validates_every_recipe_with_demo_budgets(tmp_path):
    stages = demo.build_stages(tmp_path, seeds=2, extra={"rl": ["rl.epochs=1"]})
    names = [s.name for s in stages]
    assert names[:3] == ["prepare", "rm-prm", "rm-orm"] and len(names) == 3 + 2 * 7
    assert "rl-outcome-gt-s1" in names and "bon-orm-sparse-s1" in names
    recipes = {s.name: yaml.safe_load(s.key) for s in stages}
    assert recipes["prepare"]["prepare_eval"]["min_process_accuracy"] == 0.10
    assert recipes["rm-prm"]["rm"]["time_budget_s"] == 45
    assert recipes["rm-orm"]["rm"]["data"]["cache_dir"] == str(tmp_path / "prm" / "rm_samples")
    rl = recipes["rl-prm-dense-s1"]
    assert rl["run"]["seed"] == 1 and rl["rl"]["epochs"] == 1 and rl["tracking"]["wandb"] == "disabled"
    assert rl["model"]["reward_model"] == str(tmp_path / "prm" / "reward_model")
    assert recipes["rl-outcome-gt-s0"]["model"]["reward_model"] is None
    # same sample budget and seed for the three RL runs
    keys = ["epochs", "problems_per_epoch", "samples_per_problem", "prompts_per_iteration", "ppo_epochs"]
    assert len({tuple(recipes[f"{n}-s0"]["rl"][k] for k in keys) for n, _, _ in demo.RL_RUNS}) == 1
    bon = recipes["bon-prm-dense-s0"]
    assert bon["model"]["generator"] == str(tmp_path / "seed-0" / "rl_prm_dense" / "export")
    assert set(bon["eval"]["reward_models"]) == {"prm", "orm"}
    with pytest.raises(demo.DemoError, match="--seeds"):
        demo.run_demo(tmp_path, seeds=0)


@pytest.mark.slow
def test_demo_end_to_end_tiny_budgets(tmp_path):
    """The real pipeline at toy budgets (about 75 s on 2 cores), then a re-run that skips everything."""
    sets = ["prepare:sft.steps=40", "prepare:prepare_eval.num_problems=32",
            "prepare:prepare_eval.enforce_targets=false", "rm:rm.data.train_problems=32", "rm:rm.data.eval_problems=8",
            "rm:rm.time_budget_s=5", "rl:rl.epochs=1", "rl:rl.problems_per_epoch=8", "rl:rl.prompts_per_iteration=8",
            "rl:rl.eval_problems=8", "bon:eval.num_problems=8", "bon:eval.n_max=4"]
    summary = demo.run_demo(tmp_path, sets=sets, progress=False, log=lambda _: None)
    assert summary["status"] == "done" and [s["status"] for s in summary["stages"]] == ["ran"] * 11
    report = (tmp_path / "report" / "report.md").read_text()
    for label in ["rl-prm-dense", "rl-orm-sparse", "rl-outcome-gt", "bon-start", "bon-outcome-gt"]:
        assert f"| {label} |" in report
    assert (tmp_path / "report" / "rl_curves.png").is_file() and (tmp_path / "report" / "bon_curves.png").is_file()
    assert (tmp_path / "seed-0" / "rl_prm_dense" / "export" / "config.json").is_file()
    again = demo.run_demo(tmp_path, sets=sets, progress=False, log=lambda _: None)
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 11 and again["wall_seconds"] < 30
    on_disk = json.loads((tmp_path / "demo_summary.json").read_text())
    assert on_disk["status"] == "done" and on_disk["peak_rss_gib"] < 6


def test_existing_generator_replaces_the_prepare_stage(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "config.json").write_text("{}")
    stages = demo.build_stages(tmp_path / "demo", generator=gen)
    assert "prepare" not in [s.name for s in stages] and all("prepare" not in s.deps for s in stages)
    assert yaml.safe_load(stages[0].key)["model"]["generator"] == str(gen)
    with pytest.raises(demo.DemoError, match="not a model folder"):
        demo.build_stages(tmp_path / "demo", generator=tmp_path / "nope")


def test_an_outside_generator_changed_in_place_changes_the_keys(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "config.json").write_text("{}")
    before = {s.name: s.key for s in demo.build_stages(tmp_path / "demo", generator=gen)}
    (gen / "model.safetensors").write_text("new weights")
    after = {s.name: s.key for s in demo.build_stages(tmp_path / "demo", generator=gen)}
    assert before["rm-prm"] != after["rm-prm"] and before["rl-outcome-gt-s0"] != after["rl-outcome-gt-s0"]
