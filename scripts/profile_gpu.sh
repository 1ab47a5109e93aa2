#!/usr/bin/env bash
# Measure step times on a GPU with PyTorch + transformers alone (no vLLM), and fit the roofline
# to them: the measured table and the calibrated factors for the simulator's catalog.
#
#   scripts/profile_gpu.sh [OUT_DIR] [GPU_NAME] [MODELS...]
#     OUT_DIR   where the tables go (default: $OUT if set, else results/gpu)
#     GPU_NAME  the catalog GPU the run is on (default: h200-141gb)
#     MODELS    catalog models to profile (default: llama-2-7b opt-13b)
#
# For each model: econoserve profile-gpu (bf16, SDPA, the GPU grid of
# econoserve.profiling.torch_steps.GPU_GRID) writes MODEL_steps.csv and MODEL_steps.json, then
# econoserve calibrate writes MODEL_calibration.json (the roofline's error before and after, and
# the fitted factors, in the format of the catalog's ROOFLINE_CALIBRATIONS). Needs python3 with
# torch, transformers, numpy, pandas, scipy and tqdm; run from the repository root.
# About 2-4 minutes per model on an H100/H200 (model built with random weights on the GPU).
set -euo pipefail
OUT_DIR=${1:-${OUT:-results/gpu}}
GPU_NAME=${2:-h200-141gb}
shift $(( $# > 2 ? 2 : $# )) || true
MODELS=("$@")
[ ${#MODELS[@]} -eq 0 ] && MODELS=(llama-2-7b opt-13b)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

"$PYTHON" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "transformers", "numpy", "pandas", "scipy", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"profile_gpu.sh: missing Python packages: {', '.join(missing)}")
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available() and torch.cuda.get_device_name(0)}")
if not torch.cuda.is_available():
    sys.exit("profile_gpu.sh: PyTorch sees no CUDA device")
PY

for model in "${MODELS[@]}"; do
    echo "== $model on $GPU_NAME"
    "$PYTHON" -m econoserve profile-gpu --model "$model" --device cuda --no-progress -o "$OUT_DIR/${model}_steps.csv"
    "$PYTHON" -m econoserve calibrate --steps "$OUT_DIR/${model}_steps.csv" --model "$model" --gpu "$GPU_NAME" \
        -o "$OUT_DIR/${model}_calibration.json"
done
