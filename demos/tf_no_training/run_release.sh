#!/usr/bin/env bash
# The reference's TensorFlow no-training demo (tensorflow_mnist/run_release.sh), end to end:
# a frozen mnist-style .pb and an image folder -> dopt_so (reference flags) -> dopt omg
# --framework 3 -> the emulated NPU.
# Usage: bash demos/tf_no_training/run_release.sh [OUT_DIR] [image|bin]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$ROOT/demos/tf_no_training/out}"
MODE="${2:-image}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python3 -m demos.tf_no_training.prepare --out "$OUT"
mkdir -p "$OUT/basemodel"
cp "$ROOT/demos/tf_no_training/basemodel/mnist.pb" "$OUT/basemodel/mnist.pb"
cd "$OUT"
cp "$ROOT/dopt_so.py" ./dopt_so.py
python3 ./dopt_so.py --mode 0 --framework 3 --model ./basemodel/mnist.pb \
    --cal_conf "./config_$MODE.prototxt" --output ./mnist_quant.pb --input_format NHWC \
    --input_shape "input:1,28,28,1" --out_nodes "output" --compress_conf ./param_file
python3 -m dopt omg --framework 3 --model mnist_quant.pb --input_shape "input:1,28,28,1" \
    --out_nodes "output:0" --compress_conf param_file --output mnist_int8
python3 -m demos.tf_no_training.evaluate --dir .
