"""CPU seconds per training step of an LM-scored reward model (`rm.scorer: lm`), by how many length-sorted passes
a batch's forward runs in (rlprm/reward/lm.py, LENGTH_GROUPS); prints JSON and writes it to --out.

    .venv/bin/python benchmarks/rm_step.py                 # 12 timed steps per variant, 1 thread
    .venv/bin/python benchmarks/rm_step.py --steps 4       # quicker

The shape of every small reward model that `rlprm synthetic-supervision` and `rlprm active-learning` train, and of
the demo's PRM and ORM: the tiny Llama of recipes/arith_prepare.yaml (hidden 128, MLP 384, 4 layers, 4 heads,
char tokenizer; built here, untrained: the cost does not depend on the weights), batch 64 drawn at random from the
task's checker-labelled solutions (reference, single-error, shortcut: `rlprm.train_rm.synthetic_records`), PRM
loss. Each timed step is what `train_lm_scorer` does: forward (`batch_token_logprobs` with `groups` passes), the
loss, backward, AdamW. Variants alternate step by step (ABC CBA ...) in this one process, and the machine may be
shared, so read the ratios (`cpu_vs_1_group`), CPU seconds (time.process_time), medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "rm_step.json"))
    args = parser.parse_args()

    import torch

    from rlprm.config import load_recipe
    from rlprm.data.problems import reward_model_arithmetic
    from rlprm.experiments.prepare import build_tokenizer, training_data
    from rlprm.models import build_tiny_causal_lm
    from rlprm.reward import lm
    from rlprm.reward.model import make_convention
    from rlprm.steps import encode_batch
    from rlprm.train_rm import synthetic_records

    torch.set_num_threads(args.threads)
    recipe = load_recipe(ROOT / "recipes" / "arith_prepare.yaml", ["tracking.wandb=disabled"])
    prompts, completions, _, _ = training_data(recipe)
    tokenizer = build_tokenizer(recipe, prompts[:2000] + completions[:2000])
    rm_recipe = load_recipe(ROOT / "recipes" / "prm_train.yaml", ["tracking.wandb=disabled"])
    problems, _ = reward_model_arithmetic(rm_recipe)
    records = synthetic_records(problems[:256], 3, "\n", seed=3)
    conv = make_convention("prm", "\n", rm_recipe.rm.prompt_template)
    encoded = encode_batch(tokenizer, [conv.prompt(r.problem) for r in records], [r.steps for r in records], "\n")
    examples = [(e, lm.span_labels(e, r.labels, "prm", r.answer_correct, conv.correct_classes))
                for r, e in zip(records, encoded) if e.step_ends]
    model = build_tiny_causal_lm(recipe.model.tiny, tokenizer, seed=0)
    head = torch.nn.Parameter(torch.tensor(lm.DEFAULT_HEAD))
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 1e-3}, {"params": [head], "lr": 3e-2}])
    gen = torch.Generator().manual_seed(0)
    model.train()

    def step(groups: int) -> float:
        batch = [examples[i] for i in torch.randperm(len(examples), generator=gen)[:64].tolist()]
        t = time.process_time()
        token_lp = lm.batch_token_logprobs(model, [e.input_ids for e, _ in batch], tokenizer.pad_token_id,
                                           groups=groups)
        loss, _ = lm.lm_loss(token_lp, [lm.scored_spans(e, "prm") for e, _ in batch], [y for _, y in batch], head, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.process_time() - t

    for g in args.groups:  # warm-up: allocator, first backward
        step(g)
    cpu: dict[int, list[float]] = {g: [] for g in args.groups}
    for r in range(args.steps):
        for g in args.groups if r % 2 == 0 else args.groups[::-1]:
            cpu[g].append(step(g))
    med = {g: statistics.median(v) for g, v in cpu.items()}
    lengths = [len(e.input_ids) for e, _ in examples]
    out = {
        "what": "CPU seconds per LM-scorer PRM training step, batch 64, by length groups",
        "model": "tiny Llama hidden 128, MLP 384, 4 layers, 4 heads, char tokenizer (untrained)",
        "tokens_per_example": {"min": min(lengths), "mean": round(statistics.mean(lengths), 1), "max": max(lengths)},
        "threads": args.threads, "steps_per_variant": args.steps, "default_groups": lm.LENGTH_GROUPS,
        "median_cpu_s_per_step": {str(g): round(v, 3) for g, v in med.items()},
        "cpu_vs_1_group": {str(g): round(v / med[1], 3) for g, v in med.items()} if 1 in med else None,
        "load_average": os.getloadavg(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
