#!/usr/bin/env bash
# Move the tested version set forward, on purpose: install the newest versions pyproject.toml allows
# into a fresh virtual environment, run the whole suite there, and only if it passes rewrite
# constraints.txt from what was installed. Commit the new file on its own, with the suite's result.
#
#   bash scripts/update_constraints.sh            # torch stays at the README's pin
#   TORCH_VERSION=2.14.1 bash scripts/update_constraints.sh
#
# On a failure constraints.txt is left as it is and the versions that failed are kept in
# constraints.failed.txt: compare the two to find the upstream release that broke the suite
# (docs/development.md, "Versions").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
torch_version="${TORCH_VERSION:-$(sed -n 's/^torch==\([^ ]*\).*/\1/p' constraints.txt)}"
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

python3 -m venv "$workdir/venv"
. "$workdir/venv/bin/activate"
pip install --quiet "torch==$torch_version"
pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
pip freeze --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/' > "$workdir/freeze.txt"

if ! python -m pytest -q; then
  cp "$workdir/freeze.txt" constraints.failed.txt
  echo "the suite failed on the newest allowed versions: constraints.txt is unchanged;" \
       "the versions tried are in constraints.failed.txt (diff it against constraints.txt)" >&2
  exit 1
fi
{
  echo "# The versions the whole suite last passed with (python -m pytest -q, $(date -u +%Y-%m-%d), Python $(python -c 'import platform; print(platform.python_version())'))."
  echo "# The README's install command and .ci/run install through this file; pyproject.toml keeps the ranges."
  echo "# Written by scripts/update_constraints.sh: do not edit by hand."
  cat "$workdir/freeze.txt"
} > constraints.txt
rm -f constraints.failed.txt
echo "constraints.txt now holds the versions the suite passed with; review the diff and commit it on its own"
