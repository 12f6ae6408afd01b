"""Reward models: the PRM and the ORM, from training examples to single-pass scoring.

- PRM: any causal-LM backbone with a token-classification head (2 classes,
  `incorrect` / `correct`; 3 with `neutral` kept). Cross-entropy only at the
  step-end tokens that `rlprm.steps.encode_batch` places, so training and
  scoring read the same positions.
- ORM: sequence classification, one logit at the last token, binary
  cross-entropy on "final answer right".
- `RewardModel`: one scoring object for both. `score_steps` gives, per
  solution, the probability that each step is correct (an ORM gives only the
  final one); `score` aggregates them (`prod`, the paper's choice; `min`,
  `last`, `mean`). ONE forward pass per solution: a causal model's output at a
  step end has seen only the prefix up to it, so reading every step end of the
  full solution equals scoring each prefix on its own (`score_steps_per_prefix`
  is that slow reference; a test and benchmarks/prm_scoring.py compare them).

Padding is on the right everywhere: positions of real tokens are then the same
as in an unpadded sequence (no position-id shift), causal attention never
looks at the padding, and the ORM's pooling (the rightmost token that is not
`pad_token_id`, which this module sets from the tokenizer) lands on the last
real token.

A saved reward model is a plain Hugging Face folder plus `rlprm_rm.json`: its
kind, step separator, prompt template and label convention. Loading refuses a
different separator, because step ends would fall on other tokens than the
ones it was trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rlprm.data.stepwise import CORRECT, INCORRECT, LABEL_NAMES, NEUTRAL, LabelledSolution
from rlprm.errors import InputError
from rlprm.files import atomic_dir
from rlprm.models import quiet_transformers
from rlprm.steps import encode_batch, split_steps

RM_FILE = "rlprm_rm.json"
FORMAT_VERSION = 1
AGGREGATIONS = ("prod", "min", "last", "mean")
IGNORE_INDEX = -100


class RewardModelError(InputError, ValueError):
    """A reward model cannot be built, loaded or asked to score this way (the message says why)."""


class SeparatorMismatch(RewardModelError):
    """Scoring with a step separator other than the one the reward model was trained with."""


@dataclass
class Convention:
    """Everything besides the weights that scoring must reproduce exactly; saved as rlprm_rm.json."""

    kind: str
    """`prm` or `orm`."""
    step_separator: str
    prompt_template: str = "{problem}\n"
    label_names: list[str] = field(default_factory=lambda: LABEL_NAMES[:2])
    """Class index -> name (PRM); `["answer_correct"]` for an ORM's single logit."""
    correct_classes: list[int] = field(default_factory=lambda: [CORRECT])
    """Classes whose probabilities sum to "this step is correct" (neutral counts as not wrong)."""
    neutral_as: str | None = None
    """How rating-0 steps were labelled in training (PRM800K), for the record."""
    confidence: list[float] | None = None
    """Confidence stacking, when fitted: `[a, b, c]` in `P(correct) = sigmoid(a * head_logit + b * min_logp + c)`,
    where `min_logp` is the lowest log-probability the backbone language model (saved in `confidence_lm/`) gave
    any token of the step (PRM) or of the whole solution (ORM). None: the head alone."""
    scorer: str = "head"
    """`head`: a classification head reads the hidden state at each step end (PRM) or the last token (ORM).
    `lm`: the model is a causal LM trained on the labels and a step's probability is a logistic function of
    its own token log-probabilities (rlprm/reward/lm.py)."""
    lm_head: list[float] | None = None
    """(scorer `lm`) `[w_min, w_mean, b]`: P(correct) = sigmoid(w_min * min + w_mean * mean + b) over the span's
    token log-probabilities."""
    format_version: int = FORMAT_VERSION

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def prompt(self, problem: str) -> str:
        return self.prompt_template.format(problem=problem)


def make_convention(kind: str, step_separator: str, prompt_template: str = "{problem}\n",
                    neutral_as: str | None = None) -> Convention:
    if kind == "orm":
        return Convention("orm", step_separator, prompt_template, ["answer_correct"], [0], None)
    if kind != "prm":
        raise RewardModelError(f"reward model kind must be `prm` or `orm`, got {kind!r}")
    if neutral_as == "neutral":
        return Convention("prm", step_separator, prompt_template, list(LABEL_NAMES), [CORRECT, NEUTRAL], neutral_as)
    return Convention("prm", step_separator, prompt_template, LABEL_NAMES[:2], [CORRECT], neutral_as)


def check_separator(trained: str, requested: str | None) -> None:
    """Raise SeparatorMismatch when `requested` is given and differs from the separator a model was trained with."""
    if requested is not None and requested != trained:
        raise SeparatorMismatch(
            f"this reward model was trained with step separator {trained!r} and cannot score "
            f"with {requested!r}: its step ends would fall on other tokens. Render solutions with "
            f"{trained!r} (task.step_separator) or train a reward model with {requested!r}."
        )


def aggregate(step_probs: Sequence[float], how: str = "prod") -> float:
    """One solution score from its step probabilities. A solution with no steps scores 0."""
    if how not in AGGREGATIONS:
        raise RewardModelError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    if not step_probs:
        return 0.0
    if how == "prod":
        return math.prod(step_probs)
    if how == "min":
        return min(step_probs)
    if how == "last":
        return step_probs[-1]
    return sum(step_probs) / len(step_probs)


# --------------------------------------------------------------------------- building


def load_checked(loader, path: str | Path, family: str, error: type = RewardModelError, **kwargs):
    """`loader.from_pretrained(path, **kwargs)` that refuses a checkpoint lacking weights the model reads.

    transformers fills a weight the checkpoint does not have with a random initialisation and only logs it (a
    token-classification checkpoint loaded as Qwen's PRM gets a random `score.0`/`score.2` head and scores
    noise; a causal LM loaded as a classifier gets a random `score`). Here the load report
    (`output_loading_info`) decides instead: any missing key, or any weight whose shape differs from the
    model's (head shapes are loaded leniently only to be reported here with names), is a RewardModelError
    naming the keys, `family` (what the weights were loaded as) and the architectures the checkpoint declares
    (raised as `error`, a RewardModelError subclass: the adapters' AdapterError). Keys the checkpoint has and the model does not read (an LM head under a classifier) are fine.
    """
    with quiet_transformers():  # the report is checked below, not printed
        model, info = loader.from_pretrained(str(path), output_loading_info=True, ignore_mismatched_sizes=True,
                                             **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if missing or mismatched:
        declared = list(getattr(model.config, "architectures", None) or []) or ["none"]
        problems = []
        if missing:
            problems.append(f"it lacks {len(missing)} weight(s) that the {family} model reads: "
                            + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if mismatched:
            problems.append("shapes differ: " + ", ".join(f"{key} is {tuple(ckpt)} in the checkpoint, {tuple(want)} "
                                                          f"in the {family} model" for key, ckpt, want in mismatched[:8]))
        raise error(
            f"{path} cannot be loaded as {family}: {'; '.join(problems)}. The checkpoint declares architectures "
            f"{declared}. Loading it anyway would score with randomly initialised weights: check that the reward "
            "model's family (reward.adapter) matches the checkpoint, and that the checkpoint is complete.")
    return model


def model_class(kind: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForTokenClassification if kind == "prm" else AutoModelForSequenceClassification


def build_reward_model(convention: Convention, backbone: str | Path, tokenizer, dtype: str = "float32",
                       trust_remote_code: bool = False):
    """A PRM/ORM whose body is `backbone`'s (an HF id or folder, e.g. the generator); the head is fresh."""
    from rlprm.models import torch_dtype

    cls = model_class(convention.kind)
    with quiet_transformers():
        model = cls.from_pretrained(str(backbone), num_labels=convention.num_labels, dtype=torch_dtype(dtype),
                                    trust_remote_code=trust_remote_code)
    _configure(model, convention, tokenizer)
    return model


def reward_model_from_causal_lm(convention: Convention, causal_lm, tokenizer):
    """A PRM/ORM with the body of an in-memory causal LM (e.g. a tiny model just built) and a fresh head."""
    import copy

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = convention.num_labels
    model = model_class(convention.kind).from_config(config)
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    getattr(model, model.base_model_prefix).load_state_dict(body.state_dict())
    _configure(model, convention, tokenizer)
    return model


def add_identity_layers(model, extra: int) -> None:
    """Stack `extra` new transformer blocks on top of the body, each starting as the identity.

    Why: a step-end token reads the body's last layer, which in a small backbone is busy predicting
    the next token; whether the step just written was likely under the backbone (the information
    that separates right steps from wrong ones) only exists at the top of the residual stream, with
    no layer left to compare it with the tokens written. New blocks above it can. Their attention
    and MLP output projections start at zero, so the model first computes exactly what the backbone
    did. Works for Llama-style bodies (`layers`, `self_attn.o_proj`, `mlp.down_proj`).
    """
    if extra <= 0:
        return
    import torch

    body = getattr(model, model.base_model_prefix)
    layers = getattr(body, "layers", None)
    first = layers[0] if layers is not None and len(layers) else None
    if first is None or not hasattr(first, "self_attn") or not hasattr(getattr(first, "mlp", None), "down_proj"):
        raise RewardModelError(f"rm.extra_layers needs a Llama-style body (layers with self_attn.o_proj and "
                               f"mlp.down_proj); {type(model).__name__} has another layout: set rm.extra_layers: 0")
    config = model.config
    n = config.num_hidden_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types) + [config.layer_types[-1]] * extra
    config.num_hidden_layers = n + extra
    ref = next(first.parameters())
    for i in range(n, n + extra):
        layer = type(first)(config, i).to(device=ref.device, dtype=ref.dtype)
        if hasattr(model, "_init_weights"):
            layer.apply(model._init_weights)  # the backbone family's own initialisation
        with torch.no_grad():
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()
        layers.append(layer)


def freeze_body(model, keep_from: int) -> None:
    """Freeze the embeddings and the body's first `keep_from` layers (the backbone's own weights)."""
    body = getattr(model, model.base_model_prefix)
    body.get_input_embeddings().weight.requires_grad_(False)
    for layer in body.layers[:keep_from]:
        for param in layer.parameters():
            param.requires_grad_(False)


def apply_lora(model, cfg, kind: str):
    """LoRA adapters on the body when `cfg.enabled` (a `rlprm.config.LoraConfig`); the head (`score`) is trained
    in full and saved whole (`models.apply_lora`)."""
    from rlprm import models

    return models.apply_lora(model, cfg, "TOKEN_CLS" if kind == "prm" else "SEQ_CLS", head="score")


def _configure(model, convention: Convention, tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise RewardModelError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    # the ORM pools at the rightmost token that is not pad_token_id: it must be the tokenizer's pad
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.id2label = dict(enumerate(convention.label_names))
    model.config.label2id = {name: i for i, name in enumerate(convention.label_names)}


# --------------------------------------------------------------------------- training examples


def encode_examples(tokenizer, records: Sequence[LabelledSolution], convention: Convention,
                    max_length: int) -> tuple[list[dict], dict[str, int]]:
    """Training examples (`input_ids` + `step_ends`/`step_labels` for a PRM, `label` for an ORM) and counts.

    PRM: steps after the last labelled one are cut (a causal model's labels cannot depend on them);
    an example longer than max_length is cut after the last step end that fits. Records with no label
    left are dropped. ORM: the whole solution (the score is read at its last token); too long, dropped;
    unknown outcome, dropped.
    """
    counts = {"examples": 0, "dropped_no_label": 0, "cut_too_long": 0, "dropped_too_long": 0}
    if convention.kind == "orm":
        known = [r for r in records if r.answer_correct is not None]
        counts["dropped_no_label"] = len(records) - len(known)
        records = known
    encoded = encode_batch(tokenizer, [convention.prompt(r.problem) for r in records], [r.steps for r in records],
                           convention.step_separator)
    examples = []
    for record, enc in zip(records, encoded):
        if convention.kind == "orm":
            if len(enc.input_ids) > max_length:
                counts["dropped_too_long"] += 1
                continue
            examples.append({"input_ids": enc.input_ids, "label": float(bool(record.answer_correct))})
            continue
        pairs = [(end, y) for end, y in zip(enc.step_ends, record.labels) if y is not None]
        if not pairs:
            counts["dropped_no_label"] += 1
            continue
        fitting = [(end, y) for end, y in pairs if end < max_length]
        if len(fitting) < len(pairs):
            counts["cut_too_long"] += 1
            if not fitting:
                counts["dropped_too_long"] += 1
                continue
        last = fitting[-1][0]
        examples.append({
            "input_ids": enc.input_ids[: last + 1],
            "step_ends": [end for end, _ in fitting],
            "step_labels": [y for _, y in fitting],
        })
    counts["examples"] = len(examples)
    return examples, counts


class Collator:
    """Right-pads a list of examples into tensors; PRM labels are IGNORE_INDEX except at step ends.

    `kind`: `prm`, `orm`, or `none` (inputs only, for scoring).
    """

    def __init__(self, pad_token_id: int, kind: str):
        self.pad_token_id = pad_token_id
        self.kind = kind

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "prm":
            labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, f["step_ends"]] = torch.tensor(f["step_labels"], dtype=torch.long)
            batch["labels"] = labels
        elif self.kind == "orm":
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.float)
        return batch


def reward_loss(kind: str, logits, labels):
    """PRM: cross-entropy over labelled step ends; ORM: binary cross-entropy of the last-token logit."""
    import torch.nn.functional as F

    if kind == "prm":
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), labels.float().reshape(-1))


# --------------------------------------------------------------------------- confidence stacking
#
# Why: on the arithmetic task a wrong step is, almost always, one the generator found unlikely when it
# sampled it: the lowest token log-probability of a step under the backbone language model separates right
# steps from wrong ones with AUROC 0.997 on held-out samples, while a head trained for 3 minutes on CPU on
# top of a frozen 4-layer body reaches 0.78 and does not check the arithmetic. Reading "was the written token
# the one I expected" needs a product of two residual-stream vectors, which small blocks learn slowly. So a
# reward model may keep the backbone LM beside it and stack its token confidence with the head's logit in a
# 3-parameter logistic regression fitted on the training labels (`rm.confidence_features`). Both the PRM and
# the ORM get the same option, so a PRM-vs-ORM comparison stays about the labels.

CONFIDENCE_DIR = "confidence_lm"
MIN_LOGP = -30.0  # floor for log-probabilities: a near-impossible token should not dominate the fit


def token_logprobs(lm, sequences: list[list[int]], pad_token_id: int, device) -> list[list[float]]:
    """Per sequence, log p(token_t | tokens_<t) under `lm` for every position (position 0 gets 0.0)."""
    import torch

    from rlprm.logprobs import token_logprobs

    batch = Collator(pad_token_id, "none")([{"input_ids": s} for s in sequences])
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with torch.inference_mode():
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = token_logprobs(logits[:, :-1], ids[:, 1:])[0]  # float32 a chunk of rows at a time
    logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1).clamp_min(MIN_LOGP).cpu()
    return [logp[i, :len(s)].tolist() for i, s in enumerate(sequences)]


def step_min_logprobs(logps: Sequence[float], prompt_len: int, step_ends: Sequence[int]) -> list[float]:
    """The lowest token log-probability inside each step (tokens after the previous step end, up to its own)."""
    out, start = [], prompt_len
    for end in step_ends:
        window = logps[start:end + 1]
        out.append(min(window) if window else 0.0)
        start = end + 1
    return out


def stack_confidence(prob: float, min_logp: float, weights: Sequence[float]) -> float:
    """P(correct) from the head's probability and the backbone's lowest token log-probability."""
    p = min(max(prob, 1e-7), 1 - 1e-7)
    z = weights[0] * math.log(p / (1 - p)) + weights[1] * max(min_logp, MIN_LOGP) + weights[2]
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def fit_confidence(probs: Sequence[float], min_logps: Sequence[float], labels: Sequence[bool],
                   l2: float = 1e-3) -> list[float]:
    """Logistic regression of `labels` on (head logit, min log-prob, 1): the `[a, b, c]` of `stack_confidence`."""
    import torch

    if len(probs) != len(min_logps) or len(probs) != len(labels) or not probs:
        raise RewardModelError("fit_confidence needs equally many (at least one) probabilities, features and labels")
    p = torch.tensor(probs, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    x = torch.stack([torch.log(p / (1 - p)), torch.tensor(min_logps, dtype=torch.float64).clamp_min(MIN_LOGP),
                     torch.ones_like(p)], dim=1)
    y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)  # start at "the head alone"
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w[:2] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [round(float(v), 6) for v in w.detach()]


# --------------------------------------------------------------------------- scoring


class RewardModel:
    """Scores solutions step by step (PRM) or as a whole (ORM), one forward pass per solution."""

    def __init__(self, model, tokenizer, convention: Convention, confidence_lm=None):
        if tokenizer.pad_token_id is None:
            raise RewardModelError("the tokenizer has no pad token")
        if convention.confidence is not None and confidence_lm is None:
            raise RewardModelError("this reward model stacks the backbone's token confidence "
                                   "(convention.confidence) but no confidence language model was given")
        self.model = model
        self.tokenizer = tokenizer
        self.convention = convention
        self.confidence_lm = confidence_lm
        model.config.pad_token_id = tokenizer.pad_token_id

    @property
    def kind(self) -> str:
        return self.convention.kind

    @property
    def step_separator(self) -> str:
        return self.convention.step_separator

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _check_separator(self, sep: str | None) -> None:
        check_separator(self.step_separator, sep)

    def _steps(self, solutions) -> list[list[str]]:
        return [split_steps(s, self.step_separator) if isinstance(s, str) else list(s) for s in solutions]

    def _max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def _forward(self, sequences: list[list[int]]):
        """Logits of right-padded `sequences`: (B, T, C) for a PRM, (B, 1) for an ORM."""
        import torch

        collate = Collator(self.tokenizer.pad_token_id, "none")
        batch = collate([{"input_ids": s} for s in sequences])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def _step_probs(self, logits):
        import torch

        probs = torch.softmax(logits.float(), dim=-1)
        return probs[..., self.convention.correct_classes].sum(-1)

    def confidence_features(self, encoded: list) -> list[list[float]]:
        """Per encoded solution, the backbone LM's lowest token log-probability in each step (PRM) or in the
        whole solution (ORM: one number). Needs `confidence_lm`."""
        if self.confidence_lm is None:
            raise RewardModelError("no confidence language model: fit one with rm.confidence_features")
        lm_device = next(self.confidence_lm.parameters()).device
        logps = token_logprobs(self.confidence_lm, [e.input_ids for e in encoded], self.tokenizer.pad_token_id,
                               lm_device)
        if self.kind == "orm":
            return [step_min_logprobs(lp, e.prompt_len, [len(e.input_ids) - 1]) for lp, e in zip(logps, encoded)]
        return [step_min_logprobs(lp, e.prompt_len, e.step_ends) for lp, e in zip(logps, encoded)]

    def score_steps(self, problems: Sequence[str], solutions: Sequence, sep: str | None = None,
                    batch_size: int = 32, head_only: bool = False,
                    beyond_positions: bool = False) -> list[list[float]]:
        """Per solution, the probability that each step is correct; an ORM gives one number, for the final answer.

        `problems` are problem texts (the saved prompt template formats them); `solutions` are step lists or
        texts (split with the saved separator). `sep`, if given, must be the saved separator. With confidence
        stacking fitted, the head's probabilities are combined with the backbone's token confidence, unless
        `head_only`. `beyond_positions`: score solutions longer than max_position_embeddings instead of failing
        (only for rotary positions, which are computed for any index: `rlprm bench-prm`'s bench.too_long).
        """
        self._check_separator(sep)
        if len(problems) != len(solutions):
            raise RewardModelError(f"{len(problems)} problems but {len(solutions)} solutions")
        steps = self._steps(solutions)
        encoded = encode_batch(self.tokenizer, [self.convention.prompt(p) for p in problems], steps, self.step_separator)
        limit = None if beyond_positions else self._max_positions()
        longest = max((len(e.input_ids) for e in encoded), default=0)
        if limit and longest > limit:
            raise RewardModelError(f"a solution is {longest} tokens long, beyond this model's {limit} positions; "
                                   "shorten it (cap generation length) or use a backbone with more positions")
        out: list[list[float]] = [[] for _ in encoded]
        was_training = self.model.training
        self.model.eval()
        try:
            # similar lengths together: less padding; the results go back in the callers' order
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
            for start in range(0, len(order), batch_size):
                chunk = [i for i in order[start:start + batch_size] if steps[i] or self.kind == "orm"]
                if not chunk:
                    continue
                if self.convention.scorer == "lm":
                    from rlprm.reward.lm import score_encoded

                    probs = score_encoded(self.model, self.convention.lm_head, [encoded[i] for i in chunk], self.kind,
                                          self.tokenizer.pad_token_id)
                    for i, p in zip(chunk, probs):
                        out[i] = p
                    continue
                logits = self._forward([encoded[i].input_ids for i in chunk])
                if self.kind == "orm":
                    finals = logits.float().reshape(-1).sigmoid().tolist()
                    for i, p in zip(chunk, finals):
                        out[i] = [p]
                else:
                    probs = self._step_probs(logits).cpu()
                    for row, i in enumerate(chunk):
                        out[i] = probs[row, encoded[i].step_ends].tolist()
                weights = self.convention.confidence
                if weights is not None and not head_only:
                    feats = self.confidence_features([encoded[i] for i in chunk])
                    for i, f in zip(chunk, feats):
                        out[i] = [stack_confidence(p, m, weights) for p, m in zip(out[i], f)]
        finally:
            self.model.train(was_training)
        return out

    def score_steps_per_prefix(self, problems: Sequence[str], solutions: Sequence,
                               batch_size: int = 32) -> list[list[float]]:
        """The slow reference for a PRM: every prefix (prompt + steps[:k+1]) encoded and scored on its own.

        Each prefix is a separate sequence whose last token is its step end; they are batched (right
        padding) so that timing comparisons with `score_steps` are fair. Equal to `score_steps` up to
        float noise, which is what makes the single pass legitimate.
        """
        if self.kind != "prm":
            raise RewardModelError("per-prefix scoring is defined for a PRM")
        steps = self._steps(solutions)
        prompts, prefixes, owner = [], [], []
        for i, (problem, s) in enumerate(zip(problems, steps)):
            for k in range(len(s)):
                prompts.append(self.convention.prompt(problem))
                prefixes.append(s[: k + 1])
                owner.append(i)
        encoded = encode_batch(self.tokenizer, prompts, prefixes, self.step_separator)
        flat: list[float] = [0.0] * len(encoded)
        was_training = self.model.training
        self.model.eval()
        try:
            order = sorted(range(len(encoded)), key=lambda j: len(encoded[j].input_ids))
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                if self.convention.scorer == "lm":
                    from rlprm.reward.lm import score_encoded

                    probs = score_encoded(self.model, self.convention.lm_head, [encoded[j] for j in chunk], "prm",
                                          self.tokenizer.pad_token_id)
                    for j, p in zip(chunk, probs):
                        flat[j] = p[-1]
                    continue
                logits = self._forward([encoded[j].input_ids for j in chunk])
                probs = self._step_probs(logits).cpu()
                for row, j in enumerate(chunk):
                    flat[j] = float(probs[row, len(encoded[j].input_ids) - 1])
                if self.convention.confidence is not None:
                    feats = self.confidence_features([encoded[j] for j in chunk])
                    for j, f in zip(chunk, feats):
                        flat[j] = stack_confidence(flat[j], f[-1], self.convention.confidence)
        finally:
            self.model.train(was_training)
        out: list[list[float]] = [[] for _ in steps]
        for j, i in enumerate(owner):
            out[i].append(flat[j])
        return out


    def score(self, problems: Sequence[str], solutions: Sequence, aggregate: str = "prod", sep: str | None = None,
              batch_size: int = 32) -> list[float]:
        """One score per solution: the step probabilities aggregated (`prod`, `min`, `last`, `mean`).

        For an ORM every aggregation is its single final probability.
        """
        if aggregate not in AGGREGATIONS:
            raise RewardModelError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {aggregate!r}")
        return [_aggregate(p, aggregate) for p in self.score_steps(problems, solutions, sep=sep, batch_size=batch_size)]

    # ----------------------------------------------------------------------- save / load

    def save(self, path: str | Path) -> Path:
        """A plain HF folder (LoRA merged) plus rlprm_rm.json, written to a temporary folder and renamed."""
        path = Path(path)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        with atomic_dir(path) as tmp:
            with quiet_transformers(report=False):
                model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.convention.confidence is not None:
                with quiet_transformers(report=False):
                    self.confidence_lm.save_pretrained(tmp / CONFIDENCE_DIR)
            (tmp / RM_FILE).write_text(json.dumps(asdict(self.convention), indent=2) + "\n")
        return path

    @staticmethod
    def read_convention(path: str | Path, step_separator: str | None = None) -> Convention:
        """The Convention in a saved folder's rlprm_rm.json, checked (readable, a format this rlprm reads, and
        with `step_separator` the separator it was trained with): what `load` reads before any weight."""
        meta = Path(path) / RM_FILE
        if not meta.is_file():
            raise RewardModelError(f"{path} is not an rlprm reward model: it has no {RM_FILE} "
                                   "(train one with `rlprm train-rm`, or save a RewardModel there)")
        try:
            data = json.loads(meta.read_text())
            if data.get("format_version", 0) > FORMAT_VERSION:
                raise RewardModelError(f"{meta} has format_version {data['format_version']}; this rlprm reads up to "
                                       f"{FORMAT_VERSION}: upgrade rlprm")
            convention = Convention(**data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
            raise RewardModelError(f"{meta} is not a readable reward-model description ({type(exc).__name__}: "
                                   f"{str(exc)[:160]}; a truncated copy?): copy the folder again") from None
        check_separator(convention.step_separator, step_separator)
        return convention

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32", step_separator: str | None = None,
             trust_remote_code: bool = False) -> "RewardModel":
        """Load a folder written by `save`. With `step_separator`, refuse a model trained with another one."""
        from rlprm.models import load_tokenizer, torch_dtype

        path = Path(path)
        meta = path / RM_FILE
        convention = cls.read_convention(path, step_separator)
        tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
        weights = torch_dtype(dtype)  # with the tokenizer: what the loads below need from rlprm.models, at once
        if convention.scorer == "lm":
            from transformers import AutoModelForCausalLM

            if convention.lm_head is None or len(convention.lm_head) != 3:
                raise RewardModelError(f"{meta}: scorer `lm` needs lm_head = [w_min, w_mean, b]")
            model = load_checked(AutoModelForCausalLM, path, f"rlprm {convention.kind.upper()} (scorer lm)",
                                 dtype=weights, trust_remote_code=trust_remote_code)
            return cls(model.to(device).eval(), tokenizer, convention)
        model = load_checked(model_class(convention.kind), path, f"rlprm {convention.kind.upper()}",
                             dtype=weights, trust_remote_code=trust_remote_code)
        if model.config.num_labels != convention.num_labels:
            raise RewardModelError(f"{path}: the model has {model.config.num_labels} outputs but {RM_FILE} "
                                   f"describes {convention.num_labels} ({convention.label_names})")
        model.eval()
        confidence_lm = None
        if convention.confidence is not None:
            from transformers import AutoModelForCausalLM

            if not (path / CONFIDENCE_DIR).is_dir():
                raise RewardModelError(f"{meta} stacks token confidence but {path / CONFIDENCE_DIR} is missing")
            confidence_lm = load_checked(AutoModelForCausalLM, path / CONFIDENCE_DIR,
                                         f"rlprm {convention.kind.upper()} confidence LM", dtype=weights,
                                         trust_remote_code=trust_remote_code)
            confidence_lm = confidence_lm.to(device).eval()
        return cls(model.to(device), tokenizer, convention, confidence_lm)


def _aggregate(step_probs, how):
    return aggregate(step_probs, how)


def score_steps_per_prefix(rm: RewardModel, problems: Sequence[str], solutions: Sequence,
                           batch_size: int = 32) -> list[list[float]]:
    """`rm.score_steps_per_prefix`: the slow per-prefix reference for a PRM (the same call as the hub PRMs')."""
    return rm.score_steps_per_prefix(problems, solutions, batch_size)


__all__ = [
    "AGGREGATIONS", "CORRECT", "INCORRECT", "NEUTRAL", "Collator", "Convention", "RewardModel", "RewardModelError",
    "SeparatorMismatch", "CONFIDENCE_DIR", "add_identity_layers", "fit_confidence", "stack_confidence",
    "step_min_logprobs", "token_logprobs", "aggregate", "apply_lora", "build_reward_model", "freeze_body", "check_separator", "encode_examples", "make_convention",
    "load_checked", "reward_loss", "reward_model_from_causal_lm", "score_steps_per_prefix",
]
