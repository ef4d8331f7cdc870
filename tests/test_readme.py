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
