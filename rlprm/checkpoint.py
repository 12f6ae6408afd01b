"""Checkpoints that are never half-written, resume, and export to a plain HF folder.

Layout of a run folder:

    checkpoints/epoch-0001/   model/ (HF folder), extra/ (more HF folders, e.g. the value model),
                              state.pt (optimizer, scheduler, RNG states, counters)
    checkpoints/latest        the name of the newest COMPLETE checkpoint

A checkpoint is written into `epoch-NNNN.tmp/` and renamed when complete;
`latest` is rewritten (temporary file + rename) only after that
(rlprm/files.py). A crash at any moment therefore leaves the previous
`latest` intact and loadable, and a stale `.tmp` folder is simply
overwritten next time.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from rlprm.files import atomic_dir, atomic_write_text
from rlprm.launch import unwrap

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def rng_state() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, epoch: int, model, tokenizer, state: dict, extra_models: dict | None = None) -> Path:
    """Write checkpoints/epoch-NNNN atomically and point `latest` at it. `state` is torch-saveable."""
    import torch

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    with atomic_dir(root / name) as tmp:
        unwrap(model).save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        for key, extra in (extra_models or {}).items():
            unwrap(extra).save_pretrained(tmp / "extra" / key)
        torch.save({**state, "epoch": epoch, "rng": rng_state()}, tmp / "state.pt")
    atomic_write_text(root / LATEST, name + "\n")
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def start_or_resume(run_dir: Path, resume: bool, error: type[Exception], writes: bool = True) -> Path | None:
    """The checkpoint an RL job continues from (None: a fresh start).

    A fresh start into a folder that holds checkpoints raises `error` (resuming is explicit, never a silent mix);
    `--resume` with nothing to resume starts from the beginning. A fresh start's metrics.jsonl starts empty
    (only where `writes`: the process that logs).
    """
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        print(f"--resume: {run_dir} has no complete checkpoint; starting from the beginning")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise error(f"{run_dir} already holds checkpoints: continue it with --resume, or set another "
                    "run.output_dir (or delete the folder) to start over")
    if ckpt is None and writes and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # a crashed earlier try left nothing to resume
    return ckpt


def load_state(checkpoint: Path, restore_rng: bool = True) -> dict:
    import torch

    state = torch.load(Path(checkpoint) / "state.pt", weights_only=False)
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def export(run_dir: Path, out_dir: Path | None = None) -> Path:
    """The latest checkpoint's model as a plain HF folder (LoRA merged) + recipe.yaml + final metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export ({CHECKPOINTS}/{LATEST} is missing)")
    out_dir = Path(out_dir) if out_dir else run_dir / "export"
    src = ckpt / "model"
    if (src / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(src).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(src)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        for name in ("recipe.yaml", "summary.json"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, tmp / name)
        (tmp / "rlprm_export.json").write_text(json.dumps({"from": str(ckpt)}, indent=1) + "\n")
    return out_dir
