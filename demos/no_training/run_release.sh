#!/usr/bin/env bash
# The reference tool's no-training flow, end to end: prepare the model and calibration set,
# quantize with dopt_so (its flags, unchanged), compile with dopt omg, run on the emulated NPU.
# Usage: bash demos/no_training/run_release.sh [OUT_DIR] [bin|image]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$ROOT/demos/no_training/out}"
MODE="${2:-bin}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python3 -m demos.no_training.prepare --out "$OUT"
cd "$OUT"
cp "$ROOT/dopt_so.py" ./dopt_so.py
python3 ./dopt_so.py --framework 5 --mode 0 --model ./m.onnx --cal_conf "./config_$MODE.prototxt" \
    --output ./m_quant.onnx --input_shape input:1,1,28,28 --compress_conf ./m_param
python3 -m dopt omg --framework 5 --model m_quant.onnx --compress_conf m_param --output m_int8
python3 -m demos.no_training.evaluate --dir .
