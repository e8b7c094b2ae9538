#!/usr/bin/env bash
# Create .venv and install xllm with its test and benchmark tools. Idempotent: a re-run with an
# unchanged pyproject.toml does nothing. torch is pinned here (a CPU wheel on the
# project's machines); the package itself accepts any torch >= 2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.xllm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,bench]"
  .venv/bin/python -c "import xllm_ops; xllm_ops.warm_up()"  # compile the C++ kernels once
  echo "$want" > "$stamp"
fi
