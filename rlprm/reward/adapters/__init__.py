"""Public process reward models behind one scoring interface, and the one loader for every reward model.

`load_reward_model(ref, adapter=None, ...)` is what a recipe's reward model names go through: an rlprm folder
(with rlprm_rm.json) loads as `rlprm.reward.model.RewardModel`; any other checkpoint loads through the
family named by `adapter`, or detected from its files where that is unambiguous; otherwise it fails with a
message listing the families. Every result answers `kind`, `score_steps(problems, solutions, sep=None,
batch_size=...)` (per step, P(correct); one forward pass per solution) and `score(...)`.

Families (one module each; conventions and their sources in the module docstrings):
- `qwen_prm`: token classification at `<extra_0>` after every step (Qwen2.5-Math-PRM-7B/-72B,
  Qwen2.5-Math-7B-PRM800K) - qwen_prm.py, architecture in qwen_arch.py;
- `pure_prm`: token classification at the "\\n" after every step, TRL PRMTrainer's layout, no chat template
  (PURE-PRM-7B) - token_cls.py;
- `math_shepherd`: `+`/`-` logits at the ` ки` step tag of a causal LM - tag_lm.py;
- `rlhflow`: `+`/`-` logits at each assistant turn of a multi-turn chat (RLHFlow Llama3.1-8B PRMs) - tag_lm.py;
- `value_head`: sigmoid of a scalar head at each step's "\\n" (Skywork-o1-Open-PRM-Qwen-2.5) - value_head.py;
- `implicit`: beta * log(pi/pi_ref) summed per step, two causal LMs (PRIME / EurusPRM) - implicit.py;
- `rlprm`: this project's own reward models (rlprm_rm.json).

Detection reads only local files: rlprm_rm.json -> rlprm; config.json `architectures` naming
Qwen2ForProcessRewardModel -> qwen_prm, a `*ForTokenClassification` -> pure_prm; a `v_head.summary.weight`
tensor -> value_head. A hub id is detected
from its config (architectures) when transformers can fetch it. math_shepherd, rlhflow and implicit checkpoints
are plain causal LMs, told apart by nothing in their files: name them.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlprm.reward.adapters.common import AdapterError, Encoded, HubPRM

FAMILIES = ("qwen_prm", "pure_prm", "math_shepherd", "rlhflow", "value_head", "implicit", "rlprm")
ADAPTER_FILE = "rlprm_rm.json"


def _families_text() -> str:
    return ("qwen_prm (Qwen2.5-Math-PRM: <extra_0> token classification), pure_prm (PURE-PRM-7B / TRL PRMTrainer: "
            "token classification at the \\n after each step), math_shepherd (+/- at the ки tag), "
            "rlhflow (+/- at each assistant turn), value_head (Skywork-o1-Open-PRM: sigmoid value head), "
            "implicit (PRIME/EurusPRM: beta*log(pi/pi_ref), needs reward.reference_model), rlprm (rlprm_rm.json)")


def _architectures(ref: str) -> list[str]:
    path = Path(ref)
    if path.is_dir():
        config = path / "config.json"
        return list(json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
    try:  # a hub id: its config only (cached or fetched by transformers)
        from transformers import AutoConfig

        return list(getattr(AutoConfig.from_pretrained(ref, trust_remote_code=False), "architectures", None) or [])
    except Exception:  # noqa: BLE001 - no config reachable: nothing to detect from
        return []


def detect_family(ref: str | Path) -> str | None:
    """The family a checkpoint's own files make unambiguous, else None."""
    from rlprm.reward.adapters.qwen_prm import ARCHITECTURES as QWEN
    from rlprm.reward.adapters.token_cls import is_token_classification
    from rlprm.reward.adapters.value_head import HEAD_WEIGHT, weight_file_with

    ref = str(ref)
    path = Path(ref)
    if (path / ADAPTER_FILE).is_file():
        return "rlprm"
    architectures = _architectures(ref)
    if any(a in QWEN for a in architectures):
        return "qwen_prm"
    if is_token_classification(architectures):
        return "pure_prm"
    if path.is_dir() and weight_file_with(path, HEAD_WEIGHT) is not None:
        return "value_head"
    return None


def resolve_family(ref: str, adapter: str | None = None) -> str:
    """The family `ref` loads as: `adapter`, else detected from its files; AdapterError when it is unknown, cannot
    be told, or contradicts the files (an rlprm folder named as another family, or the reverse)."""
    if adapter is not None and adapter not in FAMILIES:
        raise AdapterError(f"unknown PRM adapter {adapter!r}; the families are: {_families_text()}")
    if ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists():
        # unmistakably a path (as recipes read model references), so not a hub id to try fetching
        raise AdapterError(f"reward model folder not found: {ref}")
    found = detect_family(ref)
    family = adapter or found
    if family is None:
        where = "folder" if Path(ref).is_dir() else "model"
        raise AdapterError(f"cannot tell which PRM family the {where} {ref} belongs to (no {ADAPTER_FILE}, no "
                           "Qwen2ForProcessRewardModel or *ForTokenClassification architecture, no Skywork value "
                           "head). Name it with "
                           f"reward.adapter (or eval.reward_model_adapters.NAME): {_families_text()}")
    if family == "rlprm" and found != "rlprm":
        raise AdapterError(f"{ref} has no {ADAPTER_FILE}: it is not an rlprm reward model; name its family "
                           f"instead: {_families_text()}")
    if family != "rlprm" and found == "rlprm":
        raise AdapterError(f"{ref} is an rlprm reward model ({ADAPTER_FILE}); drop the adapter {family!r} or set "
                           "it to rlprm")
    return family


def check_reward_model(ref: str | Path, adapter: str | None = None, step_separator: str | None = None) -> None:
    """What `load_reward_model` would refuse, found without loading a weight, for a job that loads its reward
    models only after long work (`rlprm eval` scores after sampling every problem): the family
    (`resolve_family`), and for an rlprm folder its rlprm_rm.json (`RewardModel.read_convention`: readable, a
    format this rlprm reads, the step separator) and its head among the tensors its safetensors headers name.
    Raises the loader's own errors (AdapterError, RewardModelError)."""
    from rlprm.reward.model import RewardModel, RewardModelError

    ref = str(ref)
    if resolve_family(ref, adapter) != "rlprm":
        return
    convention = RewardModel.read_convention(ref, step_separator)
    names = tensor_names(Path(ref))
    if convention.scorer != "lm" and names is not None and not any(n.startswith("score.") for n in names):
        raise RewardModelError(f"{ref} cannot be loaded as rlprm {convention.kind.upper()}: its weights have no "
                               "`score` head (a causal LM's folder with an rlprm_rm.json copied in?): point it at the "
                               "folder `rlprm train-rm` wrote (RUN_DIR/reward_model)")


def tensor_names(path: Path) -> set[str] | None:
    """The tensor names of a local folder's safetensors weights, from the headers (or the shard index) only;
    None when it has none to read (a hub id, .bin weights)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return set(f.keys())


def load_reward_model(ref: str | Path, adapter: str | None = None, device: str = "cpu", dtype: str = "float32",
                      step_separator: str | None = None, trust_remote_code: bool = False,
                      reference: str | Path | None = None, beta: float = 0.001, system_prompt: str | None = None):
    """Any reward model by folder or hub id: rlprm's own, or a public PRM through its family's adapter.

    `adapter`: one of FAMILIES, or None to detect. `step_separator`: for rlprm models, the separator they must
    have been trained with (refused otherwise); for public PRMs, how solution texts are split into steps.
    `reference` / `beta`: the implicit family's reference LM and beta. `system_prompt`: qwen_prm's (None: the
    card's). `dtype`: float32 | bfloat16 | auto.
    """
    from rlprm.steps import DEFAULT_SEPARATOR

    ref = str(ref)
    family = resolve_family(ref, adapter)
    if family == "rlprm":
        from rlprm.reward.model import RewardModel

        return RewardModel.load(ref, device=device, dtype=dtype, step_separator=step_separator,
                                trust_remote_code=trust_remote_code)
    if family == "qwen_prm":
        from rlprm.reward.adapters import qwen_prm

        impl = qwen_prm.load(ref, device, dtype, system_prompt)
    elif family == "pure_prm":
        from rlprm.reward.adapters import token_cls

        impl = token_cls.load(ref, device, dtype, trust_remote_code)
    elif family in ("math_shepherd", "rlhflow"):
        from rlprm.reward.adapters import tag_lm

        impl = tag_lm.load(family, ref, device, dtype, trust_remote_code)
    elif family == "value_head":
        from rlprm.reward.adapters import value_head

        impl = value_head.load(ref, device, dtype, trust_remote_code)
    else:
        from rlprm.reward.adapters import implicit

        if reference is None:
            raise AdapterError("the implicit family scores with two LMs: set reward.reference_model to the reference "
                               "model (e.g. the PRM's base model)")
        impl = implicit.load(ref, str(reference), device, dtype, beta, trust_remote_code)
    return HubPRM(impl, ref, step_separator or DEFAULT_SEPARATOR)


def load_for_recipe(recipe, ref: str | Path | None = None, adapter: str | None = None, device: str = "cpu",
                    dtype: str | None = None, task_separator: bool = True):
    """`load_reward_model` with a recipe's settings: the task's step separator, model.dtype / trust_remote_code
    and the family's options (`reward.reference_model`, `reward.implicit_beta`, `reward.system_prompt`). With no
    `ref`: model.reward_model, whose family is reward.adapter;
    another `ref` has the family `adapter` (None: detected). `task_separator=False`: the data come split into
    steps already, so an rlprm PRM keeps the separator it was trained with instead of being held to the task's."""
    rcfg = recipe.reward
    if ref is None:
        ref, adapter = recipe.model.reward_model, rcfg.adapter
    if ref is None:
        raise AdapterError("no reward model named: set model.reward_model to a folder or hub id")
    return load_reward_model(ref, adapter, device=device,
                             dtype=dtype or recipe.model.dtype,
                             step_separator=recipe.task.step_separator if task_separator else None,
                             trust_remote_code=recipe.model.trust_remote_code, reference=rcfg.reference_model,
                             beta=rcfg.implicit_beta, system_prompt=rcfg.system_prompt)


__all__ = ["ADAPTER_FILE", "AdapterError", "Encoded", "FAMILIES", "HubPRM", "check_reward_model", "detect_family",
           "load_for_recipe", "load_reward_model", "resolve_family", "tensor_names"]
