import json

from rlprm.config import Recipe
from rlprm.tracking import NullTracker, Tracker, read_metrics, wandb_mode


def test_metrics_and_recipe_are_written(tmp_path):
    recipe = Recipe.model_validate({"tracking": {"wandb": "disabled"}}, context={"base_dir": tmp_path})
    with Tracker(tmp_path / "run", recipe, job="test") as tracker:
        tracker.log({"loss": 1.5, "acc": 0.25}, step=1)
        tracker.log({"loss": float("nan")}, step=2)
        tracker.summary({"final": 3})
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 1.5 and records[1]["loss"] == "nan"
    assert (tmp_path / "run" / "recipe.yaml").read_text().startswith("run:")
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"final": 3}


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"


def test_wandb_offline_run_carries_group_and_tags(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = Recipe.model_validate(
        {"run": {"name": "t"}, "tracking": {"group": "g1", "tags": ["process"]}}, context={"base_dir": tmp_path}
    )
    tracker = Tracker(tmp_path / "run", recipe, job="test", tags=["unit"])
    run = tracker.wandb_run
    assert run is not None and run.group == "g1" and set(run.tags) == {"process", "unit"}
    tracker.log({"x": 1.0}, step=0)
    tracker.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_null_tracker_answers_everything_a_tracker_does(tmp_path):
    public = {name for name in vars(Tracker) if not name.startswith("_")} | {"__enter__", "__exit__"}
    assert public <= set(dir(NullTracker))  # a rank other than 0 never meets a missing method
    with NullTracker() as null:
        null.log({"x": 1}, step=0)
        null.image("plot", tmp_path / "p.png")
        assert null.wandb_run is None


def test_image_goes_to_wandb_only_when_wandb_is_on(monkeypatch, tmp_path):
    import sys
    import types

    logged = []
    fake = types.SimpleNamespace(Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    recipe = Recipe.model_validate({"tracking": {"wandb": "disabled"}}, context={"base_dir": tmp_path})
    with Tracker(tmp_path / "run", recipe, job="test") as tracker:
        tracker.image("active_learning/plot", tmp_path / "a.png")  # W&B off: nothing to do, nothing imported
        assert tracker.wandb_run is None
        tracker._wandb = types.SimpleNamespace(log=logged.append, finish=lambda: None)  # stands in for wandb.init
        tracker.image("active_learning/plot", tmp_path / "a.png")
    assert logged == [{"active_learning/plot": ("image", str(tmp_path / "a.png"))}]
