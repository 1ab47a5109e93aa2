#!/usr/bin/env bash
# JupyterLab on the notebooks, on loopback only (`make lab`; the server test runs it too).
# The file browser opens notebooks/; kernels start in the repository root, as under
# `make reproduce`, so the notebooks' relative output directories (results/, figures/) are the
# repository's. Extra arguments go to JupyterLab (e.g. --ServerApp.port=8890).
# PYTHON: the interpreter of the environment with the notebooks extra (default: .venv's).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
as_root=()
if [ "$(id -u)" = 0 ]; then as_root=(--allow-root); fi  # containers and CI run as root
exec "$python" -m jupyterlab \
  --ServerApp.ip=127.0.0.1 \
  --ServerApp.open_browser=False \
  --ServerApp.root_dir="$root/notebooks" \
  --MappingKernelManager.root_dir="$root" \
  "${as_root[@]}" "$@"
