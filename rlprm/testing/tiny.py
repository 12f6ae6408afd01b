"""A tiny generator fitted on the spot, for tests and benchmarks that need one that writes step-shaped solutions."""

from __future__ import annotations


def fit_generator(tokenizer, problems, steps: int, seed: int = 0):
    """A tiny causal LM (hidden 32, 2 layers) fitted for `steps` full-batch AdamW steps (lr 1e-2) on the reference
    solutions of `problems`, returned in eval mode (a few dozen steps: step-shaped lines; about 100: the solutions
    memorised)."""
    import torch

    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import reference_solution

    model = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
                                 tokenizer, seed=seed)
    texts = [p.prompt + render_steps(reference_solution(p)) + tokenizer.eos_token for p in problems]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


__all__ = ["fit_generator"]
