"""Run tracking: a local metrics.jsonl beside every run, and W&B when wanted.

metrics.jsonl is the source of truth that `rlprm compare` and the tests read:
one JSON object per line with `step`, `time` and the logged values. W&B gets
the same values; it is imported only when it is used.

W&B mode `auto` runs online when an API key is configured (WANDB_API_KEY or a
netrc entry from `wandb login`) and offline otherwise, printing how to sync.
Tests turn it off (`tracking.wandb: disabled`, or WANDB_MODE=disabled).

Resume: the W&B run id is kept in RUN_DIR/wandb_run_id, so a resumed job
continues the same W&B run (online or offline). A run killed after its last
checkpoint had already sent W&B some steps that the resumed job recomputes;
W&B keeps a run's history append-only (steps must increase), so those steps are
not sent again (`wandb_seen_step`): W&B keeps the killed run's values for them
(equal on CPU with the same seed), while metrics.jsonl, the source of truth, is
cut back to the checkpoint (`cut_metrics`) and holds the resumed job's values.
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

    def __init__(self, run_dir: Path, recipe: Recipe, job: str, tags: list[str] | None = None, resume: bool = False,
                 wandb_seen_step: int | None = None):
        """`resume`: continue the W&B run of RUN_DIR/wandb_run_id; `wandb_seen_step`: the last step W&B already
        has (from a killed earlier try), not sent again."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a")
        self._t0 = time.time()
        self._wandb = None
        self._wandb_seen = wandb_seen_step
        cfg = recipe.tracking
        mode = wandb_mode(cfg.wandb)
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
            if run_id is None:
                import secrets

                run_id = secrets.token_hex(4)  # not from `random`: the run's own RNG streams stay untouched
                atomic_write_text(id_file, run_id + "\n")
            self._wandb = wandb.init(
                id=run_id,
                resume="allow",
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
        if self._wandb is not None and not (step is not None and self._wandb_seen is not None
                                                and step <= self._wandb_seen):
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


def cut_metrics(path: Path, last_step: int, size: int | None = None) -> int | None:
    """Cut metrics.jsonl back to what it held when a checkpoint was written; returns the last step it held before.

    `size`: the file's length in bytes at the checkpoint (exact, whatever the algorithm logs at which step);
    None (a checkpoint from before rlprm stored it): drop the records after `last_step` (`truncate_metrics`).
    The returned step is the last one a killed run logged (and sent to W&B); None for an empty or missing file.
    """
    path = Path(path)
    if not path.exists():
        return None
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(json.loads(line).get("step"))
            except json.JSONDecodeError:
                pass
    seen = max((s for s in steps if s is not None), default=None)
    if size is None:
        truncate_metrics(path, last_step)
    elif path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)
    return seen


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
