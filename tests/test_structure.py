"""The package's shape: no import circle (imports inside functions included), and no
module reaching into another package's private names."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cnnviz_fast"


def _modules():
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, parts[-1] == "__init__")
    return found


MODULES = _modules()
NATIVE = {"cnnviz_fast._C"}  # the compiled extension: imports nothing of ours


def _imports(name, path, is_package):
    """``(imported module, imported names, line)`` for every import in the file, at any depth."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cnnviz_fast"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("cnnviz_fast"):
                yield module, [alias.name for alias in node.names], node.lineno


def _edges():
    edges = {name: set() for name in MODULES}
    for name, (path, is_package) in MODULES.items():
        for module, names, _ in _imports(name, path, is_package):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            native = [n for n in names if f"{module}.{n}" in NATIVE]
            if len(targets) + len(native) < len(names) or not names:  # names defined in the module itself
                targets.append(module)
            edges[name].update(t for t in targets if t in MODULES and t != name)
    return edges


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
            if len(component) > 1:
                result.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return result


def test_the_graph_sees_imports_inside_functions():
    # the CLI's commands import the report at module level; the metrics' report writer does
    # too; a function-level import must be an edge as well
    source = "def f():\n    from ..report import Report\n"
    tree = ast.parse(source)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "report" for n in ast.walk(tree))
    assert "cnnviz_fast.report" in _edges()["cnnviz_fast.metrics.dataset"]


def test_no_import_circle():
    cycles = _cycles(_edges())
    assert not cycles, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_a_circle_would_be_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(edges) == [["a", "b", "c"]]


def _subpackage(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_of_another_package(name):
    path, is_package = MODULES[name]
    for module, names, line in _imports(name, path, is_package):
        if _subpackage(module) == _subpackage(name) or module == "cnnviz_fast":
            continue
        private = [part for part in module.split(".")[1:] if part.startswith("_")]
        private += [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"{path.name}:{line} imports private {private} from {module}"
