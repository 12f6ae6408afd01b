"""Reward models trained in memory, many per process: the experiments' PRMs and ORMs.

Active learning retrains a PRM after every labelling round and synthetic
supervision trains several small reward models on one data set. Each is
built exactly like `rlprm train-rm` builds the default arithmetic reward model
(`rm.scorer: lm`, rlprm/reward/lm.py: the backbone kept as a causal LM and trained
on the labels alone, with the recipe's rm.* learning rates, batch size and
warm-up), but for a step budget the caller gives and without saving: the
backbone is read from disk once and copied for each training, so a run of
fifty trainings does not reload fifty checkpoints.
"""

from __future__ import annotations

import copy

from rlprm.config import Recipe


class BackboneCache:
    """The recipe's rm backbone (a causal LM) and tokenizer, loaded once; `fresh()` gives a private copy."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._model = None
        self._tokenizer = None

    def _load(self):
        from rlprm.models import load_causal_lm, load_tokenizer, resolve_device
        from rlprm.reward.model import quiet_transformers

        recipe = self.recipe
        backbone = recipe.model.generator if recipe.rm.backbone == "generator" else recipe.rm.backbone
        self._tokenizer = load_tokenizer(backbone, padding_side="right", trust_remote_code=recipe.model.trust_remote_code)
        with quiet_transformers(report=False):
            self._model = load_causal_lm(backbone, recipe.model.dtype, resolve_device(recipe.run.device),
                                         recipe.model.trust_remote_code)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    def fresh(self):
        """A trainable copy of the backbone's weights (the cached one is never trained)."""
        if self._model is None:
            self._load()
        return copy.deepcopy(self._model)

    def confidence_model(self, kind: str = "prm"):
        """The untrained backbone read as an LM scorer: P(step right) = sigmoid(lowest token log-prob + 3).

        Ranks solutions exactly as the generator's own `confidence` selector does under `min` aggregation (the
        baseline a trained reward model must beat); its step AUROC is the confidence AUROC."""
        from rlprm.reward.model import RewardModel, make_convention

        rm_cfg = self.recipe.rm
        convention = make_convention(kind, self.recipe.task.step_separator, rm_cfg.prompt_template)
        convention.scorer, convention.lm_head = "lm", [1.0, 0.0, 3.0]
        return RewardModel(self.fresh().eval(), self.tokenizer, convention)


_SHARED: dict = {}


def shared_backbone(recipe: Recipe) -> BackboneCache:
    """This process's BackboneCache for the recipe's backbone: a job run in a lane (rlprm/experiments/lanes.py)
    reads the checkpoint once per child, not once per job."""
    key = (recipe.model.generator, recipe.rm.backbone, recipe.model.dtype, recipe.run.device)
    if key not in _SHARED:
        _SHARED[key] = BackboneCache(recipe)
    return _SHARED[key]


def fit_lm_reward_model(recipe: Recipe, backbone: BackboneCache, records, kind: str, steps: int, seed: int,
                        progress: bool = False):
    """A `kind` (prm | orm) reward model trained `steps` optimizer steps on `records` with the recipe's rm settings.

    PRM: step labels (records' `labels`); ORM: outcome labels (records' `answer_correct`). Same seed, same batch
    order and weights: two calls that differ only in their records differ only in their labels.
    """
    import torch

    from rlprm.reward.model import RewardModel, make_convention
    from rlprm.reward.lm import train_lm_scorer

    rm_cfg = recipe.rm
    convention = make_convention(kind, recipe.task.step_separator, rm_cfg.prompt_template)
    convention.scorer = "lm"
    torch.manual_seed(seed)
    model = backbone.fresh()
    max_length = rm_cfg.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    fit = train_lm_scorer(
        model, backbone.tokenizer, records, convention, steps=steps, batch_size=rm_cfg.batch_size,
        learning_rate=rm_cfg.learning_rate, head_learning_rate=rm_cfg.head_learning_rate, lm_coef=rm_cfg.lm_coef,
        weight_decay=rm_cfg.weight_decay, warmup_ratio=rm_cfg.warmup_ratio, max_grad_norm=rm_cfg.max_grad_norm,
        max_length=max_length, seed=seed, progress=progress)
    convention.lm_head = fit["head"]
    return RewardModel(model.eval(), backbone.tokenizer, convention)
