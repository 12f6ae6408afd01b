"""The frozen reference of a KL-regularised run: a second copy of the generator, or, with LoRA, the policy's own base.

A LoRA policy is the generator's weights, frozen, plus trainable adapters, so the
base with its adapters switched off IS the starting model: no second copy of
the weights is loaded (at 1.5B-7B that copy is 3-14 GB of bf16 per GPU). The
reference's log-probs then cost a forward pass of the policy's own weights under
peft's `disable_adapter()`, which also holds under DeepSpeed (the weights the
pass reads are the ones the engine keeps, whole or gathered layer by layer).
Which reference a run gets is decided where every model is loaded (`rl.models.load_models`).
"""

from __future__ import annotations

class AdaptersOff:
    """A peft model seen with its adapters disabled: the reference that `ppo.rollout_logprobs` and
    `evaluation.evaluate.response_logprobs` call like a model.

    A call runs in eval mode (no dropout: the reference is deterministic) and without gradients, and restores the
    model's mode after. Every other attribute (`parameters`, `config`, `get_output_embeddings`, ...) is the wrapped
    model's own, so `eval()`/`train()` act on the policy itself; the callers restore its mode as they found it.
    """

    def __init__(self, peft_model):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(f"AdaptersOff needs a peft model; got {type(peft_model).__name__}")
        self.model = peft_model

    def __call__(self, *args, **kwargs):
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)

    forward = __call__

    def __getattr__(self, name):
        return getattr(self.model, name)


__all__ = ["AdaptersOff"]
