"""The RL run skeleton (rlprm/rl/run.py): one resume path for every algorithm, and W&B continued, not duplicated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlprm.config import validate_recipe
from rlprm.tracking import read_metrics

from .conftest import RL_SEED

ROOT = Path(__file__).resolve().parents[1]

# the sizes of each algorithm's own tests: 2 epochs of 2 iterations (rejection sampling: one record per epoch)
RL = {
    "ppo": {"prompts_per_iteration": 2, "minibatch_size": 2, "ppo_epochs": 1, "value_learning_rate": 1e-3},
    "grpo": {"prompts_per_iteration": 2, "minibatch_size": 2, "ppo_epochs": 1},
    "rejection_sampling": {"sft_batch_size": 2, "samples_per_problem": 4},
}


def make_recipe(tmp: Path, generator: Path, out: str, algorithm: str, max_new_tokens: int = 16):
    data = {
        "run": {"output_dir": str(tmp / out), "device": "cpu", "seed": RL_SEED, "threads": 1},
        "model": {"generator": str(generator)},
        "reward": {"mode": "sparse", "source": "ground_truth"},
        "rl": {"algorithm": algorithm, "epochs": 2, "problems_per_epoch": 4, "samples_per_problem": 2,
               "max_new_tokens": max_new_tokens, "learning_rate": 1e-3, "eval_n_max": 2,
               "eval_num_problems": 2, **RL[algorithm]},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }
    return validate_recipe(data, tmp)


# SIGKILL (no finally, no atexit, nothing tidied up) right after the first training record of epoch 2 is
# written: after checkpoint 1, before checkpoint 2, with more of epoch 2 still to come
KILLER = """
import os, signal, sys
from rlprm.tracking import Tracker
log = Tracker.log
def log_then_die(self, metrics, step=None):
    log(self, metrics, step)
    if metrics.get("epoch", 0) > 1 and not any(k.startswith("eval/") for k in metrics):
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
Tracker.log = log_then_die
from rlprm.config import load_recipe
from rlprm.rl import train
train(load_recipe(sys.argv[1]), progress=False)
"""


def _full_and_killed(tmp_path, generator_dir, algorithm: str, killer: str, max_new_tokens: int = 16):
    """An uninterrupted run (its final metrics) and the recipe of a second run that `killer` SIGKILLed."""
    from rlprm.config import recipe_to_yaml
    from rlprm.rl import train

    final = train(make_recipe(tmp_path, generator_dir, "full", algorithm, max_new_tokens), progress=False)
    killed = make_recipe(tmp_path, generator_dir, "killed", algorithm, max_new_tokens)
    path = tmp_path / "killed.yaml"
    path.write_text(recipe_to_yaml(killed))
    out = subprocess.run([sys.executable, "-c", killer, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == -9, out.stderr[-2000:]
    return final, killed


def _timing(key: str) -> bool:
    # wall-clock readings: "time/...", and the HF Trainer's own that rejection sampling's SFT logs under "sft/"
    return key == "time" or key.startswith("time/") or key.endswith(("_runtime", "_per_second"))


def _strip(records):
    return [{k: v for k, v in r.items() if not _timing(k)} for r in records]


def _assert_rewards_tell_samples_apart(records, algorithm: str) -> None:
    """Every epoch's update had something to learn from: not one reward for every sample (a random tiny policy
    answers nothing, so every reward is -1, every advantage 0 and rejection sampling keeps nothing)."""
    if algorithm == "rejection_sampling":
        epochs = [r for r in records if "rs/kept" in r]
        assert len(epochs) == 2 and all(r["rs/kept"] > 0 and r["rs/sft_steps"] > 0 for r in epochs), epochs
        return
    its = [r for r in records if "rl/reward" in r]
    assert len(its) == 4
    for epoch in (1, 2):  # in each epoch: some samples answered and others not, or some right and others wrong
        assert any(0 < r["reward/missing_answer_frac"] < 1 or 0 < r["rl/answer_accuracy"] < 1
                   for r in its if epoch - 1 < r["epoch"] <= epoch), its
    if algorithm == "grpo":  # groups whose rewards differ: non-zero advantages
        assert any(r["rl/reward_std"] > 0 for r in its)


def _final_weights(run_dir: Path) -> str:
    from transformers import AutoModelForCausalLM

    from rlprm.checkpoint import latest_checkpoint
    from rlprm.rl.distributed import weights_digest

    return weights_digest(AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir) / "model"))


def _drop_optimizer_state(monkeypatch, algorithm: str) -> None:
    """The fault a resume-equality check must see: the checkpoint's weights come back, Adam's moments do not."""
    from rlprm.rl import algorithms as run_module

    real = run_module.algorithm_for

    def forgetful(recipe):
        algo = real(recipe)
        load = algo.load_state_dict
        if algorithm == "ppo":  # its KL coefficient and step count still come back; both optimizers restart
            algo.load_state_dict = lambda state: load({**state, "policy_optimizer": None, "value_optimizer": None})
        else:  # GRPO and rejection sampling keep nothing else there
            algo.load_state_dict = lambda state: None
        return algo

    monkeypatch.setattr(run_module, "algorithm_for", forgetful)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rejection_sampling"])
def test_a_killed_run_resumes_to_the_uninterrupted_log(algorithm, answering_generator, tmp_path, monkeypatch):
    """A generator that answers (some right, some wrong, some not at all), so that the updates after the resume
    depend on the restored weights and optimizer moments: the resumed run ends bit for bit where the uninterrupted
    one does (the log and the weights), and a resume that drops the optimizer state does not.
    Fails on the old code for grpo (its resumed trainer was seeded with seed + start_epoch, and the killed
    run's records after the checkpoint stayed in metrics.jsonl) and rejection_sampling (duplicate records)."""
    import shutil

    from rlprm.rl import train

    _, killed = _full_and_killed(tmp_path, answering_generator, algorithm, KILLER, max_new_tokens=64)
    run = tmp_path / "killed"
    assert (run / "checkpoints" / "epoch-0001").is_dir() and not (run / "checkpoints" / "epoch-0002").exists()
    assert any((r.get("epoch") or 0) > 1 for r in read_metrics(run / "metrics.jsonl"))  # epoch 2 had begun
    full = _strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    _assert_rewards_tell_samples_apart(full, algorithm)

    # the same killed run, resumed without its optimizer state: the check below must be able to tell
    shutil.copytree(run, tmp_path / "forgetful")
    forgetful = killed.model_copy(deep=True)
    forgetful.run.output_dir = tmp_path / "forgetful"
    with monkeypatch.context() as m:
        _drop_optimizer_state(m, algorithm)
        train(forgetful, resume=True, progress=False)
    assert _final_weights(tmp_path / "forgetful") != _final_weights(tmp_path / "full")
    if algorithm != "rejection_sampling":
        # (rejection sampling's log alone cannot see it: its epoch 2 may take a single SFT step, whose loss is
        # logged before the step; hence the weights are compared too)
        assert _strip(read_metrics(tmp_path / "forgetful" / "metrics.jsonl")) != full

    train(killed, resume=True, progress=False)
    resumed = _strip(read_metrics(run / "metrics.jsonl"))
    assert resumed == full  # the same values, each record once, in the same order
    assert _final_weights(run) == _final_weights(tmp_path / "full")
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-0002"


def test_cut_metrics_goes_back_to_the_checkpoints_length(tmp_path):
    """A checkpoint stores metrics.jsonl's length: records logged after it go, whatever their step (rejection
    sampling logs an epoch that trained nothing at the checkpoint's own step); a torn last line goes too."""
    from rlprm.tracking import cut_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "epoch": 0}\n{"step": 2, "epoch": 1}\n')
    size = path.stat().st_size
    with open(path, "a") as f:
        f.write('{"step": 2, "epoch": 2}\n{"step": 5, "sft/loss": 1.0}\n{"step": 6, "sft/lo')
    assert cut_metrics(path, 2, size) == 5  # the last step W&B was sent
    assert read_metrics(path) == [{"step": 0, "epoch": 0}, {"step": 2, "epoch": 1}]
    assert cut_metrics(path, 2, size) == 2  # nothing more to cut


def test_wandb_resume_continues_the_run_and_skips_the_steps_it_has(monkeypatch, tmp_path):
    """Offline, no key: a resumed Tracker reopens the same W&B run (its id kept in RUN_DIR/wandb_run_id) and does not
    send the steps the killed try already sent (W&B's history only grows: they would be duplicates or refused).
    Fails on the old code, which started a new W&B run on every resume and sent every step again."""
    from rlprm.config import Recipe
    from rlprm.tracking import Tracker, cut_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = Recipe.model_validate({"run": {"name": "t"}}, context={"base_dir": tmp_path})
    sent: list[int] = []

    def spy(tracker):
        real = tracker._wandb.log

        def log(values, step=None, **kw):
            sent.append(step)
            return real(values, step=step, **kw)

        tracker._wandb.log = log
        return tracker

    first = spy(Tracker(tmp_path / "run", recipe, job="rl"))
    first_id = first._wandb.id
    for step in (1, 2, 3):  # the checkpoint was written after step 1; steps 2 and 3 came before the kill
        first.log({"x": float(step)}, step=step)
    first.finish()
    seen = cut_metrics(tmp_path / "run" / "metrics.jsonl", 1)
    assert seen == 3
    second = spy(Tracker(tmp_path / "run", recipe, job="rl", resume=True, wandb_seen_step=seen))
    assert second._wandb.id == first_id
    for step in (2, 3, 4):
        second.log({"x": float(step)}, step=step)
    second.finish()
    assert sent == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


SUMMARY_KILLER = """
import os, signal, sys
from rlprm.tracking import Tracker
Tracker.summary = lambda self, values: os.kill(os.getpid(), signal.SIGKILL)  # after the last checkpoint
from rlprm.config import load_recipe
from rlprm.rl import train
train(load_recipe(sys.argv[1]), progress=False)
"""


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_summary_and_export(generator_dir, tmp_path):
    """Fails on the old code: a resume that found every epoch done trained nothing and wrote no summary."""
    import json

    from rlprm.rl import train

    final, killed = _full_and_killed(tmp_path, generator_dir, "ppo", SUMMARY_KILLER)
    run = tmp_path / "killed"
    assert (run / "checkpoints" / "epoch-0002").is_dir() and not (run / "summary.json").exists()
    resumed = train(killed, resume=True, progress=False)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("time/") and k != "export_dir"}  # noqa: E731
    assert strip(resumed) == strip(final) and resumed["rl/reward"] is not None
    assert strip(json.loads((run / "summary.json").read_text())) == strip(
        json.loads((tmp_path / "full" / "summary.json").read_text()))
    assert (run / "export" / "config.json").is_file()


@pytest.mark.parametrize("algorithm, reward, scale", [
    ("ppo", {"mode": "dense", "source": "prm", "dense_form": "min_form"}, "PRM, lowest step probability, 0..1"),
    ("grpo", {"mode": "dense", "source": "prm", "dense_form": "score"}, "PRM, min of the step probabilities"),
    ("rejection_sampling", {"mode": "sparse", "source": "ground_truth"}, "answer right 1, wrong 0"),
])
def test_every_algorithm_prints_an_epoch_line_with_process_accuracy_and_the_rewards_scale(
        tmp_path, monkeypatch, capsys, algorithm, reward, scale):
    """Issue 24: the progress lines showed answer accuracy and KL but not process accuracy, and GRPO's reward was on
    another scale than PPO's (+3.1 vs +0.29) without saying so. After each held-out evaluation every algorithm prints
    one line with the process accuracy, trace error, shortcut rate and the held-out reward with its scale."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import rlprm.evaluation.evaluate
    from rlprm.rl.run import Run

    recipe = validate_recipe({"model": {"generator": "tiny", "reward_model": "org/prm"}, "reward": reward,
                              "rl": {"algorithm": algorithm, "epochs": 3}}, tmp_path)
    metrics = {"eval/answer_accuracy": 0.5, "eval/process_accuracy": 0.25, "eval/trace_error": 0.5,
               "eval/shortcut_rate": 0.125, "eval/reward": 0.29}
    monkeypatch.setattr(rlprm.evaluation.evaluate, "between_epochs", lambda *a, **k: dict(metrics))
    dist = SimpleNamespace(is_main=True, whole_weights=lambda *m: nullcontext(), barrier=lambda: None)
    logged = []
    run = Run(recipe, True, tmp_path, dist, "cpu", None, tracker=SimpleNamespace(log=lambda r, step: logged.append(r)))
    run.evaluate(1)
    line = capsys.readouterr().out.strip()
    assert line == (f"epoch 1/3 held-out: answer 50.0%  process 25.0%  trace error 50.0%  shortcut 12.5%  "
                    f"reward +0.290 ({scale}; no answer -1)")
    assert logged == [metrics]


def test_the_epoch_line_shows_the_dropped_carry_beside_the_shortcut(tmp_path):
    """The demo's generator has two habits; the epoch line named only the shortcut, so a run's progress on the
    answer-changing one was visible only in metrics.jsonl."""
    from rlprm.rl.run import epoch_line

    recipe = validate_recipe({"model": {"generator": "tiny"}, "reward": {"mode": "sparse", "source": "ground_truth"},
                              "rl": {"epochs": 3}}, tmp_path)
    metrics = {"eval/answer_accuracy": 0.5, "eval/process_accuracy": 0.25, "eval/trace_error": 0.5,
               "eval/shortcut_rate": 0.125}
    assert "dropped carry" not in epoch_line(recipe, metrics, 1)
    line = epoch_line(recipe, {**metrics, "eval/carry_drop_rate": 0.0625}, 1)
    assert "shortcut 12.5%  dropped carry 6.2%" in line


def test_the_progress_line_shows_process_accuracy_where_the_task_checks_steps():
    from rlprm.rl.run import process_part

    assert process_part({"rl/process_accuracy": 0.412}) == "  process 41.2%"
    assert process_part({"rl/process_accuracy": None}) == ""  # MATH / GSM8K: no step checker, nothing claimed
    assert process_part({}) == ""


def test_the_rl_modules_import_no_circle():
    """rl/run.py (the skeleton) imports none of the algorithms that import it, and grpo.py and grpo_trainer.py do not
    import each other both ways: the registry (rl/algorithms.py) sits above them all. Read from the sources, every
    `rlprm.rl.*` import counted, also those inside functions."""
    import re

    rl = ROOT / "rlprm" / "rl"
    imports = {f"rlprm.rl.{p.stem}": set(re.findall(r"(?:from|import) (rlprm\.rl\.\w+)", p.read_text()))
               - {f"rlprm.rl.{p.stem}"} for p in rl.glob("*.py") if p.stem != "__init__"}
    circles = sorted((a, b) for a, deps in imports.items() for b in deps if a < b and a in imports.get(b, ()))
    assert circles == []
    assert not {"rlprm.rl.ppo", "rlprm.rl.grpo", "rlprm.rl.rejection"} & imports["rlprm.rl.run"]
