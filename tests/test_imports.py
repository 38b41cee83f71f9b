"""The import structure: no cycles between files, and the layers import only downwards.

Every import counts, at module level, inside functions and under TYPE_CHECKING (relative ones
resolved). `from pkg import x` imports pkg/__init__.py unless x is a submodule of pkg, so a
package's __init__ may import its submodules only if none of them imports the package back.
Run as a script (`python tests/test_imports.py`) it prints what the tests would report.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Mapping
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("bots", "chatloop", "feedback", "inference", "storage")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(module: str, source: str, known: Collection[str], *,
                   is_package: bool = False) -> set[str]:
    """The absolute names of the modules `source` (the code of `module`) imports anywhere.

    `from m import x` names m.x when that is one of the `known` modules, else m.
    """
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in known else base)
    return names


@cache
def project_imports() -> dict[str, frozenset[str]]:
    """Every module of the layers -> the modules it imports (any, not only the project's)."""
    files = {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}
    return {name: frozenset(imported_names(name, path.read_text(), files,
                                           is_package=path.name == "__init__.py"))
            for name, path in files.items()}


def import_graph(imports: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The edges between the modules of `imports` (a module importing itself is no edge)."""
    return {m: {n for n in targets if n in imports and n != m} for m, targets in imports.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle ([a, b, ..., a]) in each strongly connected part of `graph` that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm (graphs here are small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.add(w)
                if w == v:
                    break
            if len(part) > 1:
                parts.append(part)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, part) for part in parts]


def _cycle_in(graph: Mapping[str, Iterable[str]], part: set[str]) -> list[str]:
    """A shortest way back to the part's first module, through the part (breadth first)."""
    start = min(part)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in part:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strong part


def importing(prefixes: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """`module -> imported` for each module under `prefixes` importing any of `forbidden`."""
    def under(name: str, tops: tuple[str, ...]) -> bool:
        return any(name == t or name.startswith(t + ".") for t in tops)

    return sorted(f"{m} -> {n}" for m, names in project_imports().items() if under(m, prefixes)
                  for n in names if under(n, forbidden))


# the checks on small made-up code: the finder must see a real cycle


def test_the_cycle_finder_finds_cycles_and_only_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    found = find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}})
    assert sorted(found) == [["a", "b", "a"], ["c", "d", "e", "c"]]


def test_a_package_may_import_its_submodules_unless_one_imports_it_back() -> None:
    known = {"pkg", "pkg.sub", "pkg.other"}
    init = "from pkg.sub import thing\nfrom . import other\n"
    sub_back = "def f():\n    from pkg import helper\n"  # helper is no module: pkg/__init__
    sub_fine = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .other import T\n"
    code = {"pkg": init, "pkg.sub": sub_fine, "pkg.other": "import os\n"}

    def graph(sources: dict[str, str]) -> dict[str, set[str]]:
        return import_graph({m: imported_names(m, src, known, is_package=m == "pkg")
                             for m, src in sources.items()})

    assert graph(code) == {"pkg": {"pkg.sub", "pkg.other"}, "pkg.sub": {"pkg.other"},
                           "pkg.other": set()}
    assert find_cycles(graph(code)) == []
    assert find_cycles(graph({**code, "pkg.sub": sub_back})) == [["pkg", "pkg.sub", "pkg"]]
    # `from pkg import other` names the submodule, not the package
    assert find_cycles(graph({**code, "pkg.sub": "from pkg import other\n"})) == []


# the project


def test_the_walk_sees_the_layers() -> None:
    imports = project_imports()
    assert {"chatloop.app", "storage.db", "bots.gateway", "inference.base"} <= set(imports)
    assert "storage.migrate" in imports["chatloop.app"]  # check_ready, at module level


def test_no_import_cycle_between_files() -> None:
    cycles = find_cycles(import_graph(project_imports()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_platform_channels_do_not_import_storage() -> None:
    found = importing(("bots.telegram", "bots.slack"), ("storage",))
    assert not found, "\n".join(found)


def test_storage_and_inference_import_no_higher_layer() -> None:
    found = importing(("storage", "inference"), ("bots", "feedback", "chatloop"))
    assert not found, "\n".join(found)


def test_the_gateway_imports_no_training_code() -> None:
    found = importing(("bots",), ("feedback",))
    assert not found, "\n".join(found)


if __name__ == "__main__":
    for cycle in find_cycles(import_graph(project_imports())):
        print("cycle:", " -> ".join(cycle))
    for rule, found in [
        ("bots/telegram, bots/slack import storage",
         importing(("bots.telegram", "bots.slack"), ("storage",))),
        ("storage, inference import a higher layer",
         importing(("storage", "inference"), ("bots", "feedback", "chatloop"))),
        ("bots imports feedback", importing(("bots",), ("feedback",))),
    ]:
        for line in found:
            print(f"{rule}: {line}")
