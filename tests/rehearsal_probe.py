"""`rlprm/train_rl.py`, with a record of what the run graded, rewarded and turned into advantages (the rehearsal's
checks read it: tests/test_rehearsal.py). Run exactly as the entry point is run, by a user or under the DeepSpeed
launcher:

    RLPRM_PROBE_DIR=DIR python tests/rehearsal_probe.py RECIPE [key=value ...]
    RLPRM_PROBE_DIR=DIR deepspeed --num_gpus 2 tests/rehearsal_probe.py RECIPE [key=value ...]

It wraps, before anything imports them, the package functions every algorithm calls at these points (they are
imported inside the functions that use them, so the wrapped ones are what the run calls), and writes one JSON line
per call to DIR/<what>_rank<R>.jsonl. Nothing in the run changes: each wrapper returns what it wrapped returned.
- `rlprm.data.problems.grade_samples`: the problems (gold answers), the texts and the verdicts;
- `rlprm.reward.tokens.token_rewards`: the caller's module, the texts, token ids, outcomes, PRM step scores, and the result
  (missing answer, truncated, reward events, returns);
- `rlprm.rl.core.gae` (PPO) and `rlprm.rl.core.process_token_advantages` (GRPO): the advantages' size.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(os.environ["RLPRM_PROBE_DIR"])
RANK = os.environ.get("RANK", "0")


def _write(what: str, record: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / f"{what}_rank{RANK}.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _list(x):
    return x.tolist() if hasattr(x, "tolist") else [list(v) if not isinstance(v, (int, float)) else v for v in x]


def _caller() -> str | None:
    """The first module up the stack outside rlprm.reward.tokens and rlprm.reward.sources (whose helpers call
    token_rewards for the algorithms and the evaluation)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in ("rlprm.reward.tokens", "rlprm.reward.sources"):
        frame = frame.f_back
    return None if frame is None else frame.f_globals.get("__name__")


def install() -> None:
    import rlprm.data.problems
    import rlprm.reward.tokens
    import rlprm.rl.core

    grade_samples = rlprm.data.problems.grade_samples
    token_rewards = rlprm.reward.tokens.token_rewards

    def graded(problems, texts, sep="\n"):
        grades = grade_samples(problems, texts, sep)
        _write("grades", {"sep": sep, "golds": [p.gold for p in problems], "problems": [p.text for p in problems],
                          "texts": texts, "answers": [[g.answer for g in row] for row in grades],
                          "correct": [[bool(g.answer_correct) for g in row] for row in grades]})
        return grades

    def rewarded(cfg, texts, token_ids, *args, **kwargs):
        tr = token_rewards(cfg, texts, token_ids, *args, **kwargs)
        lengths = kwargs.get("lengths")
        ids = _list(token_ids)
        if lengths is not None:
            ids = [row[: int(n)] for row, n in zip(ids, _list(lengths))]
        scores = kwargs.get("scores")
        _write("rewards", {
            # who asked: the training step (rlprm.rl.*) or the held-out evaluation (rlprm.evaluation.evaluate)
            "caller": _caller(), "mode": cfg.mode, "source": cfg.source, "dense_form": kwargs.get("dense_form") or cfg.dense_form,
            "sep": kwargs.get("sep"), "last_event_at_eos": bool(kwargs.get("last_event_at_eos", False)),
            "max_tokens": kwargs.get("max_tokens"), "eos_token_id": kwargs.get("eos_token_id"),
            "texts": list(texts), "ids": ids,
            "outcomes": None if kwargs.get("outcomes") is None else [float(o) for o in kwargs["outcomes"]],
            "scores": None if scores is None else [[float(v) for v in s] for s in scores],
            "missing": [bool(m) for m in tr.missing_answer], "truncated": [bool(t) for t in tr.truncated],
            "event_positions": tr.event_positions, "event_values": tr.event_values,
            "returns": [float(r) for r in tr.returns], "stats": tr.stats})
        return tr

    rlprm.data.problems.grade_samples = graded
    rlprm.reward.tokens.token_rewards = rewarded

    def advantages_record(what: str, adv, mask=None) -> None:
        import torch

        a = adv.detach().float()
        m = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.bool()
        vals = a[m]
        _write("advantages", {"what": what, "shape": list(a.shape), "nonzero": int((vals != 0).sum()),
                              "count": int(vals.numel()), "abs_max": float(vals.abs().max()) if vals.numel() else 0.0,
                              "rows_nonzero": [bool(r) for r in (a != 0).any(dim=1).tolist()]})

    gae = rlprm.rl.core.gae

    def gae_recorded(rewards, values, mask, *args, **kwargs):
        adv, ret = gae(rewards, values, mask, *args, **kwargs)
        advantages_record("gae", adv, mask)
        return adv, ret

    rlprm.rl.core.gae = gae_recorded
    process = getattr(rlprm.rl.core, "process_token_advantages", None)
    if process is not None:
        def process_recorded(*args, **kwargs):
            adv = process(*args, **kwargs)
            advantages_record("process", adv)
            return adv

        rlprm.rl.core.process_token_advantages = process_recorded


if __name__ == "__main__":
    install()
    from rlprm.train_rl import main

    sys.exit(main(sys.argv[1:]))
