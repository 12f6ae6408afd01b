"""Bad input as a new user gives it (issue 24): every case exits with its code (2: bad input), says on its first
line which key, file or line is wrong, fails within seconds, and leaves the output folder as it was.

Each case calls `rlprm.cli.main` in this process: a subprocess per case would pay torch's import (seconds) every
time. No case may reach a prerequisite build (it would take minutes): `_run_build` fails the test if it does. The hub
is never contacted: HF_HUB_OFFLINE is set, and the unreachable-hub case replaces the reachability probe.

`pytest tests/test_bad_input.py -s` prints each case's exit code, time and first line (the issue's note).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from rlprm import cli
from rlprm import prerequisites as pre
from tests.conftest import EMPTY_SAFETENSORS

ROOT = Path(__file__).resolve().parents[1]

BASE = {"run": {"output_dir": "./out", "device": "cpu", "threads": 1}, "tracking": {"wandb": "disabled"}}

PRM800K_LINE = {"question": {"problem": "1 + 1", "pre_generated_steps": ["1 + 1 = 2", "# Answer\n\n2"]},
                "label": {"steps": [{"completions": [{"text": "1 + 1 = 2", "rating": 1}], "chosen_completion": 0}],
                          "finish_reason": "solution"}}


def _model_folder(path: Path, config=True, weights=True, tokenizer=True) -> Path:
    """The files a loader looks for (no model loads from them: every case fails before; the weights are a
    well-formed safetensors file of no tensors, which the input checks read the header of)."""
    path.mkdir(parents=True)
    for name, on, text in (("config.json", config, '{"model_type": "llama"}'), ("model.safetensors", weights, None),
                           ("tokenizer.json", tokenizer, '{"model": {}}')):
        if on and text is None:
            (path / name).write_bytes(EMPTY_SAFETENSORS)
        elif on:
            (path / name).write_text(text)
    return path


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], int]]) -> bytes:
    """A safetensors file whose header names `tensors` (name -> dtype, shape, data bytes), the data zeros."""
    header, at = {}, 0
    for name, (dtype, shape, size) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"\x00" * at


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Files every case can point at, by name: {tmp}, {out}, {base}, model folders, data files, configs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a prerequisite build started: the input should have been refused before it")

    monkeypatch.setattr(pre, "_run_build", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    t = tmp_path
    w = {"tmp": t, "out": t / "out", "base": t / "base.yaml",
         "gen": _model_folder(t / "gen"), "prm": _model_folder(t / "prm", tokenizer=False),
         "gen_no_tokenizer": _model_folder(t / "gen_no_tok", tokenizer=False),
         "gen_no_weights": _model_folder(t / "gen_no_weights", weights=False),
         "gen_bad_config": _model_folder(t / "gen_bad_config"), "gen_bad_tokenizer": _model_folder(t / "gen_bad_tok"),
         "empty": t / "empty", "a_file": t / "a_file.bin"}
    (w["gen_bad_config"] / "config.json").write_text("{}")
    # weights a copy cut short (the header describes 16 bytes of data, 8 are there), and weights that are garbage
    w["gen_cut_weights"] = _model_folder(t / "gen_cut_weights")
    (w["gen_cut_weights"] / "model.safetensors").write_bytes(safetensors_bytes({"w": ("F32", [4], 16)})[:-8])
    w["prm_garbage_weights"] = _model_folder(t / "prm_garbage_weights", tokenizer=False)
    (w["prm_garbage_weights"] / "model.safetensors").write_bytes(b"\x00" * 64)
    w["prm_bad_rm_json"] = _model_folder(t / "prm_bad_rm_json", tokenizer=False)
    (w["prm_bad_rm_json"] / "rlprm_rm.json").write_text('{"kind": "prm", ')
    (w["gen_bad_tokenizer"] / "tokenizer.json").write_text('{"model": {"vocab": {"a"')
    w["base"].write_text(yaml.safe_dump(BASE))
    w["binary"] = t / "data.jsonl.gz"  # a compressed file given where text is read
    w["binary"].write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
    w["recipe_latin1"] = t / "latin1.yaml"
    w["recipe_latin1"].write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    w["empty"].mkdir()
    w["a_file"].write_text("x")
    files = {
        "bad_yaml": "run:\n  name: [unclosed\n",
        "a_list": "- run\n- task\n",
        "typo": "run:\n  output_dir: ./out\n  seeed: 1\n",
        "two_errors": "run:\n  seed: -1\n  output_dir: ./out\nrl:\n  epochs: 0\n",
        "problems_empty.jsonl": "",
        "problems_bad_json.jsonl": '{"problem": "1+1", "answer": "2"}\n{"problem": \n',
        "problems_no_answer.jsonl": '{"problem": "1+1"}\n',
        "problems_good.jsonl": '{"problem": "1+1", "answer": "2"}\n',
        "lfs_stub.jsonl": "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n",
        "ds_stage7.json": json.dumps({"zero_optimization": {"stage": 7}}),
        "ds_zero2.json": json.dumps({"zero_optimization": {"stage": 2}}),
        "ds_not_json.json": "{stage: 2",
        "prm800k_bad.jsonl": json.dumps(PRM800K_LINE) + "\n" + '{"question": {}}\n',
        "prm800k_good.jsonl": json.dumps(PRM800K_LINE) + "\n",
        "processbench_bad.json": '[{"problem": "x", "steps": ["a"], "label": -1},\n  {"problem": }]',
        "processbench_not_list.json": '{"problem": "x"}',
        "label_good.jsonl": json.dumps(PRM800K_LINE) + "\n",
        "label_mixed.jsonl": "".join(json.dumps({"question": {"problem": p, "pre_generated_steps": steps}}) + "\n"
                                     for p, steps in (("93 +3 -4 mod 10", ["93 + 3 = 96", "# Answer\n\n2"]),
                                                      ("What is 1 + 1?", ["1 + 1 = 2", "# Answer\n\n2"]))),
        "label_two_in_one.jsonl": json.dumps({"question": {"problem": "93 +3 -4 mod 10", "pre_generated_steps": [
            "93 + 3 = 96\n96 - 4 = 92", "# Answer\n\n2"]}}) + "\n",
    }
    for name, text in files.items():
        path = t / (name if "." in name else name + ".yaml")
        path.write_text(text)
        w[name.split(".")[0]] = path
    ckpt = t / "finished" / "checkpoints"
    (ckpt / "epoch-0001").mkdir(parents=True)
    (ckpt / "epoch-0001" / "state.pt").write_text("")
    (ckpt / "latest").write_text("epoch-0001\n")
    w["finished"] = t / "finished"
    return w


def _snapshot(folder: Path):
    return None if not folder.exists() else sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns)
                                                  for p in folder.rglob("*"))


TIMES: list[tuple[str, int, float, str]] = []


def fails(capsys, world, argv, code=2, first=(), out=None, limit=20.0):
    """Run `rlprm ARGV` in this process; assert its exit code, that the first line of stderr holds each of `first`
    (formatted with the world's paths), the time, and that `out` (default {out}) is unchanged."""
    argv = [str(a).format(**world) for a in argv]
    out = Path(str(out or world["out"]).format(**world))
    before = _snapshot(out)
    t0 = time.monotonic()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err
    line = err.strip().splitlines()[0] if err.strip() else ""
    TIMES.append((" ".join(argv[:1]), rc, seconds, line[:160]))
    case = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(f"\n[{rc}] {seconds:5.2f} s  {case}  rlprm {' '.join(a.replace(str(world['tmp']), 'TMP') for a in argv)}"
          f"\n      {line.replace(str(world['tmp']), 'TMP')[:240]}")
    assert rc == code, err
    assert line.startswith("error: "), err
    for text in first:
        assert text.format(**world) in line, err
    assert _snapshot(out) == before, f"{out} changed"
    assert seconds < limit, f"took {seconds:.1f} s"
    return err


# --------------------------------------------------------------------------- the recipe and its overrides

RECIPE_CASES = {
    "recipe_missing": (["check", "{tmp}/nope.yaml"], ["recipe not found: {tmp}/nope.yaml"]),
    # row 15: a shipped recipe runs by name; a name one letter off says which ones ship
    "shipped_recipe_name_typo": (["train-rl", "prm_dens"], ["recipe not found: prm_dens", "did you mean prm_dense?"]),
    "recipes_takes_no_argument": (["recipes", "prm_dense"], ["rlprm recipes: unrecognized arguments: prm_dense"]),
    "yaml_syntax": (["check", "{bad_yaml}"], ["{bad_yaml}:3: not valid YAML", "at line 2"]),
    "recipe_a_list": (["check", "{a_list}"], ["{a_list}: a recipe must be a mapping"]),
    "recipe_not_utf8": (["check", "{recipe_latin1}"], ["{recipe_latin1}: not UTF-8 text"]),
    "unknown_key_in_file": (["check", "{typo}"], ["{typo}:3: run.seeed: unknown key. Did you mean `run.seed`?"]),
    "two_problems_at_once": (["check", "{two_errors}"], ["{two_errors}: 2 problem(s)"]),
    "override_typo": (["check", "{base}", "run.seeed=1"], ["command-line override `run.seeed=1`: run.seeed: unknown"]),
    "override_without_equals": (["check", "{base}", "run.seed"], ["override 'run.seed': expected key=value"]),
    "override_into_a_value": (["check", "{base}", "run.device.x=1"], ["`run.device` is a value, not a section"]),
    "override_makes_a_section_of_a_value": (["check", "{base}", "run.seed.x=1"],
                                            ["command-line override `run.seed.x=1`: run.seed: expected an integer"]),
    "wrong_type": (["check", "{base}", "rl.epochs=many"], ["`rl.epochs=many`: rl.epochs: expected an integer"]),
    "out_of_range": (["check", "{base}", "rl.learning_rate=0"], ["rl.learning_rate: must be > 0"]),
    "not_a_choice": (["check", "{base}", "reward.mode=dens"], ["reward.mode: 'dens' is not one of dense, sparse"]),
    "removed_key": (["check", "{base}", "sft.time_budget_s=60"], ["sft.time_budget_s: removed"]),
    "key_of_another_algorithm": (["check", "{base}", "rl.loss_type=dapo"],
                                 ["rl.loss_type: not a key of rl.algorithm ppo: it belongs to grpo"]),
    # rows 5 and 6: the task's template was not checked (the problem text silently dropped, or an IndexError)
    "task_template_without_problem": (["check", "{base}", "task.prompt_template=Solve this"],
                                      ["task.prompt_template 'Solve this' does not contain `{{problem}}`"]),
    "task_template_other_field": (["check", "{base}", 'task.prompt_template="{{question}}"'],
                                  ["task.prompt_template '{{question}}' must contain `{{problem}}` and no other"]),
    "task_template_literal_braces": (["check", "{base}", "task.prompt_template='{{problem}} \\boxed{{}}'"],
                                     ["task.prompt_template", "no other `{{...}}` fields"]),
    "rm_template_without_problem": (["check", "{base}", "rm.prompt_template=Solve"], ["prompt_template 'Solve'"]),
    # row 11: a GRPO group of one has zero advantages
    "grpo_group_of_one": (["check", "{base}", "rl.algorithm=grpo", "rl.samples_per_problem=1"],
                          ["rl.samples_per_problem is GRPO's group size and must be at least 2"]),
    # row 8: a DeepSpeed config with a stage DeepSpeed does not have failed inside every rank
    "deepspeed_stage_7": (["check", "{base}", "deepspeed={ds_stage7}"],
                          ["deepspeed: {ds_stage7}: zero_optimization.stage is 7; DeepSpeed's ZeRO stages are 0, 1, 2, 3"]),
    "deepspeed_not_json": (["check", "{base}", "deepspeed={ds_not_json}"], ["deepspeed: {ds_not_json}:1: not valid JSON"]),
    "deepspeed_missing": (["check", "{base}", "deepspeed=./ds.json"], ["deepspeed: file not found: {tmp}/ds.json"]),
    "dense_without_step_scores": (["check", "{base}", "reward.mode=dense"], ["reward: dense rewards need a score per step"]),
    "real_task_without_files": (["check", "{base}", "task.name=math"], ["task: task `math` reads problems from files"]),
    "adapter_of_no_model": (["check", "{base}", "eval.reward_model_adapters={{x: qwen_prm}}"],
                            ["eval: reward_model_adapters names x, not in eval.reward_models"]),
    # rows 1 and 2: a relative path without ./, one letter off, reached the hub as a repo id (a 96-line traceback)
    "generator_path_typo": (["train-rl", "{base}", "model.generator=runs/gen/generatr"],
                            ["model.generator: runs/gen/generatr is neither a folder nor a hub id"]),
    "reward_model_path_typo": (["train-rl", "{base}", "model.generator={gen}", "reward.source=prm",
                                "model.reward_model=runs/arith_prm/reward_modl"],
                               ["model.reward_model: runs/arith_prm/reward_modl is neither a folder nor a hub id"]),
    "eval_reward_model_path_typo": (["eval", "{base}", "eval.reward_models={{prm: runs/prm/rm}}"],
                                    ["eval.reward_models.prm: runs/prm/rm is neither a folder nor a hub id"]),
    # row 10: the wrong command for the recipe exited 3 ("missed targets")
    "prepare_with_an_rl_recipe": (["prepare", ROOT / "recipes" / "prm_dense.yaml", "run.output_dir={out}"],
                                  ["prm_dense.yaml: model.generator is", "is this another command's recipe?"]),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_and_override_errors(case, world, capsys):
    argv, first = RECIPE_CASES[case]
    if case == "prepare_with_an_rl_recipe":
        first = [first[0], "Is this another command's recipe?"]
    fails(capsys, world, argv, first=first)


# --------------------------------------------------------------------------- models: folders and hub ids

RL = ["train-rl", "{base}", "reward.source=prm", "reward.mode=sparse"]

MODEL_CASES = {
    # row 16: on a fresh clone the missing generator was built (minutes) before this was refused
    "empty_reward_model_folder": (["train-rl", ROOT / "recipes" / "prm_dense.yaml", "run.output_dir={out}",
                                   "model.reward_model={empty}"],
                                  ["model.reward_model: {empty} is not a model folder (no config.json) and is empty"]),
    # row 7: a traceback suggesting to install sentencepiece
    "generator_without_tokenizer": ([*RL, "model.generator={gen_no_tokenizer}", "model.reward_model={prm}"],
                                    ["model.generator: {gen_no_tokenizer} has weights but no tokenizer files"]),
    "generator_is_a_file": ([*RL, "model.generator={a_file}", "model.reward_model={prm}"],
                            ["model.generator: {a_file} is a file, not a model folder"]),
    "generator_without_weights": ([*RL, "model.generator={gen_no_weights}", "model.reward_model={prm}"],
                                  ["model.generator: {gen_no_weights} has a config.json but no weights"]),
    # weights cut short or garbage were found only by the load (train-rl: a traceback), read here from the header
    "generator_weights_cut_short": ([*RL, "model.generator={gen_cut_weights}", "model.reward_model={prm}"],
                                    ["model.generator: {gen_cut_weights}/model.safetensors is 78 bytes but its "
                                     "header describes 86: truncated"]),
    "eval_reward_model_weights_garbage": (["eval", "{base}", "model.generator={gen}",
                                           "eval.reward_models={{prm: {prm_garbage_weights}}}"],
                                          ["eval.reward_models.prm: {prm_garbage_weights}/model.safetensors is not a "
                                           "readable safetensors file"]),
    "reward_model_description_truncated": ([*RL, "model.generator={gen}", "model.reward_model={prm_bad_rm_json}"],
                                           ["model.reward_model: {prm_bad_rm_json}/rlprm_rm.json is not valid JSON"]),
    # row 16: the algorithm's own refusals came after the prerequisites were built (minutes)
    "grpo_minibatch_does_not_divide": (["train-rl", ROOT / "recipes" / "grpo_outcome.yaml", "run.output_dir={out}",
                                        "rl.minibatch_size=3"],
                                       ["rl.minibatch_size (3) must divide rl.prompts_per_iteration x"]),
    "rejection_sampling_dense": (["train-rl", ROOT / "recipes" / "rejection_sampling.yaml", "run.output_dir={out}",
                                  "reward.mode=dense"], ["reward.mode is dense, but rejection sampling ranks whole"]),
    "grpo_with_deepspeed": (["train-rl", ROOT / "recipes" / "grpo_outcome.yaml", "run.output_dir={out}",
                             "deepspeed={ds_zero2}"], ["deepspeed: rl.algorithm grpo takes no"]),
    "generator_config_without_model_type": ([*RL, "model.generator={gen_bad_config}", "model.reward_model={prm}"],
                                            ["model.generator: {gen_bad_config}/config.json has no `model_type`"]),
    "generator_tokenizer_truncated": ([*RL, "model.generator={gen_bad_tokenizer}", "model.reward_model={prm}"],
                                      ["model.generator: {gen_bad_tokenizer}/tokenizer.json is not valid JSON"]),
    "bench_without_reward_model": (["bench-prm", "{base}", "bench.processbench_paths=[{processbench_bad}]"],
                                   ["model.reward_model: not set: `rlprm bench-prm` benchmarks a PRM"]),
    "rl_prm_rewards_without_reward_model": (["train-rl", ROOT / "recipes" / "prm_dense.yaml", "run.output_dir={out}",
                                             "model.reward_model=null"],
                                            ["model.reward_model: not set, but reward.source is prm"]),
    "label_with_hub_id_offline": (["label", "{label_good}", "--out", "{out}/x.jsonl", "--with", "org/big-prm"],
                                  ["--with: org/big-prm is a Hugging Face hub id that is not in the local cache",
                                   "HF_HUB_OFFLINE is set"]),
    "value_model_missing": ([*RL, "model.generator={gen}", "model.reward_model={prm}", "rl.value_model=./critic"],
                            ["rl.value_model: {tmp}/critic does not exist (a typo?)"]),
    # row 3: 74 s of retries, then an OSError traceback
    "hub_id_offline": (["bench-prm", "{base}", "model.reward_model=Qwen/Qwen2.5-Math-PRM-7B", "reward.adapter=qwen_prm",
                        "bench.processbench_paths=[{processbench_bad}]"],
                       ["model.reward_model: Qwen/Qwen2.5-Math-PRM-7B is a Hugging Face hub id that is not in the "
                        "local cache", "HF_HUB_OFFLINE is set"]),
    "eval_generator_missing": (["eval", "{base}", "model.generator=./gen2"],
                               ["model.generator: {tmp}/gen2 does not exist"]),
    "bench_reward_model_empty": (["bench-prm", "{base}", "model.reward_model={empty}",
                                  "bench.processbench_paths=[{processbench_bad}]"],
                                 ["model.reward_model: {empty} is not a model folder"]),
    "train_rm_backbone_missing": (["train-rm", "{base}", "rm.data.source=prm800k", "rm.data.train_paths=[{prm800k_good}]",
                                   "rm.backbone=./backbone"], ["rm.backbone: {tmp}/backbone does not exist"]),
    "select_prm_missing": (["select", "{base}", "model.generator={gen}", "active.prm=./prm2"],
                           ["active.prm: {tmp}/prm2 does not exist"]),
    "active_learning_labeller_missing": (["active-learning", "{base}", "model.generator={gen}", "active.labeller=./big"],
                                         ["active.labeller: {tmp}/big does not exist"]),
    "synthetic_large_prm_missing": (["synthetic-supervision", "{base}", "model.generator={gen}",
                                     "synthetic.large_prm=./big"], ["synthetic.large_prm: {tmp}/big does not exist"]),
    "label_with_missing_prm": (["label", "{label_good}", "--out", "{out}/x.jsonl", "--with", "./nowhere"],
                               ["--with: {tmp}/nowhere does not exist"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_errors(case, world, capsys):
    argv, first = MODEL_CASES[case]
    fails(capsys, world, argv, first=first)


def test_hub_id_with_the_hub_unreachable(world, capsys, monkeypatch):
    """Row 3 without HF_HUB_OFFLINE: the probe (replaced here: no test depends on the network) finds no hub."""
    from rlprm import inputs

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(inputs, "hub_reachable", lambda *a, **k: False)
    fails(capsys, world, ["eval", "{base}", "model.generator={gen}", "eval.reward_models={{prm: org/some-prm}}"],
          first=["eval.reward_models.prm: org/some-prm is a Hugging Face hub id that is not in the local cache",
                 "cannot be reached"])


# --------------------------------------------------------------------------- data files of every loader

MATH = ["eval", "{base}", "task.name=math", "model.generator={gen}"]

DATA_CASES = {
    # row 4: a traceback (ValueError: an empty pool) and pool.jsonl, metrics.jsonl, recipe.yaml left behind
    "eval_empty_test_file": ([*MATH, "task.test_path={problems_empty}"],
                             ["task.test_path: {problems_empty} has no problems"]),
    # row 12: eval with bad data wrote recipe.yaml and metrics.jsonl first
    "eval_test_file_bad_json": ([*MATH, "task.test_path={problems_bad_json}"],
                                ["task.test_path: {problems_bad_json}:2: not valid JSON"]),
    "eval_test_file_no_answer": ([*MATH, "task.test_path={problems_no_answer}"],
                                 ["task.test_path: {problems_no_answer}:1: needs string fields"]),
    "eval_test_file_compressed": ([*MATH, "task.test_path={binary}"], ["task.test_path: {binary}:1: not UTF-8 text"]),
    "label_input_compressed": (["label", "{binary}", "--out", "{out}/x.jsonl"], ["{binary}:1: not UTF-8 text"]),
    "bench_processbench_compressed": (["bench-prm", "{base}", "model.reward_model={prm}",
                                       "bench.processbench_paths=[{binary}]"],
                                      ["bench.processbench_paths: {binary}: not UTF-8 text"]),
    "train_rm_prm800k_compressed": (["train-rm", "{base}", "rm.data.source=prm800k", "rm.backbone=tiny",
                                     "rm.data.train_paths=[{binary}]"], ["{binary}:1: not UTF-8 text"]),
    "eval_test_file_missing": ([*MATH, "task.test_path=./test.jsonl"], ["task.test_path: file not found: {tmp}/test.jsonl"]),
    "rl_train_file_lfs_stub": (["train-rl", "{base}", "task.name=math", "model.generator={gen}",
                                "task.test_path={problems_good}", "task.train_path={lfs_stub}"],
                               ["task.train_path: {lfs_stub} is a Git LFS pointer stub"]),
    # row 16 for train-rm: its own refusals came after its generator was built
    "train_rm_lora_and_frozen_backbone": (["train-rm", ROOT / "recipes" / "prm_train.yaml", "run.output_dir={out}",
                                           "rm.scorer=head", "rm.freeze_backbone=true", "model.lora.enabled=true"],
                                          ["rm.freeze_backbone and model.lora.enabled both limit what trains"]),
    "train_rm_processbench_bad_json": (["train-rm", "{base}", "rm.data.source=prm800k", "rm.backbone=tiny",
                                        "rm.data.train_paths=[{prm800k_good}]",
                                        "rm.data.processbench_paths=[{processbench_bad}]"],
                                       ["rm.data.processbench_paths: {processbench_bad}:2: not valid JSON"]),
    "bench_processbench_not_a_list": (["bench-prm", "{base}", "model.reward_model={prm}",
                                       "bench.processbench_paths=[{processbench_not_list}]"],
                                      ["bench.processbench_paths: {processbench_not_list}: expected a JSON list"]),
    "bench_prm800k_bad_line": (["bench-prm", "{base}", "model.reward_model={prm}", "bench.prm800k_paths=[{prm800k_bad}]"],
                               ["bench.prm800k_paths: {prm800k_bad}:2:"]),
    "label_input_bad_line": (["label", "{problems_good}", "--out", "{out}/x.jsonl"],
                             ["{problems_good}:1: no `question.pre_generated_steps`"]),
    "label_input_missing": (["label", "./nope.jsonl", "--out", "{out}/x.jsonl"], ["nope.jsonl: file not found"]),
    # the checker on a line it cannot label named neither the file nor the line
    "label_checker_not_arithmetic": (["label", "{label_mixed}", "--out", "{out}/x.jsonl"],
                                     ["{label_mixed}:2: question.problem 'What is 1 + 1?' is not an arithmetic-task "
                                      "problem", "--with PRM_DIR"]),
    "label_checker_step_holds_separator": (["label", "{label_two_in_one}", "--out", "{out}/x.jsonl"],
                                           ["{label_two_in_one}:1: question.pre_generated_steps", "step 1 ",
                                            "holds the separator '\\n'", "--sep"]),
    "compare_not_a_run": (["compare", "{empty}", "--out", "{out}"], ["{empty}: not a run folder (no metrics.jsonl)"]),
    "compare_nothing": (["compare", "--out", "{out}"], ["give run folders"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_errors(case, world, capsys):
    argv, first = DATA_CASES[case]
    fails(capsys, world, argv, first=first)


JSON_BROKEN = {"control_character": ('{"problem": "1 + 1\x01", "answer": "2"}', "Invalid control character at column 19"),
               "unterminated_string": ('{"problem": "1 + 1, "answer": "2"}', "Expecting ',' delimiter at column 22"),
               "unterminated_at_end": ('{"problem": "1 + 1', "Unterminated string starting at column 13")}
"""A JSON line each loader must report as `MESSAGE at column N`: json's own messages that end in "at" gave
"...at at column 30" (PRM800K) or a dangling "at)" (the other loaders)."""

JSON_LOADERS = {
    "problems": ["eval", "{base}", "task.name=math", "task.test_path={tmp}/broken.jsonl"],
    "prm800k": ["train-rm", "{base}", "rm.data.source=prm800k", "rm.backbone=tiny",
                "rm.data.train_paths=[{tmp}/broken.jsonl]"],
    "processbench": ["train-rm", "{base}", "rm.backbone=tiny", "rm.data.processbench_paths=[{tmp}/broken.json]"],
    "label": ["label", "{tmp}/broken.jsonl", "--out", "{out}/x.jsonl"],
    "deepspeed": ["check", "{base}", "deepspeed={tmp}/broken.json"],
}


@pytest.mark.parametrize("broken", sorted(JSON_BROKEN))
@pytest.mark.parametrize("loader", sorted(JSON_LOADERS))
def test_json_syntax_errors_name_the_column_once(loader, broken, world, capsys):
    line, message = JSON_BROKEN[broken]
    # a JSONL loader reads the broken line as line 2; a whole-file JSON (a list, or an object) sees it at line 1
    good = {"problem": "2 + 2", "answer": "4"} if loader == "problems" else PRM800K_LINE
    (world["tmp"] / "broken.jsonl").write_text(json.dumps(good) + "\n" + line)  # no newline: unterminated at the end
    whole = "[" + line if loader == "processbench" else line
    (world["tmp"] / "broken.json").write_text(whole)
    argv = JSON_LOADERS[loader]
    where = "{tmp}/broken.json:1" if loader in ("processbench", "deepspeed") else "{tmp}/broken.jsonl:2"
    column = int(message.rsplit(" ", 1)[1]) + (loader == "processbench")
    err = fails(capsys, world, argv, first=[where + ": not valid JSON (" + message.rsplit(" ", 1)[0] + f" {column})"])
    assert " at at " not in err and "at)" not in err


def test_train_rm_bad_prm800k_line_writes_nothing(world, capsys):
    """Row 12: the PRM800K files were read after recipe.yaml and an empty metrics.jsonl were written."""
    fails(capsys, world, ["train-rm", "{base}", "rm.data.source=prm800k", "rm.backbone=tiny",
                          "rm.data.train_paths=[{prm800k_bad}]"],
          first=["{prm800k_bad}:2: missing `question.problem`"], limit=60)


def inconsistent_weights(folder):
    """Weights whose header is well formed and covers the file, but whose tensor's shape needs more bytes than its
    offsets give: they pass the input checks (which read the header only) and fail the load."""
    (folder / "model.safetensors").write_bytes(safetensors_bytes({"model.norm.weight": ("F32", [32], 64)}))
    return folder


@pytest.mark.parametrize("command", ["eval", "train-rl"])
def test_a_generator_that_passes_the_checks_but_does_not_load_writes_nothing(world, capsys, char_tokenizer, command):
    """A generator folder with a valid config.json and tokenizer but corrupt weights passed every check; the load's
    SafetensorError was a traceback (exit 1) and recipe.yaml / metrics.jsonl were left in the run folder (eval;
    train-rl: a traceback too)."""
    from tests.conftest import save_tiny_generator

    inconsistent_weights(save_tiny_generator(world["tmp"] / "gen_corrupt", char_tokenizer))
    capsys.readouterr()  # save_pretrained's progress bar
    job = (["eval", "{base}", "eval.reward_models={{}}", "eval.num_problems=2", "eval.n_max=2"] if command == "eval"
           else ["train-rl", "{base}", "reward.source=ground_truth", "reward.mode=sparse"])
    fails(capsys, world, [*job, "model.generator={tmp}/gen_corrupt"],
          first=["model.generator: {tmp}/gen_corrupt does not load (SafetensorError: "], limit=60)
    assert not world["out"].exists()


def rlprm_rm_json(folder, separator):
    """An rlprm_rm.json beside a causal LM's weights: an rlprm PRM's description over a folder without its head."""
    from dataclasses import asdict

    from rlprm.reward.model import make_convention

    (folder / "rlprm_rm.json").write_text(json.dumps(asdict(make_convention("prm", separator))))
    return folder


def test_train_rl_reward_model_without_its_head_names_the_key(world, capsys, char_tokenizer):
    """A reward model folder whose weights lack the head its family reads: exit 2 naming model.reward_model (the
    loader's words named the folder but not the key), before the generator loads, nothing written."""
    from rlprm.config import load_recipe
    from tests.conftest import save_tiny_generator

    gen = save_tiny_generator(world["tmp"] / "real_gen", char_tokenizer)
    sep = load_recipe(world["base"]).task.step_separator
    headless = rlprm_rm_json(save_tiny_generator(world["tmp"] / "headless", char_tokenizer), sep)
    capsys.readouterr()
    fails(capsys, world, [*RL, f"model.generator={gen}", f"model.reward_model={headless}"],
          first=["model.reward_model: {tmp}/headless cannot be loaded as rlprm PRM: its weights have no `score` "
                 "head"], limit=60)


def test_eval_finds_a_reward_model_that_cannot_load_before_sampling(world, capsys, char_tokenizer, monkeypatch):
    """`rlprm eval` loads its reward models only after sampling every problem (minutes at scale); a folder without
    the head its family reads, or trained with another step separator, is refused before the first sample."""
    from rlprm.config import load_recipe
    from rlprm.evaluation import job
    from tests.conftest import save_tiny_generator

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before finding that a reward model cannot load")

    monkeypatch.setattr(job, "sample_pool", no_sampling)
    gen = save_tiny_generator(world["tmp"] / "real_gen", char_tokenizer)
    sep = load_recipe(world["base"]).task.step_separator
    headless = rlprm_rm_json(save_tiny_generator(world["tmp"] / "headless", char_tokenizer), sep)
    capsys.readouterr()
    fails(capsys, world, ["eval", "{base}", f"model.generator={gen}", f"eval.reward_models={{{{prm: {headless}}}}}"],
          first=["eval.reward_models.prm: {tmp}/headless cannot be loaded as rlprm PRM: its weights have no `score` "
                 "head"])
    other = rlprm_rm_json(save_tiny_generator(world["tmp"] / "other_sep", char_tokenizer), sep + "|")
    capsys.readouterr()
    fails(capsys, world, ["eval", "{base}", f"model.generator={gen}", f"eval.reward_models={{{{orm: {other}}}}}"],
          first=["eval.reward_models.orm: this reward model was trained with step separator"])


def test_a_load_failure_is_bad_input_but_running_out_of_memory_is_not(tmp_path):
    from rlprm.errors import JobInputError, loading

    with pytest.raises(JobInputError, match=f"^model.generator: {tmp_path} does not load \\(OSError: truncated\\): "
                                            "its weights may be truncated"):
        with loading("model.generator", str(tmp_path)):
            raise OSError("truncated")
    with pytest.raises(JobInputError, match="org/name does not load .*check the hub id and the network"):
        with loading("eval.reward_models.prm", "org/name"):
            raise ValueError("no such repo")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with loading("model.generator", str(tmp_path)):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


# --------------------------------------------------------------------------- run states: resume, export, demo

STATE_CASES = {
    # row 9 (and 16): --resume on a folder with no checkpoint started a whole new run (after building prerequisites)
    "resume_without_checkpoint": (["train-rl", ROOT / "recipes" / "prm_dense.yaml", "run.output_dir={out}", "--resume"],
                                  ["--resume: run.output_dir {out} does not exist, so there is nothing to resume"], None),
    "resume_into_an_empty_folder": ([*RL, "model.generator={gen}", "model.reward_model={prm}", "run.output_dir={empty}",
                                     "--resume"], ["--resume: run.output_dir {empty} has no complete checkpoint"],
                                    "{empty}"),
    "fresh_start_over_checkpoints": ([*RL, "model.generator={gen}", "model.reward_model={prm}",
                                      "run.output_dir={finished}"], ["run.output_dir {finished} already holds checkpoints"],
                                     "{finished}"),
    "export_without_checkpoint": (["export", "{empty}"], ["{empty} has no complete checkpoint"], "{empty}"),
    "export_missing_folder": (["export", "./runs/nope"], ["./runs/nope does not exist"], None),
    "demo_bad_set_group": (["demo", "--out", "{out}", "--set", "foo:x=1"], ["--set 'foo:x=1': expected GROUP:key=value"],
                           None),
    "demo_set_typo": (["demo", "--out", "{out}", "--set", "prepare:sft.stepz=1"],
                      ["command-line override `sft.stepz=1`: sft.stepz: unknown key"], None),
    "demo_no_seeds": (["demo", "--out", "{out}", "--seeds", "0"], ["--seeds must be at least 1"], None),
    "demo_generator_not_a_model": (["demo", "--out", "{out}", "--generator", "{empty}"],
                                   ["--generator {empty}: not a model folder"], None),
    "explain_missing_recipe": (["explain", "nope.yaml"], ["recipe not found: nope.yaml"], None),
    # argparse printed its usage first and the error last; now the error is the first line, with a guess
    "unknown_command": (["trainrl", "{base}"], ["error: rlprm: argument COMMAND: invalid choice: 'trainrl'",
                                                "Did you mean `train-rl`?"], None),
    "explain_unknown_algorithm": (["explain", "--algorithm", "gpro"],
                                  ["rlprm explain: argument --algorithm: invalid choice: 'gpro'", "`grpo`"], None),
    "label_without_out": (["label", "{label_good}"], ["rlprm label: the following arguments are required: --out"],
                          None),
    "demo_seeds_not_a_number": (["demo", "--out", "{out}", "--seeds", "x"],
                                ["rlprm demo: argument --seeds: invalid int value: 'x'"], None),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_run_state_errors(case, world, capsys):
    argv, first, out = STATE_CASES[case]
    fails(capsys, world, argv, first=first, out=out)


def test_resume_or_start_is_the_explicit_way_to_start_or_resume(world):
    """Row 9: what --resume used to do on a folder without a checkpoint is asked for by name."""
    from rlprm import inputs
    from rlprm.config import load_recipe

    recipe = load_recipe(world["base"], [f"run.output_dir={world['empty']}"])
    assert inputs.resume_problem(recipe, resume=True, resume_or_start=True) is None
    assert "nothing to resume" in inputs.resume_problem(recipe, resume=True)
    args = cli._parse(["train-rl", str(world["base"]), "--resume-or-start"])
    assert args.resume_or_start and not args.resume


def test_the_suite_covers_every_command():
    cases = {**RECIPE_CASES, **MODEL_CASES, **DATA_CASES, **{k: v[:2] for k, v in STATE_CASES.items()}}
    commands = {argv[0] for argv, _ in cases.values()}
    assert commands >= set(cli.COMMANDS) - {"check"} | {"check"}
    assert len(cases) + 2 >= 40


def test_the_hub_probe_asks_the_endpoint_or_the_proxy_never_the_network_here(monkeypatch):
    """The probe behind row 3, on local sockets only: a closed endpoint is unreachable; behind a proxy, the proxy is
    what must answer (the hub's own name may not resolve there)."""
    import socket

    from rlprm import inputs

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        open_port, closed_port = listening.getsockname()[1], closed.getsockname()[1]
        assert inputs.hub_reachable(f"http://127.0.0.1:{open_port}", timeout=2)
        assert not inputs.hub_reachable(f"http://127.0.0.1:{closed_port}", timeout=2)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{open_port}")
        assert inputs.hub_reachable(f"http://127.0.0.1:{closed_port}", timeout=2)


def test_problem_files_are_parsed_once_for_the_check_and_the_job(tmp_path, monkeypatch):
    """The input check read task.train_path / test_path whole, then the job read them again (and the RL loop once
    per epoch); one parse now serves them all, and a file changed in between is read again."""
    from rlprm import inputs
    from rlprm.data import problems
    from rlprm.config import load_recipe

    reads = []
    real = problems.read_jsonl
    monkeypatch.setattr(problems, "read_jsonl", lambda path, *a: reads.append(Path(path).name) or real(path, *a))
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"problem": f"{i} + 1", "answer": str(i + 1)}) + "\n" for i in range(5)))
    test.write_text("".join(json.dumps({"question": f"{i} * 2", "answer": f"#### {2 * i}"}) + "\n" for i in range(3)))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        **BASE, "task": {"name": "math", "train_path": str(train), "test_path": str(test)},
        "rl": {"problems_per_epoch": 4, "prompts_per_iteration": 4}}))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert inputs.data_problems(recipe, "train-rl") == []
    assert sorted(reads) == ["test.jsonl", "train.jsonl"]
    held_out = problems.eval_problems(recipe, 2)
    drawn = [problems.epoch_problems(recipe, epoch, set()) for epoch in range(3)]
    assert sorted(reads) == ["test.jsonl", "train.jsonl"]  # no second read
    assert [p.gold for p in held_out] == ["0", "2"] and all(len(d) == 4 for d in drawn)
    assert {p.text for d in drawn for p in d} <= {f"{i} + 1" for i in range(5)}
    test.write_text(json.dumps({"problem": "changed", "answer": "7"}) + "\n")
    os.utime(test, ns=(1, 1))  # a different modification time even where the clock is coarse
    assert [p.text for p in problems.eval_problems(recipe, 2)] == ["changed"]
    assert sorted(reads) == ["test.jsonl", "test.jsonl", "train.jsonl"]
