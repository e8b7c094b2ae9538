#!/usr/bin/env bash
# Refresh constraints.txt: install the newest releases pyproject.toml's ranges allow into a
# throw-away venv, and pin exactly what came. scripts/setup.sh (and so CI and the README's
# commands) installs from that file; the package's own requirements stay ranges.
#   bash scripts/lock.sh && bash scripts/test.sh   # then commit constraints.txt if green
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools
$pip install -q "torch==2.13.0"  # a CPU wheel on the project's machines; see setup.sh
$pip install -q -e ".[test,bench]"
{
  echo "# Exact versions for scripts/setup.sh, CI and the README's commands."
  echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version); do not edit by hand."
  $pip freeze --all --exclude-editable | grep -v '^xllm' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
