"""The project's modules form layers: no import circle, counting imports made inside functions (a
circle there is still a circle, only hidden until the call)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed names of the repository's folders (pyproject's package-dir)
PACKAGES = {"pneumonia_kfp": "pneumonia_kfp", "components": "pneumonia_kfp.components",
            "pipelines": "pneumonia_kfp.pipelines"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports_of(path: Path, package: str, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (`from pkg import module` counts as the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {}
    for name, path in found.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        graph[name] = imports_of(path, package, set(found)) - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_circle_hidden_in_a_function(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import pneumonia_kfp.b\n")
    b.write_text("def f():\n    from pneumonia_kfp import a\n")
    known = {"pneumonia_kfp.a", "pneumonia_kfp.b"}
    graph = {"pneumonia_kfp.a": imports_of(a, "pneumonia_kfp", known),
             "pneumonia_kfp.b": imports_of(b, "pneumonia_kfp", known)}
    assert circles(graph) == [["pneumonia_kfp.a", "pneumonia_kfp.b"]]


def test_the_graph_sees_the_real_imports():
    graph = import_graph()
    assert "pneumonia_kfp.storage" in graph["pneumonia_kfp.data"]
    assert "pneumonia_kfp.pipelines.pipeline" in graph["pneumonia_kfp.pipelines.cli"] or \
        any(m.startswith("pneumonia_kfp.pipelines.") for m in graph["pneumonia_kfp.pipelines.cli"])


def test_no_import_circles():
    assert circles(import_graph()) == []
