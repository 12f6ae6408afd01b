"""Files that are never half-written, and JSONL read with errors that name the line.

Every file or folder a job leaves for a person or a later stage (a checkpoint,
the `latest` pointer, summary.json, a plot, a sample cache) is written to a
temporary sibling and renamed onto its name only when it is complete: a crash
at any moment leaves the previous version, or nothing, never half of one.
The rename is atomic because the temporary sibling sits on the same file system.

(Named `files`, not `io`: `python rlprm/train_rl.py` puts this folder first on
sys.path, where a module called `io` would stand in for the standard library's.)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path to write instead of `path` (by any means, e.g. another library's save call).

    When the block ends without an error the temporary file replaces `path`; when it raises, the temporary
    file is removed and `path` keeps what it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one per process: parallel lanes (demo, several ranks) may write the same file at the same moment
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename, or a power cut could leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`path` holds `text`, whole, or keeps what it held before."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """`obj` as JSON (one trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable) -> None:
    """One JSON value a line, written atomically; `rows` may be a generator (it is consumed inside)."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """An empty temporary folder to fill instead of `path`; it becomes `path` only when the block ends without an error.

    A folder cannot be swapped in one step: the old one is renamed aside, the new one renamed in, then the old one
    deleted, so a crash in between leaves `PATH.old` (the previous version), never a half-written `PATH`. A
    temporary folder left by a killed earlier try is cleared first; one left by an error is removed.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure as a file (its format from `path`'s suffix), written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or None)
    finally:
        plt.close(fig)


def read_jsonl(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; `error` (message naming the file and line) for a missing
    file or a line that is not JSON. Lazy: a caller that needs only the first lines reads only those."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    with path.open("rb") as f:  # decoded line by line, so that a binary file's error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{lineno}: {not_text(exc)}") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: not valid JSON ({json_problem(exc)})") from None
            yield lineno, value


def json_problem(exc: json.JSONDecodeError) -> str:
    """What a JSONDecodeError says and at which column (the caller names FILE:LINE): `Expecting ',' delimiter at
    column 7`. Some of json's messages end in "at" themselves (`Unterminated string starting at`, `Invalid control
    character at`): they get the column after them, not a second "at" (or a dangling one)."""
    where = f"column {exc.colno}"
    return f"{exc.msg} {where}" if exc.msg.endswith(" at") else f"{exc.msg} at {where}"


def not_text(exc: UnicodeDecodeError) -> str:
    """What a UnicodeDecodeError means for a file a user named: it is not text (a compressed or binary file)."""
    return (f"not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}): a compressed or "
            "binary file? Give the uncompressed JSON / JSONL / YAML text file")


__all__ = ["atomic_dir", "atomic_file", "atomic_write_json", "atomic_write_jsonl", "atomic_write_text", "json_problem",
           "not_text",
           "read_jsonl", "save_figure"]
