#!/usr/bin/env bash
# Calibrate vramcalc on a bare H200 machine in about 8 minutes: measurements.csv, profile-h200.json, report.txt,
# measured_vs_estimated.png, scenarios.json, errors.log and log.txt under $OUT (7 files).
#
# Here (a machine with a package registry), once:   calibration/run_h200.sh --fetch-wheels
#   downloads the pinned wheels the GPU machine lacks into build/wheels (ignored by git; about 58 MB).
# There (no registry; run from anywhere, it works in the repository root):
#   calibration/run_h200.sh            with build/wheels carried along (device tool: carry ["build/wheels"])
# Environment: OUT (default /tmp/vramcalc-h200), DEVICE (cuda:0; cpu for a smoke test of this script here),
# BUDGET_MINUTES, HARD_LIMIT_S, SCENARIO_TIMEOUT_S, PYTHON, WHEELS.
#
# What the GPU image has (.library/device/KINDS.md, 2026-11): python3 3.12 with torch 2.11 (cu130), accelerate
# 1.15, nvidia-ml-py, numpy, matplotlib, tqdm, peft, transformers 5.17; no bitsandbytes. transformers 5.17 lacks
# activation_checkpointing_enable, which the model builder calls, so the versions the estimator and trace were
# developed against are installed over the image's: bitsandbytes 0.50.2 (ships libbitsandbytes_cuda130),
# transformers 5.24.0, peft 0.21.2 (their other requirements are in the image).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-build/wheels}
PINS=(bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2)
BUDGET_MINUTES=${BUDGET_MINUTES:-6}     # measuring; the fit, report and plot take seconds after it
HARD_LIMIT_S=${HARD_LIMIT_S:-450}       # whatever happens, measuring stops here and the fit runs on what is recorded
SCENARIO_TIMEOUT_S=${SCENARIO_TIMEOUT_S:-120}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${PINS[@]}"
fi

OUT=${OUT:-/tmp/vramcalc-h200}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1   # everything below also goes to $OUT/log.txt
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  "$PY" -m pip install -q "${PINS[@]}" || echo "no wheels in $WHEELS and no registry: using the image's packages"
  export PYTHONPATH="$PWD"
fi
"$PY" -c '
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pynvml", "matplotlib", "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "MISSING:", error)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
'

# Measure. SIGTERM at the hard limit: the scenario in flight is dropped, every recorded row stays.
timeout --signal=TERM --kill-after=20 "$HARD_LIMIT_S" "$PY" -m vramcalc.calibrate --device "$DEVICE" \
  --budget-minutes "$BUDGET_MINUTES" --scenario-timeout "$SCENARIO_TIMEOUT_S" --out "$OUT" --resume \
  --no-install-profile --progress
status=$?
if [[ $status -ne 0 ]]; then
  echo "== measuring ended with status $status: fitting what was recorded"
  "$PY" -m vramcalc.calibrate --fit-only --out "$OUT" --no-install-profile
fi
echo "== done $(date -u +%FT%TZ): copy $OUT/profile-h200.json to calibration/profiles/h200.json and" \
     "$OUT/measurements.csv to calibration/runs/h200/measurements.csv"
