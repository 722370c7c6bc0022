"""scripts/mutation.py names, per module, the functions to mutate and the tests that judge them. Functions move
and tests get renamed: a stale name there silently mutates nothing or runs no test, so every name must exist."""
import ast
import fnmatch
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mangled_names(path: Path) -> set[str]:
    """The names mutmut gives a file's functions: x_<function>, xǁ<Class>ǁ<method>."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(f"x_{node.name}")
        elif isinstance(node, ast.ClassDef):
            methods = [f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            names |= {f"xǁ{node.name}ǁ{f.name}" for f in methods}
    return names


def repository_path(installed: str) -> Path:
    for package in ("pipelines", "components"):
        installed = installed.replace(f"pneumonia_kfp/{package}/", f"{package}/")
    return ROOT / installed


def test_every_function_and_test_the_mutation_map_names_exists():
    modules = runpy.run_path(str(ROOT / "scripts" / "mutation.py"), run_name="mutation_map_check")["MODULES"]
    stale = []
    for name, module in modules.items():
        source = repository_path(module.source)
        if not source.is_file():
            stale.append(f"{name}: no {module.source}")
            continue
        defined = mangled_names(source)
        stale += [f"{name}: no function {f} in {module.source}" for f in module.functions
                  if not fnmatch.filter(defined, f)]
        for test in module.tests:
            file, _, function = test.partition("::")
            if not (ROOT / file).is_file():
                stale.append(f"{name}: no test file {file}")
            elif function and f"def {function.split('[')[0]}(" not in (ROOT / file).read_text():
                stale.append(f"{name}: no test {test}")
    assert not stale, "scripts/mutation.py names what does not exist:\n" + "\n".join(stale)


def test_the_check_sees_a_method_and_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    pass\n\n\nclass C:\n    def g(self):\n        pass\n")
    assert mangled_names(source) == {"x_f", "xǁCǁg"}
