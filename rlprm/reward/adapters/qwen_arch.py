"""`QwenProcessRewardModel`: Qwen2.5-Math-PRM's architecture on transformers' own Qwen2 classes.

The checkpoints ship remote code (`Qwen2ForProcessRewardModel`, modeling_qwen2_rm.py) that is reported to
break on transformers > 4.53 (docs/design.md section 6). This rebuilds it so that the published weight names load
as they are: the body under `model.` (a `Qwen2Model`) and a head `score` = Linear(hidden, hidden) -> ReLU ->
Linear(hidden, 2), i.e. `score.0.weight/bias` and `score.2.weight/bias`. That layout was checked against the
public reimplementations that load the published weights by name (vLLM's and SGLang's
`Qwen2ForProcessRewardModel`); the remote file itself could not be read here. An `lm_head.*` in a checkpoint
is ignored, as vLLM does.

This module imports transformers at the top: import it only where a model is loaded (qwen_prm.load).
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen2Model, Qwen2PreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput


class QwenProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen2 body + the PRM head of Qwen2.5-Math-PRM, under the published weight names."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = 2
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, self.num_labels))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        kwargs.pop("use_cache", None)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state
        return TokenClassifierOutput(logits=self.score(hidden))
