"""Run tracking: a local metrics.jsonl beside every run, and W&B when wanted.

metrics.jsonl is the source of truth that `rlprm compare` and the tests read:
one JSON object per line with `step`, `time` and the logged values. W&B gets
the same values; it is imported only when it is used.

W&B mode `auto` runs online when an API key is configured (WANDB_API_KEY or a
netrc entry from `wandb login`) and offline otherwise, printing how to sync.
Tests turn it off (`tracking.wandb: disabled`, or WANDB_MODE=disabled).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rlprm.config import Recipe, recipe_to_yaml
from rlprm.files import atomic_write_json, atomic_write_jsonl, atomic_write_text


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(setting: str) -> str:
    """`online`, `offline` or `disabled` for a tracking.wandb setting (env WANDB_MODE wins)."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if setting == "auto":
        return "online" if _has_wandb_key() else "offline"
    return setting


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Writes metrics.jsonl and the resolved recipe into `run_dir`; mirrors to W&B."""

    def __init__(self, run_dir: Path, recipe: Recipe, job: str, tags: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a")
        self._t0 = time.time()
        self._wandb = None
        cfg = recipe.tracking
        mode = wandb_mode(cfg.wandb)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                name=f"{recipe.run.name}-{job}",
                job_type=job,
                tags=sorted(set(cfg.tags + (tags or []))),
                config=recipe.model_dump(mode="json"),
                dir=str(self.run_dir),
                mode=mode,
            )
            if mode == "offline":
                print(f"W&B is offline; upload later with: wandb sync {self.run_dir / 'wandb'}/offline-run-*", file=sys.stderr)

    def log(self, metrics: dict, step: int | None = None) -> None:
        record = {"step": step, "time": round(time.time() - self._t0, 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A table of examples: tables/NAME.jsonl in the run folder and a W&B Table."""
        atomic_write_jsonl(self.run_dir / "tables" / f"{name}.jsonl",
                           (dict(zip(columns, (_jsonable(v) for v in row))) for row in rows))
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)})

    def summary(self, values: dict) -> None:
        """Final numbers: summary.json in the run folder and the W&B run summary."""
        atomic_write_json(self.run_dir / "summary.json", {k: _jsonable(v) for k, v in values.items()}, indent=2)
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def image(self, name: str, path: Path) -> None:
        """A picture already saved in the run folder (the local record), shown in W&B under `name`."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path))})

    @property
    def wandb_run(self):
        """The W&B run this tracker mirrors to; None when W&B is off."""
        return self._wandb

    def finish(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


class NullTracker:
    """A Tracker that records nothing: what ranks other than 0 log to (rank 0 writes metrics.jsonl, W&B and
    summary.json), and what a job given no tracker uses."""

    wandb_run = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def image(self, name: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records a killed run wrote after its last checkpoint (step > `last_step`, and a torn last line),
    so that a resumed run's log reads like an uninterrupted one. Rewritten atomically; returns records dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line the kill cut short
                dropped += 1
                continue
            if record.get("step") is not None and record["step"] > last_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
