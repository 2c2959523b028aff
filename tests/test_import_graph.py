"""The package's import graph follows docs/design.md: stages in pipeline order, a module imports only from its
own stage and the ones below it, and no cycle (function-level imports included)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dist_reshard")
# Lowest first; the entry points at the package root (the CLI, the Python API, `python -m` shims) sit above all.
STAGES = ("base", "formats", "config", "families", "source", "plan", "read", "exchange", "writers", "run",
          "testing", "tools")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules `name` imports anywhere in its body."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dist_reshard"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "dist_reshard":
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
    return {m for m in found if m in modules and m != name}


def _stage(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES):
        return STAGES.index(parts[1])
    return len(STAGES)  # dist_reshard itself and its entry modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_lives_in_a_stage_or_is_an_entry_point():
    entries = {"dist_reshard", "dist_reshard.api", "dist_reshard.launch", "dist_reshard.inspect",
               "dist_reshard.verify", "dist_reshard.demo"}
    stray = [m for m in _graph() if _stage(m) == len(STAGES) and m not in entries]
    assert not stray, f"modules outside the stage folders: {stray}"


def test_no_module_imports_from_a_later_stage():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets if _stage(t) > _stage(m)]
    assert not upward, "imports against the pipeline order:\n" + "\n".join(sorted(upward))


def test_the_converter_never_imports_the_testing_harness():
    users = [m for m, targets in _graph().items() for t in targets
             if t.startswith("dist_reshard.testing") and not m.startswith(("dist_reshard.testing", "dist_reshard.tools.demo"))]
    assert not users, f"testing/ is test and demo support only: {users}"


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted cycle are both reported."""
    pkg = tmp_path / "dist_reshard"
    for stage in ("base", "plan"):
        (pkg / stage).mkdir(parents=True)
        (pkg / stage / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "base" / "a.py").write_text("from ..plan import b\n")
    (pkg / "plan" / "b.py").write_text("def f():\n    from ..base import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    monkeypatch.setattr(__import__(__name__), "PACKAGE", str(pkg))
    graph = _graph()
    assert graph["dist_reshard.base.a"] == {"dist_reshard.plan", "dist_reshard.plan.b"}
    assert "dist_reshard.base.a" in graph["dist_reshard.plan.b"]
    import pytest
    with pytest.raises(AssertionError, match="pipeline order"):
        test_no_module_imports_from_a_later_stage()
    with pytest.raises(AssertionError, match="cycles"):
        test_the_import_graph_has_no_cycle()
