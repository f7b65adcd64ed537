"""Imports run one way: contracts <- components <- pipeline <- formats, training, apps. The generic pipeline
imports no format, interop, training, evaluation or speed-up module, and the package has no import circle
(counting imports deferred into functions)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "latentgen"
EDGES = ("latentgen.interop", "latentgen.training", "latentgen.evaluation", "latentgen.fast_path",
         "latentgen.formats.native", "latentgen.formats.stable_diffusion", "latentgen.cli")


def test_importing_the_pipeline_imports_no_edge_module():
    code = "import sys, latentgen.pipeline; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = [name for name in result.stdout.split() if name.startswith(EDGES)]
    assert loaded == [], loaded
    assert "latentgen.pipeline" in result.stdout.split()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The latentgen modules `path` imports, at the top or inside functions (a deferred import is still a
    dependency), leaving out `if TYPE_CHECKING:` blocks (annotations only)."""
    tree = ast.parse(path.read_text())
    skipped = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If)
               and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for child in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports the module; `from module import name`, the module.
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return found & modules


def test_the_package_has_no_import_circle():
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    # A module's own parent packages are initialised before it; importing them is not a circle.
    graph = {name: {target for target in _imports(path, set(files)) if not (name + ".").startswith(target + ".")}
             for name, path in files.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            circle = visit(name)
            assert circle is None, " -> ".join(circle)
