#!/usr/bin/env bash
# dopt deploy on the shipped Fashion-MNIST network: a passing, signed run, its verification,
# a tampered copy refused, and a run with a tightened gate that fails with exit code 1.
# Usage: bash demos/deploy/run_demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/demos/deploy"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
python3 -m demos.deploy.prepare
python3 -m dopt deploy -c "$HERE/deploy.yaml"                       # exit 0: every gate passes
python3 -m dopt verify "$HERE/out/build" --key "$HERE/keys/demo.pub"
python3 -m dopt run --om "$HERE/out/build/model.om" --verify-signature "$HERE/keys/demo.pub"
# a tampered copy is refused, naming the file
rm -rf "$HERE/out_tampered" && cp -r "$HERE/out/build" "$HERE/out_tampered"
printf '\x00' | dd of="$HERE/out_tampered/quant_param.json" bs=1 seek=100 conv=notrunc status=none
if python3 -m dopt verify "$HERE/out_tampered" --key "$HERE/keys/demo.pub"; then
    echo "a tampered build verified" >&2; exit 1
fi
# the same model with the size budget tightened below the build: exit 1, gate named
set +e
python3 -m dopt deploy -c "$HERE/deploy_tight.yaml"
rc=$?
set -e
if [ "$rc" -ne 1 ]; then echo "expected exit 1 from the tightened run, got $rc" >&2; exit 1; fi
grep -o 'name="size.max_mb"' "$HERE/out_tight/junit.xml"
echo "demo done: $HERE/out/report.html (passed), $HERE/out_tight/report.html (failed)"
