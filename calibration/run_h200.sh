#!/usr/bin/env bash
# Calibrate vramcalc on one H200 (or any CUDA GPU) in about 9 minutes: the default grid, the QLoRA panel and the
# loading panel. Writes under $OUT: measurements.csv, profile-<gpu>.json, report.txt, measured_vs_estimated.png,
# scenarios.json, errors.log (the grid); qlora/ (the panel of calibration/qlora_panel.csv, same files);
# loading/loading.csv (vramcalc/calibrate/loading.py: a real from_pretrained 4-bit load, peft's
# prepare_model_for_kbit_training, training steps); log.txt.
#
# The GPU machine needs: Python with a CUDA build of torch, nvidia-ml-py, numpy, matplotlib and tqdm, and the
# versions of transformers, peft, bitsandbytes and accelerate the estimate and the trace were checked against
# (tests/constraints.txt; PINS below, with what transformers 5.25 needs of huggingface_hub 2.x; bitsandbytes 0.50.2
# ships kernels for CUDA 13.0).
#
# A GPU machine that can reach PyPI: run the script from a checkout of this repository; it installs PINS.
#   calibration/run_h200.sh
# A GPU machine without internet access (an air-gapped or firewalled node):
#   1. on any x86_64 Linux machine that can reach PyPI, in the checkout:
#        calibration/run_h200.sh --fetch-wheels      # PINS as wheels into build/wheels
#      (WHEEL_PYTHON, default 3.12, must be the GPU machine's Python version: `python3 --version` there);
#   2. copy the checkout with build/wheels to the GPU machine (rsync, scp; build/ is ignored by git);
#   3. there: calibration/run_h200.sh                # installs the wheels into /tmp/site, then measures.
#   Without wheels and without a registry it measures with whatever versions are installed, and says so.
#
# Order: one small preflight scenario (a library that does not import, or a GPU that cannot run a step, ends the
# script there, in seconds, with the traceback), the grid for GRID_S seconds, the QLoRA panel, the loading panel,
# then the fits. Each stage stops at its own limit whatever happens; a measured row is never lost.
#
# Environment: OUT (default /tmp/vramcalc-h200), DEVICE (default cuda:0; `DEVICE=cpu` runs the whole script on a
# machine without a GPU, as a smoke test: toy models, and a loading panel on SmolLM2-135M that reads no peaks),
# GRID_S (default 310), PANEL_S (default 90), LOADING_S (default 100), SCENARIO_TIMEOUT_S (per scenario, default 90),
# PYTHON (default python3), WHEELS (default build/wheels), WHEEL_PYTHON (default 3.12). Run it from anywhere: it
# works in the repository root.
# Afterwards, copy profile-<gpu>.json to calibration/profiles/<gpu>.json so that `estimate(..., gpu=...)` uses it.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-build/wheels}
PINS=(bitsandbytes==0.50.2 transformers==5.25.0 peft==0.21.2 accelerate==1.16.0
      huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 hf-xet==1.8.0 click==8.5.1 truststore==0.10.5
      idna==3.20 anyio==4.16.0 typing_extensions==4.16.0 regex==2026.11.19 kernels==0.19.1 tomlkit==0.15.3)
GRID_S=${GRID_S:-310}
PANEL_S=${PANEL_S:-90}
LOADING_S=${LOADING_S:-100}
SCENARIO_TIMEOUT_S=${SCENARIO_TIMEOUT_S:-90}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${PINS[@]}"
fi

OUT=${OUT:-/tmp/vramcalc-h200}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1   # everything below also goes to $OUT/log.txt
# USE_HUB_KERNELS=NO: with `kernels` installed (transformers 5.25 needs it), from_pretrained on CUDA swaps in Hub
# kernels (kernels-community/rotary), which an offline machine cannot fetch and the trace does not model.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=NO

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
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub", "pynvml", "matplotlib",
             "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "MISSING:", error)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
'

calibrate() {  # LIMIT_S, then the harness's arguments; SIGTERM at the limit keeps every recorded row
  local limit=$1; shift
  timeout --signal=TERM --kill-after=15 "$limit" "$PY" -m vramcalc.calibrate --device "$DEVICE" \
    --scenario-timeout "$SCENARIO_TIMEOUT_S" --no-install-profile --progress "$@"
}

# 1. Preflight: the smallest scenario; a failure here ends the run before the grid spends the GPU's time.
preflight_model=smollm2-135m; [[ "$DEVICE" == cpu ]] && preflight_model=tiny-llama
printf 'model,method,precision,optimizer,batch_size,seq_len,grad_ckpt,attn\n%s,lora,bf16,adamw,1,256,false,sdpa\n' \
  "$preflight_model" > /tmp/vramcalc-preflight.csv
calibrate 120 --scenarios /tmp/vramcalc-preflight.csv --out "$OUT/preflight" --budget-minutes 2 --no-plot
if ! grep -q ',ok,' "$OUT/preflight/measurements.csv" 2>/dev/null; then
  echo "== preflight failed: the grid is not run"
  cat "$OUT/preflight/errors.log" 2>/dev/null | tail -40
  exit 3
fi

# 2. The default grid: the budget order spreads every axis over the first scenarios, so a cut keeps the span.
calibrate "$GRID_S" --out "$OUT" --resume --budget-minutes "$(awk "BEGIN {print ($GRID_S - 20) / 60}")" \
  || { echo "== grid ended with status $?: fitting what was recorded"
       "$PY" -m vramcalc.calibrate --fit-only --out "$OUT" --no-install-profile; }

# 3. The QLoRA panel (calibration/qlora_panel.csv): kbit preparation on and off, checkpointing on and off.
calibrate "$PANEL_S" --scenarios calibration/qlora_panel.csv --out "$OUT/qlora" --budget-minutes 10 --no-plot \
  || echo "== QLoRA panel ended with status $?"

# 4. The loading panel: a real from_pretrained of a 4-bit model, phase by phase (on the CPU: a tiny model, no peaks).
loading_model=llama-3.2-3b; [[ "$DEVICE" == cpu ]] && loading_model=smollm2-135m
timeout --signal=TERM --kill-after=15 "$LOADING_S" "$PY" -m vramcalc.calibrate.loading --device "$DEVICE" \
  --model "$loading_model" --out "$OUT/loading" || echo "== loading panel ended with status $?"
echo "== done $(date -u +%FT%TZ): copy $OUT/profile-<gpu>.json to calibration/profiles/<gpu>.json and" \
     "$OUT/measurements.csv to calibration/runs/<gpu>/measurements.csv"
