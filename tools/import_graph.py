"""The import graph of quantbench's own modules: every `import quantbench...` / `from quantbench... import` in
src/quantbench, function-level ones included (read with `ast`, nothing imported). Prints cycles (strongly connected
groups of modules) and the longest import chain, counting each module on it.

    python tools/import_graph.py            # summary
    python tools/import_graph.py --edges    # and every edge
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "quantbench"


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (a `from pkg import mod` names the module where `mod` is one)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import quantbench.a.b` names quantbench.a.b; else its package
                target = target.rpartition(".")[0]
            if target and target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return groups


def longest_chain(g: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports (each module once), on the graph without cycles."""

    @cache
    def chain(v: str) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for w in g[v]:
            c = chain(w)
            if len(c) > len(best):
                best = c
        return (v, *best)

    return list(max((chain(v) for v in sorted(g)), key=len))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every edge too")
    args = parser.parse_args(argv)
    g = graph()
    if args.edges:
        for v in sorted(g):
            for w in sorted(g[v]):
                print(f"{v} -> {w}")
    groups = cycles(g)
    for group in groups:
        print("cycle:", " <-> ".join(group))
    if groups:
        return 1
    path = longest_chain(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, no cycles")
    print(f"longest import chain: {len(path)} modules")
    print("  " + "\n  -> ".join(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
