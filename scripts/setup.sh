#!/usr/bin/env bash
# Create .venv and install xllm with its test and benchmark tools, at the exact versions of
# constraints.txt (refresh it with scripts/lock.sh). Idempotent: a re-run with unchanged
# pyproject.toml and constraints.txt does nothing. torch is pinned there too (a CPU wheel on
# the project's machines); the package itself accepts any torch >= 2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests start a real etcd (Debian's etcd-server 3.4) for the multi-host metadata store,
# over TLS too (with certificates made by the openssl command).
if ! command -v etcd >/dev/null || ! command -v openssl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client openssl >/dev/null
  else
    echo "setup: etcd or openssl is not installed; the metastore tests need them (apt-get install etcd-server etcd-client openssl)" >&2
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.xllm-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # NOTE: as an environment variable the constraints also reach pip's build environments
  export PIP_CONSTRAINT="$PWD/constraints.txt"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,bench]"
  .venv/bin/python -c "import xllm_ops; xllm_ops.warm_up()"  # compile the C++ kernels once
  echo "$want" > "$stamp"
fi
