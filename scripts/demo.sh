#!/usr/bin/env bash
# The README's run command: set up, then launch the default model and send it requests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m xllm.demo "$@"
