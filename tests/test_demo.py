"""The demo driver: skip-if-complete markers, --force, crash recovery (stub stages); the real pipeline is slow."""

from __future__ import annotations

import json
import os
import pickle
import time

import pytest
import yaml

from rlprm.experiments import demo


def lane_job(out_dir, name, seconds=0.0, fail=False, partner=None):
    """A stage's work in a lane (module level: a spawned child imports it): times, pid, then out.txt. With a
    partner stage, it marks its start and waits (up to `seconds`) for the partner's, then 0.3 s more: side by side
    they overlap however long a lane takes to start (one lane: the wait runs out)."""
    t0 = time.time()
    (out_dir / "started").write_text(name)
    while partner is not None and not (out_dir.parent / partner / "started").exists() and time.time() < t0 + seconds:
        time.sleep(0.05)
    time.sleep(0.3 if partner is not None else seconds)
    if fail:
        raise RuntimeError(f"boom in {name}")
    (out_dir / "times.json").write_text(json.dumps({"start": t0, "end": time.time(), "pid": os.getpid()}))
    (out_dir / "out.txt").write_text(name)


def lane_stage(root, name, deps=(), seconds=0.0, fail=False, parallel=True, partner=None):
    out = root / name
    call = (lane_job, (out, name, seconds, fail, partner))
    return demo.Stage(name, out, lambda: lane_job(*call[1]), "k", list(deps), ["out.txt"], call=call,
                      parallel=parallel)


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
    assert demo.parse_sets(["rl:rl.epochs=1", "rl:rl.eval_n_max=2", "prepare:sft.steps=9"]) == {
        "rl": ["rl.epochs=1", "rl.eval_n_max=2"], "prepare": ["sft.steps=9"]}
    for bad in ["rl.epochs=1", "nope:rl.epochs=1", "rl:rl.epochs"]:
        with pytest.raises(demo.DemoError, match="expected GROUP:key=value"):
            demo.parse_sets([bad])


def test_build_stages_validates_every_recipe_with_demo_budgets(tmp_path):
    stages = demo.build_stages(tmp_path, seeds=2, extra={"rl": ["rl.epochs=1"]})
    names = [s.name for s in stages]
    arms = ["prm-dense", "orm-sparse", "outcome-gt", "exact-dense", "confidence-dense"]
    assert names[:3] == ["prepare", "rm-prm", "rm-orm"] and len(names) == 3 + 2 * (3 + 2 * len(arms))
    for seed in range(2):  # five RL arms, their final best-of-N, and the start at T=1 and T=0.7, per seed
        assert {f"rl-{a}-s{seed}" for a in arms} | {f"bon-{a}-s{seed}" for a in arms} <= set(names)
        assert {f"bon-start-s{seed}", f"bon-start-t07-s{seed}", f"bon-ood-s{seed}"} <= set(names)
    recipes = {s.name: yaml.safe_load(s.key) for s in stages}
    assert recipes["prepare"]["prepare_eval"]["min_process_accuracy"] == 0.20
    sft = recipes["prepare"]["sft"]  # the 1,300-step prepare: the cosine from step 230
    assert (sft["steps"], sft["clean_steps"], sft["decay_start"]) == (1300, 900, 230)
    assert recipes["rl-prm-dense-s0"]["rl"]["eval_every"] == 3  # the arms are evaluated before and after RL only
    assert recipes["rm-prm"]["rm"]["max_steps"] == 48 and recipes["rm-prm"]["rm"]["scorer"] == "lm"
    # the PRM and the ORM sample the same seeded solutions, each into its own folder, side by side
    assert recipes["rm-orm"]["rm"]["data"]["cache_dir"] == str(tmp_path / "orm" / "rm_samples")
    assert {k: v for k, v in recipes["rm-orm"]["rm"]["data"].items() if k != "cache_dir"} == \
        {k: v for k, v in recipes["rm-prm"]["rm"]["data"].items() if k != "cache_dir"}
    assert recipes["rm-orm"]["run"]["seed"] == recipes["rm-prm"]["run"]["seed"]
    rl = recipes["rl-prm-dense-s1"]
    assert rl["run"]["seed"] == 1 and rl["rl"]["epochs"] == 1 and rl["tracking"]["wandb"] == "disabled"
    assert rl["model"]["reward_model"] == str(tmp_path / "prm" / "reward_model")
    assert recipes["rl-outcome-gt-s0"]["model"]["reward_model"] is None
    # the oracle and the control read no reward model and are dense like the PRM run
    for arm, source in [("rl-exact-dense-s1", "exact"), ("rl-confidence-dense-s1", "confidence")]:
        assert recipes[arm]["reward"]["source"] == source and recipes[arm]["reward"]["mode"] == "dense"
        assert recipes[arm]["model"]["reward_model"] is None and recipes[arm]["run"]["seed"] == 1
        assert recipes[arm]["reward"]["dense_form"] == rl["reward"]["dense_form"]
    # same sample budget, seed and learning settings for the five RL runs
    keys = ["epochs", "problems_per_epoch", "samples_per_problem", "prompts_per_iteration", "ppo_epochs",
            "learning_rate", "temperature", "eval_n_max", "eval_num_problems"]
    assert len(demo.RL_RUNS) == 5
    assert len({tuple(recipes[f"{n}-s0"]["rl"][k] for k in keys) for n, _, _ in demo.RL_RUNS}) == 1
    assert {recipes[f"{n}-s0"]["run"]["threads"] for n, _, _ in demo.RL_RUNS} == {1}
    # the start at T=0.7: the starting generator, its own run name, one thread like every lane stage
    t07, t1 = recipes["bon-start-t07-s1"], recipes["bon-start-s1"]
    assert t07["eval"]["temperature"] == 0.7 and t1["eval"]["temperature"] == 1.0
    assert t07["model"]["generator"] == t1["model"]["generator"] == str(tmp_path / "prepare" / "generator")
    assert t07["run"]["name"] == "bon-start-t07" and t07["run"]["threads"] == 1
    # out of distribution: the start on longer chains than it trained on (its recipe's task settings), demo budgets
    ood = recipes["bon-ood-s1"]
    assert ood["task"]["arithmetic"]["min_ops"] == 4 > recipes["prepare"]["task"]["arithmetic"]["max_ops"]
    assert ood["model"]["generator"] == t1["model"]["generator"] and ood["run"]["seed"] == 1
    assert ood["eval"]["n_max"] == t07["eval"]["n_max"] and ood["eval"]["num_problems"] == t07["eval"]["num_problems"]
    assert ood["eval"]["reward_models"] == t1["eval"]["reward_models"] and ood["run"]["threads"] == 1
    # the paper's Figure 3 wants N up to 64 on the start at T=1; the other best-of-N stages keep the demo's 16
    assert (t1["eval"]["n_max"], t1["eval"]["num_problems"]) == (64, 64) and t07["eval"]["n_max"] == 16
    assert recipes["bon-prm-dense-s0"]["eval"]["n_max"] == 16
    # a caller's own setting still wins over the stage's (the end-to-end test's toy budgets)
    toy = {s.name: yaml.safe_load(s.key) for s in demo.build_stages(tmp_path, extra={"bon": ["eval.n_max=4"]})}
    assert toy["bon-start-s0"]["eval"]["n_max"] == 4 and toy["bon-start-s0"]["eval"]["num_problems"] == 64
    by_name = {s.name: s for s in stages}
    assert by_name["rl-exact-dense-s0"].parallel and by_name["bon-start-t07-s0"].parallel
    assert not by_name["prepare"].parallel and by_name["rm-prm"].parallel and by_name["rm-orm"].parallel
    assert "rm-prm" not in by_name["rm-orm"].deps
    fn, args = pickle.loads(pickle.dumps(by_name["rl-confidence-dense-s0"].call))  # a lane can receive it
    assert fn is demo._rl and args[0].reward.source == "confidence"
    bon = recipes["bon-prm-dense-s0"]
    assert bon["model"]["generator"] == str(tmp_path / "seed-0" / "rl_prm_dense" / "export")
    assert set(bon["eval"]["reward_models"]) == {"prm", "orm"}
    with pytest.raises(demo.DemoError, match="--seeds"):
        demo.run_demo(tmp_path, seeds=0)


def test_the_task_group_sets_the_problems_of_every_stage(tmp_path):
    """One problem mix for the whole demo: the generator, reward models, RL and every best-of-N (the OOD stage
    keeps its longer chains but the same finals); `--set task:...` changes it everywhere."""
    finals = ["mod10", "last_digit", "none", "none"]
    recipes = {s.name: yaml.safe_load(s.key) for s in demo.build_stages(tmp_path)}
    assert {n: r["task"]["arithmetic"]["final_ops"] == finals for n, r in recipes.items()} == \
        {n: True for n in recipes}
    assert recipes["bon-ood-s0"]["task"]["arithmetic"]["min_ops"] == 4
    assert recipes["prepare"]["task"]["arithmetic"]["carry_drop_rate"] == 0.8  # the habit: prepare's data only
    assert recipes["rm-prm"]["task"]["arithmetic"]["carry_drop_rate"] == 0.0
    sets = demo.parse_sets(["task:task.arithmetic.final_ops=[none]", "rl:task.arithmetic.final_ops=[max]"])
    mine = {s.name: yaml.safe_load(s.key) for s in demo.build_stages(tmp_path, extra=sets)}
    assert mine["bon-start-s0"]["task"]["arithmetic"]["final_ops"] == ["none"]
    assert mine["rl-prm-dense-s0"]["task"]["arithmetic"]["final_ops"] == ["max"]  # a group's own wins over task


@pytest.mark.slow
def test_demo_end_to_end_tiny_budgets(tmp_path):
    """The real pipeline at toy budgets (about 75 s on 2 cores), then a re-run that skips everything."""
    sets = ["prepare:sft.steps=40", "prepare:sft.clean_steps=20", "prepare:sft.decay_start=20",
            "prepare:prepare_eval.num_problems=32",
            "prepare:prepare_eval.enforce_targets=false", "rm:rm.data.train_problems=32", "rm:rm.data.eval_problems=8",
            "rm:rm.max_steps=5", "rl:rl.epochs=1", "rl:rl.problems_per_epoch=8", "rl:rl.prompts_per_iteration=8",
            "rl:rl.eval_num_problems=8", "bon:eval.num_problems=8", "bon:eval.n_max=4"]
    summary = demo.run_demo(tmp_path, sets=sets, progress=False, log=lambda _: None)
    assert summary["status"] == "done" and [s["status"] for s in summary["stages"]] == ["ran"] * 17
    report = (tmp_path / "report" / "report.md").read_text()
    for label in ["prm_dense", "orm_sparse", "outcome_gt", "exact_dense", "confidence_dense", "start_t07"]:
        assert f"| {label} |" in report or f": {label}" in report
    for png in ["rl_curves.png", "rl_kl.png", "bon_by_generator.png", "bon_by_selector.png"]:
        assert (tmp_path / "report" / png).is_file()
    assert (tmp_path / "seed-0" / "rl_prm_dense" / "export" / "config.json").is_file()
    again = demo.run_demo(tmp_path, sets=sets, progress=False, log=lambda _: None)
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 17 and again["wall_seconds"] < 30
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


def lane_pipeline(root, fail=()):
    """a; then b, c, d side by side (b and c each waiting up to 5 s for the other to start); e after b; f must
    run alone."""
    return [lane_stage(root, "a"), lane_stage(root, "b", ["a"], 5.0, "b" in fail, partner="c"),
            lane_stage(root, "c", ["a"], 5.0, partner="b"), lane_stage(root, "d", ["a"]), lane_stage(root, "e", ["b"]),
            lane_stage(root, "f", ["c"], parallel=False)]


def test_lanes_run_stages_side_by_side_in_child_processes(tmp_path):
    records = demo.run_stages(lane_pipeline(tmp_path), tmp_path, log=lambda _: None, lanes=2)
    assert sorted(r["stage"] for r in records) == list("abcdef") and {r["status"] for r in records} == {"ran"}
    times = {n: json.loads((tmp_path / n / "times.json").read_text()) for n in "abcdef"}
    assert all(t["pid"] != os.getpid() for t in times.values())           # each in a child process
    assert len({t["pid"] for t in times.values()}) <= 2                    # the two lanes' processes, reused
    assert times["b"]["start"] < times["c"]["end"] and times["c"]["start"] < times["b"]["end"]  # b, c together
    assert times["e"]["start"] >= times["b"]["end"] and times["b"]["start"] >= times["a"]["end"]  # inputs first
    others = [t for n, t in times.items() if n != "f"]
    assert all(t["end"] <= times["f"]["start"] or t["start"] >= times["f"]["end"] for t in others)  # f alone
    assert all(r["peak_rss_mib"] > 0 and r["end"] > r["start"] for r in records)
    for n in "abcdef":
        assert json.loads((tmp_path / n / demo.MARKER).read_text())["stage"] == n
    # the same markers count whichever way they were made: a sequential re-run skips everything
    again = demo.run_stages(lane_pipeline(tmp_path), tmp_path, log=lambda _: None, lanes=1)
    assert [r["status"] for r in again] == ["skipped"] * 6


def test_lanes_give_the_same_outputs_as_one_lane(tmp_path):
    for lanes in (1, 2):
        demo.run_stages(lane_pipeline(tmp_path / str(lanes)), tmp_path / str(lanes), log=lambda _: None, lanes=lanes)
    assert all((tmp_path / "1" / n / "out.txt").read_text() == (tmp_path / "2" / n / "out.txt").read_text() == n
               for n in "abcdef")


def test_a_failure_in_a_lane_stops_the_demo_with_its_stage_name(tmp_path):
    lines = []
    with pytest.raises(demo.DemoError, match=r"stage b failed after \d+ s: RuntimeError: boom in b"):
        demo.run_stages(lane_pipeline(tmp_path, fail={"b"}), tmp_path, log=lines.append, lanes=2)
    assert (tmp_path / "c" / demo.MARKER).exists()        # the stage beside it ended and is complete
    assert not (tmp_path / "b" / demo.MARKER).exists()
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()  # nothing new started after it
    # on again: only the failed stage and what had not run
    records = demo.run_stages(lane_pipeline(tmp_path), tmp_path, log=lambda _: None, lanes=2)
    ran = {r["stage"] for r in records if r["status"] == "ran"}
    assert "b" in ran and "e" in ran and "f" in ran and "a" not in ran and "c" not in ran


def test_report_stage_reads_every_run_and_writes_the_report(tmp_path):
    stages = demo.build_stages(tmp_path, seeds=2)
    st = demo.report_stage(tmp_path, stages, 2, lambda: {})
    assert st.name == "report" and st.deps == [s.name for s in stages] and st.call is None
    assert {"report.md", "summary.json", "bon_by_generator.png"} <= set(st.outputs)
    # the OOD pools go to the OOD table, not among the generators
    layout = demo.report_layout(stages, 2)
    assert layout.ood == [tmp_path / "seed-0" / "bon_ood", tmp_path / "seed-1" / "bon_ood"]
    assert "ood" not in layout.generators and {"start", "start_t07"} <= set(layout.generators)
    assert demo.generator_name("bon-start-t07-s1") == "start_t07" and demo.generator_name("rl-exact-dense-s0") == \
        "exact_dense"
    with pytest.raises(demo.DemoError, match="--lanes"):
        demo.run_demo(tmp_path, lanes=0)


def test_demo_peak_rss_adds_lanes_that_ran_together():
    records = [{"start": 0, "end": 10, "peak_rss_mib": 100.0}, {"start": 5, "end": 20, "peak_rss_mib": 200.0},
               {"start": 20, "end": 30, "peak_rss_mib": 250.0}]
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert abs(demo.demo_peak_rss_mib(records) - (own + 300)) < 5  # 100 + 200 overlapped; 250 ran alone


def test_a_real_stage_runs_in_a_lane_and_its_error_names_it(tmp_path):
    """A built stage's recipe and job go to a spawned child as they are; here its generator is missing."""
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "config.json").write_text("{}")
    stage = next(s for s in demo.build_stages(tmp_path / "demo", generator=gen) if s.name == "bon-start-t07-s0")
    stage.deps = []
    (gen / "config.json").unlink()
    gen.rmdir()
    with pytest.raises(demo.DemoError, match=r"stage bon-start-t07-s0 failed .*FileNotFoundError: missing checkpoint"):
        demo.run_stages([stage], tmp_path / "demo", log=lambda _: None, lanes=2)
    assert not (stage.out_dir / demo.MARKER).exists()


class Dumped:
    """A stand-in recipe whose dump is the given dict, in the given key order (as a schema with moved fields)."""

    def __init__(self, tree):
        self.tree = tree

    def model_dump(self, mode="python"):
        return self.tree


def reversed_tree(tree):
    return {k: reversed_tree(v) if isinstance(v, dict) else v for k, v in reversed(list(tree.items()))}


def test_the_key_ignores_the_order_of_fields_and_sections_but_not_values(tmp_path):
    from rlprm.config import load_recipe, recipe_to_yaml

    recipe = load_recipe(demo.RECIPES / "prm_dense.yaml", ["rl.epochs=3"])
    tree = recipe.model_dump(mode="json")
    moved = Dumped(reversed_tree(tree))
    assert yaml.safe_dump(moved.tree, sort_keys=False) != recipe_to_yaml(recipe)  # the old key would change
    assert demo.canonical_settings(moved) == demo.canonical_settings(recipe)
    other = load_recipe(demo.RECIPES / "prm_dense.yaml", ["rl.epochs=1"])
    assert demo.canonical_settings(other) != demo.canonical_settings(recipe)
    assert demo.settings_diff(demo.canonical_settings(recipe), demo.canonical_settings(other)) == "rl.epochs: 3 -> 1"


def test_a_changed_setting_is_named_before_the_stage_is_redone(tmp_path):
    from rlprm.config import load_recipe

    def stages(epochs, order=lambda t: t, extra=""):
        tree = order(load_recipe(demo.RECIPES / "prm_dense.yaml", [f"rl.epochs={epochs}"]).model_dump(mode="json"))
        rec = Recorder(tmp_path)
        a = rec.stage("a", key=demo.canonical_settings(Dumped(tree)) + extra)
        return rec, [a, rec.stage("b", ["a"])]

    rec, first = stages(3)
    demo.run_stages(first, tmp_path, log=lambda _: None)
    rec, moved = stages(3, reversed_tree)
    assert [r["status"] for r in demo.run_stages(moved, tmp_path, log=lambda _: None)] == ["skipped", "skipped"]
    lines = []
    rec, changed = stages(1, extra="\n# generator files: model.safetensors:11:5")
    demo.run_stages(changed, tmp_path, log=lines.append)
    assert rec.ran == ["a", "b"]
    a_line = next(ln for ln in lines if "] a: running" in ln)
    assert "rl.epochs: 3 -> 1" in a_line and "generator files: absent -> model.safetensors:11:5" in a_line
    assert "redone input: a" in next(ln for ln in lines if "] b: running" in ln)
    # a marker written before the settings were recorded: the reason is vaguer, the stage still redone
    marker = json.loads((tmp_path / "a" / demo.MARKER).read_text())
    del marker["settings"]
    (tmp_path / "a" / demo.MARKER).write_text(json.dumps(marker))
    lines.clear()
    demo.run_stages(stages(2)[1], tmp_path, log=lines.append)
    assert "(settings changed)" in lines[0]


def test_a_marker_with_the_old_key_format_counts_and_is_rewritten(tmp_path):
    rec = Recorder(tmp_path)
    old = [demo.Stage("a", tmp_path / "a", rec.stage("a").run, "old text", [], ["out.txt"])]
    demo.run_stages(old, tmp_path, log=lambda _: None)
    new = [demo.Stage("a", tmp_path / "a", rec.stage("a").run, "canonical text", [], ["out.txt"],
                      legacy_key="old text")]
    rec.ran.clear()
    assert [r["status"] for r in demo.run_stages(new, tmp_path, log=lambda _: None)] == ["skipped"]
    assert json.loads((tmp_path / "a" / demo.MARKER).read_text())["settings"] == "canonical text"
    new[0].legacy_key = None  # the marker now holds the canonical key itself
    assert [r["status"] for r in demo.run_stages(new, tmp_path, log=lambda _: None)] == ["skipped"]
    assert rec.ran == []


def sleeper(out_dir, ignore_sigterm):
    """A lane's stage that writes its pid, then sleeps (optionally deaf to SIGTERM, as a stage busy in C code)."""
    import signal

    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (out_dir / "pid").write_text(str(os.getpid()))
    time.sleep(120)
    (out_dir / "out.txt").write_text("done")


DEMO_WITH_A_SLEEPING_LANE = """
import sys
from pathlib import Path
from rlprm.experiments import demo
from rlprm.cli import main
from tests.test_demo import lane_stage, sleeper

out, ignore = Path(sys.argv[1]), sys.argv[2] == "1"
demo.LANE_GRACE_SECONDS = 1.0

def stages(root, *args, **kwargs):
    nap = lane_stage(root, "nap", ["a"])
    nap.call = (sleeper, (root / "nap", ignore))
    return [lane_stage(root, "a"), nap]

demo.build_stages = stages
demo.report_stage = lambda root, stages, seeds, runtime: lane_stage(root, "report", [s.name for s in stages])
sys.exit(main(["demo", "--out", str(out), "--lanes", "2"]))
"""


def gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited, waiting to be reaped


@pytest.mark.parametrize("signum, ignore", [("SIGTERM", False), ("SIGHUP", True)])
def test_a_signal_to_the_demo_ends_its_lane_children_and_leaves_no_marker(tmp_path, signum, ignore):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, "-c", DEMO_WITH_A_SLEEPING_LANE, str(tmp_path), str(int(ignore))],
                              env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = tmp_path / "nap" / "pid"
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), parent.communicate(timeout=5)[0] if parent.poll() is not None else "no lane"
        time.sleep(0.2)  # the pid is written: the child is in its sleep
        child = int(pid_file.read_text())
        parent.send_signal(getattr(signal, signum))
        output = parent.communicate(timeout=30)[0]
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + getattr(signal, signum), output
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(child), f"lane child {child} still running"
    assert (tmp_path / "a" / demo.MARKER).exists() and not (tmp_path / "nap" / demo.MARKER).exists()
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["status"] == "interrupted" and signum in summary["error"]
    assert [r["stage"] for r in summary["stages"]] == ["a"]
    assert "stopping nap" in output and ("killing it" in output) == ignore


def test_a_signal_stops_a_stage_running_in_this_process_without_a_marker(tmp_path):
    import signal

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises during the sleep
        (tmp_path / "b" / "out.txt").write_text("never")

    rec = Recorder(tmp_path)
    stages = [rec.stage("a"), demo.Stage("b", tmp_path / "b", killed, "k", ["a"], ["out.txt"])]
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(demo.DemoInterrupted, match="SIGTERM") as caught, demo.stopped_by_signals():
        demo.run_stages(stages, tmp_path, log=lambda _: None)
    assert caught.value.exit_code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert (tmp_path / "a" / demo.MARKER).exists() and not (tmp_path / "b" / demo.MARKER).exists()
