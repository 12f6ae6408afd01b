"""The package's structure, read from the source with `ast` (nothing is imported):

- no import circles among rlprm's modules, counting imports inside functions too (a lazy import is still a
  dependency: it only moves the failure to run time);
- no private name (`_name`) imported from another module, in the library or the benchmarks;
- the library never imports `rlprm.testing` (the fixtures users and tests build stand-ins with);
- no function in `rlprm/rl/` over MAX_RL_FUNCTION_LINES lines: the RL code is read as numbered steps, and a longer
  function hides steps that want names of their own.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlprm"
MAX_RL_FUNCTION_LINES = 80

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[tuple[str, str | None]]:
    """(module, imported name or None) for every import in the file, relative ones resolved, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(a.name, None) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                # `from pkg import submodule` depends on the submodule
                out.add((f"{base}.{a.name}", None) if f"{base}.{a.name}" in known else (base, a.name))
    return out


def owner(dotted: str, known: set[str]) -> str | None:
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = {owner(m, known) for m, _ in imported(name, path, known)}
        # a package's own __init__ is run by importing any of its modules: that edge is not a dependency
        graph[name] = {d for d in deps if d is not None and d != name and not name.startswith(d + ".")}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively; sets of more than one module only."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        group.add(m)
                        if m == node:
                            break
                    if len(group) > 1:
                        out.append(group)
    return out


def test_the_graph_sees_imports_inside_functions():
    """The reader must count a lazy import, or every circle hidden in a function would pass."""
    graph = import_graph()
    assert "rlprm.config" in graph["rlprm.cli"]
    # train_rl imports rlprm.rl inside run(): nothing at the top of the file
    top = {n.module for n in ast.parse((PACKAGE / "train_rl.py").read_text()).body if isinstance(n, ast.ImportFrom)}
    assert "rlprm.rl" not in top and "rlprm.rl" in graph["rlprm.train_rl"]


def test_the_cycle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    circles = strongly_connected(import_graph())
    assert not circles, f"import circles among rlprm's modules: {[sorted(c) for c in circles]}"


def test_no_private_name_imported_from_another_module():
    known = set(modules())
    files = [(module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]
    files += [(f"benchmarks.{p.stem}", p) for p in sorted((ROOT / "benchmarks").glob("*.py"))]
    found = []
    for name, path in files:
        for module, imported_name in imported(name, path, known):
            # other projects' private names are their business (and pinned versions); ours must be public
            if (imported_name and imported_name.startswith("_") and not imported_name.startswith("__")
                    and module != name and module.split(".")[0] == "rlprm"):
                found.append(f"{path.relative_to(ROOT)}: from {module} import {imported_name}")
    assert not found, "private names imported across modules (make them public where they live):\n" + "\n".join(found)


def test_the_library_never_imports_the_testing_fixtures():
    graph = import_graph()
    assert "rlprm.testing.standins" in graph  # the fixtures are there to be imported by tests and users
    users = sorted(m for m, deps in graph.items()
                   if not m.startswith("rlprm.testing") and any(d.startswith("rlprm.testing") for d in deps))
    assert not users, f"library modules importing rlprm.testing: {users}"


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(qualified name, lines) of each function or method of `source` longer than `limit` lines, decorators and
    docstring included (a nested function counts inside its parent and on its own)."""
    out = []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    lines = child.end_lineno - first + 1
                    if lines > limit:
                        out.append((name, lines))
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return out


def test_the_length_check_sees_a_long_method():
    body = "\n".join(f"        x{i} = {i}" for i in range(5))
    source = f"class A:\n    def f(self):\n{body}\n\ndef g():\n    return 1\n"
    assert long_functions(source, 4) == [("A.f", 6)]
    assert long_functions(source, 6) == []


def test_no_long_function_in_rl():
    found = [f"{path.relative_to(ROOT)}: {name} ({lines} lines)"
             for path in sorted((PACKAGE / "rl").rglob("*.py"))
             for name, lines in long_functions(path.read_text(), MAX_RL_FUNCTION_LINES)]
    assert not found, (f"functions over {MAX_RL_FUNCTION_LINES} lines in rlprm/rl/ (split them into named steps):\n"
                       + "\n".join(found))
