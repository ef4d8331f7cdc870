"""The README's set-up commands are the ones CI runs, so the first thing a user types is tested."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_opens_with_the_commands_ci_runs_then_socratune_train():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert len(first_block) == 3 and first_block[2] == "socratune train"
    for command in first_block[:2]:
        assert command in ci


def _pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file, names normalised as pip does."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_install_goes_through_the_tested_version_set():
    """Every pip install of the README's first command, which CI runs too, takes constraints.txt,
    and that file pins each dependency pyproject.toml names, torch included, exactly."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).strip().splitlines()[0]
    pip_installs = [part.strip() for part in install.split("&&") if part.strip().startswith("pip install")]
    assert len(pip_installs) == 2 and all("-c constraints.txt" in part for part in pip_installs), install
    assert install in (ROOT / ".ci" / "run").read_text(encoding="utf-8")

    pins = _pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE).group(1)
    test_block = re.search(r"^test = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE).group(1)
    required = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", spec).group(0)).lower()
                for spec in re.findall(r'^\s*"([^"]+)"', block + test_block, re.MULTILINE)}
    assert {"torch", "transformers", "peft", "pytest"} <= required
    assert required <= set(pins), f"not pinned: {sorted(required - set(pins))}"
    assert "socratune" not in pins


def test_the_update_command_is_documented_and_guards_the_file():
    script = (ROOT / "scripts" / "update_constraints.sh").read_text(encoding="utf-8")
    development = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    assert "bash scripts/update_constraints.sh" in development
    # the suite runs before constraints.txt is rewritten, and a failure leaves it alone
    assert script.index("python -m pytest -q") < script.index("> constraints.txt")


def test_the_python_example_imports_names_that_exist():
    """The README's ``from socratune... import ...`` lines name modules and top-level names that the
    package has (read with ast: no model stack is imported)."""
    import ast

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    imports = [node for node in ast.parse(block).body if isinstance(node, ast.ImportFrom)]
    assert len(imports) >= 4
    for node in imports:
        path = ROOT / "src" / Path(*node.module.split(".")).with_suffix(".py")
        assert path.is_file(), f"README imports {node.module}, which is not a module"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        for alias in node.names:
            assert alias.name in defined, f"README imports {alias.name} from {node.module}, which does not define it"
