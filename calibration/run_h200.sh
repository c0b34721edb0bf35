#!/usr/bin/env bash
# Calibrate vramcalc on one H200 (or any CUDA GPU) in about 8 minutes. Writes under $OUT: measurements.csv,
# profile-<gpu>.json, report.txt, measured_vs_estimated.png, scenarios.json, errors.log and log.txt.
#
# The GPU machine needs: Python with a CUDA build of torch, accelerate, nvidia-ml-py, numpy, matplotlib and tqdm
# (`pip install 'vramcalc[calibrate]'` installs them), and the versions of transformers, peft and bitsandbytes the
# estimate and the trace were checked against (PINS below; bitsandbytes 0.50.2 ships kernels for CUDA 13.0).
#
# A GPU machine that can reach PyPI: run the script from a checkout of this repository; it installs PINS.
#   calibration/run_h200.sh
# A GPU machine without internet access (an air-gapped or firewalled node):
#   1. on any x86_64 Linux machine that can reach PyPI, in the checkout:
#        calibration/run_h200.sh --fetch-wheels      # PINS as wheels into build/wheels (about 58 MB)
#      (WHEEL_PYTHON, default 3.12, must be the GPU machine's Python version: `python3 --version` there);
#   2. copy the checkout with build/wheels to the GPU machine (rsync, scp; build/ is ignored by git);
#   3. there: calibration/run_h200.sh                # installs the wheels into /tmp/site, then measures.
#   Without wheels and without a registry it measures with whatever versions are installed, and says so.
#
# Environment: OUT (default /tmp/vramcalc-h200), DEVICE (default cuda:0; `DEVICE=cpu` runs the whole script on
# a machine without a GPU, as a smoke test), BUDGET_MINUTES (measuring, default 6), HARD_LIMIT_S (measuring stops
# here whatever happens, default 450), SCENARIO_TIMEOUT_S (per scenario, default 120), PYTHON (default python3),
# WHEELS (default build/wheels), WHEEL_PYTHON (default 3.12). Run it from anywhere: it works in the repository root.
# Afterwards, copy profile-<gpu>.json to calibration/profiles/<gpu>.json so that `estimate(..., gpu=...)` uses it.
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
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp \
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
  "$PY" -m pip install -q "${PINS[@]}" || echo "no wheels in $WHEELS and no registry: using the installed packages"
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
echo "== done $(date -u +%FT%TZ): copy $OUT/profile-<gpu>.json to calibration/profiles/<gpu>.json and" \
     "$OUT/measurements.csv to calibration/runs/<gpu>/measurements.csv"
