"""The documentation holds together: every relative link in README.md and docs/*.md names a file of this
repository (and, for `#anchor` links into Markdown, a heading of it), and nothing in the repository cites a
design file that lives outside it (the design is docs/design.md)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# files written by other parts of the work that land with the same merge: a link to them is allowed before they exist
EXPECTED_ELSEWHERE = {ROOT / "docs" / "reproducibility.md"}


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (code fences skipped)."""
    out, fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if dest in EXPECTED_ELSEWHERE:
            continue
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_anchor_rule_matches_github():
    """The anchor rule the link check uses, on headings of the shapes these docs have."""
    doc = ROOT / "docs" / "design.md"
    assert "5-rewards-where-they-sit-on-the-tokens" in anchors(doc)
    assert "rlprm-bench-prm" in anchors(ROOT / "docs" / "reward_models.md")


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 15_500, "README.md over ~15 KB: move the detail into docs/"
    for needed in ("make demo", "make test", "source .venv/bin/activate",
                   "deepspeed rlprm/train_rl.py recipes/prm_dense.yaml", "docs/bring_your_own_model.md",
                   "docs/public_prms.md", "docs/results.md", "docs/design.md"):
        assert needed in readme, needed


def test_nothing_cites_a_design_file_outside_the_repository():
    cited = []
    for folder in ("rlprm", "recipes", "tests", "benchmarks", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml", ".md", ".json", ".toml") or path == Path(__file__):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if re.search(r"DESIGN\.md|\bDESIGN \d|\(DESIGN\b", line):
                    cited.append(f"{path.relative_to(ROOT)}:{n}")
    for path in (ROOT / "README.md", ROOT / "Makefile"):
        if "DESIGN.md" in path.read_text(encoding="utf-8"):
            cited.append(path.name)
    assert not cited, "cite docs/design.md instead: " + ", ".join(cited)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_tracker_language(doc):
    """A reader cannot follow "issue 26" or "target missed": the project's issue tracker is not theirs."""
    found = [f"{doc.relative_to(ROOT)}:{n}: {line.strip()[:80]}"
             for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bissues? \d+\b|\bissue #\d+", line, re.I)]
    assert not found, "say what the thing is, not its tracker number:\n" + "\n".join(found)
