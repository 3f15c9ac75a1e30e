"""Package layout: the benchmark scorers live under storms_dist.eval (benchmarks/ holds only speed scripts), and
no import cycle runs through storms_dist.thoughts (imports inside functions included)."""

from __future__ import annotations

import ast
import importlib.util

from conftest import REPO


def internal_imports(path, package: str) -> set[str]:
    """Modules of ``package`` that a file imports anywhere in it (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith(package + ".") and n.count(".") == package.count(".") + 1}
    return found


def test_thoughts_modules_import_each_other_without_a_cycle():
    package = "storms_dist.thoughts"
    files = sorted((REPO / "storms_dist" / "thoughts").glob("*.py"))
    graph = {f"{package}.{f.stem}": internal_imports(f, package) - {f"{package}.{f.stem}"}
             for f in files if f.stem != "__init__"}
    visiting, done = [], set()

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(module):], module])}"
        if module in done:
            return
        visiting.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)
    assert f"{package}.naming" in graph[f"{package}.generators"] & graph[f"{package}.pipeline"]


def test_benchmark_scorers_live_with_evaluation():
    assert importlib.util.find_spec("storms_dist.benchmarks") is None
    for name in ("common", "judge", "mmvu", "mvbench", "tempcompass", "videomme", "cli"):
        assert importlib.util.find_spec(f"storms_dist.eval.benchmarks.{name}") is not None, name
    assert not list((REPO / "benchmarks").glob("__init__.py"))  # the speed scripts are scripts, not a package
