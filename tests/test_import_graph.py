"""The package's import graph (tools/import_graph.py): no module imports itself back through others, and the
longest chain stays within 10 modules (issue 28; 12 before the ground-floor modules names, dtypes and hub)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402

LONGEST_CHAIN_NOW = 10  # issue 28: at most 10


def test_the_package_has_no_import_cycles_and_its_longest_chain_does_not_grow():
    g = import_graph.graph()
    assert "quantbench.job.pipeline" in g and "quantbench.measure" in g["quantbench.job.pipeline"]
    assert import_graph.cycles(g) == []
    chain = import_graph.longest_chain(g)
    assert len(chain) <= LONGEST_CHAIN_NOW, " -> ".join(chain)


PARTS = ("job", "study", "ops")
# the only imports from the ground floor into a part (docs/architecture.md): the command, and the backends' knobs
GROUND_TO_PARTS = {("quantbench.__main__", "quantbench.ops.cli"), ("quantbench.schema", "quantbench.job.bench")}


def part(module: str) -> str:
    name = module.split(".")[1] if "." in module else ""
    return name if name in PARTS else "ground"


def test_the_three_parts_import_each_other_only_as_the_architecture_page_says():
    g = import_graph.graph()
    assert {part(m) for m in g} == {"ground", *PARTS}
    across = {(a, b) for a in g for b in g[a] if part(a) != part(b) and part(b) != "ground"}
    assert {(a, b) for a, b in across if part(a) == "ground"} == GROUND_TO_PARTS
    assert {(part(a), part(b)) for a, b in across if part(a) != "ground"} == {("ops", "job"), ("ops", "study")}


def test_function_level_and_relative_imports_count_and_a_cycle_is_found(tmp_path):
    package = tmp_path / "quantbench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from quantbench import b\n")
    (package / "b.py").write_text("from .c import g\n")
    (package / "c.py").write_text("import quantbench.a\n\ng = 1\n")
    names = {import_graph.module_name(p, root=tmp_path): p for p in package.glob("*.py")}
    g = {n: import_graph.imports(n, p, set(names)) for n, p in names.items()}
    assert g["quantbench.a"] == {"quantbench.b"} and g["quantbench.b"] == {"quantbench.c"}
    assert import_graph.cycles(g) == [["quantbench.a", "quantbench.b", "quantbench.c"]]
