"""Checkpoints that are never half-written, resume, and export to a plain HF folder.

Layout of a run folder:

    checkpoints/epoch-0001/   model/ (HF folder), extra/ (more HF folders, e.g. the value model),
                              state.pt (optimizer, scheduler, RNG states, counters),
                              ranks/rankR.pt (what each rank alone holds: its ZeRO shard of the optimizers)
    checkpoints/latest        the name of the newest COMPLETE checkpoint

A checkpoint is written into `epoch-NNNN.tmp/` and renamed when complete;
`latest` is rewritten (temporary file + rename) only after that
(rlprm/files.py). A crash at any moment therefore leaves the previous
`latest` intact and loadable, and a stale `.tmp` folder is simply
overwritten next time.

RNG states: python, numpy, torch and (when CUDA is available) every CUDA
device's. With several ranks, rank 0 writes the checkpoint but every rank has
its own sampling stream (`rl.distributed.Dist.split_streams`): the ranks'
states are gathered to rank 0 and saved together in state.pt (`rank_rng`), so
that they land in the same atomic folder as the weights, and each rank
restores its own (`load_state(rank=)`).

ZeRO partitions the optimizer states (and fp32 master weights) over the
ranks: no rank holds them whole. Each rank's shard is sent to rank 0, one
after the other, and written into the same temporary folder as the weights
(`ranks/rankR.pt`), so they are renamed in together, the single writer kept;
on resume each rank reads back its own (`load_state(rank=)` puts it in
`state["rank_state"]`).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

from rlprm.files import atomic_dir, atomic_write_text
from rlprm.launch import unwrap

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RANKS = "ranks"


def rng_state() -> dict:
    """This process's random number generators: python, numpy, torch's CPU one and every CUDA device's."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # sampling on a GPU draws from the device's generator: without it a resumed run would not replay
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned. CUDA states are restored where CUDA is available (one per device
    that is present: a resume on fewer devices restores the first ones), and skipped on a CPU-only machine."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(cuda)[: torch.cuda.device_count()])


def save_checkpoint(run_dir: Path, epoch: int, model, tokenizer, state: dict, extra_models: dict | None = None,
                    rank_rng: list[dict] | None = None, rank_states: Iterable | None = None) -> Path:
    """Write checkpoints/epoch-NNNN atomically and point `latest` at it. `state` is torch-saveable.

    `rank_rng`: with several ranks, every rank's `rng_state()` in rank order (gathered to the writing rank).
    `rank_states`: every rank's own torch-saveable state in rank order (ZeRO shards), e.g. the generator
    `Dist.from_every_rank`, which receives each while the previous one is on disk.
    """
    import torch

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    with atomic_dir(root / name) as tmp:
        if rank_states is not None:
            # first: the other ranks wait in their send until this loop takes their shard
            (tmp / RANKS).mkdir()
            for rank, part in enumerate(rank_states):
                torch.save(part, tmp / RANKS / f"rank{rank}.pt")
                del part  # the next rank's shard arrives in its place, not beside it
        unwrap(model).save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        for key, extra in (extra_models or {}).items():
            unwrap(extra).save_pretrained(tmp / "extra" / key)
        ranks = {"rank_rng": list(rank_rng)} if rank_rng else {}
        torch.save({**state, "epoch": epoch, "rng": rng_state(), **ranks}, tmp / "state.pt")
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


def load_state(checkpoint: Path, restore_rng: bool = True, rank: int = 0) -> dict:
    """The checkpoint's state.pt; with `restore_rng`, rank `rank`'s RNG streams restored as they were saved.

    A rank the checkpoint holds no stream for (one written by fewer ranks, or before per-rank streams were
    saved) keeps its current stream, rank 0 excepted: it restores the writer's own.
    `state["rank_state"]` is what `save_checkpoint(rank_states=)` wrote for rank `rank` (on the CPU; None if
    nothing), and `state["ranks_written"]` how many ranks wrote one.
    """
    import torch

    state = torch.load(Path(checkpoint) / "state.pt", weights_only=False)
    shards = Path(checkpoint) / RANKS
    own = shards / f"rank{rank}.pt"
    state["rank_state"] = torch.load(own, map_location="cpu", weights_only=False) if own.is_file() else None
    state["ranks_written"] = len(list(shards.glob("rank*.pt"))) if shards.is_dir() else 0
    if restore_rng:
        saved = state.get("rank_rng") or []
        if rank < len(saved):
            set_rng_state(saved[rank])
        elif rank == 0:
            set_rng_state(state["rng"])
        else:
            print(f"resume: {checkpoint} holds no RNG state for rank {rank} (written by {max(1, len(saved))} "
                  "rank(s)); this rank keeps a fresh stream, so the run will not replay exactly")
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
