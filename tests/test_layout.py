"""The package's layout, checked from its source: no import cycle among ember's modules (counting every
import: at module level, deferred into a function, or under TYPE_CHECKING, since a deferred import only
hides a cycle), ember does not depend on its test harnesses (ember_devtools) but where the CLI starts a
local cluster, and the core stays sans-IO."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("ember", "ember_devtools")
DEVTOOLS_ALLOWED = {"ember.cli.app"}  # `ember cluster up` starts a local cluster on request
CORE_FORBIDDEN = ("asyncio", "socket", "time")  # the core is sans-IO: no loop, no sockets, no clock


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module
    target: str  # the imported ember module (a package stands for its __init__)
    path: Path
    line: int

    def __str__(self) -> str:
        where = self.path.relative_to(SRC.parent) if self.path.is_relative_to(SRC.parent) else self.path
        return f"{self.source} -> {self.target} ({where}:{self.line})"


def modules(src: Path = SRC, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of `packages` under `src`, by dotted name; a package's __init__ is the package."""
    out = {}
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(mods: dict[str, Path]) -> Iterator[Import]:
    """Every import of a module in `mods`, wherever it stands in the importing module."""

    def known(name: str) -> str | None:
        while name and name not in mods:  # `import ember.a.b.C`-like names: the longest module prefix
            name = name.rpartition(".")[0]
        return name or None

    for source, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = known(alias.name)
                    if target is not None:
                        yield Import(source, target, path, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(source, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in mods else known(base)  # `from ember.x import y`, y a submodule
                    if target is not None:
                        yield Import(source, target, path, node.lineno)


def graph(edges: list[Import]) -> dict[str, dict[str, Import]]:
    out: dict[str, dict[str, Import]] = {}
    for e in edges:
        if e.source != e.target:
            out.setdefault(e.source, {}).setdefault(e.target, e)
    return out


def strongly_connected(nodes: list[str], g: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of `g`."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def a_cycle(component: list[str], g: dict[str, dict[str, Import]]) -> list[Import]:
    """One cycle through the component's first module, as the imports that make it (shortest, by BFS)."""
    start = component[0]
    members = set(component)
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, e in g.get(v, {}).items():
                if w not in members or w in came:
                    continue
                came[w] = e
                if w == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def cycles(src: Path = SRC, packages: tuple[str, ...] = PACKAGES) -> list[list[Import]]:
    mods = modules(src, packages)
    g = graph(list(imports(mods)))
    return [a_cycle(c, g) for c in strongly_connected(sorted(mods), g) if len(c) > 1]


def _describe(found: list[list[Import]]) -> str:
    return "\n".join("import cycle:\n  " + "\n  ".join(map(str, cycle)) for cycle in found)


def test_no_import_cycles() -> None:
    found = cycles()
    assert not found, _describe(found)


def test_the_cycle_checker_finds_cycles(tmp_path: Path) -> None:
    """The checker can fail: a cycle hidden behind a deferred import, one under TYPE_CHECKING, and one
    through `from pkg import submodule` and a relative import are all found; a package importing its
    own submodules is not a cycle."""
    pkg = tmp_path / "ember"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from ember import b\n",
        "b.py": "def f():\n    import ember.a\n",  # deferred
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ember.sub.d import X\n",
        "sub/__init__.py": "from . import d\n",
        "sub/d.py": "from ..c import Y\n",  # relative: ember.c
        "e.py": "import ember.sub\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    found = cycles(tmp_path, ("ember",))
    assert sorted(sorted(e.source for e in cycle) for cycle in found) == [
        ["ember.a", "ember.b"],
        ["ember.c", "ember.sub.d"],
    ]
    assert "ember.a -> ember.b" in _describe(found) and "b.py:2" in _describe(found)


def test_the_cycle_checker_on_embers_own_sandbox_cycle(tmp_path: Path) -> None:
    """The cycle this layout removed (isolation -> pool -> isolation, behind a deferred import) is found."""
    pkg = tmp_path / "ember" / "sandbox"
    pkg.mkdir(parents=True)
    (tmp_path / "ember" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "isolation.py").write_text("async def start():\n    from ember.sandbox.pool import Pool\n")
    (pkg / "pool.py").write_text("from ember.sandbox.isolation import Isolation\n")
    (pkg / "jail.py").write_text("from ember.sandbox import cgroups\n")
    (pkg / "cgroups.py").write_text("")
    found = cycles(tmp_path, ("ember",))
    assert [sorted(e.source for e in cycle) for cycle in found] == [["ember.sandbox.isolation", "ember.sandbox.pool"]]


def test_sandbox_has_no_import_cycle() -> None:
    """The sandbox's modules import one way: isolation -> pool -> zygote -> jail, spawn -> cgroups."""
    found = [c for c in cycles() if any(e.source.startswith("ember.sandbox.") for e in c)]
    assert not found, _describe(found)


def test_ember_does_not_import_its_test_harnesses() -> None:
    mods = modules()
    wrong = [
        str(e)
        for e in imports(mods)
        if e.source.split(".")[0] == "ember" and e.target.split(".")[0] == "ember_devtools"
        if e.source not in DEVTOOLS_ALLOWED
    ]
    assert not wrong, "ember imports ember_devtools:\n  " + "\n  ".join(wrong)


def test_the_core_is_sans_io() -> None:
    mods = modules()
    core = {m for m in mods if m == "ember.core" or m.startswith("ember.core.")}
    wrong = [str(e) for e in imports(mods) if e.source in core and e.target not in core]
    for module in sorted(core):
        path = mods[module]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [_resolve(module, path, node)]
            else:
                continue
            wrong += [
                f"{module} -> {name} ({path.relative_to(SRC.parent)}:{node.lineno})"
                for name in names
                if name.split(".")[0] in CORE_FORBIDDEN
            ]
    assert not wrong, "the core imports I/O or ember outside the core:\n  " + "\n  ".join(wrong)


# The marks of a sandbox's lifecycle: the outcomes the host decides and the timers behind them.
LIFECYCLE_MARKS = ("Sandbox.Timedout", "Runtime.ExitError", "Runtime.OutOfMemory", "Runtime.InvalidStateTransition",
                   "INIT_TIMEOUT", "call_later(", ".kill()")


def test_sandbox_lifecycle_lives_only_in_sandbox() -> None:
    """One host for both modes: no module outside ember/sandbox/ decides timeouts, exits or init
    deadlines, or kills a process itself (they ask the host)."""
    found = []
    for path in sorted((SRC / "ember").rglob("*.py")):
        rel = path.relative_to(SRC / "ember")
        if rel.parts[0] == "sandbox":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{rel}:{n}: {mark}" for mark in LIFECYCLE_MARKS if mark in line]
    assert not found, "sandbox lifecycle outside ember/sandbox/:\n" + "\n".join(found)
