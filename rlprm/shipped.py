"""The recipes that ship with the package, and where a shipped recipe's paths point.

The recipes live in the top-level recipes/ folder of a clone; rlprm/recipes
(and rlprm/deepspeed_configs) are links to them, and pyproject's package-data
copies them into a wheel. So the package always finds them at
`<package>/recipes`, and `rlprm train-rl prm_dense` (a bare name) runs one
wherever rlprm is installed.

Where a recipe's relative paths point depends on where its file really is:

- in a clone (the link resolves outside the package folder), relative to the
  recipe file, as for any recipe: `../runs/x` is the clone's runs/x;
- inside an installed package (site-packages), as if the recipe were the file
  ./recipes/NAME.yaml of the working directory: `../runs/x` is ./runs/x, so
  what a job writes (run.output_dir, the generator and PRM that the embedded
  recipes build) never lands in site-packages, and a user's data
  (`../../prm800k/...`) is looked for beside the working directory. A file the
  recipe reads that the package itself ships (`../deepspeed_configs/zero2.json`)
  is read from the package when the working directory has none.
"""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".yaml"

PATH_RULE = ("a shipped recipe's relative paths resolve against the working directory as if the recipe were "
             "./recipes/NAME.yaml there (its ../runs/ outputs go to ./runs/); set run.output_dir or a model key "
             "to an absolute path to put them elsewhere")
"""The rule above, for error messages about a shipped recipe's paths."""


def package_dir() -> Path:
    """The installed rlprm package's folder (symbolic links resolved)."""
    import rlprm

    return Path(rlprm.__file__).resolve().parent


def recipes_dir() -> Path:
    """The folder of the shipped recipes: the package's recipes/ (in a clone that link resolves to the top-level
    recipes/, whose path is returned); the clone's recipes/ where the link is missing (a checkout without links)."""
    inside = package_dir() / "recipes"
    return inside.resolve() if inside.is_dir() else package_dir().parent / "recipes"


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether the recipe file at `path` is inside the installed package (a wheel's copy), not a clone's file."""
    return Path(path).resolve().is_relative_to(package_dir())


def path_rule(source: str | os.PathLike | None) -> str:
    """How the relative paths of the recipe loaded from `source` resolve, for a file-not-found message."""
    if source is not None and is_shipped(source):
        return PATH_RULE
    return "recipe paths are relative to the recipe file"


def shipped_names() -> list[str]:
    """The names of the shipped recipes (`prm_dense`, ...), sorted."""
    folder = recipes_dir()
    return sorted(p.stem for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def find_shipped(name: str) -> Path | None:
    """The shipped recipe a bare name (`prm_dense` or `prm_dense.yaml`, no folder) means, or None."""
    if not name or os.sep in name or "/" in name or name.startswith("."):
        return None
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    file = recipes_dir() / f"{stem}{SUFFIX}"
    return file if file.is_file() else None


def base_dirs(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(folder the recipe's relative paths resolve against, package folder to read shipped files from or None)."""
    folder = Path(path).resolve().parent
    if is_shipped(path):
        return Path.cwd() / "recipes", folder
    return folder, None


def summary(name: str, width: int = 110) -> str:
    """A shipped recipe's first sentence (from its opening comment), at most `width` characters, for `rlprm recipes`."""
    words: list[str] = []
    try:
        for line in (recipes_dir() / f"{name}{SUFFIX}").read_text(encoding="utf-8").splitlines():
            text = line.lstrip("#").strip()
            if not line.startswith("#") or (not text and words):
                break  # the opening comment's first paragraph only
            words += text.split()
    except (OSError, UnicodeDecodeError):
        return ""
    sentence = " ".join(words)
    end = sentence.find(". ")
    sentence = sentence[:end + 1] if end >= 0 else sentence
    return sentence if len(sentence) <= width else sentence[:width - 3].rsplit(" ", 1)[0] + "..."


__all__ = ["PATH_RULE", "base_dirs", "find_shipped", "is_shipped", "package_dir", "path_rule", "recipes_dir",
           "shipped_names", "summary"]
