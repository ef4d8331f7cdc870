"""The layers of the package (code map: ``src/socratune/__init__.py``) are enforced here.

- Each folder has a layer, and a module imports only from its own layer or lower ones: ``core``
  (0) stands on nothing, ``cli`` (5) stands on everything. Every import counts, those inside
  functions and under ``TYPE_CHECKING`` too, because each is a dependency all the same.
- No import cycle between the package's modules, by the same imports.
- No module over 500 lines and no function over 80.
- Every module except the training recipe and its Trainer parts imports no torch or transformers
  at import time, so ``socratune --help``, ``validate``, ``score`` and ``status`` stay instant.

The first three read the source with ``ast`` (fast tier); the last imports every module in a
fresh interpreter (slow). Modules are found by walking the package, so a new module is checked
without being listed; a new folder must be given its layer in ``LAYERS``. Each checker is tested
on a deliberately bad package.

    python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import socratune

PACKAGE = Path(socratune.__file__).resolve().parent
SRC = str(PACKAGE.parent)

# Each folder's layer; the package's own __init__ and __main__ sit at the top with the CLI.
LAYERS = {"core": 0, "data": 1, "style": 1, "model": 2, "generation": 2, "training": 3,
          "synth": 4, "evaluation": 4, "serving": 4, "cli": 5, "__init__": 5, "__main__": 5}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

HEAVY = {"torch", "transformers"}
# The recipe and the Trainer's parts: built on transformers by nature, imported only by `train`.
TRAINING_MODULES = {"socratune.training.train", "socratune.training.hf_trainer", "socratune.training.callbacks",
                    "socratune.training.preference", "socratune.training.progress", "socratune.__main__"}


def module_name(path: Path, root: Path) -> str:
    """``socratune.core.config`` for ROOT/core/config.py; a package is named by its folder."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def package_imports(root: Path) -> dict[str, set[str]]:
    """Every module of the package under ``root`` and the package modules it imports, anywhere in
    its source (a name imported from a package is the submodule where there is one)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module
                         for alias in node.names]
            else:
                continue
            for target in found:
                while target and target not in files:  # `import socratune.core.config` and the like
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def layer_of(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
                  for name, targets in graph.items() for target in targets if layer_of(target) > layer_of(name))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def oversized(root: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES, by name and size."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{relative}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append(f"{relative}:{node.lineno} {node.name}: {size} lines")
    return found


def heavy_at_module_level(path: Path) -> list[str]:
    """The torch / transformers imports a module runs when it is imported (not those inside
    functions or under ``if TYPE_CHECKING:``)."""
    found = []
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [name for name in names if name.partition(".")[0] in HEAVY]
    return found


def test_every_folder_has_a_layer():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} <= set(LAYERS)


def test_no_module_imports_from_a_higher_layer():
    assert layer_violations(package_imports(PACKAGE)) == []


def test_the_core_imports_no_torch_or_transformers_at_module_level():
    assert {p.name: heavy_at_module_level(p) for p in (PACKAGE / "core").glob("*.py") if heavy_at_module_level(p)} == {}


def test_no_import_cycle_between_the_package_modules():
    assert find_cycle(package_imports(PACKAGE)) is None


def test_no_module_over_500_lines_and_no_function_over_80():
    assert oversized(PACKAGE) == []


def test_the_checkers_catch_an_upward_import_a_cycle_and_a_giant(tmp_path):
    root = tmp_path / "socratune"
    for folder in ("core", "training"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("", encoding="utf-8")
    (root / "__init__.py").write_text("", encoding="utf-8")
    (root / "core" / "config.py").write_text("def load():\n    from ..training import recipe\n", encoding="utf-8")
    (root / "training" / "recipe.py").write_text(
        "from ..core.config import load\n\n\ndef long():\n" + "    x = 1\n" * 80, encoding="utf-8")
    graph = package_imports(root)
    assert graph["socratune.core.config"] == {"socratune.training.recipe"}
    assert layer_violations(graph) == [
        "socratune.core.config (layer 0) imports socratune.training.recipe (layer 3)"]
    assert find_cycle(graph) == ["socratune.core.config", "socratune.training.recipe", "socratune.core.config"]
    assert oversized(root) == ["training/recipe.py:4 long: 81 lines"]
    (root / "core" / "heavy.py").write_text("import torch\nif True:\n    pass\n\n\ndef f():\n    import transformers\n",
                                           encoding="utf-8")
    assert heavy_at_module_level(root / "core" / "heavy.py") == ["torch"]


CHECKER = """
import importlib, sys
heavy = {heavy!r}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded = sorted(heavy & set(sys.modules))
    if loaded:
        sys.exit(f"{{name}} imports {{', '.join(loaded)}} at import time")
"""


def light_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(socratune.__path__, "socratune.")]
    return sorted(set(names) - TRAINING_MODULES)


def check_imports(modules: list[str], extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """Import ``modules`` one by one in a fresh interpreter; fails naming the first that loads a
    heavy module."""
    path = os.pathsep.join(p for p in (str(extra_path) if extra_path else "", SRC) if p)
    return subprocess.run([sys.executable, "-c", CHECKER.format(heavy=HEAVY), *modules], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120, check=False)


@pytest.mark.slow
def test_lower_layers_import_no_torch_or_transformers():
    modules = light_modules()
    assert {"socratune.core.config", "socratune.core.errors", "socratune.core.rundir", "socratune.core.scores",
            "socratune.data.dialogues", "socratune.data.split", "socratune.data.template",
            "socratune.training.jobs", "socratune.evaluation.report", "socratune.cli"} <= set(modules)
    result = check_imports(modules)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_the_checker_fails_on_a_module_that_imports_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("", encoding="utf-8")  # a stand-in: fast, and enough
    (tmp_path / "bad_layer.py").write_text("import socratune.core.config\nimport torch\n", encoding="utf-8")
    result = check_imports(["socratune.core.errors", "bad_layer", "socratune.data.dialogues"], extra_path=tmp_path)
    assert result.returncode == 1
    assert "bad_layer imports torch at import time" in result.stderr
