#!/usr/bin/env bash
# NASEA on Fashion-MNIST with TensorFlow (Keras 3) and the reference's command line: run it
# in this folder (the search reads user_module.py from the current folder and writes
# log_classification/, results/ and nas_state/ here). Interrupt and run again to resume.
set -euo pipefail
cd "$(dirname "$0")"
python3 ../../dopt_so.py -c scen.yaml "$@"
