"""The layers of the package (code map: ``src/socratune/__init__.py``) are enforced here: every
module except the training recipe and its Trainer parts imports no torch or transformers at
import time, so ``socratune --help``, ``validate``, ``score`` and ``status`` stay instant and the
lower layers stay usable without a deep-learning stack.

Modules are found by walking the package, so a new module is checked without being listed. The
checker itself is tested on a deliberately bad module, with a stand-in ``torch``.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import socratune

HEAVY = {"torch", "transformers"}
# The recipe and the Trainer's parts: built on transformers by nature, imported only by `train`.
TRAINING_MODULES = {"socratune.training.train", "socratune.training.hf_trainer", "socratune.training.callbacks",
                    "socratune.training.preference", "socratune.training.progress", "socratune.__main__"}
SRC = str(Path(socratune.__file__).resolve().parents[1])

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
    assert {"socratune.core.config", "socratune.data.dialogues", "socratune.data.split", "socratune.core.rundir",
            "socratune.core.errors", "socratune.data.template", "socratune.core.scores",
            "socratune.evaluation.report", "socratune.cli"} <= set(modules)
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
