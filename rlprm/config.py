"""The recipe schema: the ONLY place that reads YAML.

One recipe file describes one whole run. It is validated here, completely,
before any model is loaded: unknown keys, wrong types, out-of-range values and
missing input files are all reported at once, each naming the key, the line of
the recipe it came from and what to do about it.

Every field carries its documentation as the docstring right under it (pydantic
turns those into field descriptions), so `rlprm explain` can print them and the
error for a bad value can quote what the field is for.

Paths in a recipe are resolved relative to the recipe file, never the current
directory, so a recipe behaves the same wherever it is launched from.

The `rl` section has one schema per algorithm (PPOConfig, GRPOConfig,
RejectionSamplingConfig), a pydantic union discriminated by `rl.algorithm`,
flat rather than nested (`rl.kl_coef`, not `rl.ppo.kl_coef`): a recipe names
one algorithm, so a nested section would only add a level to every key and
override; flat, a key of another algorithm is an unknown key of this one, and
the error says which algorithm it belongs to. Shared keys live in `RLBase`
(and PPO's and GRPO's common ones in `PolicyGradientBase`), one name per
concept: `rl.kl_coef` is the KL coefficient of both PPO and GRPO,
`rl.minibatch_size` is PPO's and GRPO's optimizer batch and
`rl.sft_batch_size` rejection sampling's, and the between-epoch evaluation is
`rl.eval_n_max` / `rl.eval_num_problems`, spelled like `eval.n_max` /
`eval.num_problems`. Keys that were renamed or removed are in
`_REMOVED_KEYS`: an old recipe fails with the new key named.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      model_validator)


class RecipeError(ValueError):
    """A recipe (or an override of it) is invalid. The message lists every problem."""


# --------------------------------------------------------------------------- paths


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = Path(os.path.expanduser(str(path)))
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(os.path.normpath(path))


def _existing_file(path: Path, info: ValidationInfo) -> Path:
    given = path
    path = _resolve(path, info)
    shipped_dir = (info.context or {}).get("shipped_dir")
    if not path.exists() and shipped_dir is not None and not Path(given).is_absolute():
        # a shipped recipe reads the files the package ships (its DeepSpeed configs) from the package
        packaged = Path(os.path.normpath(Path(shipped_dir) / os.path.expanduser(str(given))))
        if packaged.exists():
            return packaged
    if not path.exists():
        from rlprm.shipped import PATH_RULE, path_rule

        raise ValueError(f"file not found: {path} ({PATH_RULE if shipped_dir is not None else path_rule(None)})")
    return path


OutputPath = Annotated[Path, AfterValidator(_resolve)]
"""A path the run writes to; it need not exist yet."""

InputPath = Annotated[Path, AfterValidator(_existing_file)]
"""A path the run reads; it must exist when the recipe is loaded."""

ZERO_STAGES = (0, 1, 2, 3)


def _deepspeed_config(path: Path, info: ValidationInfo) -> Path:
    """An existing DeepSpeed JSON whose ZeRO stage DeepSpeed knows (it would fail later, inside every rank)."""
    path = _existing_file(path, info)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        from rlprm.files import json_problem

        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({json_problem(exc)})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    if not isinstance(zero, dict):
        raise ValueError(f"{path}: expected a JSON object with an optional `zero_optimization` object "
                         "(see deepspeed_configs/)")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"{path}: zero_optimization.stage is {stage!r}; DeepSpeed's ZeRO stages are "
                         f"{', '.join(map(str, ZERO_STAGES))} (deepspeed_configs/zero2.json and zero3.json are ready "
                         "to use)")
    return path


DeepSpeedPath = Annotated[Path, AfterValidator(_deepspeed_config)]
"""A DeepSpeed JSON config the run reads: it must exist and name a ZeRO stage DeepSpeed has."""

DataPath = Annotated[Path, AfterValidator(_resolve)]
"""A path the job reads, resolved against the recipe but checked only when the job starts.

For data that a shipped recipe cannot contain (a user's PRM800K clone): the
recipe holds a placeholder that validates, and the job says which file is
missing and which key to edit.
"""


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""What a Hugging Face repo id looks like: `org/name`, one slash."""


def _model_ref(value: str, info: ValidationInfo) -> str:
    """A model is a keyword (`tiny`), a Hugging Face id (`org/name`) or a local path.

    Values that are unmistakably paths (starting with `.`, `/` or `~`) are
    resolved against the recipe folder; they may not exist yet, because an
    earlier stage of the same pipeline can be the one that writes them. Any
    other value with a path separator is a folder if it exists (against the
    recipe folder, then the current directory); if not, it must have the shape
    of a hub id, or it is a mistyped folder and refused here: the hub would
    only answer with a traceback about repo ids, or minutes of retries.
    """
    if value.startswith((".", "/", "~")):
        return str(_resolve(Path(value), info))
    if "/" not in value and "\\" not in value:
        return value  # a keyword, or a hub id without an organisation (gpt2)
    base = (info.context or {}).get("base_dir")
    for folder in ([Path(base)] if base is not None else []) + [Path.cwd()]:
        if (folder / value).exists():
            return os.path.normpath(folder / value)
    if HUB_ID.match(value):
        return value
    where = f"the recipe folder ({base}) or" if base is not None else ""
    raise ValueError(f"{value} is neither a folder nor a hub id: there is no such folder in {where} the current "
                     f"directory ({Path.cwd()}), and a hub id is `org/name` with one slash. Fix the path (write it "
                     "as ./PATH or /abs/PATH for a folder an earlier stage will write)")


ModelRef = Annotated[str, AfterValidator(_model_ref)]

PRMAdapter = Literal["qwen_prm", "pure_prm", "math_shepherd", "rlhflow", "value_head", "implicit", "rlprm"]
"""The reward-model families `rlprm.reward.adapters.load_reward_model` reads (kept equal to its FAMILIES by a test)."""


VLLM_EXTRA = 'pip install -e ".[vllm]"'
"""The command that installs the optional vLLM rollouts (pyproject's `vllm` extra: the range TRL 1.16 supports)."""


def require_vllm(key: str) -> None:
    """Raise ValueError naming the extra when `key` chooses vllm and vllm is not installed (nothing is imported)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"{key}: vllm is not installed on this machine; install the extra with `{VLLM_EXTRA}` "
                         f"(a GPU machine), or set {key}: hf")


class Section(BaseModel):
    # validate_default: defaults go through the same validators (paths get resolved against the recipe)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True, validate_default=True)


def check_prompt_template(key: str, template: str) -> None:
    """Raise ValueError unless `template` formats with `problem` alone and uses it (else every prompt would lose
    the problem text, silently)."""
    try:
        template.format(problem="")
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{key} {template!r} must contain `{{problem}}` and no other `{{...}}` fields (the only "
                         "placeholder is {problem}; write a literal brace as `{{` or `}}`, e.g. "
                         "\\boxed{{}})") from None
    if "{problem}" not in template.replace("{{", "").replace("}}", ""):
        raise ValueError(f"{key} {template!r} does not contain `{{problem}}`, so the problem text would be dropped "
                         "from every prompt; add {problem} where the problem goes")


def _section():
    """Default for a nested section: an empty mapping, validated (so resolved) like a written one."""
    return Field(default_factory=dict)


# --------------------------------------------------------------------------- sections


class RunConfig(Section):
    name: str = "run"
    """Name of the run: the W&B run name and a label in reports."""
    output_dir: OutputPath = Path("../runs/run")
    """Folder that receives everything the run writes (metrics.jsonl, the resolved recipe, checkpoints)."""
    seed: int = Field(0, ge=0)
    """Seed for problem generation, sampling and training."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: `auto` picks CUDA when a GPU is visible, else the CPU."""
    threads: int = Field(0, ge=0)
    """torch CPU threads; 0 keeps torch's default (all cores). torch splits its float reductions by thread, so a job that must give the same numbers on another machine fixes this (with the CPU kernels rlprm pins: docs/reproducibility.md)."""


class ArithmeticConfig(Section):
    """The embedded arithmetic task (docs/design.md section 8)."""

    min_ops: int = Field(2, ge=1, le=8)
    """Fewest chain operations (+/-) before the final one."""
    max_ops: int = Field(3, ge=1, le=8)
    """Most chain operations (+/-) before the final one."""
    operations: list[Literal["+", "-"]] = ["+", "-"]
    """Chain operations to draw from."""
    operand_max: int = Field(9, ge=1, le=99)
    """Operands are drawn from 1..operand_max."""
    start_max: int = Field(99, ge=1, le=999)
    """The start value is drawn from 0..start_max."""
    value_max: int = Field(99, ge=9, le=9999)
    """Every correct intermediate value stays in 0..value_max (problems that leave it are redrawn)."""
    final_ops: list[Literal["mod10", "last_digit", "max", "min", "none"]] = ["mod10", "last_digit", "none"]
    """Final operations, each problem draws one entry uniformly (a repeated entry is drawn more often). mod10, last_digit, max and min lose information, so a wrong chain can still reach the right answer."""
    corrupt_rate: float = Field(0.2, ge=0.0, le=1.0)
    """Share of the other training solutions (those not written as a shortcut) that carry exactly one error (later steps follow consistently from the wrong value)."""
    shortcut_rate: float = Field(0.7, ge=0.0, le=1.0)
    """Share of training solutions of problems whose final operation is in `shortcut_finals` that take the last-digit shortcut: every intermediate value written as its last digit (`93 + 3 = 6`). The answer is always right and the steps are wrong: a habit the generator chooses at this rate, confidently, not a slip. 0 turns it off."""
    shortcut_finals: list[Literal["mod10", "last_digit"]] = ["mod10", "last_digit"]
    """Final operations whose problems get the shortcut (only a mod-10 style final keeps the answer right)."""
    carry_drop_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Share of training solutions of problems whose final operation is in `carry_drop_finals` (and that have a carry or borrow, and do not take the shortcut) that drop EVERY carry and borrow: `38 + 5 = 33`, `52 - 7 = 55`, the tens digit not adjusted. The whole solution takes the habit, not one step at a time, so every sample that takes it reaches the same wrong answer on a none final and majority voting agrees on it. 0 turns it off (and leaves the training data exactly as without the habit)."""
    carry_drop_finals: list[Literal["mod10", "last_digit", "max", "min", "none"]] = ["none", "max", "min"]
    """Final operations whose problems get the dropped carry: on none/max/min it changes the answer; on mod10/last_digit the answer stays right (the last digit survives), another right-answer-wrong-steps chain."""

    @model_validator(mode="after")
    def _ops_range(self) -> "ArithmeticConfig":
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops ({self.min_ops}) is larger than max_ops ({self.max_ops}); make min_ops <= max_ops")
        if self.start_max > self.value_max:
            raise ValueError(f"start_max ({self.start_max}) exceeds value_max ({self.value_max}); lower start_max")
        if self.carry_drop_rate > 0 and not set(self.carry_drop_finals) & set(self.final_ops):
            raise ValueError(f"carry_drop_rate is {self.carry_drop_rate} but no problem can take the dropped carry: "
                             f"carry_drop_finals {self.carry_drop_finals} shares no entry with final_ops "
                             f"{self.final_ops}; add one of final_ops to carry_drop_finals (or set carry_drop_rate: 0)")
        return self


class TaskConfig(Section):
    name: Literal["arithmetic", "math", "gsm8k"] = "arithmetic"
    """Which problems: the embedded arithmetic task, or MATH-style / GSM8K JSONL files."""
    arithmetic: ArithmeticConfig = _section()
    """Settings of the embedded task (used when name is `arithmetic`)."""
    train_path: DataPath | None = None
    """JSONL of training problems (MATH / GSM8K tasks). Checked when the job starts (so a recipe naming a user's clone validates anywhere)."""
    test_path: DataPath | None = None
    """JSONL of held-out problems (MATH / GSM8K tasks). Checked when the job starts."""
    step_separator: str = Field("\n", min_length=1)
    """Text between solution steps; saved with every reward model, which refuses to score with another."""
    prompt_template: str = "{problem}\n"
    """How a MATH / GSM8K problem becomes the generator's prompt (`{problem}` is replaced by its text)."""

    @model_validator(mode="after")
    def _files_for_real_tasks(self) -> "TaskConfig":
        if self.name != "arithmetic" and self.test_path is None:
            raise ValueError(f"task `{self.name}` reads problems from files: set task.test_path to a JSONL file")
        check_prompt_template("task.prompt_template", self.prompt_template)
        return self


class TinyModelConfig(Section):
    """A small causal LM built from a config on the spot (no download)."""

    architecture: Literal["llama"] = "llama"
    """Model family of the tiny model. Only llama: transformers 5 loads the tokenizer saved beside a `qwen2` model as Qwen2Tokenizer, which replaces a char-level pre-tokenizer and silently drops spaces and newlines."""
    hidden_size: int = Field(128, ge=8)
    """Width of the residual stream."""
    intermediate_size: int = Field(384, ge=8)
    """Width of the MLP."""
    num_layers: int = Field(4, ge=1)
    """Transformer blocks."""
    num_heads: int = Field(4, ge=1)
    """Attention heads (hidden_size must be divisible by it)."""
    max_positions: int = Field(256, ge=16)
    """Longest sequence the model accepts."""
    tokenizer: Literal["char", "bpe"] = "char"
    """Char-level vocabulary of the task's symbols, or a byte-level BPE trained on task text."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                "pick a hidden_size that is a multiple of num_heads"
            )
        return self


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters instead of all weights. Checkpoints hold the adapters only; the export merges them into a plain HF folder. Under PPO the frozen reference is the base with its adapters off (no second copy of the weights)."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA path. 0 by default: RL compares the policy that sampled (eval mode) with the one trained (train mode), and any dropout makes every update's first ratio differ from 1 (PPO refuses more than 0). Reward-model training may use some (recipes/prm_train_prm800k.yaml: 0.05)."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters (peft's `target_modules`)."""


class ModelConfig(Section):
    generator: ModelRef = "tiny"
    """The policy: `tiny` builds one from `model.tiny`; otherwise a Hugging Face id or a local folder."""
    tiny: TinyModelConfig = _section()
    """Shape of the tiny model when `generator` (or a reward model) is `tiny`."""
    reward_model: ModelRef | None = None
    """A trained PRM/ORM folder (or id) for scoring; none for ground-truth rewards."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Weights dtype; `auto` takes the checkpoint's own."""
    lora: LoraConfig = _section()
    """LoRA settings for the trained model."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""


class SFTConfig(Section):
    """Supervised fine-tuning of the generator (`rlprm prepare`)."""

    num_examples: int = Field(30000, ge=1)
    """Training solutions to generate (clean and corrupted mixed by task.arithmetic.corrupt_rate)."""
    steps: int = Field(700, ge=1)
    """Optimizer steps: training stops here and the learning-rate schedule (warm-up, then cosine to min_lr_ratio) is laid over them, so a slower machine trains the same number of steps. The same recipe and seed give the same generator on any x86 machine with AVX2 only with the CPU kernels pinned as rlprm pins them (and run.threads fixed): docs/reproducibility.md. Wall time is reported, never used to stop."""
    clean_steps: int = Field(0, ge=0)
    """The first this many of sft.steps train on the reference solutions alone (same problems), the rest on the recipe's mix of clean, corrupted and shortcut solutions: the arithmetic clicks sooner from consistent examples, and the habits are learned after. 0: the mix from the start."""
    batch_size: int = Field(64, ge=1)
    """Sequences per optimizer step."""
    learning_rate: float = Field(3e-3, gt=0, le=1)
    """Peak AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(30, ge=0)
    """Linear warm-up steps."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at this fraction of the peak rate."""
    decay_start: int = Field(0, ge=0)
    """The step at which the cosine decay starts; until then (after warm-up) the rate holds at its peak. 0: cosine from the end of warm-up. The demo's 1,300-step prepare decays from step 230, so that the rate at the step where the arithmetic clicks (~650) and at the switch to the mix is the 1,600-step schedule's; held at the peak through the clean steps, the arithmetic clicked but did not settle (docs/results.md, "A shorter prepare")."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    processes: int = Field(1, ge=1)
    """Processes that train together on CPU, one torch thread each, each running its share of every batch (gradients summed before each step; rlprm/experiments/sft.py). 1: this process alone, on run.threads threads. Two processes of one thread beat one process of two threads on the tiny model (benchmarks/sft_step.py); they give another generator than either (the float sums differ: docs/reproducibility.md), the same one on every run."""
    logging_steps: int = Field(25, ge=1)
    """Log the mean loss, learning rate and speed every this many steps (metrics.jsonl, W&B, the progress bar)."""

    @model_validator(mode="after")
    def _decay_within_steps(self) -> "SFTConfig":
        if self.decay_start >= self.steps:
            raise ValueError(f"decay_start ({self.decay_start}) must be below steps ({self.steps}): the rate would "
                             "never decay; lower decay_start or set it to 0 for plain cosine")
        return self


class PrepareEvalConfig(Section):
    """The check `rlprm prepare` runs on the generator before handing it on."""

    num_problems: int = Field(500, ge=1)
    """Held-out problems sampled once each."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (1.0, as RL and best-of-N use)."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest solution sampled."""
    batch_size: int = Field(256, ge=1)
    """Problems per generation batch."""
    min_well_formed: float = Field(0.95, ge=0, le=1)
    """Fail if fewer samples than this parse as a full solution."""
    min_process_accuracy: float = Field(0.30, ge=0, le=1)
    """Fail below this share of samples with every step right (too weak for RL to start from)."""
    max_process_accuracy: float = Field(0.80, ge=0, le=1)
    """Fail above this share (reward models would see too few wrong chains)."""
    enforce_targets: bool = True
    """Refuse to save the generator as `generator/` when a target is missed."""

    @model_validator(mode="after")
    def _bounds(self) -> "PrepareEvalConfig":
        if self.min_process_accuracy > self.max_process_accuracy:
            raise ValueError("min_process_accuracy exceeds max_process_accuracy; swap or widen them")
        return self


class RewardConfig(Section):
    """How a sample is scored and its scores become rewards (RL, and the held-out eval/reward), and everything needed to score with the reward model that model.reward_model names (its family and the family's options). `rm.*` is for training a reward model."""

    mode: Literal["dense", "sparse"] = "sparse"
    """`dense`: a reward at every step end from step scores (source prm, exact, confidence or python); `sparse`: one reward at the last token."""
    source: Literal["prm", "orm", "ground_truth", "exact", "confidence", "python"] = "ground_truth"
    """Who scores (rlprm/reward/sources.py): `prm` / `orm` a trained reward model (model.reward_model, family reward.adapter); `ground_truth` the grader's 1/0 on the final answer; `exact` the arithmetic task's exact step checker as an oracle PRM (steps score 1 up to the first wrong step, 0 from it on; sparse: 1 if every step is right; arithmetic task only); `confidence` the frozen starting generator's own token confidence at temperature 1 (per step exp of its lowest token log-prob; sparse: over the whole response; ppo only); `python` your own function, reward.function. exact, confidence and python load no reward model."""
    function: str | None = None
    """(source python) The reward function, "package.module:function", importable where the run starts: `f(problems: list[str], solutions: list[str], **kwargs) -> list[float]` (sparse: one score per solution) or `list[list[float]]` (dense: one score per step), every score in [0, 1]; kwargs: completion_ids, answers, sep (rlprm/reward/sources.py)."""
    dense_form: Literal["log_prob", "min_form", "delta", "score"] = "log_prob"
    """How step probabilities p_k become step rewards r_k (docs/design.md section 5; rlprm/reward/tokens.py): `log_prob` r_k = log p_k, `min_form` and `delta` shaped so that the return is the lowest p_k or the last one, `score` r_k = p_k (DeepSeekMath's process supervision; GRPO only for now)."""
    outcome_coef: float = Field(0.0, ge=0)
    """Weight of an extra ground-truth outcome reward at the last token."""
    missing_answer_reward: float = -1.0
    """Reward of a response with no final answer, or cut at rl.max_new_tokens before its EOS. Dense rewards of an answered response never return less than this plus 0.1 (their running sum is floored there, rlprm/reward/tokens.py), so not answering never pays."""
    sparse_aggregate: Literal["prod", "min", "last", "mean"] = "prod"
    """How a PRM's step probabilities become one sparse reward (`mode: sparse`, `source: prm` or `python`); `prod` is the paper's solution score."""
    adapter: PRMAdapter | None = None
    """Family of the reward model that model.reward_model names (RL rewards, `rlprm bench-prm`): `qwen_prm` (Qwen2.5-Math-PRM, <extra_0> token classification), `pure_prm` (PURE-PRM-7B and TRL PRMTrainer models: token classification at the "\\n" after each step, no chat template), `math_shepherd` (+/- logits at the ки tag), `rlhflow` (+/- at each assistant turn of a chat), `value_head` (Skywork-o1-Open-PRM, sigmoid value head), `implicit` (PRIME/EurusPRM, beta*log(pi/pi_ref) per step; needs reward.reference_model), `rlprm` (our own folders). None: detected from the checkpoint where unambiguous (rlprm_rm.json, Qwen2ForProcessRewardModel, *ForTokenClassification, a value head), else the job fails and lists these."""
    reference_model: ModelRef | None = None
    """(adapter implicit) The reference LM pi_ref of an implicit PRM: a Hugging Face id or folder."""
    implicit_beta: float = Field(0.001, gt=0)
    """(adapter implicit) beta in beta * log(pi/pi_ref); the EurusPRM cards use 0.001."""
    system_prompt: str | None = None
    """(adapter qwen_prm) The system prompt of the chat template; None: the card's "Please reason step by step, and put your final answer within \\boxed{}."."""

    @model_validator(mode="after")
    def _dense_needs_step_scores(self) -> "RewardConfig":
        if self.mode == "dense" and self.source not in ("prm", "exact", "confidence", "python"):
            raise ValueError(f"dense rewards need a score per step, but reward.source is `{self.source}` (one score "
                             "per solution); set reward.source: prm, exact, confidence or python, or reward.mode: "
                             "sparse")
        if (self.source == "python") != (self.function is not None):
            raise ValueError("reward.source python needs reward.function (\"package.module:function\")" if
                             self.source == "python" else f"reward.function is read by reward.source python only, "
                             f"but reward.source is `{self.source}`; remove it or set reward.source: python")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"reward.function {self.function!r} must read \"package.module:function\"")
        # log_prob returns are <= 0 and an answered return is floored at missing_answer_reward + 0.1 (reward/tokens.py):
        # at or above -0.1 every answered solution would return that floor, and nothing would tell them apart
        if self.mode == "dense" and self.dense_form == "log_prob" and self.missing_answer_reward >= -0.1:
            raise ValueError(f"dense_form log_prob returns log(prod p) <= 0, so missing_answer_reward must be below "
                             f"-0.1 (got {self.missing_answer_reward}); answered returns are floored 0.1 above it. "
                             "Use e.g. -1.0, or another dense_form")
        return self


ALGORITHMS = ("ppo", "grpo", "rejection_sampling")


class StepSearch(Section):
    """The keys every PRM-guided step-level search reads (rlprm/evaluation/search.py), at test time (`eval.search`) and in RL rollouts (`rl.rollout_search`)."""

    method: Literal["none", "beam", "dvts"] = "none"
    """`none`: no search. `beam`: beam search over steps. `dvts`: diverse verifier tree search."""
    width: int = Field(4, ge=1)
    """Next steps sampled per kept partial solution (the beam width M)."""
    lookahead: int = Field(0, ge=0)
    """Steps each candidate is rolled out greedily (temperature 0) before it is scored; its tokens count as generated."""
    aggregation: Literal["prod", "min", "last", "mean"] = "prod"
    """How a partial solution's step probabilities make its score (as best-of-N's PRM selectors)."""
    max_steps: int = Field(12, ge=1)
    """Steps after which a solution is finished as it is (cut)."""
    max_step_tokens: int = Field(48, ge=1)
    """Longest step; a step that writes no separator within it ends the solution."""


class RolloutSearchConfig(StepSearch):
    """Search-guided RL rollouts (rlprm/rl/search_rollouts.py): each problem's group of rl.samples_per_problem completions comes from a PRM-guided tree (shared prefixes, branching at steps) instead of independent samples. The completions are not samples of the policy (the scorer picked them): harmless for rejection sampling's SFT on selected samples, which is off-policy by design; GRPO treats them as on-policy with no importance weight, a bias towards the scorer's choices (docs/rl.md)."""

    method: Literal["none", "beam", "dvts"] = "none"
    """`none`: plain sampling. `beam`: the group is beam search's finished solutions with rl.samples_per_problem beams (each extended by `width` sampled next steps per round, the best kept by the scorer). `dvts`: rl.samples_per_problem independent subtrees, each extended by `width` next steps and continued with its best one: one completion per subtree. A search that finishes fewer distinct solutions than the group holds fills it with repeats of its best ones (logged as rs/search_short_groups)."""
    max_step_tokens: int = Field(48, ge=1)
    """Longest step; a step that writes no separator within it ends the solution. Solutions are also capped at rl.max_new_tokens."""
    scorer: Literal["reward_model", "checker", "confidence"] = "reward_model"
    """What scores partial solutions: `reward_model`, the run's model.reward_model (a PRM's step scores; an ORM's one verdict per prefix; family reward.adapter); `checker`, the arithmetic task's exact step checker (the oracle ceiling); `confidence`, the policy's own lowest token probability per step."""


class RLBase(Section):
    """What every RL algorithm reads: the schedule, sampling, the policy's optimizer, and best-of-N between epochs."""

    algorithm: Literal["ppo", "grpo", "rejection_sampling"] = "ppo"
    """The update rule; it decides which other `rl` keys exist (`rlprm explain --algorithm NAME` lists them)."""
    epochs: int = Field(3, ge=1)
    """RL epochs; best-of-N evaluation and a checkpoint follow each."""
    problems_per_epoch: int = Field(256, ge=1)
    """Prompts drawn per epoch."""
    samples_per_problem: int = Field(4, ge=1)
    """Completions per prompt (the group size for GRPO, N for rejection sampling)."""
    learning_rate: float = Field(1e-5, gt=0, le=1)
    """Policy learning rate."""
    max_new_tokens: int = Field(96, ge=1)
    """Response length cap."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature during rollouts."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm (PPO: the policy and the value model separately)."""
    eval_n_max: int = Field(4, ge=0)
    """Best-of-N between epochs: samples per held-out problem (N at most this, as eval.n_max; 0 skips the evaluation)."""
    eval_num_problems: int = Field(32, ge=1)
    """Best-of-N between epochs: held-out problems (as eval.num_problems)."""
    eval_every: int = Field(1, ge=1)
    """Best-of-N between epochs after every this many epochs; the start (epoch 0) and the last epoch are always evaluated. A value of rl.epochs or more evaluates the start and the end only (the demo, where each evaluation of 256 x 4 samples cost about as much as three updates); the per-update rates of the rollouts (rl/*) are logged either way."""
    rollout: Literal["hf", "vllm"] = "hf"
    """Who samples the rollouts (rlprm/rollout.py): `hf`, Hugging Face `generate` on the policy itself; `vllm`, a colocated vLLM engine on the same GPU (`pip install -e ".[vllm]"`), whose weights are refreshed from the policy after every update (LoRA adapters merged into a copy first). PPO recomputes every log-prob of its ratio with the policy (never the sampler's) and logs the gap as rollout/logprob_gap; GRPO uses TRL's own `use_vllm` in colocate mode. The between-epoch best-of-N samples with the same engine (GRPO: with `generate`)."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    """(rl.rollout vllm) Share of the GPU's memory the colocated vLLM engine takes for its weights and KV cache (TRL's vllm_gpu_memory_utilization); the policy, its optimizer and the other models share the rest."""

    @model_validator(mode="after")
    def _rollout_installed(self):
        if self.rollout == "vllm":
            require_vllm("rl.rollout")
        return self


class PolicyGradientBase(RLBase):
    """What PPO and GRPO share: rollout batches, passes over them in minibatches, the clipped ratio, the KL term."""

    prompts_per_iteration: int = Field(32, ge=1)
    """Prompts per rollout batch; each gets samples_per_problem completions, then one update. An epoch is ceil(problems_per_epoch / prompts_per_iteration) iterations. On several processes a total over them (each rank samples its share)."""
    ppo_epochs: int = Field(2, ge=1, le=16)
    """Passes over each rollout batch (typically 1-4; GRPO's mu)."""
    minibatch_size: int = Field(32, ge=1)
    """Sampled responses per optimizer step within a pass (a rollout batch holds prompts_per_iteration * samples_per_problem). On several processes a total over them (each rank takes minibatch_size / world; GRPO needs it to divide)."""
    clip_range: float = Field(0.2, gt=0, lt=1)
    """Policy ratio clip epsilon (typically 0.1-0.3)."""


class PPOConfig(PolicyGradientBase):
    """PPO (rl/ppo.py): a critic, GAE, and a KL penalty in the reward."""

    algorithm: Literal["ppo"] = "ppo"
    """The update rule; it decides which other `rl` keys exist (`rlprm explain --algorithm NAME` lists them)."""
    kl_coef: float = Field(0.05, ge=0)
    """KL coefficient: every response token's reward pays kl_coef times its KL estimate (rl.kl_estimator) against the reference model (the starting generator)."""
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = "k1"
    """Per-token estimate of KL(policy || reference) in the reward penalty (docs/design.md section 7; k3 is never negative)."""
    target_kl: float | None = Field(None, gt=0)
    """None: a fixed KL coefficient, rl.kl_coef. A number: start at rl.kl_coef and adapt it towards this per-token KL (Ziegler et al. 2019)."""
    kl_horizon: int = Field(10000, ge=1)
    """Samples over which the adaptive KL coefficient reacts (with target_kl)."""
    warmup_steps: int = Field(0, ge=0)
    """The policy's learning rate rises linearly to rl.learning_rate over its first this many optimizer steps (ppo_epochs x minibatches per iteration; 0: none). Adam's first steps move every weight by about the learning rate whatever the gradient's size, and on a sparse reward's noisy first gradients that cost the tiny generator 5 points of answer accuracy in the first epoch."""
    critic_warmup_passes: int = Field(0, ge=0)
    """PPO: before a fresh run's first policy update, this many passes of value-only updates (minibatches of rl.minibatch_size, plain squared error, no clipping) fit the critic to the first rollout's reward-to-go; the advantages are then computed with the fitted critic. A new value head predicts about 0 everywhere, so without this the first iterations' advantages are mostly its token-to-token noise, whitened to the size of the signal. No extra samples (the first rollout serves both); 0: none."""
    clip_range_value: float = Field(0.2, gt=0)
    """How far a value prediction may move from the rollout's (in reward units; typically 0.1-1)."""
    vf_coef: float = Field(0.5, ge=0)
    """Weight of the value loss in the summed loss (0.1-1)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per token; 1.0: rewards of a solution count fully wherever they land."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda (0: one-step TD error, 1: reward-to-go minus value)."""
    value_learning_rate: float = Field(1e-5, gt=0, le=1)
    """Learning rate of the value model (critic)."""
    whiten_advantages: bool = True
    """Standardise advantages over each rollout batch (mean 0, std 1)."""
    value_model: ModelRef = "policy"
    """Initial weights of the critic: `policy` (the generator's body with a fresh 1-output head) or an HF id / local folder. The critic is a separate model trained in all its weights, with or without model.lora.enabled (adapters go on the policy only): a LoRA critic on the policy's own base would share one set of frozen weights between two engines; make it small with rl.value_layers instead."""
    value_layers: int = Field(0, ge=0)
    """Keep only the first this many transformer layers of the critic's body (0: all). The critic's forward and backward are nearly half of a PPO update; half its layers made the embedded demo's updates about a fifth cheaper."""


class GRPOConfig(PolicyGradientBase):
    """GRPO (rl/grpo.py on TRL's GRPOTrainer): group-relative advantages, no critic, a KL term in the loss."""

    algorithm: Literal["grpo"] = "grpo"
    """The update rule; it decides which other `rl` keys exist (`rlprm explain --algorithm NAME` lists them)."""
    kl_coef: float = Field(0.04, ge=0)
    """KL coefficient: weight of the KL term in the GRPO loss (TRL's beta: its k3 estimate per token against the starting generator; DeepSeekMath used 0.04; 0 skips the reference model)."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """How TRL averages token losses: `grpo` per sequence then over sequences (length-biased), `dapo` over all tokens of the batch, `dr_grpo` by a constant, `bnpo` over the local batch's tokens."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """(sparse rewards) Divide the group-centred rewards by the group's std (`group`, DeepSeekMath), the batch's std, or not at all (`none`, Dr. GRPO). Dense (process) rewards are always normalised over the group's steps."""
    rollout_search: RolloutSearchConfig = _section()
    """Draw each prompt's group from a PRM-guided tree (beam search or DVTS over steps) instead of independent samples; off (`method: none`) by default. OFF-POLICY: the scorer chose the completions, which GRPO's ratio and group advantages then treat as samples of the policy, with no importance weight (the tree has no tractable density), so the gradient leans towards what the scorer prefers; measured on the embedded task it made GRPO much worse than plain groups (docs/results.md). HF generation only (rl.rollout hf). Logged: rl/generated_tokens per iteration."""
    process_advantage: Literal["min", "mean", "sum"] = "min"
    """(dense rewards) How each sample's step rewards become token advantages (`core.process_token_advantages`): `min`, a token's return is the lowest step reward from its step on, `mean` their mean, each normalised with the group's statistics; `sum`, the group-normalised step rewards summed from the token on (DeepSeekMath's, which a policy can farm by writing more, smaller steps: it warns). `min` cannot be farmed by step count (PURE, Cheng et al. 2025)."""

    @model_validator(mode="after")
    def _group_of_two(self) -> "GRPOConfig":
        if self.rollout_search.method != "none" and self.rollout == "vllm":
            raise ValueError("rl.rollout_search steps through HF `generate` on the policy in GRPO (TRL's vLLM engine "
                             "takes whole prompts, not steps); set rl.rollout: hf, or rl.rollout_search.method: none")
        # a group of one is its own mean: every advantage would be 0 and nothing would train
        if self.samples_per_problem < 2:
            raise ValueError(f"rl.samples_per_problem is GRPO's group size and must be at least 2 (got "
                             f"{self.samples_per_problem}): each completion's advantage is relative to the other "
                             "completions of its group")
        return self


class RejectionSamplingConfig(RLBase):
    """Rejection sampling (rl/rejection.py): sample N per problem, keep the best, one SFT pass over them."""

    algorithm: Literal["rejection_sampling"] = "rejection_sampling"
    """The update rule; it decides which other `rl` keys exist (`rlprm explain --algorithm NAME` lists them)."""
    rejection_top_k: int = Field(1, ge=1)
    """Samples kept per problem, distinct texts only: the k best by the reward model (reward.source prm/orm; a PRM's steps aggregated by reward.sparse_aggregate), or up to k that the grader accepts (reward.source ground_truth)."""
    rejection_min_score: float | None = None
    """With a reward model: keep only samples it scores at least this (0..1); none keeps the best whatever their score."""
    sample_batch_size: int = Field(128, ge=1)
    """Sequences generated at once while sampling the N per problem."""
    sft_epochs: int = Field(1, ge=1)
    """Passes of SFT (TRL's SFTTrainer, loss on the completion only) over each RL epoch's kept samples, at rl.learning_rate (constant)."""
    sft_batch_size: int = Field(32, ge=1)
    """Kept samples per SFT optimizer step; on several processes a total over them (must divide by their number)."""
    rollout_search: RolloutSearchConfig = _section()
    """Draw each problem's N samples from a PRM-guided tree (beam search or DVTS over steps) instead of N independent samples; off (`method: none`) by default. Logged: rs/generated_tokens per epoch either way, so the two can be compared at equal generated tokens."""


RL_SECTIONS: dict[str, type[RLBase]] = {"ppo": PPOConfig, "grpo": GRPOConfig, "rejection_sampling": RejectionSamplingConfig}
"""The `rl` section's schema per rl.algorithm."""


class _UnknownAlgorithm(RLBase):
    """An `rl` section whose algorithm is none of ALGORITHMS: validated against the shared keys only (the algorithm's
    own cannot be judged), so that its other problems are still reported with the bad algorithm, all at once."""

    model_config = ConfigDict(extra="ignore")


def _algorithm_of(value) -> str:
    """The tag of an `rl` mapping (ppo when unset) or section, for the discriminated union."""
    name = value.get("algorithm", "ppo") if isinstance(value, dict) else getattr(value, "algorithm", "ppo")
    return name if name in RL_SECTIONS else "unknown"


RLConfig = Annotated[
    Union[Annotated[PPOConfig, Tag("ppo")], Annotated[GRPOConfig, Tag("grpo")],
          Annotated[RejectionSamplingConfig, Tag("rejection_sampling")], Annotated[_UnknownAlgorithm, Tag("unknown")]],
    Discriminator(_algorithm_of),
]
"""The `rl` section: one schema per rl.algorithm, so a key of another algorithm is an unknown key."""


class SearchConfig(StepSearch):
    """PRM-guided step-level search at test time (rlprm/evaluation/search.py), compared with best-of-N at equal generated tokens."""

    method: Literal["none", "beam", "dvts"] = "none"
    """`none`: best-of-N only. `beam`: keep the n best partial solutions of a problem, extend each by `width` sampled next steps, rank by the scorer's aggregation over their steps so far. `dvts`: n / width independent subtrees per problem, each extended by `width` next steps and continued greedily with its best one (diverse verifier tree search)."""
    n: int = Field(8, ge=1)
    """The largest budget: beam, partial solutions kept per problem; dvts, candidates per step (n / width subtrees). The comparison runs every power of two from `width` up to n."""
    max_step_tokens: int = Field(48, ge=1)
    """Longest step; a step that writes no separator within it ends the solution. Solutions are also capped at eval.max_new_tokens."""
    scorer: str = "checker"
    """What scores partial solutions: a name in eval.reward_models (an rlprm PRM or a hub PRM family), `checker` (the arithmetic task's exact step checker: the oracle ceiling) or `confidence` (the generator's own lowest token probability per step: the baseline that could explain a gain away)."""

    @model_validator(mode="after")
    def _runnable(self) -> "SearchConfig":
        # the field types already bound method, aggregation and the sizes; the one rule across fields is DVTS's split
        # (the same as evaluation.search.check_settings, which the schema does not import: config sits below it)
        if self.method == "dvts" and (self.n % self.width or self.n < self.width):
            raise ValueError(f"dvts splits n={self.n} candidates per step into n / width subtrees of width "
                             f"{self.width}: n must be a multiple of width (e.g. n={max(self.width, self.n - self.n % self.width)})")
        return self


class EvalConfig(Section):
    n_max: int = Field(16, ge=1)
    """Largest N of best-of-N; curves are drawn at 1, 2, 4, ..., n_max."""
    num_problems: int = Field(64, ge=1)
    """Held-out problems for best-of-N."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the pool."""
    resamples: int = Field(200, ge=1)
    """Bootstrap resamples for every mean and 95% interval: each draws the problems with replacement and, within each drawn problem, N of its n_max samples; every selector is scored on the same draws (paired)."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest sampled solution."""
    batch_size: int = Field(256, ge=1)
    """Sequences generated at once."""
    reward_models: dict[str, ModelRef] = {}
    """Reward models to select with, by name: a PRM folder yields selectors `NAME_prod`, `NAME_min`, `NAME_last`, `NAME_mean`; an ORM yields `NAME`. rlprm folders and public PRMs (see reward_model_adapters) alike."""
    reward_model_adapters: dict[str, PRMAdapter] = {}
    """Family of a reward model in reward_models, by name, for public PRMs whose family cannot be detected from their files (math_shepherd, rlhflow, implicit: see rlprm/reward/adapters). Unnamed ones are detected (rlprm_rm.json, Qwen2ForProcessRewardModel, a Skywork value head). The implicit family's reference model and beta come from reward.reference_model and reward.implicit_beta."""
    aggregations: list[Literal["prod", "min", "last", "mean"]] = ["prod", "min", "last", "mean"]
    """PRM aggregations to compare (the paper uses prod)."""
    weighted_vote_by: str | None = None
    """Selector whose solution scores weight the reward-weighted majority vote; none picks the first PRM `_prod` (else the first reward-model selector; never `confidence` or `likelihood`, whose log-probabilities are no vote weights)."""
    log_samples: int = Field(64, ge=0)
    """Sampled solutions, with their per-step scores, logged as a W&B table."""
    rollout: Literal["hf", "vllm"] = "hf"
    """Who samples the pool (rlprm/rollout.py): `hf`, Hugging Face `generate`; `vllm`, a vLLM engine loaded from model.generator (`pip install -e ".[vllm]"`). The confidence and likelihood baselines are read by the HF model's teacher-forced pass under vllm; under hf the sampling loop reads them off its own logits."""
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, lt=1)
    """(eval.rollout vllm) Share of the GPU's memory the vLLM engine takes; the HF model (for the baselines) and the reward models share the rest."""
    differences: list[str] = []
    """Paired differences to report with their own 95% intervals, each `A-B` (selector A minus selector B, e.g. `prm_prod-orm`, `prm_prod-confidence`). Empty: the first PRM's `_prod` selector minus the first ORM, majority, confidence, likelihood and random (those present)."""
    search: SearchConfig = _section()
    """Step-level search (beam, DVTS) against best-of-N at equal generated tokens: search.md, search.json, search.png."""

    @model_validator(mode="after")
    def _difference_names(self) -> "EvalConfig":
        if self.rollout == "vllm":
            require_vllm("eval.rollout")
        unknown = sorted(set(self.reward_model_adapters) - set(self.reward_models))
        if unknown:
            raise ValueError(f"reward_model_adapters names {', '.join(unknown)}, not in eval.reward_models "
                             f"({', '.join(sorted(self.reward_models)) or 'none'}); use the same names")
        scorer = self.search.scorer
        if self.search.method != "none" and scorer not in ("checker", "confidence") and scorer not in self.reward_models:
            raise ValueError(f"eval.search.scorer {scorer!r} is not `checker`, `confidence` or a name in "
                             f"eval.reward_models ({', '.join(sorted(self.reward_models)) or 'none'})")
        # the selector names a pool can have (kept equal to rlprm.evaluation.evaluate's by a test): a reward model's kind is
        # known only once it is loaded, so both an ORM's `NAME` and a PRM's `NAME_AGG` are accepted here
        known = {"majority", "weighted_majority", "random", "pass@n", "confidence", "likelihood"}
        known |= set(self.reward_models) | {f"{name}_{how}" for name in self.reward_models for how in self.aggregations}
        for entry in self.differences:
            splits = [(entry[:i], entry[i + 1:]) for i, ch in enumerate(entry) if ch == "-"]
            pairs = [(a, b) for a, b in splits if a in known and b in known]
            if len(pairs) != 1 or pairs[0][0] == pairs[0][1]:
                raise ValueError(
                    f"differences entry {entry!r} must be `A-B` with two different selectors; selectors here: "
                    + ", ".join(sorted(known)))
        return self


class TrackingConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto`: online when an API key is configured, else offline (sync later with `wandb sync`)."""
    project: str = "rlprm"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); none uses your default."""
    group: str | None = None
    """W&B group, so that runs to compare line up in one view."""
    tags: list[str] = []
    """W&B tags, e.g. `process` or `outcome`."""


class RMDataConfig(Section):
    """Where reward-model training and evaluation data come from (`rlprm train-rm`)."""

    source: Literal["arithmetic", "prm800k"] = "arithmetic"
    """`arithmetic`: sample model.generator on the embedded task, label steps with the exact checker; `prm800k`: human step labels from PRM800K JSONL files."""
    train_problems: int = Field(768, ge=1)
    """(arithmetic) Training problems; each is sampled samples_per_problem times."""
    samples_per_problem: int = Field(4, ge=1)
    """(arithmetic) Generator samples per training problem, at `temperature` (uniform sampling, as the paper's ORM data)."""
    synthetic_per_problem: int = Field(0, ge=0)
    """(arithmetic) Extra solutions per training problem written by the task itself and labelled by the checker, in equal thirds: the reference solution, one with a single error, and the last-digit shortcut (another single-error one where the problem has no shortcut). Balances the generator's samples, which are mostly right or mostly one kind of wrong. 0: generator samples only."""
    eval_problems: int = Field(128, ge=1)
    """(arithmetic) Held-out problems for evaluation (drawn like `rlprm prepare`'s held-out set, so the generator never trained on them)."""
    eval_samples_per_problem: int = Field(16, ge=2)
    """(arithmetic) Samples per held-out problem; several per problem are needed to compare solutions of the same problem (blind-spot rate, best-of-N)."""
    temperature: float = Field(1.0, gt=0)
    """(arithmetic) Sampling temperature."""
    max_new_tokens: int = Field(96, ge=1)
    """(arithmetic) Longest sampled solution."""
    sample_batch_size: int = Field(256, ge=1)
    """(arithmetic) Sequences per generation batch."""
    cache_dir: OutputPath | None = None
    """(arithmetic) Folder for the labelled samples (JSONL); a re-run with the same generator and settings reuses them. None: the run folder."""
    train_paths: list[DataPath] = []
    """(prm800k) PRM800K JSONL files to train on (phase 1 and/or phase 2), e.g. a clone's prm800k/data/phase2_train.jsonl. Checked when the job starts."""
    eval_paths: list[DataPath] = []
    """(prm800k) PRM800K JSONL files to evaluate on; empty: hold out eval_fraction of the training problems."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """(prm800k) Share of training problems held out for evaluation when eval_paths is empty."""
    neutral_as: Literal["positive", "negative", "ignore", "neutral"] = "positive"
    """(prm800k) Rating 0: a positive label (the paper's choice), a negative one, no label, or a third class `neutral` (a 3-class PRM whose "correct" probability is P(correct) + P(neutral))."""
    keep_quality_control: bool = False
    """(prm800k) Keep quality-control questions (served to every labeler; dropped by default)."""
    keep_screening: bool = False
    """(prm800k) Keep initial-screening questions (dropped by default)."""
    alternatives: bool = True
    """(prm800k) Rated alternative completions of a step become extra examples: the trajectory's prefix, then the alternative, labelled at its end."""
    on_bad_line: Literal["error", "skip"] = "error"
    """(prm800k) A malformed line stops the job with file:line and the reason, or is skipped and counted."""
    max_records: int = Field(0, ge=0)
    """(prm800k) Keep at most this many training examples (0: all); for quick checks."""
    processbench_paths: list[DataPath] = []
    """ProcessBench JSON files (e.g. processbench/math.json) to evaluate the trained PRM on: first-error F1. Checked when the job starts."""
    processbench_max: int = Field(0, ge=0)
    """Evaluate on at most this many ProcessBench items per file, evenly spaced through it (0: all)."""

    @model_validator(mode="after")
    def _source_needs_files(self) -> "RMDataConfig":
        if self.source == "prm800k" and not self.train_paths:
            raise ValueError("rm.data.source is prm800k but rm.data.train_paths is empty; list PRM800K JSONL files there")
        return self


class RewardModelTrainConfig(Section):
    """Training and evaluating a reward model (`rlprm train-rm`)."""

    kind: Literal["prm", "orm"] = "prm"
    """`prm`: a label at every step end (token classification); `orm`: one logit at the last token, trained on "final answer right" (sequence classification)."""
    backbone: ModelRef = "generator"
    """Starting weights: `generator` (model.generator's checkpoint), `tiny` (a fresh model shaped by model.tiny), or a Hugging Face id / local folder."""
    prompt_template: str = "{problem}\n"
    """How a problem becomes the text in front of the first step; `{problem}` is replaced. Saved with the model."""
    data: RMDataConfig = _section()
    """Training and evaluation data."""
    scorer: Literal["head", "lm"] = "head"
    """How the reward model turns a solution into scores. `head`: a new classification head reads the hidden state at each step end (PRM) or the last token (ORM), trained with the HF Trainer (any backbone, DeepSpeed, LoRA). `lm`: the backbone stays a causal LM, trained on the labels (LM loss on positively labelled steps/solutions plus a logistic loss through its token log-probabilities), and a step's probability is sigmoid(w_min * lowest + w_mean * mean token log-probability of the step); one process, exactly rm.max_steps steps. See rlprm/reward/lm.py for why the tiny arithmetic PRM needs it."""
    lm_coef: float = Field(1.0, ge=0)
    """(scorer lm) Weight of the language-model loss on positively labelled tokens beside the logistic loss."""
    head_learning_rate: float = Field(3e-2, gt=0, le=10)
    """(scorer lm) Learning rate of the three head weights (they are few and start far from their fit)."""
    extra_layers: int = Field(0, ge=0, le=16)
    """New transformer blocks stacked on the backbone, each starting as the identity (zeroed output projections), so the step-end token can compare what was written with what the backbone expected. 0: none."""
    freeze_backbone: bool = False
    """Train only the new blocks (extra_layers), the final norm and the head; the backbone's own weights stay as they are (and backward passes get cheaper)."""
    confidence_features: bool = False
    """After training, stack the head with the backbone language model's token confidence (the lowest token log-probability in each step; in the whole solution for an ORM) in a 3-parameter logistic regression fitted on the training labels. The backbone LM is saved beside the reward model (confidence_lm/) and scoring runs it too. See rlprm/reward/model.py for why."""
    confidence_fit_examples: int = Field(4096, ge=1)
    """Training solutions the confidence stacking is fitted on (the first ones)."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the training examples (unless max_steps or time_budget_s stops training first)."""
    max_steps: int = Field(0, ge=0)
    """Stop after this many optimizer steps (0: no limit beyond epochs)."""
    time_budget_s: float = Field(0.0, ge=0)
    """Stop training after this many seconds (0: no limit)."""
    batch_size: int = Field(32, ge=1)
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(5e-4, gt=0, le=1)
    """Peak AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the optimizer steps spent warming up."""
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    max_length: int = Field(0, ge=0)
    """Longest training sequence in tokens (0: the backbone's max_position_embeddings). A longer PRM example is cut after the last step that fits; a longer ORM example is dropped. Both are counted."""
    bf16: bool = False
    """Train in bfloat16 mixed precision (GPU, or CPU with DeepSpeed)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    eval_batch_size: int = Field(64, ge=1)
    """Solutions per scoring batch during evaluation."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """A step counts as predicted wrong below this probability (step accuracy, first-error F1)."""
    logging_steps: int = Field(10, ge=1)
    """Optimizer steps between loss records in metrics.jsonl."""
    @model_validator(mode="after")
    def _template(self) -> "RewardModelTrainConfig":
        if self.scorer == "lm":
            if not self.max_steps:
                raise ValueError("rm.scorer `lm` trains for exactly rm.max_steps optimizer steps: set rm.max_steps (e.g. 300)")
            clash = [k for k, on in (("extra_layers", self.extra_layers), ("freeze_backbone", self.freeze_backbone),
                                     ("confidence_features", self.confidence_features),
                                     ("time_budget_s", self.time_budget_s)) if on]
            if clash:
                raise ValueError(f"rm.scorer `lm` does not use {', '.join('rm.' + k for k in clash)}: remove them "
                                 "(the LM scorer trains the whole backbone for rm.max_steps steps)")
        check_prompt_template("prompt_template", self.prompt_template)
        return self


class ActiveConfig(Section):
    """Active learning: surfacing convincing wrong-answer solutions for labelling (`rlprm select`, `rlprm active-learning`).

    The pool is rm.data's training split (its samples cached like `rlprm train-rm`'s), evaluation is rm.data's
    held-out split (a validation share chooses the first-error threshold, the rest is the test set), and each PRM
    is built like `rlprm train-rm` builds one from the rm settings (rm.scorer lm: the default PRM, from labels
    alone; rm.scorer head: rm.extra_layers, rm.freeze_backbone, ...), but trained for active.train_steps steps.
    """

    prm: ModelRef | None = None
    """(select) The current PRM that scores the pool: an rlprm folder or any public PRM (see reward.adapter); None: model.reward_model."""
    prm_adapter: PRMAdapter | None = None
    """(select) Family of active.prm (the families of reward.adapter); None: reward.adapter when active.prm is unset (the PRM is then model.reward_model), else detected from the checkpoint where unambiguous."""
    top_k: int = Field(2, ge=1)
    """Solutions surfaced per problem (each one is one label in the budget)."""
    convincing_fraction: float = Field(0.8, ge=0, le=1)
    """Share of the surfaced solutions that are the most convincing wrong-answer ones (highest PRM score among samples whose final answer is wrong); the paper used 0.8. Spread evenly over problems."""
    fill: Literal["uniform", "convincing"] = "uniform"
    """The other slots: `uniform` (random samples of the problem) or `convincing` (its highest-scored remaining samples, any answer: the paper's other 20%). A problem with too few wrong-answer samples fills the rest the same way."""
    aggregate: Literal["prod", "min", "last", "mean"] = "prod"
    """How step probabilities become the solution score that ranks candidates (the paper: prod)."""
    select_problems: int = Field(0, ge=0)
    """(select) Pool problems to surface solutions from (0: all of them)."""
    generation: int = Field(1, ge=0)
    """(select) The PRM800K `generation` number written on each surfaced line."""
    output: OutputPath | None = None
    """(select) The JSONL to write (PRM800K phase-2 lines, unrated); None: RUN_DIR/to_label.jsonl."""
    seed_labels: int = Field(256, ge=1)
    """(loop) Labelled solutions in the uniform seed set both strategies start from (generation 0 has no PRM to select with)."""
    labels_per_generation: int = Field(256, ge=1)
    """(loop) Solutions labelled per generation after the seed set, by each strategy (the label budget counts solutions)."""
    generations: int = Field(3, ge=1)
    """(loop) Select-label-retrain rounds after the seed set."""
    budgets: list[int] = []
    """(loop) The label budgets, cumulative, in labelled SOLUTIONS (one solution sent to the labeller is one label, whatever its steps; labelled steps are reported beside): the first is the uniform seed set every arm shares, each later one adds that many minus the previous, exactly. Empty: seed_labels + g * labels_per_generation for g = 0..generations."""
    convincing_shares: list[float] = [0.0, 0.4, 0.8, 1.0]
    """(loop) One active arm per share: the share of each generation's labels that are convincing wrong-answer solutions (the rest `fill`), the paper's phase-2 ablation; uniform selection is always run beside them. The factor's headline arm is convincing_fraction's share when listed, else the last one."""
    seeds: list[int] = Field([0], min_length=1)
    """(loop) Repeats of the whole comparison (problem order, uniform picks and PRM initialisation); the report gives mean and a bootstrap interval over seeds."""
    lanes: int = Field(1, ge=1)
    """(loop) Child processes that run the arms side by side (each arm of a seed, from the seed's shared first PRM, is one job), each with run.threads torch threads (rlprm/experiments/lanes.py). Every arm is seeded, so the numbers are those of one process with run.threads threads, whatever the lanes."""
    train_steps: int = Field(150, ge=1)
    """(loop) Optimizer steps per PRM training: the per-generation budget, in steps. Every PRM of every arm gets the same number, so only the labels differ. With rm.scorer lm each PRM is trained as `rlprm train-rm` trains the default PRM (rm.learning_rate, rm.head_learning_rate, rm.lm_coef, rm.batch_size, rm.warmup_ratio), from labels alone."""
    warmup_steps: int = Field(10, ge=0)
    """(loop, rm.scorer head only) Linear warm-up steps; the learning rate then decays linearly to 10%."""
    validation_share: float = Field(0.25, gt=0, lt=1)
    """(loop) Share of the held-out problems (the first ones) that only choose the first-error threshold (the one with the best first-error F1 there, from threshold_grid); every reported quality is on the other problems."""
    threshold_grid: list[float] = Field([round(0.05 * i, 2) for i in range(1, 20)], min_length=1)
    """(loop) Thresholds tried on the validation problems for first-error F1."""
    factor_level_share: float = Field(0.9, gt=0, le=1)
    """(loop) The quality at which the data-efficiency factor is read: uniform's first point + this share of the way to uniform's best (seed-mean curves); see rlprm/experiments/efficiency.py."""
    bootstrap_resamples: int = Field(2000, ge=100)
    """(loop) Resamples of the bootstrap over seeds (curve bands and factor intervals)."""
    eval_n: int = Field(16, ge=2)
    """(loop) N of best-of-N on the held-out pool (the first eval_n samples of each held-out problem; at most rm.data.eval_samples_per_problem)."""
    eval_aggregate: Literal["prod", "min", "last", "mean"] = "prod"
    """(loop) How best-of-N turns step probabilities into the score that picks a solution (the paper: prod; with a weak PRM, prod favours solutions with fewer steps, e.g. a skipped step, so min can be the fairer measure)."""
    labeller: ModelRef = "checker"
    """(loop) Who labels the selected solutions: `checker` (the exact checker) or a PRM, an rlprm folder or any public PRM (a large PRM supervising small ones, the paper's small-scale set-up); loaded once per run."""
    labeller_adapter: PRMAdapter | None = None
    """(loop) Family of a PRM labeller (the families of reward.adapter); None: detected from the checkpoint where unambiguous. The implicit family takes reward.reference_model and reward.implicit_beta."""
    quality_metric: Literal["best_of_n_process_accuracy", "best_of_n_answer_accuracy", "first_error_f1", "step_auroc"] = "best_of_n_process_accuracy"
    """(loop) The headline PRM quality of the report (factors are computed for every metric)."""

    @model_validator(mode="after")
    def _budgets(self) -> "ActiveConfig":
        if self.budgets and (self.budgets[0] < 1 or any(b <= a for a, b in zip(self.budgets, self.budgets[1:]))):
            raise ValueError(f"active.budgets {self.budgets} must be positive and strictly increasing (cumulative "
                             "labelled solutions, e.g. [32, 64, 128, 256])")
        bad = [s for s in self.convincing_shares if not 0 <= s <= 1]
        if bad or not self.convincing_shares:
            raise ValueError(f"active.convincing_shares {self.convincing_shares} must be a non-empty list of shares "
                             "in [0, 1], e.g. [0, 0.4, 0.8, 1.0]")
        return self


LABELLINGS = ("process_large_prm", "outcome_large_prm", "outcome_grader", "process_checker")
"""The labellings `rlprm synthetic-supervision` can train small reward models on (see SyntheticConfig.labellings)."""


class SyntheticConfig(Section):
    """Synthetic supervision (`rlprm synthetic-supervision`): a large PRM labels fresh generator samples; small reward
    models train on the same samples with different labels (the paper's small-scale section).

    The samples are rm.data's training pool (cached like `rlprm train-rm`'s); evaluation is best-of-N on rm.data's
    held-out samples with the exact checker as the reference. Every reward model is built like the default one
    (rm.scorer lm, the rm.* settings)."""

    large_prm: ModelRef | None = None
    """The large PRM that labels: an rlprm folder (e.g. runs/arith_prm/reward_model, what `rlprm train-rm recipes/prm_train.yaml` writes) or any public PRM (family large_prm_adapter). None: trained in this command on the checker-labelled samples of the first large_problems pool problems (plus rm.data.synthetic_per_problem task-written solutions each) for rm.max_steps steps, the default PRM's budget."""
    large_prm_adapter: PRMAdapter | None = None
    """Family of large_prm (the families of reward.adapter); None: detected where unambiguous."""
    large_problems: int = Field(512, ge=0)
    """The first pool problems, kept for the large PRM (its training set when trained here; with rm.data.train_problems >= 512 and the same seed they are also recipes/prm_train.yaml's 512 training problems); the fresh samples come from the problems after them."""
    problems: int = Field(256, ge=1)
    """Fresh pool problems whose samples (rm.data.samples_per_problem each) the large PRM labels and the small reward models train on."""
    labellings: list[Literal["process_large_prm", "outcome_large_prm", "outcome_grader", "process_checker"]] = \
        ["process_large_prm", "outcome_large_prm", "outcome_grader"]
    """Small reward models to train, one per labelling of the same samples: `process_large_prm` (a PRM on the large PRM's step labels, up to its first judged error), `outcome_large_prm` (an ORM: a solution is right iff the large PRM judges every step right), `outcome_grader` (an ORM on the final-answer grader's verdict), `process_checker` (a PRM on the exact checker's step labels: the ceiling)."""
    budgets: list[int] = []
    """Label budgets, in labelled SOLUTIONS, strictly increasing, the largest at most synthetic.problems x rm.data.samples_per_problem: each labelling's small reward model is trained at every budget on a random subset of that many fresh samples, drawn per seed and nested (a smaller budget's solutions are inside every larger one's), always for train_steps steps (so a small budget repeats its solutions more often, and the curve measures labels, not compute). The best-of-N curve over N is reported at the largest budget. Empty: one budget, every fresh sample (fewer if some samples were unusable: a budget above the usable samples is lowered to them)."""
    train_steps: int = Field(48, ge=1)
    """Optimizer steps of each small reward model (the same for all labellings and budgets: only the labels and their number differ)."""
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    """Training seeds of the small reward models (batch order, and the budget subsets); best-of-N pools their scores in one paired bootstrap over problems and seeds."""
    lanes: int = Field(1, ge=1)
    """Child processes that train and score the small reward models side by side, each with run.threads torch threads (rlprm/experiments/lanes.py). Every model is seeded, so the numbers are those of one process with run.threads threads, whatever the lanes; on 2 cores, 2 lanes of 1 thread take about half the wall time of 1."""
    aggregate: Literal["prod", "min", "last", "mean"] = "prod"
    """How a PRM's step probabilities become the solution score best-of-N picks by."""
    eval_n: int = Field(0, ge=0)
    """Samples per held-out problem in the best-of-N pool (problems with fewer are left out); 0: rm.data.eval_samples_per_problem."""
    resamples: int = Field(1000, ge=100)
    """Resamples of the paired bootstrap over problems and seeds (rlprm.evaluation.evaluate.bon_bootstrap)."""

    @model_validator(mode="after")
    def _budgets(self) -> "SyntheticConfig":
        b = self.budgets
        if b and (b[0] < 1 or any(y <= x for x, y in zip(b, b[1:]))):
            raise ValueError(f"synthetic.budgets {b} must be positive and strictly increasing (labelled solutions, "
                             "e.g. [64, 128, 256, 512, 1024]); [] trains on every fresh sample")
        return self


class BenchConfig(Section):
    """Benchmarking a PRM the way papers report it (`rlprm bench-prm`): model.reward_model, family reward.adapter."""

    processbench_paths: list[DataPath] = []
    """ProcessBench JSON files (e.g. gsm8k.json, math.json), one subset each: error / correct accuracy and their F1 as ProcessBench defines them, step AUROC, first-error accuracy. Checked when the job starts."""
    prm800k_paths: list[DataPath] = []
    """PRM800K JSONL files, one subset each (e.g. a clone's prm800k/data/phase2_test.jsonl, the paper's test split): each line's trajectory, without alternatives, labelled from its ratings (rm.data.neutral_as decides a 0; quality-control and screening questions are dropped unless rm.data keeps them); its gold first error is its first step labelled wrong. Lines that settle no answer to that (no wrong step, and not a finished `solution` with every step rated) are left out and counted. Checked when the job starts."""
    arithmetic_problems: int = Field(0, ge=0)
    """Held-out arithmetic problems (drawn like `rlprm prepare`'s held-out set: the generator never trained on them) on which model.generator is sampled and every step labelled by the exact checker: the subset `arithmetic`. Samples that stop before their answer step are left out and counted. 0: no such subset."""
    arithmetic_samples_per_problem: int = Field(4, ge=1)
    """Generator samples per held-out arithmetic problem, drawn at rm.data.temperature with rm.data.max_new_tokens and rm.data.sample_batch_size; cached in RUN_DIR/bench_samples_arithmetic.jsonl (reused while the generator and these settings stay the same)."""
    limit: int = Field(0, ge=0)
    """Score at most this many items per file, evenly spaced through it (0: all); for quick checks."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """The first step scored below this probability is the predicted error (none below: predicted error-free)."""
    tune_threshold_on: DataPath | None = None
    """A separate ProcessBench-format file to choose the threshold on (the one with the best F1 there, from tune_grid); None: `threshold` as given."""
    tune_grid: list[float] = [round(0.05 * i, 2) for i in range(1, 20)]
    """Thresholds tried when tune_threshold_on is set."""
    batch_size: int = Field(8, ge=1)
    """Solutions per forward pass."""
    too_long: Literal["skip", "extend"] = "extend"
    """A solution longer than the PRM's max_position_embeddings: `extend` scores it anyway when the model's positions are rotary (RoPE computes them for any index; the quality past the trained length is the model's own, and the report counts these items), `skip` leaves it out and counts it (also what `extend` does for a model with learned positions)."""


class Recipe(Section):
    """One whole run."""

    run: RunConfig = _section()
    """Name, output folder, seed, device."""
    task: TaskConfig = _section()
    """Problems and the step convention."""
    model: ModelConfig = _section()
    """Generator, reward model, dtype, LoRA."""
    sft: SFTConfig = _section()
    """Generator fine-tuning (`rlprm prepare`)."""
    prepare_eval: PrepareEvalConfig = _section()
    """Targets the prepared generator must meet."""
    reward: RewardConfig = _section()
    """How rewards are formed for RL."""
    rl: RLConfig = _section()
    """The RL algorithm and its schedule."""
    eval: EvalConfig = _section()
    """Best-of-N evaluation."""
    tracking: TrackingConfig = _section()
    """W&B and metrics.jsonl."""
    rm: RewardModelTrainConfig = _section()
    """Reward-model training and evaluation (`rlprm train-rm`)."""
    active: ActiveConfig = _section()
    """Active learning: `rlprm select` and the `rlprm active-learning` loop."""
    synthetic: SyntheticConfig = _section()
    """Synthetic supervision: `rlprm synthetic-supervision` (a large PRM labels for small reward models)."""
    bench: BenchConfig = _section()
    """PRM benchmarking: `rlprm bench-prm` (ProcessBench F1 per subset, step AUROC)."""
    deepspeed: DeepSpeedPath | None = None
    """A DeepSpeed JSON config (see deepspeed_configs/); none trains without DeepSpeed. PPO runs ZeRO-2 and ZeRO-3 (zero3.json shards the policy's and critic's weights, gathered whole to generate, evaluate and save); CPU offload is refused (it needs DeepSpeed's own optimizer). GRPO and rejection sampling take none: they run data parallel (DDP) with a new TRL trainer per epoch around one optimizer, which a ZeRO engine would own; LoRA (model.lora) keeps their memory small."""

    # Where the recipe came from; set by load_recipe, not by the YAML.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _synthetic_budgets_fit(self) -> "Recipe":
        fresh = self.synthetic.problems * self.rm.data.samples_per_problem
        if self.synthetic.budgets and self.synthetic.budgets[-1] > fresh:
            raise ValueError(f"synthetic.budgets: the largest, {self.synthetic.budgets[-1]}, is more than the fresh "
                             f"samples (synthetic.problems {self.synthetic.problems} x rm.data.samples_per_problem "
                             f"{self.rm.data.samples_per_problem} = {fresh}): lower it to at most {fresh}, or raise "
                             "synthetic.problems")
        return self

    @model_validator(mode="after")
    def _reward_source_fits(self) -> "Recipe":
        src, algo = self.reward.source, self.rl.algorithm
        if self.eval.search.method != "none" and self.eval.search.scorer == "checker" and self.task.name != "arithmetic":
            raise ValueError(f"eval.search.scorer checker is the arithmetic task's exact step checker; task "
                             f"`{self.task.name}` has none: name a reward model of eval.reward_models")
        search = getattr(self.rl, "rollout_search", None)
        if search is not None and search.method != "none":
            if search.scorer == "checker" and self.task.name != "arithmetic":
                raise ValueError(f"rl.rollout_search.scorer checker is the arithmetic task's exact step checker; task "
                                 f"`{self.task.name}` has none: use reward_model (model.reward_model) or confidence")
            if search.scorer == "reward_model" and self.model.reward_model is None:
                raise ValueError("rl.rollout_search.scorer reward_model scores partial solutions with "
                                 "model.reward_model, which is not set: set it to a PRM folder (or hub id), or use "
                                 "rl.rollout_search.scorer checker / confidence")
        if src == "exact" and self.task.name != "arithmetic":
            raise ValueError(f"reward.source exact is the arithmetic task's exact step checker, and task "
                             f"`{self.task.name}` has no step checker (only final answers can be graded); use "
                             "reward.source prm (a trained PRM) or ground_truth")
        if src in ("exact", "confidence") and algo == "rejection_sampling":
            raise ValueError(f"reward.source {src} is implemented for rl.algorithm ppo (and grpo for exact), not "
                             "rejection_sampling, which would rank by the grader instead; use reward.source "
                             "ground_truth, prm, orm or python there")
        if self.reward.mode == "dense" and self.reward.dense_form == "score" and algo == "ppo":
            # PPO's return is the sum of the step rewards: with r_k = p_k every extra sure step adds to it
            raise ValueError("reward.dense_form score (r_k = p_k) makes PPO's return the SUM of the step "
                             "probabilities, which pays for padding a solution with sure steps "
                             "(tests/test_reward_hacking.py); for PPO use min_form (the return is the lowest step "
                             "probability) or log_prob; score is for GRPO, whose rl.process_advantage reads step values")
        if self.reward.mode == "dense" and algo == "grpo" and self.reward.dense_form in ("min_form", "delta"):
            # min_form / delta rewards are increments of a running score, not values of the steps: their min or mean
            # means nothing (a shortcut chain can then rank above the reference: tests/test_reward_hacking.py), and
            # `sum` normalises each one on its own as if it were a step's value (rewards.dense_step_values)
            raise ValueError(f"rl.process_advantage {self.rl.process_advantage} takes the {self.rl.process_advantage} "
                             f"of step values, but reward.dense_form {self.reward.dense_form} gives increments of a "
                             "running score; use reward.dense_form score (the step probabilities) or log_prob")
        if src == "confidence" and algo == "grpo":
            raise ValueError("reward.source confidence needs the starting generator's token log-probs inside the "
                             "reward function, which rlprm's GRPO (TRL's trainer) does not compute yet; use "
                             "rl.algorithm ppo for the confidence control")
        return self


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. rl.learning_rate=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: the key must be dotted names such as rl.algorithm")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"override {text!r}: `{where}` is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _field_info(loc: tuple, algorithm: str | None = None):
    """The pydantic FieldInfo at a location, or None (for list items and the like); `rl` is `algorithm`'s section."""
    cls, info = Recipe, None
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        info = cls.model_fields[part]
        cls = (RL_SECTIONS.get(algorithm or "ppo", RLBase) if (cls is Recipe and part == "rl")
               else _unwrap(info.annotation))
    return info


def _unwrap(annotation):
    """Strip Optional/Annotated to reach a model class or a Literal."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _literal_choices(loc: tuple, algorithm: str | None = None) -> list | None:
    info = _field_info(tuple(p for p in loc if isinstance(p, str)), algorithm)
    if info is None:
        return None
    ann = _unwrap(info.annotation)
    if typing.get_origin(ann) is list:
        ann = _unwrap(typing.get_args(ann)[0])
    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann))
    return None


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "tuple_type": "a list", "model_type": "a section (a mapping of keys)", "dict_type": "a mapping",
    "path_type": "a path",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}

_STEPS_NOT_CLOCK = ("SFT is budgeted in optimizer steps now, so that the same recipe and seed train the same "
                    "number of steps on any machine (a wall-clock budget gave a slower machine fewer steps, hence another "
                    "generator)")
# Keys that existed once: an old recipe that still sets one is told what replaced it and why, not just
# "unknown key". Reported like every other problem (file:line, all at once).
_REMOVED_KEYS: dict[tuple[str, ...], str] = {
    ("sft", "time_budget_s"): f"removed: {_STEPS_NOT_CLOCK}. Use `sft.steps` instead (700 steps took 4-8 "
                              "minutes on 2 cores)",
    ("sft", "min_steps"): f"removed: {_STEPS_NOT_CLOCK}. Use `sft.steps` instead (set it to this value)",
    ("sft", "max_steps"): f"removed: {_STEPS_NOT_CLOCK}. Use `sft.steps` instead (training now always runs "
                          "exactly that many steps)",
    # the rl section became one schema per algorithm, with one name per concept
    ("reward", "kl_coef"): "moved: the KL coefficient is `rl.kl_coef` now, one name for PPO's reward penalty and "
                           "GRPO's loss term (set it there; rejection sampling has none)",
    ("rl", "beta"): "renamed: GRPO's KL coefficient is `rl.kl_coef` now (the same name as PPO's)",
    ("rl", "process_reward"): "removed: one key says what the step reward is, `reward.dense_form`: write "
                              "`reward.dense_form: score` for `process_reward: score` (each step's probability), and "
                              "keep the dense_form for `process_reward: dense_form`",
    ("rl", "eval_n"): "renamed: `rl.eval_n_max` (spelled like eval.n_max)",
    # scoring with a reward model is the reward section's, training one the rm section's (issue 25)
    **{("rm", key): f"moved: `reward.{key}` (the reward model's family and its options live with reward.source, "
                    "which scores with it; `rm` is for training a reward model)"
       for key in ("adapter", "reference_model", "implicit_beta", "system_prompt")},
    ("rl", "eval_problems"): "renamed: `rl.eval_num_problems` (spelled like eval.num_problems)",
    ("rl", "minibatch_size"): {"rejection_sampling": "renamed for rejection sampling: `rl.sft_batch_size` (kept "
                                                     "samples per SFT step; rl.minibatch_size is PPO's and GRPO's)"},
    ("rl", "prompts_per_iteration"): {"rejection_sampling": "renamed for rejection sampling: `rl.sample_batch_size`, "
                                                            "counted in sequences (the old value x "
                                                            "rl.samples_per_problem)"},
}
"""Keys that existed once -> what to write instead; a dict maps rl.algorithm -> message for keys that moved in one
algorithm's section only."""


def _removed(loc: tuple, algorithm: str | None) -> str | None:
    entry = _REMOVED_KEYS.get(tuple(str(p) for p in loc))
    return entry.get(algorithm or "ppo") if isinstance(entry, dict) else entry


def _describe(err: dict, source: str, lines: dict[tuple, int], overrides: dict[tuple, str] | None = None) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    # inside `rl`, pydantic names the union member (the algorithm) after "rl"; the recipe does not
    algorithm = None
    if len(loc) >= 2 and loc[0] == "rl" and (loc[1] in RL_SECTIONS or loc[1] == "unknown"):
        algorithm, loc = loc[1], (loc[0],) + loc[2:]
    # errors from a model_validator are reported at the section that holds it
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    removed = _removed(loc, algorithm) if kind == "extra_forbidden" else None
    if removed:
        msg = removed
    elif kind == "extra_forbidden" and loc[:1] == ("rl",) and len(loc) == 2 and algorithm:
        owners = [a for a, section in RL_SECTIONS.items() if loc[1] in section.model_fields]
        valid = sorted(RL_SECTIONS[algorithm].model_fields)
        if owners:
            msg = (f"not a key of rl.algorithm {algorithm}: it belongs to {' and '.join(owners)}. Remove it, or set "
                   f"rl.algorithm: {owners[0]}. Keys allowed in `rl` for {algorithm}: {', '.join(valid)}")
        else:
            guess = difflib.get_close_matches(str(loc[1]), valid, n=1)
            hint = f"Did you mean `rl.{guess[0]}`? " if guess else ""
            msg = f"unknown key. {hint}Keys allowed in `rl` for {algorithm}: {', '.join(valid)}"
    elif kind == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if isinstance(p, str))
        info = _field_info(parent, algorithm) if parent else None
        cls = _unwrap(info.annotation) if info else Recipe
        valid = sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []
        guess = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"Did you mean `{'.'.join(map(str, parent + (guess[0],)))}`?" if guess else ""
        where = f"`{'.'.join(map(str, parent))}`" if parent else "the top level"
        msg = f"unknown key. {hint} Keys allowed in {where}: {', '.join(valid)}".replace(".  ", ". ")
    elif kind == "literal_error":
        choices = _literal_choices(loc, algorithm)
        options = ", ".join(map(str, choices)) if choices else ctx.get("expected", "")
        msg = f"{value!r} is not one of {options}"
    elif kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        msg = f"must be {_BOUNDS[kind]} {limit}, got {value!r}"
    elif kind in _TYPE_WORDS:
        msg = f"expected {_TYPE_WORDS[kind]}, got {value!r} ({type(value).__name__})"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "string_too_short":
        msg = "must not be empty"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    line = None
    for cut in range(len(loc), 0, -1):
        line = lines.get(tuple(str(p) for p in loc[:cut]))
        if line:
            break
    where = f"{source}:{line}" if line else source
    # a value from the command line has no line in the file: name the override that set it (or, for a problem
    # found across a section, the overrides inside it beside the section's line)
    path = tuple(str(p) for p in loc)
    given = {k: v for k, v in (overrides or {}).items() if path[:len(k)] == k}
    # (a whole-recipe check names its keys itself: every override is "inside" the top level, so none is named)
    inside = {k: v for k, v in (overrides or {}).items() if path and k[:len(path)] == path and len(k) > len(path)}
    if given:
        where = f"command-line override `{given[max(given, key=len)]}`"
    elif inside and path not in lines:  # the file does not have this key: the overrides alone made it
        where = "command-line override " + ", ".join(f"`{v}`" for v in inside.values())
    elif inside:
        where += " (with command-line override " + ", ".join(f"`{v}`" for v in inside.values()) + ")"
    text = f"{where}: {key}: {msg}"
    info = _field_info(tuple(p for p in loc if isinstance(p, str)), algorithm)
    is_section = info is not None and (key == "rl" or isinstance(_unwrap(info.annotation), type)
                                       and issubclass(_unwrap(info.annotation), BaseModel))
    if info is not None and info.description and kind != "extra_forbidden" and not is_section:
        text += f"\n    ({key}: {info.description.splitlines()[0]})"
    return text


def validate_recipe(data: dict, base_dir: Path, source: str = "<recipe>", lines: dict | None = None,
                    overrides: list[str] | None = None, shipped_dir: Path | None = None) -> Recipe:
    """Validate a recipe dict; raise RecipeError listing every problem (at the file's line, or at the command-line
    override that gave the value).

    `base_dir`: what relative paths resolve against; `shipped_dir`: for a recipe shipped inside the installed
    package, its real folder, where a file it reads is looked for when base_dir has none (rlprm/shipped.py)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections (run:, task:, model:, ...)")
    try:
        return Recipe.model_validate(data, context={"base_dir": Path(base_dir), "shipped_dir": shipped_dir})
    except ValidationError as exc:
        given = {tuple(parse_override(text)[0]): text for text in overrides or []}
        problems = [_describe(e, source, lines or {}, given) for e in exc.errors()]
        # one problem is its own first line (file:line, key); several get a count above them
        head = [f"{source}: {len(problems)} problem(s) in the recipe:"] if len(problems) > 1 else []
        raise RecipeError("\n".join([*head, *problems])) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file, or a shipped recipe named without a folder (`prm_dense`). Nothing
    heavy is imported."""
    from rlprm import shipped

    path = Path(path)
    if not path.is_file():
        found = shipped.find_shipped(str(path))
        if found is None:
            names = shipped.shipped_names()
            close = difflib.get_close_matches(path.name.removesuffix(shipped.SUFFIX), names, n=1)
            hint = (f" (did you mean {close[0]}?)" if close else "") + (
                f"; the shipped recipes (`rlprm recipes` lists them): {', '.join(names)}" if names else "")
            raise RecipeError(f"recipe not found: {path}: give a recipe file, or the name of a shipped one{hint}")
        path = found
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                          f"{exc.start}): a recipe is a YAML text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        # an unclosed bracket or quote is noticed where the file ends: name the line that opened it too
        opened = getattr(exc, "context_mark", None)
        start = (f" ({getattr(exc, 'context', None) or 'opened'} at line {opened.line + 1})"
                 if opened and mark and opened.line != mark.line else "")
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}{start}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (run:, task:, model:, ...)")
    data = apply_overrides(data, list(overrides or []))
    base, shipped_dir = shipped.base_dirs(path)
    recipe = validate_recipe(data, base, str(path), _key_lines(text), list(overrides or []), shipped_dir)
    recipe.source = path.resolve()
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (absolute paths, every default filled in)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def explain(cls: type[BaseModel] = Recipe, prefix: str = "", algorithm: str | None = None,
            values: dict | None = None) -> str:
    """Every field with its type, default and docstring: the recipe reference.

    The `rl` section is `algorithm`'s (ppo, grpo or rejection_sampling); None lists the keys every algorithm
    reads, then each algorithm's own. `values` (a resolved recipe as `model_dump(mode="json")`, or its section)
    adds each key's value in that recipe beside the default, so `rlprm explain RECIPE` shows what the recipe runs.
    """
    out = []
    for name, info in cls.model_fields.items():
        if info.exclude:
            continue
        key = f"{prefix}{name}"
        value = values.get(name, _NO_VALUE) if values is not None else _NO_VALUE
        if cls is Recipe and name == "rl":
            out.append(_explain_rl(key, info.description or "", algorithm,
                                   value if isinstance(value, dict) else None))
            continue
        inner = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out.append(f"{key}:  {info.description or ''}")
            # a section the recipe leaves unset (an optional one) is explained with its defaults only
            out.append(explain(inner, key + ".", values=value if isinstance(value, dict) else None))
            continue
        out.append(_explain_field(key, info, value))
    return "\n".join(out)


_NO_VALUE = object()
"""`explain` without a recipe: print the default only."""


def _explain_field(key: str, info, value=_NO_VALUE) -> str:
    inner = _unwrap(info.annotation)
    choices = typing.get_args(inner) if typing.get_origin(inner) is Literal else None
    kind = " | ".join(map(str, choices)) if choices else getattr(inner, "__name__", str(inner))
    if value is _NO_VALUE:
        return f"  {key} ({kind}, default {info.default!r}): {info.description or ''}"
    return f"  {key} = {value!r} ({kind}, default {info.default!r}): {info.description or ''}"


def _explain_rl(key: str, description: str, algorithm: str | None, values: dict | None = None) -> str:
    if algorithm is not None:
        section = RL_SECTIONS[algorithm]
        return "\n".join([f"{key}:  {description} For rl.algorithm {algorithm}: {section.__doc__}",
                          explain(section, key + ".", values=values)])
    shared = RLBase.model_fields
    out = [f"{key}:  {description} Every algorithm reads these; `rlprm explain --algorithm NAME` (or "
           "`rlprm explain RECIPE`) shows one algorithm's keys only.", explain(RLBase, key + ".")]
    for name, section in RL_SECTIONS.items():
        out.append(f"{key} (rl.algorithm {name}):  {section.__doc__}")
        out.extend(_explain_field(f"{key}.{field}", info) for field, info in section.model_fields.items()
                   if field not in shared)
    return "\n".join(out)
